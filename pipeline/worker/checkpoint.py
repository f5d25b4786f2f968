"""Checkpoints: what was processed becomes durable, then committed, in one written-down order.

A checkpoint (every `commit_interval_ms`, on partition revoke, on shutdown) goes:

1. score what is pending and emit its events (the loop does this before calling `save`), and
   make them durable: flush the producer (every event and dead letter acknowledged);
2. write each touched partition's state to the compacted state topic: the keys' window positions
   and whatever else keeps per-key state (alarm episodes), one record per partition. Keys silent
   beyond `--key-ttl-s` are forgotten first, by every stage (`pipeline.modalities.expiry`), after
   `on_expired` has emitted what their going ends (an open alarm resolves), before step 1's flush;
3. make the state durable: flush again, or, exactly-once, commit the transaction that holds the
   events, dead letters, state and offsets;
4. commit, per partition, the offset of the oldest reading an unfinished window still needs (or of
   the next record): Kafka stores the offset of the next record to read. Offsets never go back.
   Readings of parked keys (`pipeline.modalities.parking`) are in the state record, not needed.
   A checkpoint of the interval sends its commit without waiting for the group's answer (a round
   trip to the group coordinator, about half of such a checkpoint on a busy broker); a refusal
   comes back in a later poll, and the next checkpoint commits those partitions again. On revoke
   and on shutdown the commit is waited for: the partitions' next owner reads from it.

State is therefore never older than the commit, and never newer than the events: a state record
that says a window was emitted is written only once that window's event is acknowledged (the
producer sends each partition's batches on its own, so one flush could land the state record and
then die before an event batch of another partition). A member that takes a partition over reads
from the commit, skips what the state says was used, and continues the same windows.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping

from pipeline.errors import CommitRejected
from pipeline.kafka_io.protocols import Sink, Source
from pipeline.modalities.base import StreamWindows
from pipeline.worker.metrics import WorkerMetrics, WorkerStats
from pipeline.worker.state import KeyedState, StateStore, decode_state

__all__ = ["Checkpointer"]

log = logging.getLogger(__name__)
Partition = tuple[str, int]


class Checkpointer:
    """Offsets processed and committed per partition, and the checkpoint that moves them."""

    def __init__(
        self,
        sink: Sink,
        store: StateStore,
        windows: StreamWindows,
        stages: Mapping[str, KeyedState],
        metrics: WorkerMetrics,
        stats: WorkerStats,
        clock: Callable[[], float],
        on_expired: Callable[[Partition, list[str]], None] = lambda partition, keys: None,
    ) -> None:
        self.sink, self.store, self.windows = sink, store, windows
        self.on_expired = on_expired  # called with a partition's forgotten keys, before they go
        self.stages = stages  # every holder of per-key state, by its name in the state record
        self.metrics, self.stats, self.clock = metrics, stats, clock
        self.processed: dict[Partition, int] = {}  # next offset after what was processed
        self.began: dict[Partition, int] = {}  # first offset processed since the assignment
        self.committed: dict[Partition, int] = {}
        self._last_commit: dict[Partition, int] = {}  # kept across revocations
        self._recommit: set[Partition] = set()  # commits refused after the checkpoint went on
        self.touched: set[Partition] = set()

    def took(self, partition: Partition, first_offset: int, next_offset: int) -> None:
        """Records of `partition` from `first_offset` to before `next_offset` were processed."""
        self.processed[partition] = next_offset
        self.touched.add(partition)
        self.began.setdefault(partition, first_offset)

    def uncommitted(self, partitions: set[Partition]) -> dict[Partition, int]:
        """Where what was processed and not committed since the assignment begins."""
        since = {p: self.began[p] for p in partitions if p in self.began}
        return since | {p: self.committed[p] for p in partitions if p in self.committed}

    def restore(self, partitions: set[Partition]) -> tuple[int, dict[Partition, int]]:
        """Load the saved state of newly assigned partitions into every stage. Returns for how
        many there was state, and where to read again from those this member committed before
        (see `Worker.on_assigned`)."""
        records = self.store.load(partitions) if partitions else {}
        restored = [p for p, record in records.items() if self._restore(p, record)]
        rewind = {p: self._last_commit[p] for p in partitions if p in self._last_commit}
        # The state's own resume point, even past a refused commit, and not this member's older
        # commit: another owner may have moved on since, and all it read would be read again.
        for partition in restored:
            oldest = self.windows.oldest_needed(partition)
            if oldest is not None:
                rewind[partition] = oldest
        return len(restored), rewind

    def _restore(self, partition: Partition, record: bytes) -> bool:
        """Hand each stage its part of the partition's record; False, with every stage left
        without the partition's keys, if the record or a part of it cannot be read."""
        try:
            saved = decode_state(record)
            for name, stage in self.stages.items():
                stage.restore(partition, saved.get(name) or {})
        except Exception as exc:  # noqa: BLE001 - one unreadable record must not stop the group
            for stage in self.stages.values():
                stage.forget({partition})
            self.metrics.state_refused.inc()
            log.error(
                "state record of %s:%d refused, its keys start afresh from the committed "
                "offset: %s",
                *partition,
                f"{type(exc).__name__}: {exc}"[:300],
            )
            return False
        return True

    def forget(self, partitions: set[Partition]) -> None:
        """Nothing of these partitions stays: a member that kept them would write stale state
        over the new owner's."""
        for stage in self.stages.values():
            stage.forget(partitions)
        self.metrics.forget(partitions)
        self.touched -= partitions
        for partition in partitions:
            self.processed.pop(partition, None)
            self.began.pop(partition, None)
            self.committed.pop(partition, None)
        self._recommit -= partitions

    def _expire(self, partition: Partition) -> None:
        """Keys of the partition silent for long leave every stage (`pipeline.modalities.expiry`)."""
        gone = self.windows.expire(partition)
        if not gone:
            return
        self.on_expired(partition, gone)
        for stage in self.stages.values():
            stage.drop(partition, gone)
        self.metrics.forget_keys(gone)
        self.metrics.keys_expired.inc(len(gone))
        log.info("forgot %d keys of %s:%d, silent for long: %s", len(gone), *partition, gone[:5])

    def commit_offsets(self) -> dict[Partition, int]:
        """Per partition: the oldest reading still needed, else the next record; never back."""
        offsets = {}
        for partition, next_offset in self.processed.items():
            oldest = self.windows.oldest_needed(partition)
            offset = next_offset if oldest is None else min(next_offset, oldest)
            if offset > self.committed.get(partition, -1) or partition in self._recommit:
                offsets[partition] = max(offset, self.committed.get(partition, -1))
        return offsets

    def save(
        self,
        source: Source | None,
        assigned: set[Partition],
        *,
        reason: str,
        model_version: str,
        started: float,
    ) -> None:
        """The flush of step 1, and steps 2 to 4 of the module notes (step 1, begun at
        `started`, has scored and emitted)."""
        partitions = self.touched & assigned
        for partition in partitions:
            self._expire(partition)
        if not self.sink.transactional:
            self.sink.flush()
        saved = {}
        for partition in partitions:
            state = {name: stage.state(partition) for name, stage in self.stages.items()}
            size = self.store.save(partition, state)
            parked = len((state.get("parked") or {}).get("keys", ()))
            saved[partition] = (len(state.get("resume") or ()), parked, size)
        self.touched.clear()
        if source is not None and not self.sink.transactional:
            self._recommit |= source.refused_commits() & self.processed.keys()
        offsets = self.commit_offsets() if source is not None else {}
        if self.sink.transactional:
            metadata = source.group_metadata() if source is not None else None
            self.sink.commit(offsets, metadata)
        else:
            self.sink.flush()
            if offsets:
                try:
                    source.commit(offsets, wait=reason != "interval")
                    self._recommit -= offsets.keys()
                except CommitRejected as exc:
                    # evicted (or rebalancing): the next poll rejoins, and whoever owns these
                    # partitions then reads them again from the last accepted commit
                    log.warning("commit refused by the group, will rejoin: %s", exc)
                    offsets = {}
        if source is not None:
            highwaters = source.highwaters(self.processed)
            self.metrics.set_lag(
                {p: max(0, hw - self.processed[p]) for p, hw in highwaters.items()}
            )
        if offsets:
            self.committed.update(offsets)
            self._last_commit.update(offsets)
        reread = {
            p: n - self.committed[p] for p, n in self.processed.items() if p in self.committed
        }
        self.metrics.set_held(reread, saved)
        if offsets:
            self.stats.commits += 1
            self.metrics.commits.inc()
            log.info(
                "checkpoint (%s, %.0f ms): %s",
                reason,
                1000 * (self.clock() - started),
                self.stats.snapshot(),
                extra={
                    "fields": {
                        "checkpoint": reason,
                        "stats": self.stats.snapshot(),
                        "model_version": model_version,
                        "commit": {f"{t}:{p}": o for (t, p), o in offsets.items()},
                    }
                },
            )
