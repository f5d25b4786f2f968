"""The whole artifact is integrity-checked: a registered version carries the digest of its manifest
and weights (canonical form) as a tag, every loader checks it, and a missing or null digest is
refused with a reason like the other refusals."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from pipeline.cli import main
from pipeline.detector import artifact_digest, load_detector
from pipeline.errors import ArtifactError
from pipeline.registry.client import TAG_PREFIX, load_model, resolve_model
from tests.helpers import labelled_series_csv, register_result, train_series_detector
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
    manifest = json.loads(path.read_text())
    change(manifest)
    path.write_text(json.dumps(manifest, indent=2))


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
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    for path in _stored_manifests(root):
        _edit(path, _raise_threshold)
    with pytest.raises(Exception, match="digest"):
        mlflow.pyfunc.load_model(f"models:/integrity/{version}")


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
