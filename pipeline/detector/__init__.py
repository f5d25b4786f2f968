"""The detector core shared by training and scoring: numpy and torch only.

Windows, scalers, models, scoring, thresholds and the pickle-free artifact. Higher score = more
anomalous. Names are imported on first use, so that reading a constant does not load torch.
"""

from __future__ import annotations

from pipeline.lazy import lazy_getattr

_EXPORTS = {
    "FORMAT_VERSION": "artifact",
    "artifact_digest": "artifact",
    "load_detector": "artifact",
    "read_manifest": "artifact",
    "save_detector": "artifact",
    "sha256_file": "artifact",
    "available_cores": "cores",
    "Detector": "detector",
    "InputSpec": "detector",
    "resolve_device": "detector",
    "MODEL_KINDS": "models",
    "ModelConfig": "models",
    "build_model": "models",
    "SCALER_KINDS": "scaler",
    "STREAMING_KINDS": "scaler",
    "Scaler": "scaler",
    "ScalerFit": "scaler",
    "WindowCarry": "windows",
    "Scores": "scoring",
    "Threshold": "threshold",
    "WindowSet": "windows",
    "WindowSpec": "windows",
    "cut_windows": "windows",
    "sliding_windows": "windows",
    "window_starts": "windows",
}

__all__ = sorted(_EXPORTS)


__getattr__ = lazy_getattr(__name__, _EXPORTS, globals())


def __dir__() -> list[str]:
    return __all__
