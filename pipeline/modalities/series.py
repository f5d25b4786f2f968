"""Series of sensor readings: a detector that takes windows [W, F] of a key's readings.

Records are JSON readings or pre-cut windows (see `pipeline.modalities.readings`), windowed per
key with the training job's rule (see `pipeline.modalities.windowing`). An anomaly event names
the window's span and the features and time steps with the largest errors; alarm episodes sum
the per-feature errors of their windows.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np

from pipeline.detector.calendar import calendar_columns
from pipeline.events import iso_ms
from pipeline.modalities.base import Partition, Reject
from pipeline.modalities.readings import Decoded, RecordDecoder, Rejection, finite_rows
from pipeline.modalities.windowing import ReadyWindows, StreamWindower

if TYPE_CHECKING:
    import pandas as pd

    from pipeline.detector import Detector, InputSpec, Scores

__all__ = ["SeriesModality"]

TOP_FEATURES = 3
TOP_STEPS = 3
_NON_FINITE = Rejection("non_finite", "a value is NaN, infinite or beyond float32")


class SeriesIntake:
    """Decodes a partition's records one by one (the only per-record Python work), then checks
    and windows the good readings of every key together; pre-cut windows pass straight on."""

    def __init__(self, spec: InputSpec, max_record_bytes: int) -> None:
        self.decoder = RecordDecoder(
            spec.features, spec.window.length, max_record_bytes, spec.data_features
        )
        self.windows = StreamWindower(spec.window, len(spec.features))
        self.calendar = spec.calendar

    def take(
        self, partition: Partition, records: Sequence, pending: ReadyWindows, reject: Reject
    ) -> None:
        decode = self.decoder.decode
        readings: list[Decoded] = []
        taken: list[int] = []
        for i, record in enumerate(records):
            decoded = decode(record.key, record.value)
            if isinstance(decoded, Rejection):
                reject(record, decoded)
            elif decoded.is_window:
                window = np.asarray(decoded.values, np.float32)
                start, end = decoded.ts_start_ms, decoded.ts_ms
                pending.add(window, decoded.key, start, end, partition, record.offset)
            else:
                readings.append(decoded)
                taken.append(i)
        if not readings:
            return
        keys = [r.key for r in readings]
        ts = np.array([r.ts_ms for r in readings], np.int64)
        values = np.array([r.values for r in readings], np.float64)
        offsets = np.array([records[i].offset for i in taken], np.int64)
        finite = finite_rows(values)
        if not finite.all():
            for index in np.flatnonzero(~finite):
                reject(records[taken[index]], _NON_FINITE)
            keep = np.flatnonzero(finite)
            keys = [keys[i] for i in keep]
            taken = [taken[i] for i in keep]
            ts, values, offsets = ts[keep], values[keep], offsets[keep]
        if self.calendar:  # calendar inputs from each reading's timestamp, as in training
            values = np.hstack([values, calendar_columns(ts, self.calendar)])
        late, duplicate = self.windows.push(partition, keys, ts, values, offsets, pending)
        for index, reason in [(i, "out_of_order") for i in late] + [
            (i, "duplicate_timestamp") for i in duplicate
        ]:
            reject(records[taken[index]], Rejection(reason, "timestamp not after the key's latest"))


class SeriesModality:
    def __init__(self, spec: InputSpec) -> None:
        self.spec = spec

    def intake(self, max_record_bytes: int) -> SeriesIntake:
        return SeriesIntake(self.spec, max_record_bytes)

    def event_detail(self, scored: Scores, i: int, start_ms: int, end_ms: int) -> dict:
        names, spec = self.spec.features, self.spec.window
        feature_order = np.argsort(-scored.per_feature[i], kind="stable")[:TOP_FEATURES]
        step_order = np.argsort(-scored.per_step[i], kind="stable")[:TOP_STEPS]
        return {
            "window": {
                "start": iso_ms(start_ms),
                "end": iso_ms(end_ms),
                "length": spec.length,
                "stride": spec.stride,
            },
            "top_features": [
                {"name": names[f], "error": float(scored.per_feature[i, f])} for f in feature_order
            ],
            "top_steps": [
                {"index": int(t), "error": float(scored.per_step[i, t])} for t in step_order
            ],
        }

    @property
    def alarm_features(self) -> tuple[str, ...]:
        return tuple(self.spec.features)

    def alarm_errors(self, scored: Scores) -> np.ndarray:
        return scored.per_feature

    def mismatch(self, candidate: InputSpec) -> tuple[str, str] | None:
        old, new = self.spec, candidate
        if tuple(old.features) != tuple(new.features):
            return "features", f"features {list(new.features)}, serving {list(old.features)}"
        if (old.window.length, old.window.stride) != (new.window.length, new.window.stride):
            return (
                "window",
                f"window {new.window.length}/{new.window.stride}, "
                f"serving {old.window.length}/{old.window.stride}",
            )
        return None

    def score_rows(self, detector: Detector, rows: pd.DataFrame) -> pd.DataFrame:
        """One output row per input reading: the score of the window ending at it."""
        from pipeline.batch import score_readings

        return score_readings(detector, rows)

    def version_tags(self) -> dict[str, str]:
        window = self.spec.window
        return {
            "window": f"{window.length}/{window.stride}",
            "features": ",".join(self.spec.features),
        }

    def example_rows(self, sample: np.ndarray) -> pd.DataFrame:
        """A window as the pyfunc takes it: one reading per row, with a key and a time."""
        import pandas as pd

        names = list(self.spec.data_features)  # calendar inputs come from the times
        frame = pd.DataFrame(sample[:, : len(names)], columns=names)
        times = pd.date_range("2026-01-01", periods=len(frame), freq="s").astype(str)
        frame.insert(0, "ts", times)
        frame.insert(0, "key", "example")
        return frame
