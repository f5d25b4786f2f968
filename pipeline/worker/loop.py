"""The scoring loop: poll -> take -> score -> emit -> checkpoint, around one group membership.

A small state machine. Each turn:

- poll: records arrive per partition; the modality's intake decodes them (rejecting bad ones
  with a reason, see `pipeline.worker.writer`) and windows readings per key, pre-cut windows and
  images passing straight through;
- score: ready windows from every key and partition wait at most `max_wait_ms` or until
  `max_batch` are ready, then go through the model in one forward pass (`BatchScorer`). A turn of
  the loop (poll and take) takes time too: windows are scored as soon as waiting for one more
  turn would take them past `max_wait_ms`, so under load each poll's windows form a batch. The
  loop takes the next poll while a large pass runs, and emits the batch once it is done;
- emit: each key's adaptive stage turns the scores into a surprise relative to the key's own
  history (see `pipeline.detector.adaptive_stage`); the decision (score above the calibrated
  threshold, or with `alarm_on` adaptive surprise at or above its threshold), an event for each
  anomalous window (every window with `emit_all`) and the alarm episodes the decisions open or
  resolve;
- checkpoint every `commit_interval_ms`, on revoke and on shutdown, in the order
  `pipeline.worker.checkpoint` writes down: score and emit what is pending, save per-key state,
  make everything sent durable, commit offsets that never go back.

Delivery is at-least-once: after a crash, records since the last commit are read again and
windows completed since then are emitted again, with the same event ids. With `exactly_once`
the sink is transactional: what a checkpoint interval produced (events, dead letters, state) and
the offsets it commits form one transaction, so a `read_committed` consumer sees each event once.

While the loop runs, the interpreter's thread switch interval is `switch_interval_ms`. A thread
that gives Python up around a C call (the scoring pass, a client's network thread after a read)
waits that long for the loop, which always holds it, to hand it back: a pass of 1,340 windows
that takes 16 ms alone takes 39 ms beside a busy Python thread at the interpreter's 5 ms, and 18 ms
at 0.5 ms (`benchmarks.memory_feed.pass_beside_busy`).

Between two batches the loop may swap in a new model version that the follower (see
`pipeline.registry.follower`) has downloaded and checked; windows waiting at that moment are
scored by the old version first, so no batch mixes versions.

Size: over 400 lines because the turn, the group's callbacks and the checkpoint order are one
state machine, read together; the stages it drives live in modules of their own.
"""

from __future__ import annotations

import gc
import logging
import sys
import time
from collections.abc import Callable, Mapping, Sequence

import numpy as np

from pipeline.detector import Detector
from pipeline.detector.adaptive import AdaptiveScores
from pipeline.detector.adaptive_stage import (
    AdaptiveStage,
    range_features,
    score_reference,
    window_extremes,
)
from pipeline.detector.key_baselines import check_baselines, check_following
from pipeline.detector.threshold import anomalous
from pipeline.events import ModelIdentity
from pipeline.kafka_io.protocols import Record, Sink, Source
from pipeline.modalities import modality_of
from pipeline.modalities.readings import Rejection
from pipeline.modalities.windowing import ReadyWindows
from pipeline.worker.alarms import AlarmTracker
from pipeline.worker.baselines import BaselineStage, adaptive_rows, column_refs
from pipeline.worker.checkpoint import Checkpointer
from pipeline.worker.drift import OVERALL, DriftStage
from pipeline.worker.metrics import WorkerMetrics, WorkerStats
from pipeline.worker.scorer import KEEPALIVE_FRACTION, BatchScorer, ScoredBatch
from pipeline.worker.settings import WorkerSettings
from pipeline.worker.state import StateStore
from pipeline.worker.writer import EventWriter

__all__ = ["Worker", "check_serves"]

log = logging.getLogger(__name__)
Partition = tuple[str, int]
# Poll timeout while nothing waits to be scored. kafka-python can hold fetched records until a
# longer timeout runs out (measured: p99 latency 196 ms with 100 ms polls, 78 ms with 20 ms).
IDLE_POLL_MS = 20
# The longest poll while a batch is being scored: its events go out soon after the pass ends.
INFLIGHT_POLL_MS = 2
# Weight of the newest turn in the running estimate of how long one turn of the loop takes.
TURN_SMOOTHING = 0.2
# /healthz fails when the loop has not turned for this long.
STALL_S = 60.0
# Latest scored windows the model follower warms a new version up on.
WARMUP_SAMPLE = 64
# Reasons of per-key order checks: dead-lettered, or only counted with `order_policy` drop.
ORDER_REASONS = ("out_of_order", "duplicate_timestamp")


def _version(model: ModelIdentity) -> str:
    return f"{model.name}/{model.version}"


def check_serves(settings: WorkerSettings, detector: Detector, *, keeping: bool = False) -> None:
    """`ConfigError`, naming the setting, if `settings` cannot serve `detector`: level following
    needs keys with their own baselines, and per-key baselines (needed, or `keeping` those of a
    version served now) take a standard scaler. `WorkerApp.build` asks once the model is loaded,
    before any Kafka I/O; the model follower asks before a version is taken."""
    config = settings.baselines.config()
    check_following(config, detector)
    if keeping or BaselineStage.needed(config, detector):
        check_baselines(detector)


class Worker:
    def __init__(
        self,
        settings: WorkerSettings,
        detector: Detector,
        model: ModelIdentity,
        sink: Sink,
        state: StateStore,
        *,
        metrics: WorkerMetrics | None = None,
        follower=None,
        clock: Callable[[], float] = time.monotonic,
        wall_ms: Callable[[], float] = lambda: time.time() * 1000.0,
    ) -> None:
        self.settings, self.detector, self.model = settings, detector, model
        self.sink, self.follower, self.clock, self.wall_ms = sink, follower, clock, wall_ms
        if follower is not None:
            follower.accepts = self.accepts
        self.metrics = metrics or WorkerMetrics()
        self.stats = WorkerStats()
        self.modality = modality = modality_of(detector.input)
        records = settings.records
        self.intake = modality.intake(
            records.max_record_bytes,
            records.reread_max,
            max_future_s=records.max_future_s,
            wall_ms=wall_ms,
            key_ttl_s=records.key_ttl_s,
        )
        stages = self.intake.windows.parts()  # per-key state, by its name in the state record
        self.adaptive = None
        if settings.adaptive.enabled:
            self.adaptive = AdaptiveStage(
                settings.adaptive.stage(),
                settings.adaptive.rule(),
                self._refs(detector),
                _version(model),
                range_features(detector),
            )
            stages["adaptive"] = self.adaptive
        self.alarms = None
        if settings.events.alarms:
            self.alarms = AlarmTracker(settings.alarms.rules(), modality.alarm_features)
            stages["alarms"] = self.alarms
        self.drift = None
        if settings.drift.drift_window:
            self.drift = DriftStage(
                detector.threshold.calibration_scores,
                settings.drift.drift_window,
                settings.drift.drift_psi,
                settings.drift.drift_key_psi,
            )
            stages["drift"] = self.drift
            self.metrics.drift_psi_limit.labels(OVERALL).set(settings.drift.drift_psi)
            if not self.drift.enabled:
                log.warning("the detector holds no calibration scores: no drift statistic")
        self.stages = stages
        self.baselines: BaselineStage | None = None
        self._use_baselines(detector)
        self.writer = EventWriter(
            sink, settings.topics, settings.events, modality, self.metrics, self.stats
        )
        self.checkpoints = Checkpointer(
            sink,
            state,
            self.intake.windows,
            stages,
            self.metrics,
            self.stats,
            clock,
            on_expired=self._expired,
        )
        self.scorer = BatchScorer(
            settings.batching.max_batch,
            KEEPALIVE_FRACTION * settings.kafka.max_poll_interval_ms / 1000.0,
            keepalive=lambda: self.source.keepalive(),
            on_wait=self._turned,
            threads=settings.batching.threads(),
            extremes=self.adaptive.range_features if self.adaptive is not None else 0,
        )
        self.pending = ReadyWindows()
        self.pending_since: float | None = None
        self.assigned: set[Partition] = set()
        self._assigned_at = float("-inf")
        self.joined = False
        self.source: Source | None = None
        self._stop = False
        self._finished = False
        self._last_checkpoint = self.last_turn = clock()
        self._turn_s = 0.0  # running estimate of a turn (poll and take) that brought records
        self.metrics.set_model(model.name, model.version, model.alias)

    # -- wiring and the group's callbacks ----------------------------------------------------------
    def attach(self, source: Source) -> None:
        self.source = source

    def stop(self) -> None:
        """Ask the loop to finish its batch, checkpoint and leave (signal-handler safe)."""
        self._stop = True

    def on_assigned(self, partitions: set[Partition]) -> None:
        self.assigned |= partitions
        self._assigned_at = self.clock()
        self.joined = True
        # A partition revoked and handed straight back (eager rebalancing) may keep the client's
        # fetch position, past readings the restored windows need: read again from our commit.
        # (Another owner in between only committed further; the restored state skips the rest.)
        restored, rewind = self.checkpoints.restore(partitions)
        if rewind:
            self.source.seek(rewind)
        self.metrics.assigned.set(len(self.assigned))
        log.info("assigned %s (state for %d)", sorted(partitions), restored)

    def on_revoked(self, partitions: set[Partition], *, lost: bool = False) -> None:
        """Partitions taken away: checkpoint them first, unless they were lost (the member was
        evicted and can no longer commit) or the loop already made its final checkpoint."""
        try:
            if partitions and lost:
                self._drop_lost(partitions)
            elif partitions and not self._finished:
                self.checkpoint(reason="revoke")
        except Exception as exc:  # noqa: BLE001 - the client would end the member for it
            # Whatever the checkpoint did not commit, the partitions' next owner reads again
            # from the last accepted commit: nothing is lost, so the member carries on.
            log.warning("checkpoint on revoke failed, %s read again: %r", sorted(partitions), exc)
        finally:
            if self.drift is not None:
                self.metrics.forget_keys(self.drift.keys_of(partitions))
            self.checkpoints.forget(partitions)
            self.assigned -= partitions
        self.metrics.assigned.set(len(self.assigned))
        self.metrics.alarms_open.set(self.alarms.open_count if self.alarms else 0)
        log.info("%s %s", "lost" if lost else "revoked", sorted(partitions))

    def _drop_lost(self, partitions: set[Partition]) -> None:
        """Nothing more is emitted for lost partitions: their next owner reads them again from
        the last commit. The pass in flight is emitted first and their pending windows dropped,
        so no stage takes their keys back after they are forgotten. With a transactional sink
        the open transaction is aborted (committed with the next checkpoint, their events would
        be there twice once their new owner emits them again), and the partitions still owned,
        whose events it held too, are read again from their committed state."""
        for batch in self.scorer.score(ReadyWindows(), self.detector):
            self.emit(batch)
        if not self.sink.transactional:
            self.pending = self.pending.without(partitions)
        else:
            self.sink.abort()
            self.pending = ReadyWindows()
            # (a loss takes the member's whole assignment on both clients: none is kept)
            kept = self.assigned - partitions
            if kept:  # read again from their committed state, or from what was not committed
                since = self.checkpoints.uncommitted(kept)
                self.checkpoints.forget(kept)
                _, rewind = self.checkpoints.restore(kept)
                self.source.seek(since | rewind)
        if not len(self.pending):
            self.pending_since = None

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

    def _turned(self) -> None:
        self.last_turn = self.clock()

    # -- model swap ------------------------------------------------------------------------------
    def swap_model(self, detector: Detector, model: ModelIdentity) -> None:
        """Serve `detector` from the next batch on; what is pending is scored by the old one."""
        self.score_pending()
        self._use_baselines(detector)  # first: it refuses a detector it cannot serve (`accepts`)
        previous, self.detector, self.model = self.model, detector, model
        if self.adaptive is not None:  # scores of another version: every key warms up again
            self.adaptive.reset(self._refs(detector), _version(model))
        self.stats.reloads += 1
        if self.drift is not None:  # the new version's calibration deciles, fresh reservoirs
            self.drift.recalibrate(detector.threshold.calibration_scores)
            self.metrics.drift_psi.clear()
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
        idle_limit = self.settings.loop.stop_after_idle_s
        # Before the group has taken this member in, waiting is not idleness: a join may take up
        # to the rebalance timeout (max.poll.interval.ms; a broker's first join waits
        # group.initial.rebalance.delay.ms, 3 s by default). Only past that does it give up.
        join_wait = self.settings.kafka.max_poll_interval_ms / 1000.0
        switch_interval = sys.getswitchinterval()
        if self.settings.loop.switch_interval_ms:
            sys.setswitchinterval(self.settings.loop.switch_interval_ms / 1000.0)
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
                if self.scorer.busy:  # back soon to emit the batch in flight
                    timeout_ms = min(timeout_ms, INFLIGHT_POLL_MS)
                polled = self.source.poll(timeout_ms)
                now = self.last_turn = self.clock()
                if polled or self._assigned_at > idle_since:  # input, or a new assignment
                    idle_since = now
                if polled:
                    self.process(polled)
                    self._turn_s += TURN_SMOOTHING * (self.clock() - started - self._turn_s)
                for batch in self.scorer.finished():
                    self.emit(batch)
                if self.pending_since is not None and (
                    len(self.pending) >= self.settings.batching.max_batch
                    or self._left_s(self.clock()) <= 0
                ):
                    self.score_pending(wait=False)
                if now - self._last_checkpoint >= interval:
                    self.checkpoint()
                if idle_limit and now - idle_since >= idle_limit + (
                    0 if self.joined else join_wait
                ):
                    if self.joined:
                        log.info("no input for %.1fs; stopping", idle_limit)
                    else:
                        log.warning(
                            "not taken into group %s in %.1fs; stopping",
                            self.settings.kafka.group_id,
                            idle_limit + join_wait,
                        )
                    break
        finally:
            try:
                self.checkpoint(reason="shutdown")
            finally:
                self._finished = True
                self.scorer.close()
                sys.setswitchinterval(switch_interval)
        return self.stats

    def _left_s(self, now: float) -> float:
        """How long the pending windows may still wait for more to join their batch: their
        `max_wait_ms`, less one more turn of the loop."""
        wait_s = self.settings.batching.max_wait_ms / 1000.0
        return wait_s - (now - self.pending_since) - self._turn_s

    def process(self, polled: Mapping[Partition, Sequence[Record]]) -> None:
        """Take one poll's records: decoded, checked and windowed by the modality's intake."""
        # (a partition revoked while this poll ran: its new owner reads it from the commit)
        live = [(p, records) for p, records in polled.items() if records and p in self.assigned]
        self.intake.take_all(live, self.pending, self.reject)
        for partition, records in live:
            self.stats.records_in += len(records)
            self.metrics.records.labels(partition[0]).inc(len(records))
            self.checkpoints.took(partition, records[0].offset, records[-1].offset + 1)
        if len(self.pending) and self.pending_since is None:
            self.pending_since = self.clock()

    def reject(self, record: Record, rejection: Rejection) -> None:
        """A record that gives no reading: dead-lettered, or only counted if the order policy
        drops readings out of order."""
        if rejection.reason in ORDER_REASONS and self.settings.records.order_policy == "drop":
            self.stats.dropped[rejection.reason] += 1
            self.metrics.dropped_by_reason[rejection.reason].inc()
        else:
            self.writer.dead_letter(record, rejection)

    # -- scoring and emitting --------------------------------------------------------------------
    def accepts(self, detector: Detector) -> None:
        """`ConfigError` if these settings cannot serve `detector` (the follower asks before a
        version is taken): see `check_serves`."""
        check_serves(self.settings, detector, keeping=self.baselines is not None)

    def _use_baselines(self, detector: Detector) -> None:
        """Per-key baselines for `detector`, when any key is scored with its own."""
        config = self.settings.baselines.config()
        check_following(config, detector)
        if self.baselines is not None:
            self.baselines.use(detector)
        elif BaselineStage.needed(config, detector):
            self.baselines = self.stages["baselines"] = BaselineStage(config, detector)

    def score_pending(self, *, wait: bool = True) -> None:
        """Score what is pending in one forward pass (see `BatchScorer`) and emit, or with
        `wait=False` leave the pass in flight. With per-key baselines (always waited for: a
        key's levels follow its emitted windows), warm-up windows are taken out first, and those
        that level following holds back for a key's next block go in a further pass."""
        # the batch in flight first, while what is pending stays where a checkpoint that a
        # keep-alive's rebalance runs meanwhile finds it
        for batch in self.scorer.score(ReadyWindows(), self.detector):
            self.emit(batch)
        if self.baselines is None:
            pending, self.pending, self.pending_since = self.pending, ReadyWindows(), None
            for batch in self.scorer.score(pending, self.detector, wait=wait):
                self.emit(batch)
            return
        while len(self.pending):
            pending, since = self.pending, self.pending_since
            self.pending, self.pending_since = ReadyWindows(), None
            now, scaling, later = self.baselines.take(pending)
            if len(later):
                self.pending, self.pending_since = later, since
            for batch in self.scorer.score(now, self.detector, scaling):
                self.emit(batch)

    def emit(self, batch: ScoredBatch) -> None:
        n = len(batch)
        self.stats.batches += 1
        self.stats.windows_scored += n
        self.metrics.scoring_seconds.observe(batch.seconds)
        self.metrics.windows.inc(n)
        self.metrics.batch_windows.observe(n)
        self.metrics.latency.observe_many((self.wall_ms() - batch.end_ts) / 1000.0)
        if self.follower is not None:
            self.follower.sample = batch.windows[-WARMUP_SAMPLE:]
        threshold = self.detector.threshold
        adaptive = self.adapt(batch)
        if self.settings.adaptive.alarm_on == "adaptive":
            flags = adaptive.anomalous(self.settings.adaptive.adaptive_threshold)
        else:
            flags = anomalous(batch.scored.scores, threshold.value)
        if self.settings.events.windows:
            self.writer.windows(batch, flags, threshold, self.model, adaptive)
        if self.alarms is not None:
            self._update_alarms(batch, flags, threshold.value)
        if self.baselines is not None:
            self.baselines.follow(batch, ~flags)
        if self.drift is not None and self.drift.enabled:
            self._update_drift(batch)

    def adapt(self, batch: ScoredBatch) -> AdaptiveScores | None:
        """The adaptive stage's surprise, likelihood and detections of the batch's windows."""
        if self.adaptive is None:
            return None
        rows = adaptive_rows(self.settings.adaptive.adaptive_columns, batch, self.detector)
        extremes = batch.extremes
        if extremes is None and self.adaptive.range is not None:
            extremes = window_extremes(batch.windows)
        return self.adaptive.update(batch.groups(), batch.end_ts, rows, extremes)

    def _refs(self, detector: Detector) -> list[float]:
        columns = self.settings.adaptive.adaptive_columns
        return column_refs(columns, detector, score_reference(detector.threshold))

    def _update_alarms(self, batch: ScoredBatch, flags: np.ndarray, threshold: float) -> None:
        scores, errors = batch.scored.scores, self.modality.alarm_errors(batch.scored)
        for key, partition, rows in batch.groups():
            for transition in self.alarms.update(
                key,
                partition,
                batch.start_ts[rows],
                batch.end_ts[rows],
                scores[rows],
                flags[rows],
                None if errors is None else errors[rows],
            ):
                self.writer.alarm(transition, threshold, self.model)
        self.metrics.alarms_open.set(self.alarms.open_count)

    def _expired(self, partition: Partition, keys: list[str]) -> None:
        """Keys forgotten after a long silence: an alarm still open on one resolves now."""
        if self.alarms is None:
            return
        threshold = self.detector.threshold.value
        for transition in self.alarms.resolve_silent(partition, keys):
            self.writer.alarm(transition, threshold, self.model)
        self.metrics.alarms_open.set(self.alarms.open_count)

    def _update_drift(self, batch: ScoredBatch) -> None:
        values, pooled, crossings = self.drift.take(batch)
        for key, value in values.items():
            if key != OVERALL:  # the label `key="*"` is the pooled statistic's
                self.metrics.drift_psi.labels(key).set(value)
        if pooled is not None:
            self.metrics.drift_psi.labels(OVERALL).set(pooled)
        for crossing in crossings:
            self.writer.drift(crossing, self.drift.limit_of(crossing), self.model)

    # -- checkpoint ------------------------------------------------------------------------------
    def checkpoint(self, reason: str = "interval") -> None:
        """Score and emit what is pending, then save, flush and commit (`Checkpointer.save`)."""
        started = self._last_checkpoint = self.clock()
        self.score_pending()
        self.checkpoints.save(
            self.source,
            self.assigned,
            reason=reason,
            model_version=self.model.version,
            started=started,
        )
