"""The whole artifact is integrity-checked: a registered version carries the digest of its manifest
and weights (canonical form) as a tag, every loader checks it, and a missing or null digest is
refused with a reason like the other refusals; the MLflow model's other files (MLmodel, the
pyfunc's code) are listed with their SHA-256 in another tag and checked too."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import torch

from pipeline.cli import main
from pipeline.detector import artifact_digest, load_detector
from pipeline.errors import ArtifactError
from pipeline.registry.client import TAG_PREFIX, load_model, package_files, resolve_model
from tests.helpers import (
    edit_manifest,
    labelled_series_csv,
    register_result,
    train_series_detector,
)
from training.tracking import local_store


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("integrity")
    return train_series_detector(labelled_series_csv(root / "series.csv"), root / "det")


@pytest.fixture
def registry(tmp_path, trained):
    """A sqlite registry holding one version of the trained detector as NAME@challenger."""
    uri = local_store(tmp_path, "tests")
    version = register_result(uri, trained, "integrity")
    return uri, version, tmp_path


def _stored_manifests(root: Path) -> list[Path]:
    found = list((root / "artifacts").rglob("manifest.json"))
    assert found, "the registered detector's manifest is in the artifact store"
    return found


def _edit(path: Path, change) -> None:
    """The manifest at `path` changed and sealed again: the registry's digest still tells."""
    edit_manifest(path.parent, change, indent=2)


def _raise_threshold(manifest: dict) -> None:
    manifest["threshold"]["value"] = 1e9


def test_registration_tags_the_whole_artifact_digest(registry, trained):
    from mlflow import MlflowClient

    uri, version, _ = registry
    tags = MlflowClient(uri).get_model_version("integrity", version).tags
    assert tags[TAG_PREFIX + "artifact_sha256"] == artifact_digest(trained.artifact_dir)


def test_a_digest_ignores_formatting_but_not_values(tmp_path, trained):
    copy = shutil.copytree(trained.artifact_dir, tmp_path / "det")
    before = artifact_digest(copy)
    _edit(copy / "manifest.json", lambda m: None)  # same values, other whitespace
    assert artifact_digest(copy) == before
    _edit(copy / "manifest.json", _raise_threshold)
    assert artifact_digest(copy) != before


def test_a_registered_version_with_an_edited_manifest_is_refused(registry, capsys):
    uri, version, root = registry
    for path in _stored_manifests(root):
        _edit(path, _raise_threshold)
    with pytest.raises(ArtifactError, match="digest") as refused:
        load_model("models:/integrity@challenger", tracking_uri=uri, download_dir=root / "dl")
    assert refused.value.reason == "artifact_digest"
    code = main(
        ["score", "--model", "models:/integrity@challenger", "--tracking-uri", uri]
        + ["--data", str(root / "none.csv"), "--out", str(root / "scores.csv")]
    )
    err = capsys.readouterr().err
    assert code == 2 and "digest" in err and "Traceback" not in err


def test_the_pyfunc_refuses_an_edited_manifest(registry):
    import mlflow

    uri, version, root = registry
    for path in _stored_manifests(root):
        _edit(path, _raise_threshold)
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    try:
        with pytest.raises(Exception, match="digest"):
            mlflow.pyfunc.load_model(f"models:/integrity/{version}")
    finally:  # a later test's MlflowClient(server) must not be sent to this store's registry
        mlflow.set_tracking_uri(None)
        mlflow.set_registry_uri(None)
        os.environ.pop("MLFLOW_REGISTRY_URI", None)  # set_registry_uri exports it


def test_a_version_without_the_digest_tag_is_refused(registry):
    from mlflow import MlflowClient

    uri, version, root = registry
    MlflowClient(uri).delete_model_version_tag("integrity", version, TAG_PREFIX + "artifact_sha256")
    with pytest.raises(ArtifactError, match="artifact digest") as refused:
        load_model(f"models:/integrity/{version}", tracking_uri=uri, download_dir=root / "dl")
    assert refused.value.reason == "artifact_digest"


@pytest.mark.parametrize("change", ["null", "missing", "not-hex"])
def test_a_null_or_missing_weights_digest_is_refused(tmp_path, trained, change, capsys):
    copy = shutil.copytree(trained.artifact_dir, tmp_path / "det")
    state = torch.load(copy / "weights.pt", weights_only=True)
    torch.save({k: torch.zeros_like(v) for k, v in state.items()}, copy / "weights.pt")

    def edit(manifest: dict) -> None:
        if change == "missing":
            del manifest["weights"]["sha256"]
        else:
            manifest["weights"]["sha256"] = None if change == "null" else "zz"

    _edit(copy / "manifest.json", edit)
    with pytest.raises(ArtifactError, match="SHA-256") as refused:
        load_detector(copy)
    assert refused.value.reason == "sha256"
    with pytest.raises(ArtifactError, match="SHA-256"):
        resolve_model(str(copy))
    code = main(
        ["encode", "--model", str(copy), "--data", "x.csv", "--out", str(tmp_path / "o.csv")]
    )
    err = capsys.readouterr().err
    assert code == 2 and "SHA-256" in err and "Traceback" not in err


def _stored(root: Path, name: str) -> list[Path]:
    found = [p for p in (root / "artifacts").rglob(name) if "artifacts/" in p.as_posix()]
    assert found, f"the registered model's {name} is in the artifact store"
    return found


def test_registration_lists_every_file_of_the_mlflow_model(registry):
    from mlflow import MlflowClient

    uri, version, root = registry
    listing = json.loads(
        MlflowClient(uri).get_model_version("integrity", version).tags[TAG_PREFIX + "package_files"]
    )
    ref = resolve_model(f"models:/integrity/{version}", tracking_uri=uri, download_dir=root / "dl")
    assert listing == package_files(ref.package)
    assert {"MLmodel", "pyfunc.py"} <= set(listing)
    assert any(path.endswith("weights.pt") for path in listing)


@pytest.mark.parametrize("change", ["edited code", "added file", "removed file"])
def test_a_version_whose_mlflow_files_changed_is_refused_and_not_promoted(registry, change, capsys):
    from mlflow import MlflowClient

    uri, version, root = registry
    for code in _stored(root, "pyfunc.py"):
        if change == "edited code":
            code.write_text(code.read_text() + "\nprint('not what was registered')\n")
        elif change == "added file":
            (code.parent / "extra.py").write_text("print('not registered')\n")
        else:
            (code.parent / "requirements.txt").unlink()
    with pytest.raises(ArtifactError, match="MLflow model's file") as refused:
        load_model(f"models:/integrity/{version}", tracking_uri=uri, download_dir=root / "dl")
    assert refused.value.reason == "package_digest"
    named = {"edited code": "pyfunc.py", "added file": "extra.py", "removed file": "requirements"}
    assert named[change] in str(refused.value)
    code = main(
        ["promote", "integrity", "--tracking-uri", uri, "--allow-high-fpr", "--no-pca-gate"]
    )
    err = capsys.readouterr().err
    assert code != 0 and named[change] in err and "Traceback" not in err
    assert "champion" not in MlflowClient(uri).get_registered_model("integrity").aliases


def test_the_weights_loaded_are_the_bytes_that_were_checked(tmp_path, trained, monkeypatch):
    """Weights replaced on disk after their hash was checked are not what gets loaded."""
    from pipeline.detector import artifact

    copy = shutil.copytree(trained.artifact_dir, tmp_path / "det")
    original = torch.load(copy / "weights.pt", weights_only=True)
    real_load = torch.load

    def swapped_then_loaded(source, *args, **kwargs):
        torch.save({k: torch.zeros_like(v) for k, v in original.items()}, copy / "weights.pt")
        return real_load(source, *args, **kwargs)

    monkeypatch.setattr(artifact.torch, "load", swapped_then_loaded)
    detector = load_detector(copy)
    loaded = detector.model.state_dict()
    assert all(torch.equal(loaded[k], v) for k, v in original.items())
