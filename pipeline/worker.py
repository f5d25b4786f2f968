"""The scoring loop: poll -> decode -> window -> batch score -> produce -> checkpoint.

A small state machine around one consumer-group membership:

- poll: records arrive per partition; each is decoded (or dead-lettered with a reason), readings
  are windowed per key with numpy, pre-cut windows pass straight through;
- score: ready windows from every key and partition wait at most `max_wait_ms` or until
  `max_batch` are ready, then go through the model in one forward pass;
- produce: an event for each anomalous window (every window with `emit_all`);
- checkpoint (every `commit_interval_ms`, on revoke, on shutdown), in this order: score what is
  pending, write each partition's window positions to the state topic, flush the producer (every
  event, dead letter and state record acknowledged), then commit for each partition the offset of
  the oldest reading an unfinished window still needs (or of the next record). Offsets never go
  backwards.

Delivery is at-least-once: after a crash, records since the last commit are read again and
windows completed since then are emitted again, with the same event ids.
"""

from __future__ import annotations

import gc
import logging
import time
from collections import Counter, defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import orjson

from pipeline.config import WorkerSettings
from pipeline.detector import Detector
from pipeline.events import EVENT_TYPE, ModelIdentity, dead_letter_headers, event_id, iso_ms
from pipeline.records import Decoded, RecordDecoder, Rejection, finite_rows
from pipeline.windowing import ReadyWindows, StreamWindower

__all__ = ["Worker", "WorkerStats"]

log = logging.getLogger(__name__)
Partition = tuple[str, int]
# Poll timeout while nothing waits to be scored. kafka-python can hold fetched records until a
# longer timeout runs out (measured: p99 latency 196 ms with 100 ms polls, 78 ms with 20 ms).
IDLE_POLL_MS = 20
TOP_FEATURES = 3
TOP_STEPS = 3


@dataclass
class WorkerStats:
    records_in: int = 0
    windows_scored: int = 0
    events_out: int = 0
    batches: int = 0
    commits: int = 0
    dead_letters: Counter = field(default_factory=Counter)
    dropped: Counter = field(default_factory=Counter)
    latencies_ms: list[float] = field(default_factory=list)

    def snapshot(self) -> dict:
        return {
            "records_in": self.records_in,
            "windows_scored": self.windows_scored,
            "events_out": self.events_out,
            "dead_letters": dict(self.dead_letters),
            "batches": self.batches,
            "commits": self.commits,
        }


class Worker:
    def __init__(
        self,
        settings: WorkerSettings,
        detector: Detector,
        model: ModelIdentity,
        sink,
        state,
        *,
        clock: Callable[[], float] = time.monotonic,
        wall_ms: Callable[[], float] = lambda: time.time() * 1000.0,
    ) -> None:
        if detector.input.kind != "series":
            raise ValueError("this worker scores series detectors")
        self.settings = settings
        self.detector = detector
        self.model = model
        self.sink = sink
        self.state = state
        self.clock = clock
        self.wall_ms = wall_ms
        spec = detector.input.window
        self.decoder = RecordDecoder(
            detector.input.features, spec.length, settings.max_record_bytes
        )
        self.windower = StreamWindower(spec, len(detector.input.features))
        self.pending = ReadyWindows()
        self.pending_since: float | None = None
        self.processed: dict[Partition, int] = {}
        self.committed: dict[Partition, int] = {}
        self.touched: set[Partition] = set()
        self.assigned: set[Partition] = set()
        self._assigned_at = float("-inf")
        self.stats = WorkerStats()
        self.source = None
        self._stop = False
        self._last_checkpoint = clock()

    # -- wiring ----------------------------------------------------------------------------------
    def attach(self, source) -> None:
        self.source = source

    def stop(self) -> None:
        """Ask the loop to finish its batch, checkpoint and leave (signal-handler safe)."""
        self._stop = True

    def on_assigned(self, partitions: set[Partition]) -> None:
        self.assigned |= partitions
        self._assigned_at = self.clock()
        restored = self.state.load(partitions) if partitions else {}
        for partition, resume in restored.items():
            self.windower.restore(partition, resume)
        log.info("assigned %s (state for %d)", sorted(partitions), len(restored))

    def on_revoked(self, partitions: set[Partition]) -> None:
        if partitions:
            self.checkpoint(reason="revoke")
        self.windower.forget(partitions)
        self.assigned -= partitions
        for partition in partitions:
            self.processed.pop(partition, None)
            self.committed.pop(partition, None)
        log.info("revoked %s", sorted(partitions))

    # -- the loop --------------------------------------------------------------------------------
    def run(self) -> WorkerStats:
        # Objects alive now (model, settings, clients) never become garbage: keep them out of
        # the collector's generations so its pauses stay short on the hot path.
        gc.freeze()
        idle_since = self.clock()
        interval = self.settings.commit_interval_ms / 1000.0
        wait = self.settings.max_wait_ms / 1000.0
        try:
            while not self._stop:
                timeout_ms = IDLE_POLL_MS
                if self.pending_since is not None:
                    left = wait - (self.clock() - self.pending_since)
                    timeout_ms = max(0, int(left * 1000))
                polled = self.source.poll(timeout_ms)
                now = self.clock()
                if polled or self._assigned_at > idle_since:  # input, or a new assignment
                    idle_since = now
                if polled:
                    self.process(polled)
                if self.pending_since is not None and (
                    len(self.pending) >= self.settings.max_batch or now - self.pending_since >= wait
                ):
                    self.score_pending()
                if now - self._last_checkpoint >= interval:
                    self.checkpoint()
                idle_limit = self.settings.stop_after_idle_s
                if idle_limit and now - idle_since >= idle_limit:
                    log.info("no input for %.1fs; stopping", idle_limit)
                    break
        finally:
            self.checkpoint(reason="shutdown")
        return self.stats

    def process(self, polled: dict[Partition, list]) -> None:
        """Decode and window one poll's records."""
        for partition, records in polled.items():
            if not records:
                continue
            self.stats.records_in += len(records)
            groups: dict[str, tuple[list, list, list, list]] = defaultdict(lambda: ([], [], [], []))
            for record in records:
                decoded = self.decoder.decode(record.key, record.value)
                if isinstance(decoded, Rejection):
                    self.dead_letter(record, decoded)
                elif decoded.is_window:
                    self._add_window(partition, record, decoded)
                else:
                    ts, values, offsets, originals = groups[decoded.key]
                    ts.append(decoded.ts_ms)
                    values.append(decoded.values)
                    offsets.append(record.offset)
                    originals.append(record)
            for key, (ts, values, offsets, originals) in groups.items():
                ts, values = np.asarray(ts, np.int64), np.asarray(values, np.float64)
                offsets = np.asarray(offsets, np.int64)
                finite = finite_rows(values)
                if not finite.all():
                    for index in np.flatnonzero(~finite):
                        self.dead_letter(
                            originals[index],
                            Rejection("non_finite", "a value is NaN, infinite or beyond float32"),
                        )
                    keep = np.flatnonzero(finite)
                    ts, values, offsets = ts[keep], values[keep], offsets[keep]
                    originals = [originals[i] for i in keep]
                late, duplicate = self.windower.push(
                    key, partition, ts, values.astype(np.float32), offsets, self.pending
                )
                for index, reason in [(i, "out_of_order") for i in late] + [
                    (i, "duplicate_timestamp") for i in duplicate
                ]:
                    self._reject_order(originals[index], reason)
            self.processed[partition] = records[-1].offset + 1
            self.touched.add(partition)
        if len(self.pending) and self.pending_since is None:
            self.pending_since = self.clock()

    def _add_window(self, partition: Partition, record, decoded: Decoded) -> None:
        window = np.asarray(decoded.values, np.float32)[None]
        self.pending.windows.append(window)
        self.pending.keys.append(decoded.key)
        self.pending.start_ts.append(np.array([decoded.ts_start_ms], np.int64))
        self.pending.end_ts.append(np.array([decoded.ts_ms], np.int64))
        self.pending.partitions.append(partition)
        self.pending.first_offsets.append(np.array([record.offset], np.int64))
        self.pending.last_offsets.append(np.array([record.offset], np.int64))
        self.pending.counts.append(1)

    def _reject_order(self, record, reason: str) -> None:
        if self.settings.order_policy == "drop":
            self.stats.dropped[reason] += 1
        else:
            self.dead_letter(record, Rejection(reason, "timestamp not after the key's latest"))

    def dead_letter(self, record, rejection: Rejection) -> None:
        headers = list(record.headers or []) + dead_letter_headers(
            rejection.reason, rejection.detail, record.topic, record.partition, record.offset
        )
        self.sink.send(self.settings.dlq_topic, key=record.key, value=record.value, headers=headers)
        self.stats.dead_letters[rejection.reason] += 1

    # -- scoring ---------------------------------------------------------------------------------
    def score_pending(self) -> None:
        pending, self.pending, self.pending_since = self.pending, ReadyWindows(), None
        n = len(pending)
        if n == 0:
            return
        counts = np.asarray(pending.counts)
        windows = np.concatenate(pending.windows)
        keys = np.repeat(np.asarray(pending.keys, dtype=object), counts)
        group = np.repeat(np.arange(len(counts)), counts)
        start_ts = np.concatenate(pending.start_ts)
        end_ts = np.concatenate(pending.end_ts)
        first_offsets = np.concatenate(pending.first_offsets)
        last_offsets = np.concatenate(pending.last_offsets)
        scored = self.detector.score(windows, batch_size=self.settings.max_batch)
        threshold = self.detector.threshold
        flags = scored.scores > threshold.value
        chosen = np.arange(n) if self.settings.emit_all else np.flatnonzero(flags)
        self.stats.batches += 1
        self.stats.windows_scored += n
        if len(chosen) == 0:
            return
        p_values = threshold.p_values(scored.scores[chosen])
        names = self.detector.input.features
        spec = self.detector.input.window
        now_ms = self.wall_ms()
        for j, i in enumerate(chosen):
            key = str(keys[i])
            topic, part = pending.partitions[group[i]]
            feature_order = np.argsort(-scored.per_feature[i], kind="stable")[:TOP_FEATURES]
            step_order = np.argsort(-scored.per_step[i], kind="stable")[:TOP_STEPS]
            score = float(scored.scores[i])
            end_ms = int(end_ts[i])
            event = {
                "specversion": "1.0",
                "id": event_id(self.model, key, end_ms),
                "source": self.model.source,
                "type": EVENT_TYPE,
                "subject": key,
                "time": iso_ms(end_ms),
                "datacontenttype": "application/json",
                "data": {
                    "key": key,
                    "score": score,
                    "threshold": threshold.value,
                    "p_value": float(p_values[j]),
                    "severity": score / threshold.value if threshold.value > 0 else score,
                    "is_anomaly": bool(flags[i]),
                    "model": {
                        "name": self.model.name,
                        "version": self.model.version,
                        "alias": self.model.alias,
                    },
                    "window": {
                        "start": iso_ms(int(start_ts[i])),
                        "end": iso_ms(end_ms),
                        "length": spec.length,
                        "stride": spec.stride,
                    },
                    "top_features": [
                        {"name": names[f], "error": float(scored.per_feature[i, f])}
                        for f in feature_order
                    ],
                    "top_steps": [
                        {"index": int(t), "error": float(scored.per_step[i, t])} for t in step_order
                    ],
                    "source": {
                        "topic": topic,
                        "partition": int(part),
                        "offset_start": int(first_offsets[i]),
                        "offset_end": int(last_offsets[i]),
                    },
                },
            }
            self.sink.send(self.settings.output_topic, key=key.encode(), value=orjson.dumps(event))
            self.stats.latencies_ms.append(now_ms - end_ms)
        self.stats.events_out += len(chosen)
        if len(self.stats.latencies_ms) > 100_000:
            del self.stats.latencies_ms[:50_000]

    # -- checkpoint ------------------------------------------------------------------------------
    def commit_offsets(self) -> dict[Partition, int]:
        """Per partition: the oldest reading still needed, else the next record; never back."""
        offsets = {}
        for partition, next_offset in self.processed.items():
            oldest = self.windower.oldest_needed(partition)
            offset = next_offset if oldest is None else min(next_offset, oldest)
            if offset > self.committed.get(partition, -1):
                offsets[partition] = offset
        return offsets

    def checkpoint(self, reason: str = "interval") -> None:
        started = self._last_checkpoint = self.clock()
        self.score_pending()
        for partition in self.touched:
            self.state.save(partition, self.windower.resume_points(partition))
        self.touched.clear()
        self.sink.flush()
        offsets = self.commit_offsets()
        if offsets and self.source is not None:
            self.source.commit(offsets)
            self.committed.update(offsets)
            self.stats.commits += 1
            log.info(
                "checkpoint (%s, %.0f ms): %s",
                reason,
                1000 * (self.clock() - started),
                self.stats.snapshot(),
                extra={"fields": {"commit": {f"{t}:{p}": o for (t, p), o in offsets.items()}}},
            )
