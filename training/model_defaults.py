"""Model defaults that depend on the data: the layer widths an image model gets."""

from __future__ import annotations

from pipeline.detector import ModelConfig
from training.data.images import is_image_source

__all__ = ["IMAGE_HIDDEN", "default_hidden", "is_image_input"]

IMAGE_HIDDEN = (256, 128)
"""The dense layer widths an image model gets when none are given (series keep the model's
(64, 32)): chosen on one-class digits, where it beat PCA with the step budget of `training.budget`
and the narrower widths did not (benchmarks/bench_images.py)."""


def is_image_input(input_kind: str, data: str) -> bool:
    """Whether `data` is read as images: `input_kind`, or, when auto, what the source looks like."""
    return is_image_source(data) if input_kind == "auto" else input_kind == "image"


def default_hidden(*, image: bool, backbone: str) -> tuple[int, ...]:
    """The layer widths when none are given: wider dense layers for images."""
    return IMAGE_HIDDEN if image and backbone == "dense" else ModelConfig().hidden
