"""Training on series larger than memory: prepared splits that are read again on every pass.

`prepare_streamed` makes the two preparatory passes of `SeriesStream` (split plan, scaler) and
returns `StreamedSplits`, the out-of-core `Splits` (the in-memory ones are in
`training.data.prepared`). Training then reads the
data once per epoch for the training windows and once for the validation loss; calibration and
the false-positive estimate read their splits once, on rank 0.

Training windows are shuffled within a buffer of `shuffle_windows` windows (not over the whole
split, which is never in memory), and with several ranks window i of the stream goes to rank
i mod world size. Peak memory is the record batch, the per-key carry-over and that buffer.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np
import torch
from torch.utils.data import IterableDataset

from pipeline.detector import InputSpec, Scaler, WindowSet, WindowSpec
from pipeline.errors import DataError
from training.data.splits import PARTS, SplitScores
from training.data.streamed import SeriesStream, SplitPlan
from training.distributed import RankContext

__all__ = [
    "ShuffledWindows",
    "StreamBatches",
    "StreamedSplits",
    "prepare_streamed",
    "rank_windows",
    "validation_batches",
]

log = logging.getLogger(__name__)
_SCORE_BATCH = 4096


@dataclass
class StreamedSplits:
    """Out-of-core splits: the stream, its split plan, the window spec and the fitted scaler."""

    input: InputSpec
    scaler: Scaler
    stream: SeriesStream
    plan: SplitPlan
    _scored: dict = field(default_factory=dict, repr=False)

    @property
    def spec(self) -> WindowSpec:
        return self.input.window

    @property
    def digest(self) -> str:
        return self.plan.digest

    @property
    def time_range(self) -> tuple[str, str]:
        return self.plan.time_range

    def window_counts(self) -> dict[str, int]:
        return {part: self.plan.windows(part, self.spec) for part in PARTS}

    def has(self, split: str) -> bool:
        return self.plan.windows(split, self.spec) > 0

    def windows(self, split: str) -> Iterator[WindowSet]:
        """The split's raw windows, chunk by chunk."""
        return self.stream.windows(self.plan, split, self.spec)

    def first_sample(self, split: str) -> np.ndarray | None:
        return next((ws.windows[0] for ws in self.windows(split)), None)

    def fit_inputs(self, config, *, batch_size, shuffle_windows, seed, context, device):
        """The training and validation inputs of `fit`: streams of this rank's windows."""
        shuffled = ShuffledWindows(
            self,
            "train",
            batch_size=max(1, batch_size // context.world_size),
            buffer_windows=shuffle_windows,
            seed=seed,
            context=context,
        )
        val = validation_batches(self, context, device) if self.has("validation") else None
        return StreamBatches(shuffled, device), val

    def evaluate(self, detector, split: str, rule="end", scores=None, threshold=None) -> None:
        """Not point by point: that needs every reading of the split (`aewatch evaluate`)."""
        if self.stream.label_col:
            log.info(
                "out of core, the %s split is not evaluated point by point: aewatch evaluate", split
            )
        return None

    def figures(self, detector, split: str, scores: np.ndarray) -> dict:
        return {}

    def term_statistics(self, detector, split: str, limit: int) -> np.ndarray:
        """The terms score's statistics of the split's normal windows, read once (about
        `limit` of them, every k-th window when the split holds more)."""
        every = max(1, -(-self.plan.windows(split, self.spec) // limit))
        parts, seen = [], 0
        for ws in self.windows(split):
            keep = np.arange(len(ws))
            keep = keep[(keep + seen) % every == 0]
            seen += len(ws)
            if ws.any_labels is not None:
                keep = keep[~ws.any_labels[keep]]
            if len(keep):
                parts.append(detector.term_statistics(ws.windows[keep]).astype(np.float32))
        return np.concatenate(parts) if parts else np.zeros(0)

    def split_scores(self, detector, split: str) -> SplitScores:
        """Scores of a whole split, read once per detector and split (one float a window)."""
        cached = self._scored.get(split)
        if cached is not None and cached[0] is detector:
            return cached[1]
        scores, ends, anys = [], [], []
        for ws in self.windows(split):
            for start in range(0, len(ws), _SCORE_BATCH):
                chunk = ws.windows[start : start + _SCORE_BATCH]
                scores.append(detector.score(chunk, attribution=False).scores)
            if ws.end_labels is not None:
                ends.append(ws.end_labels)
                anys.append(ws.any_labels)
        joined = np.concatenate(scores) if scores else np.zeros(0)
        labels = np.concatenate(ends) if ends else None
        normal = ~np.concatenate(anys) if anys else np.ones(len(joined), dtype=bool)
        result = SplitScores(joined, labels, normal)
        self._scored[split] = (detector, result)
        return result


def prepare_streamed(settings, scaler_kind: str) -> StreamedSplits:
    """The split plan (pass one) and the scaler of the training rows (pass two)."""
    stream = SeriesStream(
        settings.data, **settings.series_columns(), batch_rows=settings.batch_rows
    )
    spec = WindowSpec(settings.window, settings.stride)
    plan = stream.plan(settings.fractions, settings.train_until)
    if plan.windows("train", spec) == 0:
        raise DataError(
            f"{settings.data}: the train split of every key is shorter than one window of "
            f"{spec.length}"
        )
    scaler = stream.fit_scaler(plan, scaler_kind)
    input_spec = InputSpec("series", features=stream.features, window=spec)
    return StreamedSplits(input_spec, scaler, stream, plan)


class ShuffledWindows(IterableDataset):
    """Scaled training windows of this rank as float32 batches [B, W, F].

    Windows holding a labelled anomaly are left out (as in memory). Each epoch shuffles within
    a buffer of `buffer_windows`, seeded by (seed, epoch); the last batch may be short.
    """

    def __init__(
        self,
        data: StreamedSplits,
        split: str,
        *,
        batch_size: int,
        buffer_windows: int,
        seed: int,
        context: RankContext,
        drop_labelled: bool = True,
    ) -> None:
        super().__init__()
        self.data, self.split = data, split
        self.batch_size, self.buffer_windows = batch_size, max(buffer_windows, batch_size)
        self.seed, self.context, self.drop_labelled = seed, context, drop_labelled
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self) -> Iterator[torch.Tensor]:
        rng = np.random.default_rng([self.seed, self.epoch])
        pending: list[np.ndarray] = []
        held = 0
        for windows in rank_windows(self.data, self.split, self.context, self.drop_labelled):
            pending.append(self.data.scaler.transform(windows))
            held += len(windows)
            if held >= self.buffer_windows:
                rest = yield from self._batches(np.concatenate(pending), rng, keep_rest=True)
                pending, held = [rest], len(rest)
        if held:
            yield from self._batches(np.concatenate(pending), rng, keep_rest=False)

    def _batches(self, buffer: np.ndarray, rng, *, keep_rest: bool):
        shuffled = buffer[rng.permutation(len(buffer))]
        full = len(shuffled) - len(shuffled) % self.batch_size if keep_rest else len(shuffled)
        for start in range(0, full, self.batch_size):
            yield torch.from_numpy(shuffled[start : start + self.batch_size])
        return shuffled[full:]


def rank_windows(
    data: StreamedSplits, split: str, context: RankContext, drop_labelled: bool
) -> Iterator[np.ndarray]:
    """This rank's raw windows of a split: stream window i belongs to rank i mod world size.
    `drop_labelled` leaves out windows holding a labelled anomaly."""
    rank, world = context.rank, context.world_size
    index = 0
    for ws in data.windows(split):
        windows = ws.windows
        if drop_labelled and ws.any_labels is not None:
            windows = windows[~ws.any_labels]
        if world > 1:
            first = (rank - index) % world
            index += len(windows)
            windows = windows[first::world]
        if len(windows):
            yield windows


class StreamBatches:
    """A `BatchSource` over `ShuffledWindows`, moved to the training device."""

    def __init__(self, dataset: ShuffledWindows, device: torch.device) -> None:
        self.dataset, self.device = dataset, device

    def epoch(self, epoch: int) -> Iterator[tuple[torch.Tensor, float]]:
        self.dataset.set_epoch(epoch)
        for batch in self.dataset:
            yield batch.to(self.device, non_blocking=True), 1.0


def validation_batches(data: StreamedSplits, context: RankContext, device: torch.device):
    """A function giving this rank's scaled validation windows in batches, for `fit`."""

    def batches() -> Iterator[torch.Tensor]:
        for windows in rank_windows(data, "validation", context, drop_labelled=False):
            scaled = data.scaler.transform(windows)
            for start in range(0, len(scaled), _SCORE_BATCH):
                yield torch.from_numpy(scaled[start : start + _SCORE_BATCH]).to(device)

    return batches
