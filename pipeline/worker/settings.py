"""Worker settings: one frozen, validated object built at start-up from flags and environment.

Each setting is declared once, as a field of the group it belongs to (see `pipeline.settings`):
its flag `--some-setting`, its variable `AEWATCH_SOME_SETTING` (a flag on the command line wins),
its checks and its row in the README's table come from that declaration. `MLFLOW_TRACKING_URI` is
read as MLflow defines it. An invalid value fails at start-up with a `ConfigError` that names the
setting. Secrets (the SASL password, the TLS key password, the webhook secret) never appear in
`repr`, logs or metrics.

Each part of the worker gets its own group: the registry and the model follower `registry`, the
Kafka adapter `kafka`, the event writer `events` and `topics`, the alarm tracker `alarms`, the
HTTP server `http`, the record decoders `records`, the scorer `batching`, the loop `loop`, the
per-key adaptive stage `adaptive`, the drift statistic `drift`.

Size: over 400 lines because every setting of the worker is declared here, once, with its checks,
and the checks across groups (topics that must stay apart, the members' ports) need all of them.
"""

from __future__ import annotations

import argparse
import re
from collections.abc import Mapping
from dataclasses import dataclass

from pipeline import settings as declared
from pipeline.detector.cores import available_cores, device_problem
from pipeline.errors import ConfigError
from pipeline.kafka_io.settings import KafkaSettings, is_topic_name, not_a_topic_name
from pipeline.modalities.expiry import KEY_TTL_S
from pipeline.modalities.parking import REREAD_MAX
from pipeline.modalities.readings import MAX_FUTURE_S
from pipeline.registry.reach import default_tracking_uri, uri_problem
from pipeline.settings import check, setting
from pipeline.uris import mask_uri
from pipeline.worker.adaptive_settings import AdaptiveStageSettings
from pipeline.worker.alarms import MAX_WINDOWS, AlarmRules
from pipeline.worker.baselines import BaselineSettings

__all__ = [
    "AdaptiveStageSettings",
    "AlarmSettings",
    "BaselineSettings",
    "BatchSettings",
    "DriftSettings",
    "EventSettings",
    "HttpSettings",
    "LoopSettings",
    "RecordSettings",
    "RegistrySettings",
    "TopicSettings",
    "WorkerSettings",
    "add_worker_arguments",
    "settings_from_args",
    "settings_table",
]

ORDER_POLICIES = ("reject", "drop")
# Bounds of settings that a careless value would overflow (a duration in seconds made into
# integer milliseconds), or that would ask for memory or processes no machine has.
MAX_SECONDS = 10 * 365 * 86_400  # ten years
MAX_THREADS = 1024
MAX_PROCESSES = 256
MAX_DRIFT_WINDOW = 100_000
EVENT_MODES = ("alarms", "windows", "both")


@dataclass(frozen=True)
class RegistrySettings:
    """Which detector serves, and how its registry alias is followed."""

    model: str = setting(
        "detector: models:/NAME@ALIAS, models:/NAME/VERSION or a folder", required=True
    )
    reload_interval_s: float = setting(
        "how often the model alias is checked for a new version (0: on webhook deliveries only)",
        30.0,
        minimum=0,
        maximum=MAX_SECONDS,
    )
    registry_wait_s: float = setting(
        "at start, how long to keep retrying an unreachable registry (0: fail at once)",
        0.0,
        minimum=0,
        maximum=MAX_SECONDS,
    )
    tracking_uri: str | None = setting(
        "MLflow tracking URI (default: sqlite:///mlflow.db in the working directory, as for "
        "every command)",
        env="MLFLOW_TRACKING_URI",
        listed=False,
    )

    def __post_init__(self) -> None:
        check(self)
        if self.model.startswith("models:/") and not self.tracking_uri:
            # the store every command finds without one (a missing store is refused at start-up,
            # not made empty by MLflow)
            object.__setattr__(self, "tracking_uri", default_tracking_uri())
        problem = uri_problem(self.tracking_uri) if self.model.startswith("models:/") else None
        if problem is not None:
            raise ConfigError("tracking_uri", f"{mask_uri(self.tracking_uri)!r}: {problem}")


@dataclass(frozen=True)
class TopicSettings:
    """What is read and where events, dead letters and window positions go."""

    input_topic: tuple[str, ...] = setting(
        "topic to consume (repeatable; env: comma-separated)", ()
    )
    input_pattern: str | None = setting(
        "regular expression of topics to consume instead of --input-topic"
    )
    output_topic: str = setting("topic for anomaly events", "aewatch.anomalies")
    dlq_topic: str = setting("topic for records that cannot be used", "aewatch.dlq")
    state_topic: str | None = setting(
        "compacted topic for window positions (default: GROUP.aewatch-state)"
    )
    alarm_topic: str | None = setting("topic for alarm events (default: --output-topic)")

    def __post_init__(self) -> None:
        check(self)
        if bool(self.input_topic) == bool(self.input_pattern):
            raise ConfigError("input_topic", "give --input-topic (repeatable) or --input-pattern")
        named = [("input_topic", name) for name in self.input_topic]
        for setting_name in ("output_topic", "dlq_topic", "state_topic", "alarm_topic"):
            if getattr(self, setting_name) is not None:
                named.append((setting_name, getattr(self, setting_name)))
        for setting_name, name in named:
            if not is_topic_name(name):
                raise ConfigError(
                    setting_name, f"{not_a_topic_name(name)}; a pattern goes in --input-pattern"
                )
        if self.input_pattern:
            try:
                re.compile(self.input_pattern)
            except re.error as exc:
                raise ConfigError("input_pattern", f"not a regular expression: {exc}") from None

    @property
    def alarm_topic_name(self) -> str:
        return self.alarm_topic or self.output_topic


@dataclass(frozen=True)
class RecordSettings:
    """How input records are taken: their size limit and the per-key order policy."""

    max_record_bytes: int = setting(
        "larger records go to the DLQ as oversize", 1_048_576, minimum=1
    )
    order_policy: str = setting(
        "out-of-order or duplicate timestamps per key: reject (to the DLQ) "
        "or drop (counted, not forwarded)",
        "reject",
        choices=ORDER_POLICIES,
    )
    max_future_s: float = setting(
        "readings stamped further ahead of the worker's clock go to the DLQ as bad_timestamp "
        "(one from a wrong clock would put every later reading of its key out of order); "
        "0: no limit",
        MAX_FUTURE_S,
        minimum=0,
        maximum=MAX_SECONDS,
    )
    reread_max: int = setting(
        "records of a partition a restart reads again, at most: a key whose unfinished window "
        "reaches further back (silent, or far slower than the others) keeps its readings in "
        "the state record instead of holding the commit back",
        REREAD_MAX,
        minimum=0,
    )
    key_ttl_s: float = setting(
        "a key silent this long (event time, and more than --reread-max records) is forgotten: "
        "it leaves memory and the state record, and starts afresh if it comes back; 0: never",
        KEY_TTL_S,
        minimum=0,
        maximum=MAX_SECONDS,
    )

    def __post_init__(self) -> None:
        check(self)


@dataclass(frozen=True)
class BatchSettings:
    """Where windows are scored and how many go through the model together."""

    device: str = setting("auto, cpu or cuda[:N]", "auto")
    max_batch: int = setting("most windows scored in one forward pass", 4096, minimum=1)
    max_wait_ms: int = setting("longest a ready window waits for a fuller batch", 20, minimum=0)
    cpu_threads: int = setting(
        "threads of a forward pass on the CPU (0: this member's share of the cores, within a container's CPU limit)",
        0,
        minimum=0,
        maximum=MAX_THREADS,
    )

    def __post_init__(self) -> None:
        check(self)
        problem = device_problem(self.device)
        if problem:
            raise ConfigError("device", problem)

    def threads(self, processes: int = 1, cores: int | None = None) -> int:
        """`cpu_threads`, or when 0 each of `processes` members' share of the cores (at least
        one): members that each take every core spin against one another."""
        if self.cpu_threads:
            return self.cpu_threads
        if cores is None:
            cores = available_cores()
        return max(1, cores // processes)


@dataclass(frozen=True)
class LoopSettings:
    """How often the loop checkpoints, when it stops by itself, and how it shares the
    interpreter with the scoring thread and the client's threads."""

    commit_interval_ms: int = setting("how often offsets are committed", 1000, minimum=1)
    stop_after_idle_s: float = setting(
        "exit after this long in the group without input (0: never)",
        0.0,
        minimum=0,
        maximum=MAX_SECONDS,
    )
    processes: int = setting(
        "group members run as processes sharing the device",
        1,
        minimum=1,
        maximum=MAX_PROCESSES,
    )
    switch_interval_ms: float = setting(
        "the interpreter's thread switch interval while the loop runs: how long the scoring "
        "thread and the Kafka client's threads wait for the loop to hand Python over "
        "(0: the interpreter's own, 5 ms)",
        0.5,
        minimum=0,
        maximum=1000,
    )

    def __post_init__(self) -> None:
        check(self)


@dataclass(frozen=True)
class EventSettings:
    """What goes to the output topic."""

    events: str = setting(
        "what goes to the output topic: alarms (episodes), windows (every anomalous window) "
        "or both",
        "alarms",
        choices=EVENT_MODES,
    )
    emit_all: bool = setting("also emit events for normal windows", False)

    def __post_init__(self) -> None:
        check(self)

    @property
    def windows(self) -> bool:
        return self.events in ("windows", "both")

    @property
    def alarms(self) -> bool:
        return self.events in ("alarms", "both")


@dataclass(frozen=True)
class AlarmSettings:
    """When an alarm episode opens, resolves and may open again (see `pipeline.worker.alarms`)."""

    alarm_k: int = setting(
        "an alarm opens when k of the last n windows are anomalous: k", 3, minimum=1
    )
    alarm_n: int = setting("... of the last n windows: n", 5, minimum=1)
    alarm_resolve_after: int = setting(
        "consecutive normal windows that resolve an alarm", 10, minimum=1
    )
    alarm_cooldown_s: float = setting(
        "after a resolve, seconds before the key can alarm again",
        60.0,
        minimum=0,
        maximum=MAX_SECONDS,
    )

    def __post_init__(self) -> None:
        if isinstance(self.alarm_n, int) and not 1 <= self.alarm_n <= MAX_WINDOWS:
            # n first: k is judged against it
            raise ConfigError("alarm_n", f"must be between 1 and {MAX_WINDOWS}, got {self.alarm_n}")
        check(self)
        if self.alarm_k > self.alarm_n:
            raise ConfigError(
                "alarm_k", f"must be between 1 and alarm_n ({self.alarm_n}), got {self.alarm_k}"
            )

    def rules(self) -> AlarmRules:
        return AlarmRules(
            k=self.alarm_k,
            n=self.alarm_n,
            resolve_after=self.alarm_resolve_after,
            cooldown_ms=int(round(self.alarm_cooldown_s * 1000)),
        )


@dataclass(frozen=True)
class DriftSettings:
    """Score drift against the calibration distribution (see `pipeline.worker.drift`)."""

    drift_window: int = setting(
        "recent windows per key whose scores are compared with the calibration scores "
        "(0: no drift statistic)",
        0,
        minimum=0,
        maximum=MAX_DRIFT_WINDOW,
    )
    drift_psi: float = setting(
        "pooled population stability index at which a drift event is emitted", 0.25, minimum=0.001
    )
    drift_key_psi: float = setting(
        "a key's population stability index at which its drift event is emitted "
        "(0: events for the pooled statistic only)",
        0.0,
        minimum=0,
    )

    def __post_init__(self) -> None:
        check(self)
        if 0 < self.drift_window < 50:
            raise ConfigError(
                "drift_window", f"must be 0 (off) or at least 50, got {self.drift_window}"
            )


@dataclass(frozen=True)
class HttpSettings:
    """The metrics, health and webhook endpoint."""

    http_host: str = setting("address of the metrics, health and webhook endpoint", "0.0.0.0")
    http_port: int = setting(
        "port of /metrics, /healthz, /readyz (0: any free port, -1: off)",
        8080,
        minimum=-1,
        maximum=65535,
    )
    webhook_secret: str | None = setting(
        "HMAC secret of the MLflow registry webhook (without one the webhook is off)", secret=True
    )
    webhook_insecure: bool = setting(
        "serve the registry webhook without a secret, accepting unsigned deliveries", False
    )

    def __post_init__(self) -> None:
        check(self)
        if self.webhook_insecure and self.webhook_secret:
            raise ConfigError(
                "webhook_insecure", "set either a webhook secret or webhook_insecure, not both"
            )


@dataclass(frozen=True)
class WorkerSettings:
    """Every setting of `aewatch worker`, by group. Build one from flat values with `build`."""

    registry: RegistrySettings
    kafka: KafkaSettings
    topics: TopicSettings
    records: RecordSettings
    batching: BatchSettings
    loop: LoopSettings
    events: EventSettings
    alarms: AlarmSettings
    adaptive: AdaptiveStageSettings
    baselines: BaselineSettings
    drift: DriftSettings
    http: HttpSettings

    def __post_init__(self) -> None:
        if not is_topic_name(self.state_topic_name):  # named after a group id of any characters
            raise ConfigError(
                "state_topic",
                f"the default {self.state_topic_name!r} (from --group-id) is not a Kafka topic "
                "name: give --state-topic",
            )
        self._check_topics_apart()
        last_port = self.http.http_port + self.loop.processes - 1  # member i serves port + i
        if self.http.http_port > 0 and last_port > 65535:
            raise ConfigError(
                "processes",
                f"{self.loop.processes} members serve ports {self.http.http_port} to "
                f"{last_port}: past 65535, lower --http-port",
            )

    def _check_topics_apart(self) -> None:
        """No topic the worker writes is one it reads; the state topic, which the worker makes
        compacted, and the DLQ, whose records are not events, are topics of their own."""
        topics = self.topics
        written = {
            "output_topic": topics.output_topic,
            "alarm_topic": topics.alarm_topic_name,
            "dlq_topic": topics.dlq_topic,
            "state_topic": self.state_topic_name,
        }
        pattern = re.compile(topics.input_pattern) if topics.input_pattern else None
        for name, topic in written.items():
            if topic in topics.input_topic or (pattern is not None and pattern.match(topic)):
                read_by = "--input-pattern" if pattern is not None else "--input-topic"
                raise ConfigError(
                    name,
                    f"{topic!r} is also read ({read_by}): the worker would read what it writes",
                )
        for name in ("dlq_topic", "state_topic"):
            for other, topic in written.items():
                if other != name and topic == written[name]:
                    raise ConfigError(
                        name,
                        f"{topic!r} is also the {other}: "
                        + (
                            "the state topic is compacted, a topic of its own"
                            if "state_topic" in (name, other)
                            else "dead letters are not events, they go to a topic of their own"
                        ),
                    )

    @classmethod
    def build(cls, **values) -> WorkerSettings:
        """From flat values by setting name (`model=...`, `max_batch=...`); the rest default."""
        return declared.build(cls, values)

    def replace(self, **values) -> WorkerSettings:
        """A copy with these settings (by name, as for `build`) changed."""
        return declared.replace(self, **values)

    @property
    def state_topic_name(self) -> str:
        return self.topics.state_topic or f"{self.kafka.group_id}.aewatch-state"

    def to_argv(self) -> list[str]:
        """`aewatch worker` flags that give these settings (defaults left out). Secrets are
        never put on a command line, where any process could read them: pass them as AEWATCH_
        variables; `tracking_uri` is MLFLOW_TRACKING_URI."""
        return declared.to_argv(self)

    def redacted(self) -> dict:
        """The settings for logs: secrets masked."""
        return declared.redacted(self)


def add_worker_arguments(parser: argparse.ArgumentParser) -> None:
    declared.add_arguments(parser, WorkerSettings)


def settings_from_args(args: argparse.Namespace, environ: Mapping[str, str]) -> WorkerSettings:
    """Flags first, then AEWATCH_ variables, then defaults; each value converted and checked."""
    return declared.build(WorkerSettings, declared.read(WorkerSettings, args, environ))


def settings_table() -> str:
    """The worker settings as a Markdown table (the README's copy is checked against this)."""
    return declared.table(WorkerSettings)
