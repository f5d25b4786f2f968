"""The batch scorer: ready windows through the model in one forward pass, off the loop's thread.

The forward pass runs on a scoring thread while the loop's thread keeps the consumer-group
membership alive: every `KEEPALIVE_FRACTION` of max.poll.interval.ms it polls with every
partition paused (`Source.keepalive`). A batch slower than that interval (a slow or busy device)
then neither gets the member evicted nor turns into a CommitFailedError and rebalance loop. A
rebalance that such a poll runs calls back into the loop (revoke -> checkpoint -> score): the batch
in flight is finished first, so no commit passes windows that are not yet emitted.

The loop need not wait: a batch of `SMALL_BATCH` windows or more started with `wait=False` stays
in flight while the loop polls and takes the next records (the forward pass and the intake
overlap, on two cores), and `finished` hands it over once scored; the next `score` finishes it
first, so batches are emitted in order, one in flight at a time. A smaller batch (a member that
keeps up with a live stream) is waited for all the same: beside a busy loop thread its pass
slows down, each torch call waiting for the interpreter lock (measured: p50 latency 28 -> 40 ms
at 30,000 readings/s), and there is little intake to overlap it with.

On the CPU, a batch of fewer than `SMALL_BATCH` windows runs on one thread (larger ones on
`cpu_threads`, less one for the loop when it works beside the pass): alone it is at most about
1.2x slower than on two (measured on 2 cores), and the idle threads of a parallel pass spin
afterwards against the loop and the Kafka client, which a member that keeps up with a live
stream (small batches) feels most.

With `extremes`, the pass also takes each window's minimum and maximum of the first features
(the adaptive stage's range check, `window_extremes`), inside its graph: numpy would give the
interpreter lock up and take it back at each step of the folds, and beside the busy loop thread
each take waits for the loop's switch interval.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import wait as wait_for
from dataclasses import dataclass

import numpy as np
import torch

from pipeline.detector import Detector, Scores
from pipeline.modalities.windowing import ReadyWindows

__all__ = ["BatchScorer", "ScoredBatch"]

# While a batch is scored, the group hears from this member at least this often (as a fraction
# of max.poll.interval.ms), however slow the device.
KEEPALIVE_FRACTION = 0.25
# Windows below which a default-threaded CPU pass runs on one thread.
SMALL_BATCH = 512

Partition = tuple[str, int]


@dataclass
class ScoredBatch:
    """Windows scored together, with where each came from. Windows come in groups of one key
    and partition (`pending.keys`, `pending.partitions`, `pending.counts`)."""

    pending: ReadyWindows
    windows: np.ndarray  # [N, ...] raw
    scored: Scores
    start_ts: np.ndarray  # [N] epoch ms
    end_ts: np.ndarray
    seconds: float  # of the forward pass
    scaling: tuple | None = None  # per-window (center, scale) of per-key baselines
    extremes: tuple[np.ndarray, np.ndarray] | None = None  # [N, F'] minima, maxima (`extremes`)

    def __len__(self) -> int:
        return len(self.windows)

    def groups(self) -> Iterator[tuple[str, Partition, slice]]:
        """(key, partition, rows) of each group of consecutive windows."""
        start = 0
        for key, partition, count in zip(
            self.pending.keys, self.pending.partitions, self.pending.counts, strict=True
        ):
            yield key, partition, slice(start, start + count)
            start += count

    def keys(self) -> np.ndarray:
        """The key of every window."""
        return np.repeat(np.asarray(self.pending.keys, dtype=object), self.pending.counts)

    def sources(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Per window: the index of its group, and its first and last record's offsets."""
        group = np.repeat(np.arange(len(self.pending.counts)), self.pending.counts)
        first = np.concatenate(self.pending.first_offsets)
        last = np.concatenate(self.pending.last_offsets)
        return group, first, last


@dataclass
class _InFlight:
    pending: ReadyWindows
    windows: np.ndarray
    future: Future
    scaling: tuple | None = None


class BatchScorer:
    """Scores one batch at a time on its own thread; `keepalive` runs on the caller's thread
    while it waits, every `keepalive_every_s` (and `on_wait` after each keep-alive)."""

    def __init__(
        self,
        max_batch: int,
        keepalive_every_s: float,
        keepalive: Callable[[], None],
        on_wait: Callable[[], None] = lambda: None,
        threads: int = 1,
        extremes: int = 0,
    ) -> None:
        """`threads`: CPU threads of a pass of `SMALL_BATCH` windows or more (a smaller one
        takes one). `extremes`: how many first features of each series window the pass also
        takes the extremes of (`ScoredBatch.extremes`; 0: none)."""
        self.max_batch = max_batch
        self.threads = threads
        self.extremes = extremes
        self.keepalive_every_s = keepalive_every_s
        self.keepalive = keepalive
        self.on_wait = on_wait
        self._inflight: _InFlight | None = None
        self._pool: ThreadPoolExecutor | None = None

    def score(
        self,
        pending: ReadyWindows,
        detector: Detector,
        scaling: tuple | None = None,
        *,
        wait: bool = True,
    ) -> Iterator[ScoredBatch]:
        """Score `pending` (empty: nothing to score) and yield the scored batches: first a batch
        still in flight (left by `wait=False` or an interrupted call), then this one, unless a
        keep-alive's rebalance finished it already. `scaling`: per-window (center, scale) of
        per-key baselines. With `wait=False` a batch of `SMALL_BATCH` windows or more is left in
        flight instead."""
        previous = self._inflight
        if previous is not None:
            self._wait(previous)
            if self._inflight is previous:
                yield self._finish(previous)
        if not len(pending):
            return
        large = len(pending) >= SMALL_BATCH
        beside_loop = large and not wait  # leaves a core of the member's to the loop
        threads = max(1, self.threads - beside_loop) if large else 1
        batch = self._inflight = self._start(pending, detector, scaling, threads)
        if beside_loop:
            return
        self._wait(batch)
        if self._inflight is batch:
            yield self._finish(batch)

    def _wait(self, batch: _InFlight) -> None:
        """Until `batch`'s pass is done, or a keep-alive's rebalance has finished it."""
        while self._inflight is batch and not batch.future.done():
            wait_for([batch.future], timeout=self.keepalive_every_s)
            if self._inflight is batch and not batch.future.done():
                self.keepalive()
                self.on_wait()

    @property
    def busy(self) -> bool:
        """A batch is in flight."""
        return self._inflight is not None

    def finished(self) -> Iterator[ScoredBatch]:
        """The batch in flight, if its pass is done (never waits)."""
        if self._inflight is not None and self._inflight.future.done():
            yield self._finish(self._inflight)

    def _start(self, pending: ReadyWindows, detector: Detector, scaling, threads: int) -> _InFlight:
        if self._pool is None:
            self._pool = ThreadPoolExecutor(1, thread_name_prefix="aewatch-score")
        windows = np.concatenate(pending.windows)
        future = self._pool.submit(
            _score, detector, windows, self.max_batch, scaling, threads, self.extremes
        )
        return _InFlight(pending, windows, future, scaling)

    def _finish(self, batch: _InFlight) -> ScoredBatch:
        self._inflight = None
        scored, seconds, extremes = batch.future.result()
        pending = batch.pending
        return ScoredBatch(
            pending,
            batch.windows,
            scored,
            np.concatenate(pending.start_ts),
            np.concatenate(pending.end_ts),
            seconds,
            batch.scaling,
            extremes,
        )

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=False)
            self._pool = None


def _score(
    detector: Detector, windows, batch_size: int, scaling, threads: int, extremes: int = 0
) -> tuple[Scores, float, tuple | None]:
    """The scores of `windows`, the seconds the pass took, and the extremes of the windows'
    first `extremes` features (None for 0)."""
    started = time.perf_counter()
    if torch.get_num_threads() != threads:
        torch.set_num_threads(threads)
    scored = detector.score(windows, batch_size=batch_size, scaling=scaling, extremes=extremes)
    return scored, time.perf_counter() - started, scored.extremes if extremes else None
