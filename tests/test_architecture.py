"""The layout's contract (ARCHITECTURE.md, "Dependencies"), checked over every module's source.

Imports are read with `ast`, those inside functions and those for type checking included, so a
rule cannot be kept by hiding an import. The rules:

1. the core (`pipeline.detector`, `pipeline.errors`, `pipeline.lazy`) imports, of aewatch, only
   the core (and `pipeline` itself, for the version), and of other packages only numpy, torch and
   the standard library;
2. the modalities, event vocabulary and batch scoring that both sides share
   (`pipeline.modalities`, `pipeline.events`, `pipeline.batch`) import only the core, each other
   and the Kafka protocols (types of records);
3. nothing in `pipeline` imports `training`;
4. kafka-python is imported by `pipeline.kafka_io.kafka_python` and by nothing else, and
   confluent-kafka by `pipeline.kafka_io.confluent*` only;
5. mlflow is imported by `training.tracking` (runs, registration, promotion), and on the scoring
   side by `pipeline.registry.client` (reading the registry) and `pipeline.registry.pyfunc` (the
   model MLflow runs), and by nothing else;
6. the environment (`os.environ`, `os.getenv`, `os.putenv`) is touched only by the command line
   (`pipeline.cli`, `pipeline.worker.cli`, `training.cli.*`) and by `training.tracking`, which
   puts back the registry URI MLflow exports;
7. no module is longer than 400 lines unless its docstring says why (a line starting `Size:`).
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CORE = ("pipeline.detector", "pipeline.errors", "pipeline.lazy")
SHARED = ("pipeline.modalities", "pipeline.events", "pipeline.batch")
KAFKA_CLIENT = {"pipeline.kafka_io.kafka_python"}
CONFLUENT_CLIENT = {
    "pipeline.kafka_io.confluent",
    "pipeline.kafka_io.confluent_records",
    "pipeline.kafka_io.confluent_sink",
}
MLFLOW_USERS = {"training.tracking", "pipeline.registry.client", "pipeline.registry.pyfunc"}
ENVIRONMENT_USERS = ("pipeline.cli", "pipeline.worker.cli", "training.cli", "training.tracking")
CORE_PACKAGES = {"numpy", "torch"}
MAX_LINES = 400


def _module(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _sources() -> dict[str, tuple[Path, ast.Module]]:
    files = [*(ROOT / "pipeline").rglob("*.py"), *(ROOT / "training").rglob("*.py")]
    return {_module(p): (p, ast.parse(p.read_text(), str(p))) for p in sorted(files)}


SOURCES = _sources()


def _imports(tree: ast.Module) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module)
    return names


IMPORTS = {module: _imports(tree) for module, (_, tree) in SOURCES.items()}


def _within(name: str, prefixes) -> bool:
    return any(name == p or name.startswith(p + ".") for p in prefixes)


def _ours(name: str) -> bool:
    return _within(name, ("pipeline", "training"))


def _importers(package: str) -> set[str]:
    return {m for m, names in IMPORTS.items() if any(_within(n, (package,)) for n in names)}


def test_the_sources_are_found():
    assert {"pipeline.worker.loop", "pipeline.detector.detector", "training.job"} <= set(SOURCES)


@pytest.mark.parametrize("module", [m for m in SOURCES if _within(m, CORE)])
def test_the_core_imports_neither_side(module):
    for name in IMPORTS[module]:
        if _ours(name):
            assert name == "pipeline" or _within(name, CORE), f"{module} imports {name}"
        else:
            top = name.split(".")[0]
            assert top in sys.stdlib_module_names or top in CORE_PACKAGES, (
                f"{module} imports {name}: the core takes numpy and torch only"
            )


@pytest.mark.parametrize("module", [m for m in SOURCES if _within(m, SHARED)])
def test_what_both_sides_share_imports_only_the_core(module):
    allowed = (*CORE, *SHARED, "pipeline.kafka_io.protocols")
    for name in IMPORTS[module]:
        if _ours(name):
            assert _within(name, allowed), f"{module} imports {name}"


def test_pipeline_never_imports_training():
    offenders = {m for m in _importers("training") if _within(m, ("pipeline",))}
    assert offenders == set()


def test_only_the_kafka_client_imports_kafka_python():
    assert _importers("kafka") == KAFKA_CLIENT


def test_only_the_confluent_client_imports_confluent_kafka():
    assert _importers("confluent_kafka") == CONFLUENT_CLIENT


def test_only_the_tracking_and_registry_modules_import_mlflow():
    assert _importers("mlflow") == MLFLOW_USERS


def _touches_environment(tree: ast.Module) -> bool:
    names = ("environ", "getenv", "putenv")
    for node in ast.walk(tree):
        attribute = isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name)
        if attribute and node.value.id == "os" and node.attr in names:
            return True
        imported = isinstance(node, ast.ImportFrom) and node.module == "os"
        if imported and any(a.name in names for a in node.names):
            return True
    return False


def test_only_the_command_line_touches_the_environment():
    touching = {m for m, (_, tree) in SOURCES.items() if _touches_environment(tree)}
    assert {m for m in touching if not _within(m, ENVIRONMENT_USERS)} == set()


@pytest.mark.parametrize("module", sorted(SOURCES))
def test_long_modules_say_why(module):
    path, tree = SOURCES[module]
    lines = len(path.read_text().splitlines())
    if lines > MAX_LINES:
        doc = ast.get_docstring(tree) or ""
        assert any(line.startswith("Size:") for line in doc.splitlines()), (
            f"{module} has {lines} lines and no 'Size:' note in its docstring"
        )
