"""The scoring loop: poll -> decode -> window -> batch score -> produce -> checkpoint.

A small state machine around one consumer-group membership:

- poll: records arrive per partition; each is decoded (or dead-lettered with a reason), readings
  are windowed per key with numpy, pre-cut windows pass straight through;
- score: ready windows from every key and partition wait at most `max_wait_ms` or until
  `max_batch` are ready, then go through the model in one forward pass. A turn of the loop (poll
  and decode) takes time too: windows are scored as soon as waiting for one more turn would take
  them past `max_wait_ms`, so under load each poll's windows form a batch;
- produce: an event for each anomalous window (every window with `emit_all`);
- checkpoint (every `commit_interval_ms`, on revoke, on shutdown), in this order: score what is
  pending, write each partition's window positions to the state topic, flush the producer (every
  event, dead letter and state record acknowledged), then commit for each partition the offset of
  the oldest reading an unfinished window still needs (or of the next record). Offsets never go
  backwards.

Delivery is at-least-once: after a crash, records since the last commit are read again and
windows completed since then are emitted again, with the same event ids. With `exactly_once`
the sink is transactional: what a checkpoint interval produced (events, dead letters, state) and
the offsets it commits form one transaction, so a `read_committed` consumer sees each event once.

Between two batches the loop may swap in a new model version that the follower (see
`pipeline.registry.follower`) has downloaded and checked; windows waiting at that moment are scored by the old
version first, so no batch mixes versions. Scored windows feed the alarm tracker (see
`pipeline.worker.alarms`), whose state is saved with the window positions at each checkpoint.
Image detectors take one image per record instead of windows.
"""

from __future__ import annotations

import gc
import logging
import time
from collections import Counter
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field

import numpy as np
import orjson

from pipeline.detector import Detector
from pipeline.errors import CommitRejected
from pipeline.events import (
    EVENT_TYPE,
    ModelIdentity,
    alarm_event,
    dead_letter_headers,
    event_id,
    iso_ms,
)
from pipeline.kafka_io.protocols import Sink, Source
from pipeline.modalities.readings import Decoded, RecordDecoder, Rejection, finite_rows
from pipeline.modalities.windowing import ReadyWindows, StreamWindower
from pipeline.worker.alarms import AlarmTracker, AlarmTransition
from pipeline.worker.metrics import WorkerMetrics
from pipeline.worker.settings import WorkerSettings

__all__ = ["Worker", "WorkerStats"]

log = logging.getLogger(__name__)
Partition = tuple[str, int]
# Poll timeout while nothing waits to be scored. kafka-python can hold fetched records until a
# longer timeout runs out (measured: p99 latency 196 ms with 100 ms polls, 78 ms with 20 ms).
IDLE_POLL_MS = 20
# Weight of the newest turn in the running estimate of how long one turn of the loop takes.
TURN_SMOOTHING = 0.2
TOP_FEATURES = 3
TOP_STEPS = 3
TOP_REGIONS = 3
# /healthz fails when the loop has not turned for this long.
STALL_S = 60.0
# While a batch is scored, the group hears from this member at least this often (as a fraction
# of max.poll.interval.ms), however slow the device.
KEEPALIVE_FRACTION = 0.25


@dataclass
class _Batch:
    """Windows taken from `pending` and being scored (on the scoring thread for a live source)."""

    pending: ReadyWindows
    windows: np.ndarray
    future: Future
    started: float


class _NoWindows:
    """Image streams: every record is scored on its own; nothing is held between batches."""

    def restore(self, partition, resume) -> None:
        pass

    def resume_points(self, partition) -> dict:
        return {}

    def oldest_needed(self, partition) -> None:
        return None

    def forget(self, partitions) -> None:
        pass


@dataclass
class WorkerStats:
    records_in: int = 0
    windows_scored: int = 0
    events_out: int = 0
    batches: int = 0
    commits: int = 0
    dead_letters: Counter = field(default_factory=Counter)
    dropped: Counter = field(default_factory=Counter)
    alarms: Counter = field(default_factory=Counter)
    reloads: int = 0

    def snapshot(self) -> dict:
        return {
            "records_in": self.records_in,
            "windows_scored": self.windows_scored,
            "events_out": self.events_out,
            "dead_letters": dict(self.dead_letters),
            "batches": self.batches,
            "commits": self.commits,
            "alarms": dict(self.alarms),
            "reloads": self.reloads,
        }


class Worker:
    def __init__(
        self,
        settings: WorkerSettings,
        detector: Detector,
        model: ModelIdentity,
        sink: Sink,
        state,
        *,
        metrics: WorkerMetrics | None = None,
        follower=None,
        clock: Callable[[], float] = time.monotonic,
        wall_ms: Callable[[], float] = lambda: time.time() * 1000.0,
    ) -> None:
        self.settings = settings
        self.detector = detector
        self.model = model
        self.sink = sink
        self.state = state
        self.metrics = metrics or WorkerMetrics()
        self.follower = follower
        self.clock = clock
        self.wall_ms = wall_ms
        self.kind = detector.input.kind
        if self.kind == "series":
            spec = detector.input.window
            self.decoder = RecordDecoder(
                detector.input.features, spec.length, settings.records.max_record_bytes
            )
            self.windower = StreamWindower(spec, len(detector.input.features))
        else:
            from pipeline.modalities.images import ImageDecoder

            self.decoder = ImageDecoder(
                detector.input.image_shape, settings.records.max_record_bytes
            )
            self.windower = _NoWindows()
        self.emit_windows = settings.events.windows
        self.alarms = (
            AlarmTracker(
                settings.alarms.rules(),
                tuple(detector.input.features) if self.kind == "series" else None,
            )
            if settings.events.alarms
            else None
        )
        self.pending = ReadyWindows()
        self.pending_since: float | None = None
        self.processed: dict[Partition, int] = {}
        self.committed: dict[Partition, int] = {}
        self._last_commit: dict[Partition, int] = {}  # kept across revocations
        self.touched: set[Partition] = set()
        self.assigned: set[Partition] = set()
        self._assigned_at = float("-inf")
        self.joined = False
        self.stats = WorkerStats()
        self.source = None
        self._stop = False
        self._finished = False
        self._last_checkpoint = self.last_turn = clock()
        self._inflight: _Batch | None = None
        self._turn_s = 0.0  # running estimate of a turn (poll and process) that brought records
        self._scorer: ThreadPoolExecutor | None = None
        self.metrics.set_model(model.name, model.version, model.alias)

    # -- wiring ----------------------------------------------------------------------------------
    def attach(self, source: Source) -> None:
        self.source = source

    def stop(self) -> None:
        """Ask the loop to finish its batch, checkpoint and leave (signal-handler safe)."""
        self._stop = True

    def on_assigned(self, partitions: set[Partition]) -> None:
        self.assigned |= partitions
        self._assigned_at = self.clock()
        self.joined = True
        restored = self.state.load(partitions) if partitions else {}
        for partition, saved in restored.items():
            self.windower.restore(partition, saved.resume)
            if self.alarms is not None:
                self.alarms.restore(partition, saved.alarms)
        # A partition revoked and handed straight back (eager rebalancing) may keep the client's
        # fetch position, past readings the restored windows need: read again from our commit.
        # (Another owner in between only committed further; the restored state skips the rest.)
        rewind = {p: self._last_commit[p] for p in partitions if p in self._last_commit}
        if rewind:
            self.source.seek(rewind)
        self.metrics.assigned.set(len(self.assigned))
        log.info("assigned %s (state for %d)", sorted(partitions), len(restored))

    def on_revoked(self, partitions: set[Partition], *, lost: bool = False) -> None:
        """Partitions taken away: checkpoint them first, unless they were lost (the member was
        evicted and can no longer commit) or the loop already made its final checkpoint."""
        try:
            if partitions and not lost and not self._finished:
                self.checkpoint(reason="revoke")
        finally:
            # Whatever the checkpoint did, nothing of these partitions stays: a member that kept
            # them would write stale state over the new owner's.
            self.windower.forget(partitions)
            if self.alarms is not None:
                self.alarms.forget(partitions)
            self.assigned -= partitions
            self.touched -= partitions
            for partition in partitions:
                self.processed.pop(partition, None)
                self.committed.pop(partition, None)
        self.metrics.assigned.set(len(self.assigned))
        self.metrics.alarms_open.set(self.alarms.open_count if self.alarms else 0)
        log.info("%s %s", "lost" if lost else "revoked", sorted(partitions))

    # -- health ----------------------------------------------------------------------------------
    def liveness(self) -> tuple[bool, dict]:
        age = self.clock() - self.last_turn
        return age < STALL_S, {"loop_age_s": round(age, 3)}

    def readiness(self) -> tuple[bool, dict]:
        live, detail = self.liveness()
        detail.update(
            joined=self.joined,
            partitions=len(self.assigned),
            model={"name": self.model.name, "version": self.model.version},
        )
        return live and self.joined and not self._stop, detail

    # -- model swap ------------------------------------------------------------------------------
    def swap_model(self, detector: Detector, model: ModelIdentity) -> None:
        """Serve `detector` from the next batch on; what is pending is scored by the old one."""
        self.score_pending()
        previous, self.detector, self.model = self.model, detector, model
        self.stats.reloads += 1
        self.metrics.set_model(model.name, model.version, model.alias)
        self.metrics.reloads.labels("loaded", "").inc()
        log.info("now serving %s version %s (was %s)", model.name, model.version, previous.version)

    # -- the loop --------------------------------------------------------------------------------
    def run(self) -> WorkerStats:
        # Objects alive now (model, settings, clients) never become garbage: keep them out of
        # the collector's generations so its pauses stay short on the hot path.
        gc.freeze()
        idle_since = self.clock()
        interval = self.settings.loop.commit_interval_ms / 1000.0
        try:
            while not self._stop:
                if self.follower is not None:
                    ready = self.follower.take()
                    if ready is not None:
                        self.swap_model(ready[0], ready[1].identity())
                started = self.clock()
                timeout_ms = IDLE_POLL_MS
                if self.pending_since is not None:
                    timeout_ms = max(0, int(self._left_s(started) * 1000))
                polled = self.source.poll(timeout_ms)
                now = self.last_turn = self.clock()
                if polled or self._assigned_at > idle_since:  # input, or a new assignment
                    idle_since = now
                if polled:
                    self.process(polled)
                    self._turn_s += TURN_SMOOTHING * (self.clock() - started - self._turn_s)
                if self.pending_since is not None and (
                    len(self.pending) >= self.settings.batching.max_batch
                    or self._left_s(self.clock()) <= 0
                ):
                    self.score_pending()
                if now - self._last_checkpoint >= interval:
                    self.checkpoint()
                idle_limit = self.settings.loop.stop_after_idle_s
                if idle_limit and now - idle_since >= idle_limit:
                    log.info("no input for %.1fs; stopping", idle_limit)
                    break
        finally:
            try:
                self.checkpoint(reason="shutdown")
            finally:
                self._finished = True
                if self._scorer is not None:
                    self._scorer.shutdown(wait=False)
                    self._scorer = None
        return self.stats

    def _left_s(self, now: float) -> float:
        """How long the pending windows may still wait for more to join their batch: their
        `max_wait_ms`, less one more turn of the loop."""
        return (
            self.settings.batching.max_wait_ms / 1000.0 - (now - self.pending_since) - self._turn_s
        )

    def process(self, polled: dict[Partition, list]) -> None:
        """Decode and window one poll's records."""
        for partition, records in polled.items():
            if not records or partition not in self.assigned:
                # revoked while this poll ran: the new owner reads them from the commit
                continue
            self.stats.records_in += len(records)
            self.metrics.records.labels(partition[0]).inc(len(records))
            if self.kind == "image":
                self._process_images(partition, records)
                continue
            self._process_readings(partition, records)
            self.processed[partition] = records[-1].offset + 1
            self.touched.add(partition)
        if len(self.pending) and self.pending_since is None:
            self.pending_since = self.clock()

    def _process_readings(self, partition: Partition, records: list) -> None:
        """Decode a partition's records one by one (the only per-record Python work), then
        check and window the good readings of every key together."""
        decode = self.decoder.decode
        readings: list[Decoded] = []
        taken: list[int] = []
        for i, record in enumerate(records):
            decoded = decode(record.key, record.value)
            if isinstance(decoded, Rejection):
                self.dead_letter(record, decoded)
            elif decoded.is_window:
                self._add_window(partition, record, decoded)
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
                self.dead_letter(
                    records[taken[index]],
                    Rejection("non_finite", "a value is NaN, infinite or beyond float32"),
                )
            keep = np.flatnonzero(finite)
            keys = [keys[i] for i in keep]
            taken = [taken[i] for i in keep]
            ts, values, offsets = ts[keep], values[keep], offsets[keep]
        late, duplicate = self.windower.push(partition, keys, ts, values, offsets, self.pending)
        for index in late:
            self._reject_order(records[taken[index]], "out_of_order")
        for index in duplicate:
            self._reject_order(records[taken[index]], "duplicate_timestamp")

    def _process_images(self, partition: Partition, records: list) -> None:
        for record in records:
            decoded = self.decoder.decode(
                record.key, record.value, record.headers, record.timestamp
            )
            if isinstance(decoded, Rejection):
                self.dead_letter(record, decoded)
                continue
            ts = np.array([decoded.ts_ms], np.int64)
            offset = np.array([record.offset], np.int64)
            self.pending.windows.append(decoded.image[None])
            self.pending.keys.append(decoded.key)
            self.pending.start_ts.append(ts)
            self.pending.end_ts.append(ts)
            self.pending.partitions.append(partition)
            self.pending.first_offsets.append(offset)
            self.pending.last_offsets.append(offset)
            self.pending.counts.append(1)
        self.processed[partition] = records[-1].offset + 1
        self.touched.add(partition)

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
        if self.settings.records.order_policy == "drop":
            self.stats.dropped[reason] += 1
            self.metrics.dropped.labels(reason).inc()
        else:
            self.dead_letter(record, Rejection(reason, "timestamp not after the key's latest"))

    def dead_letter(self, record, rejection: Rejection) -> None:
        headers = list(record.headers or []) + dead_letter_headers(
            rejection.reason, rejection.detail, record.topic, record.partition, record.offset
        )
        self.sink.send(
            self.settings.topics.dlq_topic, key=record.key, value=record.value, headers=headers
        )
        self.stats.dead_letters[rejection.reason] += 1
        self.metrics.dead_letters.labels(rejection.reason).inc()

    # -- scoring ---------------------------------------------------------------------------------
    def score_pending(self) -> None:
        """Score what is pending in one forward pass, then emit.

        Against a live group the pass runs on a scoring thread while this thread polls the
        consumer with every partition paused (`keepalive`) each `KEEPALIVE_FRACTION` of
        max.poll.interval.ms: a batch slower than that interval (a slow or busy device) neither
        gets the member evicted nor turns into a CommitFailedError and rebalance loop. A rebalance
        that such a poll runs calls back here (revoke -> checkpoint): the batch in flight is
        finished and emitted first, so no commit passes windows that are not yet emitted.
        """
        if self._inflight is not None:
            self._finish(self._inflight)
        if not len(self.pending):
            self.pending_since = None
            return
        batch = self._inflight = self._start(self.pending)
        self.pending, self.pending_since = ReadyWindows(), None
        every_s = KEEPALIVE_FRACTION * self.settings.kafka.max_poll_interval_ms / 1000.0
        while self._inflight is batch and not batch.future.done():
            wait([batch.future], timeout=every_s)
            if self._inflight is batch and not batch.future.done():
                self.source.keepalive()
                self.last_turn = self.clock()
        if self._inflight is batch:
            self._finish(batch)

    def _start(self, pending: ReadyWindows) -> _Batch:
        windows = np.concatenate(pending.windows)
        detector, size = self.detector, self.settings.batching.max_batch
        if self._scorer is None:
            self._scorer = ThreadPoolExecutor(1, thread_name_prefix="aewatch-score")
        future = self._scorer.submit(detector.score, windows, batch_size=size)
        return _Batch(pending, windows, future, time.perf_counter())

    def _finish(self, batch: _Batch) -> None:
        self._inflight = None
        scored = batch.future.result()
        self.metrics.scoring_seconds.observe(time.perf_counter() - batch.started)
        pending, windows, n = batch.pending, batch.windows, len(batch.windows)
        counts = np.asarray(pending.counts)
        start_ts = np.concatenate(pending.start_ts)
        end_ts = np.concatenate(pending.end_ts)
        threshold = self.detector.threshold.value
        flags = scored.scores > threshold
        now_ms = self.wall_ms()
        self.stats.batches += 1
        self.stats.windows_scored += n
        self.metrics.windows.inc(n)
        self.metrics.batch_windows.observe(n)
        self.metrics.latency.observe_many((now_ms - end_ts) / 1000.0)
        if self.follower is not None:
            self.follower.sample = windows[-64:]
        if self.emit_windows:
            chosen = np.arange(n) if self.settings.events.emit_all else np.flatnonzero(flags)
            if len(chosen):
                self._emit_windows(pending, counts, scored, flags, chosen, start_ts, end_ts)
        if self.alarms is not None:
            self._update_alarms(pending, counts, scored, flags, start_ts, end_ts)

    def _emit_windows(self, pending, counts, scored, flags, chosen, start_ts, end_ts):
        keys = np.repeat(np.asarray(pending.keys, dtype=object), counts)
        group = np.repeat(np.arange(len(counts)), counts)
        first_offsets = np.concatenate(pending.first_offsets)
        last_offsets = np.concatenate(pending.last_offsets)
        threshold = self.detector.threshold
        p_values = threshold.p_values(scored.scores[chosen])
        model = {"name": self.model.name, "version": self.model.version, "alias": self.model.alias}
        for j, i in enumerate(chosen):
            key = str(keys[i])
            topic, part = pending.partitions[group[i]]
            score = float(scored.scores[i])
            end_ms = int(end_ts[i])
            data = {
                "key": key,
                "score": score,
                "threshold": threshold.value,
                "p_value": float(p_values[j]),
                "severity": score / threshold.value if threshold.value > 0 else score,
                "is_anomaly": bool(flags[i]),
                "model": model,
            }
            if self.kind == "series":
                data.update(self._window_detail(scored, i, int(start_ts[i]), end_ms))
            else:
                data["image"] = self._image_detail(scored.pixel_map[i], end_ms)
            data["source"] = {
                "topic": topic,
                "partition": int(part),
                "offset_start": int(first_offsets[i]),
                "offset_end": int(last_offsets[i]),
            }
            event = {
                "specversion": "1.0",
                "id": event_id(self.model, key, end_ms),
                "source": self.model.source,
                "type": EVENT_TYPE,
                "subject": key,
                "time": iso_ms(end_ms),
                "datacontenttype": "application/json",
                "data": data,
            }
            self.sink.send(
                self.settings.topics.output_topic, key=key.encode(), value=orjson.dumps(event)
            )
        self.stats.events_out += len(chosen)
        self.metrics.events.labels("anomaly").inc(len(chosen))

    def _window_detail(self, scored, i: int, start_ms: int, end_ms: int) -> dict:
        names = self.detector.input.features
        spec = self.detector.input.window
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

    def _image_detail(self, pixel_errors: np.ndarray, ts_ms: int) -> dict:
        from pipeline.modalities.images import error_map_png, top_regions

        channels, height, width = self.detector.input.image_shape
        return {
            "time": iso_ms(ts_ms),
            "channels": channels,
            "height": height,
            "width": width,
            "error_map_png": error_map_png(pixel_errors),
            "top_regions": top_regions(pixel_errors, TOP_REGIONS),
        }

    def _update_alarms(self, pending, counts, scored, flags, start_ts, end_ts) -> None:
        bounds = np.concatenate([[0], np.cumsum(counts)])
        per_feature = scored.per_feature if self.kind == "series" else None
        for g, key in enumerate(pending.keys):
            lo, hi = int(bounds[g]), int(bounds[g + 1])
            transitions = self.alarms.update(
                key,
                pending.partitions[g],
                start_ts[lo:hi],
                end_ts[lo:hi],
                scored.scores[lo:hi],
                flags[lo:hi],
                None if per_feature is None else per_feature[lo:hi],
            )
            for transition in transitions:
                self._emit_alarm(transition)
        self.metrics.alarms_open.set(self.alarms.open_count)

    def _emit_alarm(self, transition: AlarmTransition) -> None:
        event = alarm_event(self.model, transition, self.detector.threshold.value)
        self.sink.send(
            self.settings.topics.alarm_topic_name,
            key=transition.key.encode(),
            value=orjson.dumps(event),
        )
        self.stats.alarms[transition.kind] += 1
        self.metrics.events.labels(f"alarm_{transition.kind}").inc()
        log.info(
            "alarm %s: %s (episode %s, peak %.4g)",
            transition.kind,
            transition.key,
            transition.episode_id,
            transition.peak_score,
            extra={"fields": {"alarm": transition.kind, "key": transition.key}},
        )

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
        for partition in self.touched & self.assigned:
            alarms = self.alarms.state(partition) if self.alarms is not None else None
            self.state.save(partition, self.windower.resume_points(partition), alarms)
        self.touched.clear()
        offsets = self.commit_offsets() if self.source is not None else {}
        if self.sink.transactional:
            metadata = self.source.group_metadata() if self.source is not None else None
            self.sink.commit(offsets, metadata)
        else:
            self.sink.flush()
            if offsets:
                try:
                    self.source.commit(offsets)
                except CommitRejected as exc:
                    # evicted (or rebalancing): the next poll rejoins, and whoever owns these
                    # partitions then reads them again from the last accepted commit
                    log.warning("commit refused by the group, will rejoin: %s", exc)
                    offsets = {}
        if self.source is not None:
            highwaters = self.source.highwaters(self.processed)
            self.metrics.set_lag(
                {p: max(0, hw - self.processed[p]) for p, hw in highwaters.items()}
            )
        if offsets:
            self.committed.update(offsets)
            self._last_commit.update(offsets)
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
                        "model_version": self.model.version,
                        "commit": {f"{t}:{p}": o for (t, p), o in offsets.items()},
                    }
                },
            )
