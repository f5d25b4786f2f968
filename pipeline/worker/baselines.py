"""The worker's per-key baselines stage: a `KeyedState` between the windows and the model.

Before a batch is scored, `take` hands each key's windows to its `KeyBaselines` (one per
partition, see `pipeline.detector.key_baselines`): windows of a key's warm-up are taken out (not
scored, no events, no alarms), the others get the center and scale their key is scored with, and
with level following the windows past the end of a key's current block wait for the next pass.
After the decisions, `follow` gives them back. The state of every key is saved under `baselines`
in the partition's state record, so a restart or a new owner continues the same baselines.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from pipeline.detector import Detector
from pipeline.detector.key_baselines import (
    SCALE_RULES,
    BaselineConfig,
    KeyBaselines,
    check_baselines,
)
from pipeline.modalities.windowing import ReadyWindows
from pipeline.settings import check, setting

__all__ = ["ADAPTIVE_COLUMNS", "BaselineSettings", "BaselineStage", "adaptive_rows", "column_refs"]

# What the adaptive stage judges per key: the window score; each feature's reconstruction error;
# or each feature's error and how far its window mean is from the key's baseline.
ADAPTIVE_COLUMNS = ("score", "features", "levels")
COLUMNS_HELP = (
    "what the adaptive stage judges per key: score (the window score), features (each "
    "feature's error) or levels (each feature's error and its window mean's distance from "
    "the key's baseline)"
)

Partition = tuple[str, int]


@dataclass(frozen=True)
class BaselineSettings:
    """Per-key baselines (see `pipeline.detector.key_baselines`); also `aewatch score`'s."""

    key_baselines: bool = setting(
        "keys not seen in training learn their own level and spread in a warm-up, in which "
        "they do not alarm (keys seen in training always use their own)",
        False,
    )
    baseline_warmup: int = setting(
        "readings of a key's warm-up (0: ten windows' worth)", 0, minimum=0
    )
    baseline_scale: str = setting(
        "spread of a warmed-up key: ratio (its warm-up spread over the detector's rho) or "
        "center (the detector's own)",
        "ratio",
        choices=SCALE_RULES,
    )
    level_half_life: float = setting(
        "follow each key's level: half-life in readings of its mean over windows judged normal "
        "(0: off)",
        0.0,
        minimum=0,
    )

    def __post_init__(self) -> None:
        check(self)

    def config(self) -> BaselineConfig:
        return BaselineConfig(
            warmup=self.key_baselines,
            warmup_readings=self.baseline_warmup,
            scale_rule=self.baseline_scale,
            half_life=self.level_half_life,
        )


def _flat(pending: ReadyWindows) -> dict:
    """The arrays of `pending` joined (its lists split windows by arrival, not by group)."""
    names = ("windows", "start_ts", "end_ts", "first_offsets", "last_offsets")
    return {name: np.concatenate(getattr(pending, name)) for name in names}


def _append(out: ReadyWindows, flat: dict, key: str, partition, lo: int, hi: int) -> None:
    """Windows lo:hi of the joined arrays as a group of `out`."""
    if hi <= lo:
        return
    out.windows.append(flat["windows"][lo:hi])
    out.start_ts.append(flat["start_ts"][lo:hi])
    out.end_ts.append(flat["end_ts"][lo:hi])
    out.first_offsets.append(flat["first_offsets"][lo:hi])
    out.last_offsets.append(flat["last_offsets"][lo:hi])
    out.keys.append(key)
    out.partitions.append(partition)
    out.counts.append(hi - lo)


class BaselineStage:
    """Per-key baselines of the partitions this member owns."""

    def __init__(self, config: BaselineConfig, detector: Detector) -> None:
        self.config, self.detector = config, detector
        self.parts: dict[Partition, KeyBaselines] = {}
        self.warmup_windows = 0  # windows taken by warm-ups (not scored)
        check_baselines(detector)  # a detector it cannot serve is refused here

    @staticmethod
    def needed(config: BaselineConfig, detector: Detector) -> bool:
        """Whether any key of `detector` is scored otherwise than with its scaler."""
        trained = detector.baselines is not None and bool(detector.baselines.keys)
        return detector.input.kind == "series" and (config.warmup or trained)

    def _part(self, partition: Partition) -> KeyBaselines:
        part = self.parts.get(partition)
        if part is None:
            part = self.parts[partition] = KeyBaselines(self.config, self.detector)
        return part

    def take(self, pending: ReadyWindows):
        """(windows to score now, their per-window (center, scale) or None, windows that wait)."""
        now, later = ReadyWindows(), ReadyWindows()
        if not len(pending):
            return now, None, later
        flat = _flat(pending)
        centers, scales = [], []
        waiting: set[tuple[Partition, str]] = set()
        own = False
        hi = 0
        for key, partition, count in zip(
            pending.keys, pending.partitions, pending.counts, strict=True
        ):
            lo, hi = hi, hi + count
            if (partition, key) in waiting:
                _append(later, flat, key, partition, lo, hi)
                continue
            part = self._part(partition)
            warm, take = part.take(key, flat["windows"][lo:hi])
            self.warmup_windows += warm
            _append(now, flat, key, partition, lo + warm, lo + warm + take)
            if warm + take < count:
                _append(later, flat, key, partition, lo + warm + take, hi)
                waiting.add((partition, key))
            if take:
                center, scale = part.scaling(key)
                own = own or center is not part.c
                centers.append(np.broadcast_to(center, (take, len(center))))
                scales.append(np.broadcast_to(scale, (take, len(scale))))
        scaling = (np.concatenate(centers), np.concatenate(scales)) if own else None
        return now, scaling, later

    def follow(self, batch, normal: np.ndarray) -> None:
        """The decisions of a scored batch (`ScoredBatch`): level following."""
        if not self.config.follow_rate:
            return
        for key, partition, rows in batch.groups():
            part = self.parts.get(partition)
            if part is not None:
                part.follow(key, batch.windows[rows], normal[rows])

    def use(self, detector: Detector) -> None:
        """A new detector version serves from the next batch on."""
        check_baselines(detector)
        self.detector = detector
        for part in self.parts.values():
            part.use(detector)

    # -- KeyedState ------------------------------------------------------------------------------
    def state(self, partition: Partition) -> dict:
        part = self.parts.get(partition)
        return {} if part is None else {key: part.state(key) for key in part.keys}

    def restore(self, partition: Partition, saved: dict) -> None:
        part = self.parts[partition] = KeyBaselines(self.config, self.detector)
        for key, entry in saved.items():
            part.restore(key, entry)

    def drop(self, partition: Partition, keys) -> None:
        part = self.parts.get(partition)
        for key in keys if part is not None else ():
            part.keys.pop(key, None)  # a key of the training set comes back with its statistics

    def forget(self, partitions: set[Partition]) -> None:
        for partition in partitions:
            self.parts.pop(partition, None)


def column_refs(columns: str, detector: Detector, score_ref: float) -> list[float]:
    """The reference scale of each adaptive channel: the model's typical score for errors, one
    baseline spread for levels."""
    n = len(detector.input.features) if detector.input.kind == "series" else 0
    if columns == "score" or not n:
        return [score_ref]
    return [score_ref] * n + ([1.0] * n if columns == "levels" else [])


def adaptive_rows(columns: str, batch, detector: Detector) -> np.ndarray:
    """The adaptive stage's input of a scored batch: [N] scores or [N, C] channels. A level is
    the absolute distance of a feature's window mean from its key's baseline, in the key's
    spread (the detector's scaler for keys without one): a level the key has not had lately."""
    scored = batch.scored
    if columns == "score" or scored.per_feature is None:
        return scored.scores
    if columns == "features":
        return scored.per_feature
    means = np.asarray(batch.windows, np.float64).mean(axis=1)
    if batch.scaling is None:
        center = np.asarray(detector.scaler.center, np.float32)
        scale = np.asarray(detector.scaler.scale, np.float32)
    else:
        center, scale = batch.scaling
    levels = np.abs(means - np.asarray(center, np.float64)) / np.asarray(scale, np.float64)
    return np.hstack([scored.per_feature, levels])
