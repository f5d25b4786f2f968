"""The detector core shared by training and scoring: numpy and torch only.

Windows, scalers, models, scoring, thresholds and the pickle-free artifact. Higher score = more
anomalous.
"""

from pipeline.detector.artifact import (
    FORMAT_VERSION,
    load_detector,
    read_manifest,
    save_detector,
    sha256_file,
)
from pipeline.detector.detector import Detector, InputSpec, resolve_device
from pipeline.detector.models import MODEL_KINDS, ModelConfig, build_model
from pipeline.detector.scaler import SCALER_KINDS, Scaler
from pipeline.detector.scoring import Scores
from pipeline.detector.threshold import Threshold
from pipeline.detector.windows import (
    WindowSet,
    WindowSpec,
    cut_windows,
    sliding_windows,
    window_starts,
)

__all__ = [
    "FORMAT_VERSION",
    "MODEL_KINDS",
    "SCALER_KINDS",
    "Detector",
    "InputSpec",
    "ModelConfig",
    "Scaler",
    "Scores",
    "Threshold",
    "WindowSet",
    "WindowSpec",
    "cut_windows",
    "build_model",
    "load_detector",
    "read_manifest",
    "resolve_device",
    "save_detector",
    "sha256_file",
    "sliding_windows",
    "window_starts",
]
