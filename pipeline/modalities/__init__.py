"""Input modalities: what depends on whether a detector takes series windows or images.

`modality_of(spec)` is the one place that looks at the kind of a detector's input; everything
else asks the modality it returns (see `pipeline.modalities.base` for what one provides):

- `series`: JSON readings or pre-cut windows, windowed per key (`readings`, `windowing`);
- `image`: PNG, JPEG or `.npy` images, one per record (`images`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from pipeline.detector import InputSpec
    from pipeline.modalities.base import Modality

__all__ = ["modality_of"]


def modality_of(spec: InputSpec) -> Modality:
    """The modality of a detector's input spec."""
    if spec.kind == "image":
        from pipeline.modalities.image import ImageModality

        return ImageModality(spec)
    from pipeline.modalities.series import SeriesModality

    return SeriesModality(spec)
