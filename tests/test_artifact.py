"""The detector artifact refuses anything it cannot trust, before any code in it could run."""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline.detector import (
    Detector,
    InputSpec,
    ModelConfig,
    Scaler,
    Threshold,
    WindowSpec,
    build_model,
    load_detector,
    read_manifest,
    save_detector,
    sha256_file,
)
from pipeline.errors import ArtifactError
from tests.helpers import HostilePickle, edit_manifest


@pytest.fixture
def saved(tmp_path: Path) -> Path:
    config = ModelConfig(input_shape=(8, 3), hidden=(16,), code_size=2)
    torch.manual_seed(0)
    detector = Detector(
        InputSpec("series", ("a", "b", "c"), WindowSpec(8, 2)),
        Scaler.fit("standard", np.random.default_rng(0).normal(size=(100, 3))),
        config,
        build_model(config),
    )
    save_detector(detector, tmp_path / "det")
    return tmp_path / "det"


def _rewrite_manifest(directory: Path, **changes) -> None:
    edit_manifest(directory, lambda manifest: manifest.update(changes))


def test_round_trip_keeps_everything(saved: Path):
    detector = load_detector(saved)
    manifest = read_manifest(saved)
    assert manifest["weights"]["sha256"] == sha256_file(saved / "weights.pt")
    assert manifest["threshold"]["calibrated"] is False
    assert detector.input.features == ("a", "b", "c")
    assert {"torch", "numpy", "python"} <= set(manifest["libraries"])


def test_uncalibrated_detector_is_refused_where_a_threshold_is_required(saved: Path):
    with pytest.raises(ArtifactError, match="not calibrated"):
        load_detector(saved, require_calibrated=True)


def test_tampered_weights_are_refused(saved: Path):
    state = torch.load(saved / "weights.pt", weights_only=True)
    first = next(iter(state))
    state[first] = state[first] + 1.0
    torch.save(state, saved / "weights.pt")
    with pytest.raises(ArtifactError, match="SHA-256"):
        load_detector(saved)


def test_registry_hash_must_match_too(saved: Path):
    with pytest.raises(ArtifactError, match="SHA-256"):
        load_detector(saved, expected_sha256="0" * 64)


def test_newer_format_is_refused(saved: Path):
    _rewrite_manifest(saved, format_version=99)
    with pytest.raises(ArtifactError, match="newer"):
        load_detector(saved)


def test_pickle_where_weights_belong_never_runs(saved: Path, tmp_path: Path):
    marker = tmp_path / "pwned"
    with open(saved / "weights.pt", "wb") as handle:
        pickle.dump({"encoder.1.weight": HostilePickle(marker)}, handle)
    # Even with a matching hash the safe loader must refuse it.
    _rewrite_manifest(
        saved, weights={"file": "weights.pt", "sha256": sha256_file(saved / "weights.pt")}
    )
    with pytest.raises(ArtifactError, match="not a plain tensor state_dict"):
        load_detector(saved)
    assert not marker.exists()


def test_nan_weights_are_refused(saved: Path):
    state = torch.load(saved / "weights.pt", weights_only=True)
    first = next(iter(state))
    state[first][0] = float("nan")
    torch.save(state, saved / "weights.pt")
    _rewrite_manifest(
        saved, weights={"file": "weights.pt", "sha256": sha256_file(saved / "weights.pt")}
    )
    with pytest.raises(ArtifactError, match="NaN"):
        load_detector(saved)


def test_weights_of_another_shape_are_refused(saved: Path):
    edit_manifest(saved, lambda manifest: manifest["model"].update(code_size=3))
    with pytest.raises(ArtifactError, match="do not fit") as refused:
        load_detector(saved)
    assert "\n" not in str(refused.value)  # one line (torch gives a line per mismatch)


@pytest.mark.parametrize(
    ("path", "value"),
    [
        (("threshold", "value"), float("nan")),  # (all 291 windows were "above the threshold nan")
        (("threshold", "value"), float("inf")),
        (("threshold", "calibration_scores"), [0.1, float("nan")]),
        (("scaler", "scale"), "zeros"),  # (every window scored as anomalous)
        (("scaler", "scale"), "negative"),
        (("scaler", "center"), "nan"),
    ],
)
def test_manifest_numbers_that_cannot_score_are_refused(saved: Path, path, value):
    def change(manifest: dict) -> None:
        numbers = value
        if isinstance(numbers, str):
            numbers = {"zeros": 0.0, "negative": -1.0, "nan": float("nan")}[numbers]
            numbers = [numbers] * len(manifest["scaler"]["scale"])
        if path == ("threshold", "value"):
            manifest["threshold"]["calibrated"] = True
        manifest[path[0]][path[1]] = numbers

    edit_manifest(saved, change)
    with pytest.raises(ArtifactError, match="finite"):
        load_detector(saved)


@pytest.mark.parametrize(
    ("path", "value"),
    [
        (("input",), None),
        (("scaler",), None),
        (("threshold",), 1),
        (("model", "code_size"), 1.5),
        (("model", "hidden"), [1e308]),
    ],
)
def test_a_manifest_field_of_the_wrong_type_is_refused_as_an_artifact_error(saved, path, value):
    def change(manifest: dict) -> None:
        holder = manifest
        for name in path[:-1]:
            holder = holder[name]
        holder[path[-1]] = value

    edit_manifest(saved, change)
    with pytest.raises(ArtifactError, match=str(saved)):
        load_detector(saved)


def test_threshold_p_values_follow_the_conformal_formula():
    threshold = Threshold(
        value=2.0, method="quantile", n=4, calibration_scores=(1.0, 2.0, 3.0, 4.0)
    )
    p = threshold.p_values(np.array([0.5, 2.0, 2.5, 9.0]))
    np.testing.assert_allclose(p, [5 / 5, 4 / 5, 3 / 5, 1 / 5])


def test_scoring_scales_exactly_like_the_scaler(saved: Path):
    from pipeline.detector.scoring import score_tensor

    detector = load_detector(saved)
    raw = np.random.default_rng(3).normal(4, 3, size=(500, 8, 3)).astype(np.float32)
    with torch.inference_mode():
        expected = score_tensor(
            detector.model, detector.config, torch.from_numpy(detector.scaler.transform(raw))
        )[0]
    np.testing.assert_array_equal(
        detector.score(raw, batch_size=97).scores, expected.numpy().astype(np.float64)
    )


@pytest.mark.parametrize(
    "mlmodel",
    [
        b"flavors: [python_function\n",  # YAML that never closes its list
        b"- a list\n- not a mapping\n",
        b"flavors: python_function\n",
        b"flavors:\n  python_function:\n    artifacts: [detector]\n",
        b"\xff\xfe\n",
    ],
)
def test_a_registry_model_whose_mlmodel_file_is_unreadable_is_refused(tmp_path: Path, mlmodel):
    from pipeline.registry.client import _detector_dir

    (tmp_path / "MLmodel").write_bytes(mlmodel)
    with pytest.raises(ArtifactError, match=str(tmp_path)):
        _detector_dir(tmp_path)


def test_a_hand_edited_manifest_in_a_local_folder_is_refused(saved: Path, caplog):
    """A local folder's manifest (a threshold raised by hand, a scaler changed) is refused as
    changed weights are, naming the file; `aewatch recalibrate` is the way to a new threshold.
    A manifest of an aewatch before the seal loads, with a warning."""

    def raise_threshold(manifest: dict) -> None:
        manifest["threshold"].update(value=1e9, calibrated=True)

    edit_manifest(saved, lambda manifest: None, seal=False)  # reformatted only: the same
    load_detector(saved)
    edit_manifest(saved, raise_threshold, seal=False)
    with pytest.raises(ArtifactError, match=r"manifest\.json: SHA-256 .* edited") as refused:
        load_detector(saved)
    assert refused.value.reason == "manifest_sha256"
    edit_manifest(saved, lambda manifest: manifest.pop("manifest_sha256"), seal=False)
    with caplog.at_level("WARNING", logger="pipeline.detector.artifact"):
        load_detector(saved)
    assert "records no manifest_sha256" in caplog.text
