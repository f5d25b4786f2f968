"""Where a command's detector comes from: a folder, or a version in the MLflow registry."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from pipeline.detector import Detector, resolve_device
from pipeline.registry.client import ModelRef, load_model

__all__ = ["ModelSource"]


@dataclass(frozen=True)
class ModelSource:
    """`--model` (a detector folder, models:/NAME@ALIAS or models:/NAME/VERSION), the registry
    it is in and the device to load it on."""

    uri: str
    tracking_uri: str | None = None
    device: str = "cpu"

    def __post_init__(self) -> None:  # a device there is not: before the registry is asked
        resolve_device(self.device)

    def load(
        self, *, require_calibrated: bool = True, download_dir: Path | None = None
    ) -> tuple[Detector, ModelRef]:
        """The detector and where it came from, resolved and verified as the worker does; a
        registry version's files stay in `download_dir` when one is given."""
        return load_model(
            self.uri,
            tracking_uri=self.tracking_uri,
            device=self.device,
            require_calibrated=require_calibrated,
            download_dir=download_dir,
        )
