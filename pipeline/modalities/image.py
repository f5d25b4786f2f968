"""Images: a detector that takes one image [C, H, W] per record.

Records are PNG, JPEG or `.npy` bytes, or a JSON envelope (see `pipeline.modalities.images`);
each is scored on its own, so no image is held between polls; of each key only when it last
sent is kept, so that a key silent for `--key-ttl-s` is forgotten as a series key is. An anomaly
event carries a small picture of where the reconstruction error lies and the hottest regions;
alarm episodes carry no per-feature summary.
"""

from __future__ import annotations

import base64
import io
from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image

from pipeline.errors import DataError
from pipeline.events import iso_ms_many
from pipeline.modalities.base import Partition, Reject
from pipeline.modalities.expiry import KEY_TTL_S, silent
from pipeline.modalities.images import ImageDecoder, image_axes
from pipeline.modalities.readings import Rejection, unforeseen
from pipeline.modalities.windowing import ReadyWindows

if TYPE_CHECKING:
    import pandas as pd

    from pipeline.detector import Detector, InputSpec, Scores

__all__ = ["ImageModality", "error_map_png", "top_regions"]

TOP_REGIONS = 3
_FLOAT32_MAX = float(np.finfo(np.float32).max)


class ImageKeys:
    """When each key of a partition last sent (event time ms and offset of its latest record):
    nothing to resume and nothing that holds the commit back, but a key silent beyond both
    limits of `pipeline.modalities.expiry` (`ttl_ms` of event time behind its partition's newest
    record, `reread_max` records behind its latest; `expiry.silent`) is forgotten at a
    checkpoint, by every stage.
    The state record keeps ``{key: [ts_ms, offset]}``."""

    def __init__(self, reread_max: int = 0, key_ttl_s: float = KEY_TTL_S) -> None:
        self.reread_max, self.ttl_ms = reread_max, int(key_ttl_s * 1000)
        self._seen: dict[Partition, dict[str, tuple[int, int]]] = {}

    def saw(self, partition: Partition, keys: list[str], ts: list[int], offsets: list[int]):
        """Records of these keys arrived (in offset order)."""
        seen = self._seen.setdefault(partition, {})
        seen.update(zip(keys, zip(ts, offsets, strict=True), strict=True))

    def state(self, partition: Partition) -> dict:
        return {key: list(last) for key, last in self._seen.get(partition, {}).items()}

    def restore(self, partition: Partition, saved: dict) -> None:
        self._seen[partition] = {key: (int(ts), int(at)) for key, (ts, at) in saved.items()}

    def oldest_needed(self, partition: Partition) -> None:
        return None

    def expire(self, partition: Partition) -> list[str]:
        seen = self._seen.get(partition)
        if self.ttl_ms <= 0 or not seen:
            return []
        ts, at = np.array(list(seen.values()), np.int64).T
        limits = (int(ts.max()), int(at.max()) + 1, self.ttl_ms, self.reread_max)
        gone = np.asarray(list(seen), object)[silent(ts, at + 1, *limits)].tolist()
        for key in gone:
            del seen[key]
        return gone

    def drop(self, partition: Partition, keys) -> None:
        pass  # `expire` has let them go

    def forget(self, partitions: set[Partition]) -> None:
        for partition in partitions:
            self._seen.pop(partition, None)

    def parts(self) -> dict:
        return {"resume": self}


class ImageIntake:
    def __init__(
        self, spec: InputSpec, max_record_bytes: int, reread_max: int = 0, key_ttl_s=KEY_TTL_S
    ) -> None:
        self.decoder = ImageDecoder(spec.image_shape, max_record_bytes)
        self.windows = ImageKeys(reread_max, key_ttl_s)

    def take_all(
        self, polled: Sequence[tuple[Partition, Sequence]], pending: ReadyWindows, reject: Reject
    ) -> None:
        for partition, records in polled:
            self.take(partition, records, pending, reject)

    def take(
        self, partition: Partition, records: Sequence, pending: ReadyWindows, reject: Reject
    ) -> None:
        keys, times, offsets = [], [], []
        for record in records:
            try:
                decoded = self.decoder.decode(
                    record.key, record.value, record.headers, record.timestamp
                )
            except Exception as exc:
                decoded = unforeseen(exc)
            if isinstance(decoded, Rejection):
                reject(record, decoded)
                continue
            ts = decoded.ts_ms
            pending.add(decoded.image, decoded.key, ts, ts, partition, record.offset)
            keys.append(decoded.key)
            times.append(ts)
            offsets.append(record.offset)
        self.windows.saw(partition, keys, times, offsets)


class ImageModality:
    def __init__(self, spec: InputSpec) -> None:
        self.spec = spec

    def intake(self, max_record_bytes: int, reread_max: int = 0, **clock) -> ImageIntake:
        """An image is its own window, never held, and its time orders nothing: of `clock`
        only `key_ttl_s` applies, with `reread_max`, to forget silent keys (`ImageKeys`)."""
        return ImageIntake(
            self.spec, max_record_bytes, reread_max, clock.get("key_ttl_s", KEY_TTL_S)
        )

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
        """A column `image` holding each image as nested lists of pixels ([C, H, W], [H, W, C] or
        [H, W] as the worker reads an array) or flat ones in [C, H, W] order; a row of another
        shape, or with a pixel a float32 model cannot hold, is refused naming it."""
        from pipeline.batch import score_images

        shape = tuple(self.spec.image_shape)
        images = np.stack([_row_image(i, v, shape) for i, v in enumerate(rows["image"])])
        return score_images(detector, images)[["score", "threshold", "p_value", "is_anomaly"]]

    def version_tags(self) -> dict[str, str]:
        return {"image_shape": "x".join(str(d) for d in self.spec.image_shape)}

    def example_rows(self, sample: np.ndarray) -> pd.DataFrame:
        import pandas as pd

        return pd.DataFrame({"image": [sample.ravel().tolist()]})


def _row_image(row: int, value, shape: tuple[int, int, int]) -> np.ndarray:
    """One pyfunc row's image as float32 [C, H, W], read as the worker reads an array."""
    try:
        array = np.asarray(value, dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise DataError(f"row {row}: 'image' is not an array of numbers ({exc})") from exc
    if array.ndim == 1 and array.size == np.prod(shape):
        array = array.reshape(shape)
    else:
        axes = image_axes(array.shape, shape)
        if axes is None:
            raise DataError(
                f"row {row}: 'image' of shape {list(array.shape)}; the model takes {list(shape)} "
                "([C, H, W], [H, W, C], [H, W] for one channel, or flat)"
            )
        array = array.reshape(shape) if array.ndim == 2 else array.transpose(axes)
    if not (np.abs(array) <= _FLOAT32_MAX).all():  # NaN compares False
        raise DataError(f"row {row}: 'image' holds NaN, infinity or values beyond float32")
    return np.ascontiguousarray(array, dtype=np.float32)


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
