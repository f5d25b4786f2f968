"""The detector artifact: a folder with `manifest.json` and `weights.pt`, nothing pickled.

The manifest describes everything needed to rebuild and trust the detector: format version,
input spec, scaler statistics, model config, threshold, training provenance, library versions,
and the SHA-256 of the weights. Loading checks format and hash before the weights file is opened,
then reads it with `torch.load(weights_only=True)`, which refuses anything but tensors. A weights
hash that is missing, null or not 64 hex digits is refused like one that differs.

The manifest seals itself: `manifest_sha256` is the SHA-256 of its canonical JSON without that
field, so a hand-edited threshold or scaler in a local folder is refused as a changed weights file
is (a manifest of an aewatch before the seal loads with a warning that edits cannot be told).

`artifact_digest` covers the whole artifact: the manifest in canonical JSON (sorted keys, no
whitespace, so reformatting does not change it, any value does) and the weights' bytes. A
registered version carries it as a tag (`aewatch.artifact_sha256`) and every registry loader
passes it as `expected_digest`, so an edited threshold or scaler is refused as tampered weights are.

The manifest also holds the score statistics of the `terms` score (with their own SHA-256). A
detector with them is written as format version 2, so that a reader of version 1 (which would
score it with the raw mean error against a threshold made for the terms) refuses it; a raw
detector stays version 1.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import platform
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import torch

from pipeline import __version__
from pipeline.detector.baselines import KeyStats
from pipeline.detector.detector import Detector, InputSpec
from pipeline.detector.models import ModelConfig, build_model
from pipeline.detector.scaler import Scaler
from pipeline.detector.scoring import ScoreStats
from pipeline.detector.threshold import Threshold
from pipeline.errors import ArtifactError, ConfigError, ModelError, one_line

log = logging.getLogger(__name__)

__all__ = [
    "FORMAT_NAME",
    "FORMAT_VERSION",
    "MANIFEST_FILE",
    "WEIGHTS_FILE",
    "artifact_digest",
    "load_detector",
    "manifest_seal",
    "read_manifest",
    "save_detector",
    "sha256_file",
]

FORMAT_NAME = "aewatch-detector"
FORMAT_VERSION = 2  # the newest this reads and writes; 2 adds the `score` statistics
MANIFEST_FILE = "manifest.json"
WEIGHTS_FILE = "weights.pt"


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _canonical(manifest: dict) -> bytes:
    return json.dumps(manifest, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode()


SEAL = "manifest_sha256"


def manifest_seal(manifest: dict) -> str:
    """The SHA-256 a manifest records of itself: its canonical JSON without the `SEAL` field."""
    body = {k: v for k, v in manifest.items() if k != SEAL}
    return hashlib.sha256(b"aewatch.manifest/1\0" + _canonical(body)).hexdigest()


def _check_seal(manifest: dict, directory: Path) -> None:
    """Refuse a manifest whose recorded seal is not its own (`manifest_seal`)."""
    if SEAL not in manifest:
        log.warning(
            "%s: the manifest records no %s (written by an aewatch before it): edits to it "
            "cannot be told",
            directory,
            SEAL,
        )
        return
    actual, recorded = manifest_seal(manifest), manifest[SEAL]
    if recorded != actual:
        raise ArtifactError(
            f"{directory / MANIFEST_FILE}: SHA-256 {actual[:12]}... does not match the recorded "
            f"{str(recorded)[:12]}...; refusing an edited manifest (a new threshold: "
            "`aewatch recalibrate`)",
            reason="manifest_sha256",
        )


def _digest(manifest: dict, weights_sha256: str) -> str:
    digest = hashlib.sha256(b"aewatch.artifact/1\0")
    digest.update(_canonical(manifest))
    digest.update(b"\0" + weights_sha256.encode())
    return digest.hexdigest()


def artifact_digest(directory: str | Path) -> str:
    """SHA-256 of the whole artifact: the manifest's canonical JSON and the weights' bytes."""
    directory = Path(directory)
    manifest = read_manifest(directory)
    weights = directory / str((manifest.get("weights") or {}).get("file", WEIGHTS_FILE))
    if not weights.is_file():
        raise ArtifactError(
            f"{directory}: weights file {weights.name!r} is missing", reason="weights"
        )
    return _digest(manifest, sha256_file(weights))


def _is_sha256(value: object) -> bool:
    return isinstance(value, str) and len(value) == 64 and all(c in _HEX for c in value)


_HEX = frozenset("0123456789abcdef")


def save_detector(detector: Detector, directory: str | Path) -> Path:
    """Write the detector to `directory` (created if needed); returns the manifest path."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    weights = directory / WEIGHTS_FILE
    state = {k: v.detach().cpu().contiguous() for k, v in detector.model.state_dict().items()}
    staged = directory / f".{WEIGHTS_FILE}.partial"
    torch.save(state, staged)
    manifest = {
        "format": FORMAT_NAME,
        "format_version": 1 if detector.score_stats is None else FORMAT_VERSION,
        "created_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "aewatch_version": __version__,
        "input": detector.input.to_dict(),
        "scaler": detector.scaler.to_dict(),
        "model": detector.config.to_dict(),
        "score": None if detector.score_stats is None else detector.score_stats.to_dict(),
        "threshold": detector.threshold.to_dict(),
        "training": detector.info,
        **({"baselines": detector.baselines.to_dict()} if detector.baselines else {}),
        "libraries": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "numpy": np.__version__,
        },
        "weights": {"file": WEIGHTS_FILE, "sha256": sha256_file(staged)},
    }
    manifest[SEAL] = manifest_seal(manifest)
    # Each file appears whole: written under a temporary name, then renamed into place.
    path = directory / MANIFEST_FILE
    staged_manifest = directory / f".{MANIFEST_FILE}.partial"
    staged_manifest.write_text(json.dumps(manifest, indent=2, sort_keys=False) + "\n")
    os.replace(staged, weights)
    os.replace(staged_manifest, path)
    return path


def read_manifest(directory: str | Path) -> dict:
    """Parse and check the manifest's format and version; no weights are touched."""
    path = Path(directory) / MANIFEST_FILE
    if not path.is_file():
        raise ArtifactError(f"{path}: no detector manifest here")
    try:
        manifest = json.loads(path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ArtifactError(f"{path}: manifest is not valid JSON ({exc})") from exc
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT_NAME:
        raise ArtifactError(f"{path}: not an {FORMAT_NAME} manifest")
    version = manifest.get("format_version")
    if not isinstance(version, int) or version < 1:
        raise ArtifactError(f"{path}: invalid format_version {version!r}")
    if version > FORMAT_VERSION:
        raise ArtifactError(
            f"{path}: format version {version} is newer than this aewatch reads "
            f"({FORMAT_VERSION}); upgrade aewatch"
        )
    return manifest


def load_detector(
    directory: str | Path,
    *,
    device: str | torch.device = "cpu",
    require_calibrated: bool = False,
    expected_sha256: str | None = None,
    expected_digest: str | None = None,
) -> Detector:
    """Load and verify a detector artifact.

    Refused with ArtifactError: a newer format, a weights hash that is missing or differs from
    the manifest (or from `expected_sha256`, e.g. a registry tag), a whole-artifact digest that
    differs from `expected_digest`, a weights file that is not a plain tensor
    state_dict, a state_dict that does not fit the model config, non-finite weights; and, when
    `require_calibrated`, a detector without a threshold.
    """
    directory = Path(directory)
    manifest = read_manifest(directory)
    _check_seal(manifest, directory)
    try:
        input_spec = InputSpec.from_dict(manifest["input"])
        scaler = Scaler.from_dict(manifest["scaler"])
        config = ModelConfig.from_dict(manifest["model"])
        threshold = Threshold.from_dict(manifest.get("threshold") or {})
        score = manifest.get("score")
        stats = ScoreStats.from_dict(score) if score is not None else None
        weights_meta = dict(manifest["weights"])
    except (KeyError, TypeError, ValueError, AttributeError, ConfigError, ModelError) as exc:
        raise ArtifactError(f"{directory}: manifest is incomplete or invalid: {exc}") from exc
    if require_calibrated and not threshold.calibrated:
        raise ArtifactError(f"{directory}: detector is not calibrated (no threshold)")
    weights = directory / str(weights_meta.get("file", WEIGHTS_FILE))
    if weights.parent.resolve() != directory.resolve() or not weights.is_file():
        raise ArtifactError(
            f"{directory}: weights file {weights.name!r} is missing", reason="weights"
        )
    recorded = weights_meta.get("sha256")
    if not _is_sha256(recorded):
        raise ArtifactError(
            f"{directory}: the manifest records no valid weights SHA-256 ({recorded!r}); "
            "refusing unverifiable weights",
            reason="sha256",
        )
    blob = weights.read_bytes()  # read once: the bytes checked are the bytes loaded
    actual = hashlib.sha256(blob).hexdigest()
    for expected in (recorded, expected_sha256):
        if expected is not None and actual != expected:
            raise ArtifactError(
                f"{weights}: SHA-256 {actual[:12]}... does not match the recorded "
                f"{str(expected)[:12]}...; refusing tampered weights",
                reason="sha256",
            )
    if expected_digest is not None and _digest(manifest, actual) != expected_digest:
        raise ArtifactError(
            f"{directory}: artifact digest {_digest(manifest, actual)[:12]}... does not match "
            f"the recorded {str(expected_digest)[:12]}...; refusing a tampered manifest or weights",
            reason="artifact_digest",
        )
    try:
        state = torch.load(io.BytesIO(blob), map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any refusal by the safe loader is an artifact error
        raise ArtifactError(
            f"{weights}: not a plain tensor state_dict ({exc})", reason="weights"
        ) from exc
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ArtifactError(f"{weights}: not a state_dict of tensors", reason="weights")
    if not all(torch.isfinite(v).all() for v in state.values() if v.is_floating_point()):
        raise ArtifactError(
            f"{weights}: weights hold NaN or infinite values", reason="non_finite_weights"
        )
    try:
        model = build_model(config)
    except (TypeError, ValueError, OverflowError, RuntimeError) as exc:  # sizes that are no sizes
        raise ArtifactError(f"{directory}: the model config cannot be built: {exc}") from exc
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        detail = one_line(exc, 300)  # (torch lists every mismatch, a line each)
        raise ArtifactError(
            f"{weights}: weights do not fit the model config: {detail}", reason="weights"
        ) from exc
    if scaler.n_features != input_spec.n_scaled:
        raise ArtifactError(f"{directory}: scaler size does not match the input spec")
    if tuple(config.input_shape) != input_spec.sample_shape:
        raise ArtifactError(f"{directory}: model input shape does not match the input spec")
    baselines = None
    if manifest.get("baselines") is not None:
        try:
            baselines = KeyStats.from_dict(manifest["baselines"], input_spec.n_scaled)
        except ArtifactError as exc:
            raise ArtifactError(f"{directory}: {exc}", reason=exc.reason) from exc
    try:
        detector = Detector(
            input_spec,
            scaler,
            config,
            model,
            threshold,
            manifest.get("training", {}),
            baselines,
            score_stats=stats,
        )
    except ModelError as exc:
        raise ArtifactError(f"{directory}: {exc}") from exc
    return detector.to(device)
