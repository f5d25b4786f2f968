"""Images: a detector that takes one image [C, H, W] per record.

Records are PNG, JPEG or `.npy` bytes, or a JSON envelope (see `pipeline.modalities.images`);
each is scored on its own, so nothing is held between polls. An anomaly event carries a small
picture of where the reconstruction error lies and the hottest regions; alarm episodes carry no
per-feature summary.
"""

from __future__ import annotations

import base64
import io
from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image

from pipeline.events import iso_ms_many
from pipeline.modalities.base import Partition, Reject
from pipeline.modalities.images import ImageDecoder
from pipeline.modalities.readings import Rejection
from pipeline.modalities.windowing import ReadyWindows

if TYPE_CHECKING:
    import pandas as pd

    from pipeline.detector import Detector, InputSpec, Scores

__all__ = ["ImageModality", "error_map_png", "top_regions"]

TOP_REGIONS = 3


class NoWindows:
    """Images keep no stream state: there is nothing to resume, nothing still needed."""

    def state(self, partition: Partition) -> dict:
        return {}

    def restore(self, partition: Partition, saved: dict) -> None:
        pass

    def oldest_needed(self, partition: Partition) -> None:
        return None

    def expire(self, partition: Partition) -> list[str]:
        return []  # an image key's stage state is forgotten with its partition only

    def drop(self, partition: Partition, keys) -> None:
        pass

    def forget(self, partitions: set[Partition]) -> None:
        pass

    def parts(self) -> dict:
        return {"resume": self}


class ImageIntake:
    def __init__(self, spec: InputSpec, max_record_bytes: int) -> None:
        self.decoder = ImageDecoder(spec.image_shape, max_record_bytes)
        self.windows = NoWindows()

    def take_all(
        self, polled: Sequence[tuple[Partition, Sequence]], pending: ReadyWindows, reject: Reject
    ) -> None:
        for partition, records in polled:
            self.take(partition, records, pending, reject)

    def take(
        self, partition: Partition, records: Sequence, pending: ReadyWindows, reject: Reject
    ) -> None:
        for record in records:
            decoded = self.decoder.decode(
                record.key, record.value, record.headers, record.timestamp
            )
            if isinstance(decoded, Rejection):
                reject(record, decoded)
                continue
            ts = decoded.ts_ms
            pending.add(decoded.image, decoded.key, ts, ts, partition, record.offset)


class ImageModality:
    def __init__(self, spec: InputSpec) -> None:
        self.spec = spec

    def intake(self, max_record_bytes: int, reread_max: int = 0, **clock) -> ImageIntake:
        """(`reread_max` and `clock` are for series: an image is its own window, never held,
        and its time orders nothing.)"""
        return ImageIntake(self.spec, max_record_bytes)

    def event_details(
        self, scored: Scores, rows: np.ndarray, start_ms: np.ndarray, end_ms: np.ndarray
    ) -> list[dict]:
        channels, height, width = self.spec.image_shape
        details = []
        for i, time in zip(rows.tolist(), iso_ms_many(end_ms), strict=True):
            pixel_errors = scored.pixel_map[i]
            image = {
                "time": time,
                "channels": channels,
                "height": height,
                "width": width,
                "error_map_png": error_map_png(pixel_errors),
                "top_regions": top_regions(pixel_errors, TOP_REGIONS),
            }
            details.append({"image": image})
        return details

    @property
    def alarm_features(self) -> None:
        return None

    def alarm_errors(self, scored: Scores) -> None:
        return None

    def mismatch(self, candidate: InputSpec) -> tuple[str, str] | None:
        old, new = self.spec.image_shape, candidate.image_shape
        if tuple(old) != tuple(new):
            return "image_shape", f"image shape {new}, serving {old}"
        return None

    def score_rows(self, detector: Detector, rows: pd.DataFrame) -> pd.DataFrame:
        """A column `image` holding each image as nested or flat lists of pixels."""
        from pipeline.batch import score_images

        shape = self.spec.image_shape
        images = np.stack([np.asarray(v, dtype=np.float32).reshape(shape) for v in rows["image"]])
        return score_images(detector, images)[["score", "threshold", "p_value", "is_anomaly"]]

    def version_tags(self) -> dict[str, str]:
        return {"image_shape": "x".join(str(d) for d in self.spec.image_shape)}

    def example_rows(self, sample: np.ndarray) -> pd.DataFrame:
        import pandas as pd

        return pd.DataFrame({"image": [sample.ravel().tolist()]})


# -- summaries of a per-pixel error map ---------------------------------------------------------
def _error_plane(pixel_errors: np.ndarray) -> np.ndarray:
    """A per-pixel error map as float64 [H, W]; [C, H, W] is averaged over channels."""
    plane = np.asarray(pixel_errors, dtype=np.float64)
    if plane.ndim == 3:
        plane = plane.mean(axis=0)
    if plane.ndim != 2 or plane.size == 0:
        raise ValueError(f"expected a non-empty [H, W] or [C, H, W] map, got {plane.shape}")
    return plane


def error_map_png(pixel_errors: np.ndarray, max_side: int = 32) -> str:
    """A compact picture of where an image's reconstruction error lies, for an event.

    The map ([H, W], or [C, H, W] averaged over channels) is box-downscaled when a side exceeds
    `max_side`, normalised so its maximum is 255 (an all-zero map stays zero; +inf counts as the
    maximum, NaN and negatives as zero), and returned as a base64 greyscale PNG."""
    if max_side < 1:
        raise ValueError("max_side must be at least 1")
    plane = _error_plane(pixel_errors)
    hot = np.isposinf(plane)
    plane = np.where(np.isfinite(plane), np.maximum(plane, 0.0), 0.0)
    if hot.any():
        peak = plane.max()
        plane[hot] = peak if peak > 0 else 1.0
    height, width = plane.shape
    if max(height, width) > max_side:
        ratio = max_side / max(height, width)
        size = (max(1, round(width * ratio)), max(1, round(height * ratio)))
        small = Image.fromarray(plane.astype(np.float32)).resize(size, Image.Resampling.BOX)
        plane = np.asarray(small, dtype=np.float64)
    peak = plane.max()
    if peak > 0:
        grey = np.rint(np.clip(plane / peak, 0.0, 1.0) * 255.0).astype(np.uint8)
    else:
        grey = np.zeros(plane.shape, dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(grey).save(buffer, format="PNG", optimize=True)
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def top_regions(pixel_errors: np.ndarray, k: int = 3, cell: int = 4) -> list[dict]:
    """The `k` cell x cell blocks of the (channel-averaged) error map with the highest mean
    error, largest first (ties in row-major order). Edge blocks may be smaller than a cell."""
    if cell < 1:
        raise ValueError("cell must be at least 1")
    plane = _error_plane(pixel_errors)
    if k <= 0:
        return []
    height, width = plane.shape
    rows = np.arange(0, height, cell)
    cols = np.arange(0, width, cell)
    sums = np.add.reduceat(np.add.reduceat(plane, rows, axis=0), cols, axis=1)
    heights = np.minimum(cell, height - rows)
    widths = np.minimum(cell, width - cols)
    means = (sums / np.outer(heights, widths)).ravel()
    order = np.argsort(-means, kind="stable")[:k]
    block_rows, block_cols = np.divmod(order, len(cols))
    return [
        {
            "row": int(rows[r]),
            "col": int(cols[c]),
            "height": int(heights[r]),
            "width": int(widths[c]),
            "error": float(means[i]),
        }
        for i, r, c in zip(order, block_rows, block_cols, strict=True)
    ]
