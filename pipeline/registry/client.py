"""Reading detectors from the MLflow model registry (the worker's and the CLI's side; the training
job is the only writer).

A model reference is either a local artifact folder or `models:/NAME@ALIAS` / `models:/NAME/VERSION`.
A registered version is downloaded, its detector folder found through the MLmodel file, and loaded
with its weights' SHA-256 and the digest of the whole artifact (manifest and weights) checked
against the version tags that registration wrote; a version without them is refused.

The other files of the MLflow model (`MLmodel`, the pyfunc's code, its environment files, the
input example) are listed with their SHA-256 in a third tag, `aewatch.package_files`; a download
that holds a file the listing does not, lacks one, or has one that differs is refused too (a
version registered before the listing existed is checked by the two digests alone).
"""

from __future__ import annotations

import json
import logging
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path

import yaml

from pipeline.detector import Detector, load_detector, read_manifest, sha256_file
from pipeline.errors import ArtifactError, RegistryError, one_line
from pipeline.events import ModelIdentity
from pipeline.registry.reach import probe, unreachable_error

__all__ = [
    "TAG_PREFIX",
    "ModelRef",
    "alias_version",
    "download_version",
    "load_model",
    "log_run_metrics",
    "package_files",
    "parse_model_uri",
    "resolve_model",
    "version_run_id",
]

log = logging.getLogger(__name__)

TAG_PREFIX = "aewatch."
_SHA256 = re.compile(r"[0-9a-f]{64}")
# written by the registry into the logged model when a version is made of it, not part of it
_REGISTRY_FILES = frozenset({"registered_model_meta"})
_URI = re.compile(r"^models:/(?P<name>[^/@]+)(?:@(?P<alias>[^/]+)|/(?P<version>\d+))$")


@dataclass(frozen=True)
class ModelRef:
    """Where a detector came from: a registry version (name, version, alias) or a folder."""

    uri: str
    directory: Path
    name: str | None = None
    version: str | None = None
    alias: str | None = None
    weights_sha256: str | None = None
    artifact_sha256: str | None = None
    package: Path | None = None  # the downloaded MLflow model folder
    package_files: str | None = None  # its files' listing, as registration tagged it

    @property
    def label(self) -> str:
        return f"{self.name} v{self.version}" if self.name else str(self.directory)

    def identity(self) -> ModelIdentity:
        """Name and version as events carry them; a folder is named by its weights' hash."""
        if self.name:
            return ModelIdentity(self.name, str(self.version), self.alias)
        return ModelIdentity(self.directory.resolve().name, f"sha-{self.weights_sha256[:12]}")


def parse_model_uri(uri: str) -> tuple[str, str | None, str | None] | None:
    """(name, alias, version) of a registry URI; None for anything else (a local folder)."""
    if not uri.startswith("models:/"):
        return None
    match = _URI.match(uri)
    if not match:
        raise RegistryError(f"{uri}: use models:/NAME@ALIAS or models:/NAME/VERSION")
    return match["name"], match["alias"], match["version"]


def package_files(model_dir: str | Path) -> dict[str, str]:
    """{relative path: SHA-256} of every file of a downloaded MLflow model folder."""
    root = Path(model_dir)
    return {
        path.relative_to(root).as_posix(): sha256_file(path)
        for path in sorted(root.rglob("*"))
        if path.is_file() and path.relative_to(root).as_posix() not in _REGISTRY_FILES
    }


def _check_package(ref: ModelRef) -> None:
    """The downloaded model's files against the listing registration tagged; ArtifactError
    naming the first file that is new, missing or changed."""
    try:
        listed = json.loads(ref.package_files)
        if not isinstance(listed, dict):
            raise ValueError("not an object")
    except ValueError as exc:
        raise ArtifactError(
            f"{ref.label}: the {TAG_PREFIX}package_files tag is unreadable ({exc})",
            reason="package_digest",
        ) from None
    found = package_files(ref.package)
    for path in sorted(set(listed) | set(found)):
        if path not in listed:
            problem = "is not among the files registered"
        elif path not in found:
            problem = "is missing"
        elif found[path] != listed[path]:
            problem = f"differs from the file registered (SHA-256 {found[path][:12]}...)"
        else:
            continue
        raise ArtifactError(
            f"{ref.label}: the MLflow model's file {path} {problem}; refusing the version",
            reason="package_digest",
        )


def _client(tracking_uri: str | None):
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)


def _registry_error(uri: str | None, what: str, exc: Exception) -> RegistryError:
    """A network error as `RegistryUnreachable`, MLflow's refusals as `RegistryError` on
    `what`; anything else is raised as it is."""
    from mlflow.exceptions import MlflowException

    unreachable = unreachable_error(uri, exc)
    if unreachable is not None:
        return unreachable
    if not isinstance(exc, MlflowException):
        raise exc
    return RegistryError(f"{what}: {exc.message}")


def alias_version(name: str, alias: str, *, tracking_uri: str | None) -> str:
    """The version an alias points to now; `RegistryUnreachable` if the server cannot be
    reached, `RegistryError` if it cannot say."""
    probe(tracking_uri)
    try:
        return str(_client(tracking_uri).get_model_version_by_alias(name, alias).version)
    except Exception as exc:  # the client raises MlflowException or requests' errors
        unreachable = unreachable_error(tracking_uri, exc)
        raise (unreachable or RegistryError(f"{name}@{alias}: {exc}")) from exc


def download_version(
    client, name: str, version: str, dst: str | Path, tracking_uri: str | None
) -> str:
    """Download a registered version's files from where `client`'s registry says they are (a
    models:/ URI would be looked up in the process's default registry instead); its folder."""
    import mlflow

    source = client.get_model_version_download_uri(name, version)
    return mlflow.artifacts.download_artifacts(
        artifact_uri=source, dst_path=str(dst), tracking_uri=tracking_uri
    )


def resolve_model(
    uri: str, *, tracking_uri: str | None = None, download_dir: str | Path | None = None
) -> ModelRef:
    """Find and download (registry) or locate (folder) the detector that `uri` names; a
    registry version goes into `download_dir`, or a new temporary folder the caller removes."""
    parsed = parse_model_uri(uri)
    if parsed is None:
        directory = Path(uri)
        if not directory.is_dir():
            raise RegistryError(f"{uri}: no such detector folder (or use models:/NAME@ALIAS)")
        sha = (read_manifest(directory).get("weights") or {}).get("sha256")
        if not isinstance(sha, str) or not _SHA256.fullmatch(sha):
            raise ArtifactError(
                f"{directory}: the manifest records no weights SHA-256 ({sha!r}); refusing "
                "unverifiable weights",
                reason="sha256",
            )
        return ModelRef(uri, directory, weights_sha256=sha)

    name, alias, version = parsed
    probe(tracking_uri)
    client = _client(tracking_uri)
    try:
        mv = (
            client.get_model_version_by_alias(name, alias)
            if alias
            else client.get_model_version(name, version)
        )
    except Exception as exc:  # MlflowException, or requests' errors once its retries are spent
        raise _registry_error(tracking_uri, uri, exc) from exc
    target = Path(download_dir or tempfile.mkdtemp(prefix="aewatch-model-"))
    target = target / f"{name}-v{mv.version}"
    try:
        local = download_version(client, name, str(mv.version), target, tracking_uri)
    except Exception as exc:  # as above
        raise _registry_error(tracking_uri, f"{uri}: download failed", exc) from exc
    tags = mv.tags or {}
    return ModelRef(
        uri=uri,
        directory=_detector_dir(Path(local)),
        name=name,
        version=str(mv.version),
        alias=alias,
        weights_sha256=tags.get(f"{TAG_PREFIX}weights_sha256"),
        artifact_sha256=tags.get(f"{TAG_PREFIX}artifact_sha256"),
        package=Path(local),
        package_files=tags.get(f"{TAG_PREFIX}package_files"),
    )


def _detector_dir(model_dir: Path) -> Path:
    """The attached detector folder, as the MLmodel file records it."""
    mlmodel = model_dir / "MLmodel"
    if not mlmodel.is_file():
        raise ArtifactError(f"{model_dir}: not an MLflow model (no MLmodel file)")
    try:
        meta = yaml.safe_load(mlmodel.read_bytes().decode()) or {}
        artifacts = meta.get("flavors", {}).get("python_function", {}).get("artifacts") or {}
        path = (artifacts.get("detector") or {}).get("path")
    except (yaml.YAMLError, ValueError, AttributeError) as exc:  # (not YAML, not a mapping)
        detail = one_line(exc, 200)
        raise ArtifactError(f"{model_dir}: the MLmodel file is unreadable: {detail}") from None
    if not path or not isinstance(path, str):
        raise ArtifactError(f"{model_dir}: the MLflow model has no 'detector' artifact")
    directory = (model_dir / path).resolve()
    if model_dir.resolve() not in directory.parents:
        raise ArtifactError(f"{model_dir}: detector artifact path escapes the model folder")
    return directory


def load_model(
    uri: str,
    *,
    tracking_uri: str | None = None,
    device: str = "cpu",
    require_calibrated: bool = True,
    download_dir: str | Path | None = None,
) -> tuple[Detector, ModelRef]:
    """Resolve, download and load a detector; a registry version must match its weights'
    SHA-256 tag, its whole-artifact digest tag and (where tagged) its files' listing. A
    registry version is downloaded into `download_dir`, which is kept, or without one into a
    temporary folder removed once the detector is loaded (the ref's `directory` and `package`
    then name where it was)."""
    if download_dir is None and parse_model_uri(uri) is not None:
        with tempfile.TemporaryDirectory(prefix="aewatch-model-") as scratch:
            return load_model(
                uri,
                tracking_uri=tracking_uri,
                device=device,
                require_calibrated=require_calibrated,
                download_dir=scratch,
            )
    ref = resolve_model(uri, tracking_uri=tracking_uri, download_dir=download_dir)
    if ref.name and not ref.weights_sha256:
        raise ArtifactError(
            f"{ref.label}: the version has no weights SHA-256 tag to verify", reason="sha256"
        )
    if ref.name and not ref.artifact_sha256:
        raise ArtifactError(
            f"{ref.label}: the version has no artifact digest tag ({TAG_PREFIX}artifact_sha256) "
            "to verify; register it again",
            reason="artifact_digest",
        )
    detector = load_detector(
        ref.directory,
        device=device,
        require_calibrated=require_calibrated,
        expected_sha256=ref.weights_sha256,
        expected_digest=ref.artifact_sha256,
    )
    if ref.package_files is not None:  # the rest of the MLflow model (its own reasons first)
        _check_package(ref)
    return detector, ref


def version_run_id(name: str, version: str, *, tracking_uri: str | None) -> str | None:
    """The MLflow run that produced a registered version (None if it names none)."""
    from mlflow.exceptions import MlflowException

    try:
        return _client(tracking_uri).get_model_version(name, version).run_id or None
    except MlflowException as exc:
        raise RegistryError(f"models:/{name}/{version}: {exc.message}") from exc


def log_run_metrics(
    run_id: str,
    metrics: dict[str, float],
    *,
    step: int,
    timestamp_ms: int,
    tracking_uri: str | None,
) -> None:
    """Append one point to each metric's history on a run (the run may be finished)."""
    from mlflow.entities import Metric
    from mlflow.exceptions import MlflowException

    points = [Metric(k, float(v), timestamp_ms, step) for k, v in sorted(metrics.items())]
    try:
        _client(tracking_uri).log_batch(run_id, metrics=points)
    except MlflowException as exc:
        raise RegistryError(f"run {run_id}: {exc.message}") from exc
