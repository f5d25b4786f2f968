"""The worker application: the loop with everything that lives as long as it.

`WorkerApp.build(settings)` loads the detector (retrying an unreachable registry for
`registry_wait_s`), refuses settings it cannot serve (`check_serves`) before any Kafka I/O, opens
the Kafka client the settings select and makes sure the topics exist, then wires the loop to a
source, a sink and the state topic, starts the model follower (for an alias) and the HTTP server
(unless `http_port` is -1). `run` runs the loop until it stops; `close`
releases, once and in order, what `build` made: the follower's thread, the consumer (leaving the
group), the producer and the HTTP port.

    with WorkerApp.build(settings) as app:
        app.run()
"""

from __future__ import annotations

import logging
import time

from pipeline.detector import Detector, resolve_device
from pipeline.errors import RegistryError
from pipeline.kafka_io import open_client
from pipeline.registry.client import ModelRef, load_model, parse_model_uri
from pipeline.registry.follower import ModelFollower
from pipeline.worker.http_server import WorkerHttpServer, check_bindable
from pipeline.worker.loop import Worker, check_serves
from pipeline.worker.metrics import WorkerMetrics, WorkerStats
from pipeline.worker.settings import RegistrySettings, WorkerSettings
from pipeline.worker.state import STATE_RECORD_MAX, STATE_TOPIC, KafkaStateStore

# The least time a transaction may stay open (Kafka's own default): it spans a checkpoint
# interval and the scoring pass a checkpoint waits for, so a pass of a slow or busy device
# shorter than this does not get the transaction aborted by the broker. It is also how long a
# worker gone for good (not back under its transactional id) holds read_committed consumers.
TRANSACTION_TIMEOUT_MIN_MS = 60_000


def transaction_timeout_ms(commit_interval_ms: int) -> int:
    """The transaction timeout of `--exactly-once`: 4 commit intervals, at least a minute."""
    return max(TRANSACTION_TIMEOUT_MIN_MS, 4 * commit_interval_ms)


__all__ = ["WorkerApp", "load_with_retries"]

log = logging.getLogger(__name__)


def load_with_retries(registry: RegistrySettings, device: str) -> tuple[Detector, ModelRef]:
    """The model to serve; an unreachable registry is retried for `registry_wait_s`."""
    deadline = time.monotonic() + registry.registry_wait_s
    delay = 1.0
    while True:
        try:
            return load_model(
                registry.model,
                tracking_uri=registry.tracking_uri,
                device=device,
                require_calibrated=True,
            )
        except RegistryError as exc:
            left = deadline - time.monotonic()
            if left <= 0:
                raise RegistryError(f"cannot load {registry.model}: {exc}") from exc
            log.warning("registry not ready (%s); retrying for %.0f s more", exc, left)
            time.sleep(min(delay, left))
            delay = min(delay * 2, 10.0)


class WorkerApp:
    def __init__(
        self,
        worker: Worker,
        *,
        follower: ModelFollower | None = None,
        http: WorkerHttpServer | None = None,
    ) -> None:
        self.worker, self.follower, self.http = worker, follower, http
        self._closed = False

    @classmethod
    def build(cls, settings: WorkerSettings) -> WorkerApp:
        import torch

        torch.set_num_threads(settings.batching.threads())
        resolve_device(settings.batching.device)  # CUDA asked for where there is none: at once
        if settings.http.http_port > 0:  # a port in use is told before anything is loaded
            check_bindable(settings.http.http_host, settings.http.http_port)
        detector, ref = load_with_retries(settings.registry, settings.batching.device)
        check_serves(settings, detector)  # a setting this model cannot take: before any topic
        topics = settings.topics
        kafka = open_client(settings.kafka)
        kafka.ensure_topics(
            {
                topics.output_topic: {},
                topics.dlq_topic: {},
                topics.alarm_topic_name: {},
                settings.state_topic_name: STATE_TOPIC,
            }
        )
        metrics = WorkerMetrics()
        exactly_once = settings.kafka.exactly_once
        sink = kafka.sink(  # the largest record it sends: a dead letter, or a state record
            max_record_bytes=max(settings.records.max_record_bytes, STATE_RECORD_MAX),
            transaction_timeout_ms=(
                transaction_timeout_ms(settings.loop.commit_interval_ms) if exactly_once else None
            ),
        )
        webhook = bool(settings.http.webhook_secret or settings.http.webhook_insecure)
        follower = cls._follower(
            settings.registry, settings.batching.device, detector, ref, webhook=webhook
        )
        if follower is not None:
            follower.on_outcome = lambda outcome, why: metrics.reloads.labels(outcome, why).inc()
        state = KafkaStateStore(sink, kafka.read_latest, settings.state_topic_name)
        worker = Worker(
            settings, detector, ref.identity(), sink, state, metrics=metrics, follower=follower
        )
        worker.attach(kafka.source(topics.input_topic, topics.input_pattern, worker))
        http = None
        if settings.http.http_port >= 0:
            http = WorkerHttpServer(
                settings.http.http_host,
                settings.http.http_port,
                metrics=metrics.exposition,
                live=worker.liveness,
                ready=worker.readiness,
                on_alias_created=follower.trigger if follower else None,
                webhook_secret=settings.http.webhook_secret,
                webhook_insecure=settings.http.webhook_insecure,
            ).start()
        if follower is not None:
            follower.start()
        log.info(
            "worker ready: model %s on %s (%d CPU threads); settings %s",
            ref.label,
            detector.device,
            torch.get_num_threads(),
            settings.redacted(),
        )
        return cls(worker, follower=follower, http=http)

    @staticmethod
    def _follower(
        registry: RegistrySettings,
        device: str,
        detector: Detector,
        ref: ModelRef,
        *,
        webhook: bool = False,
    ) -> ModelFollower | None:
        """A follower for a registry alias that is polled, or woken by the webhook only
        (`--reload-interval-s 0` with a webhook); none for a folder or a version."""
        parsed = parse_model_uri(registry.model)
        if parsed is None or parsed[1] is None:
            return None
        if registry.reload_interval_s <= 0 and not webhook:
            return None
        return ModelFollower(
            registry.model,
            detector,
            ref,
            tracking_uri=registry.tracking_uri,
            device=device,
            interval_s=registry.reload_interval_s,
        )

    def run(self) -> WorkerStats:
        return self.worker.run()

    def stop(self) -> None:
        """Ask the loop to finish its batch, checkpoint and leave (signal-handler safe)."""
        self.worker.stop()

    def close(self) -> None:
        """Stop the follower, leave the group, release the producer and the HTTP port."""
        if self._closed:
            return
        self._closed = True
        if self.follower is not None:
            self.follower.close()
        self.worker.source.close()
        self.worker.sink.close()
        if self.http is not None:
            self.http.close()

    def __enter__(self) -> WorkerApp:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
