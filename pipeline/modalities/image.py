"""Images: a detector that takes one image [C, H, W] per record.

Records are PNG, JPEG or `.npy` bytes, or a JSON envelope (see `pipeline.modalities.images`);
each is scored on its own, so nothing is held between polls. An anomaly event carries a small
picture of where the reconstruction error lies and the hottest regions; alarm episodes carry no
per-feature summary.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np

from pipeline.events import iso_ms
from pipeline.modalities.base import Partition, Reject
from pipeline.modalities.images import ImageDecoder, error_map_png, top_regions
from pipeline.modalities.readings import Rejection
from pipeline.modalities.windowing import ReadyWindows

if TYPE_CHECKING:
    import pandas as pd

    from pipeline.detector import Detector, InputSpec, Scores

__all__ = ["ImageModality"]

TOP_REGIONS = 3


class NoWindows:
    """Images keep no stream state: there is nothing to resume, nothing still needed."""

    def state(self, partition: Partition) -> dict:
        return {}

    def restore(self, partition: Partition, saved: dict) -> None:
        pass

    def oldest_needed(self, partition: Partition) -> None:
        return None

    def forget(self, partitions: set[Partition]) -> None:
        pass


class ImageIntake:
    def __init__(self, spec: InputSpec, max_record_bytes: int) -> None:
        self.decoder = ImageDecoder(spec.image_shape, max_record_bytes)
        self.windows = NoWindows()

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

    def intake(self, max_record_bytes: int) -> ImageIntake:
        return ImageIntake(self.spec, max_record_bytes)

    def event_detail(self, scored: Scores, i: int, start_ms: int, end_ms: int) -> dict:
        channels, height, width = self.spec.image_shape
        pixel_errors = scored.pixel_map[i]
        return {
            "image": {
                "time": iso_ms(end_ms),
                "channels": channels,
                "height": height,
                "width": width,
                "error_map_png": error_map_png(pixel_errors),
                "top_regions": top_regions(pixel_errors, TOP_REGIONS),
            }
        }

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
