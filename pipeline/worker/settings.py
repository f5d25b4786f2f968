"""Worker settings: one frozen, validated object built at start-up from flags and environment.

Every flag `--some-setting` can also be given as `AEWATCH_SOME_SETTING`; a flag on the command
line wins. `MLFLOW_TRACKING_URI` is read as MLflow defines it. An invalid value fails at start-up
with a ConfigError that names the setting. Secrets (the SASL password, the TLS key password) never
appear in `repr`, logs or metrics.
"""

from __future__ import annotations

import argparse
import os
import re
import socket
from collections.abc import Mapping
from dataclasses import dataclass, field, fields

from pipeline.errors import ConfigError

__all__ = [
    "ENV_PREFIX",
    "SETTINGS",
    "Setting",
    "WorkerSettings",
    "add_client_security_arguments",
    "client_security",
    "add_worker_arguments",
    "settings_from_args",
    "settings_table",
]

ENV_PREFIX = "AEWATCH_"
SECURITY_PROTOCOLS = ("PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL")
SASL_MECHANISMS = ("PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512")
ORDER_POLICIES = ("reject", "drop")
EVENT_MODES = ("alarms", "windows", "both")
ASSIGNORS = ("range", "roundrobin", "cooperative-sticky")


@dataclass(frozen=True)
class Setting:
    """One worker setting: its flag, type, default and meaning (the README table comes from
    this list)."""

    name: str
    help: str
    default: object = None
    type: type = str
    choices: tuple | None = None
    repeatable: bool = False
    secret: bool = False
    flag_only: bool = False

    @property
    def flag(self) -> str:
        return "--" + self.name.replace("_", "-")

    @property
    def env(self) -> str:
        return ENV_PREFIX + self.name.upper()


SETTINGS: tuple[Setting, ...] = (
    Setting("model", "detector: models:/NAME@ALIAS, models:/NAME/VERSION or a folder"),
    Setting("bootstrap_servers", "Kafka bootstrap servers, host:port[,host:port]"),
    Setting("group_id", "consumer group id", "aewatch-worker"),
    Setting(
        "input_topic", "topic to consume (repeatable; env: comma-separated)", (), repeatable=True
    ),
    Setting("input_pattern", "regular expression of topics to consume instead of --input-topic"),
    Setting("output_topic", "topic for anomaly events", "aewatch.anomalies"),
    Setting("dlq_topic", "topic for records that cannot be used", "aewatch.dlq"),
    Setting("state_topic", "compacted topic for window positions (default: GROUP.aewatch-state)"),
    Setting("max_batch", "most windows scored in one forward pass", 4096, int),
    Setting("max_wait_ms", "longest a ready window waits for a fuller batch", 20, int),
    Setting("max_poll_records", "most records one poll returns", 5000, int),
    Setting("commit_interval_ms", "how often offsets are committed", 1000, int),
    Setting("session_timeout_ms", "consumer group session timeout", 10000, int),
    Setting(
        "max_poll_interval_ms", "longest gap between polls before the group evicts us", 300000, int
    ),
    Setting("max_record_bytes", "larger records go to the DLQ as oversize", 1_048_576, int),
    Setting(
        "order_policy",
        "out-of-order or duplicate timestamps per key: reject (to the DLQ) "
        "or drop (counted, not forwarded)",
        "reject",
        choices=ORDER_POLICIES,
    ),
    Setting("device", "auto, cpu or cuda[:N]", "auto"),
    Setting("emit_all", "also emit events for normal windows", False, bool),
    Setting("client_id", "Kafka client id", "aewatch-worker"),
    Setting(
        "security_protocol",
        "PLAINTEXT, SSL, SASL_PLAINTEXT or SASL_SSL",
        "PLAINTEXT",
        choices=SECURITY_PROTOCOLS,
    ),
    Setting(
        "sasl_mechanism", "PLAIN, SCRAM-SHA-256 or SCRAM-SHA-512", None, choices=SASL_MECHANISMS
    ),
    Setting("sasl_username", "SASL user name"),
    Setting("sasl_password", "SASL password", secret=True),
    Setting("ssl_cafile", "CA certificate file (PEM)"),
    Setting("ssl_certfile", "client certificate file (PEM)"),
    Setting("ssl_keyfile", "client key file (PEM)"),
    Setting("ssl_password", "password of the client key", secret=True),
    Setting("stop_after_idle_s", "exit after this long without input (0: never)", 0.0, float),
    Setting(
        "events",
        "what goes to the output topic: alarms (episodes), windows (every anomalous window) "
        "or both",
        "alarms",
        choices=EVENT_MODES,
    ),
    Setting("alarm_topic", "topic for alarm events (default: --output-topic)"),
    Setting("alarm_k", "an alarm opens when k of the last n windows are anomalous: k", 3, int),
    Setting("alarm_n", "... of the last n windows: n", 5, int),
    Setting("alarm_resolve_after", "consecutive normal windows that resolve an alarm", 10, int),
    Setting(
        "alarm_cooldown_s", "after a resolve, seconds before the key can alarm again", 60.0, float
    ),
    Setting(
        "reload_interval_s",
        "how often the model alias is checked for a new version (0: never)",
        30.0,
        float,
    ),
    Setting(
        "registry_wait_s",
        "at start, how long to keep retrying an unreachable registry (0: fail at once)",
        0.0,
        float,
    ),
    Setting("webhook_secret", "HMAC secret of the MLflow registry webhook", secret=True),
    Setting("http_host", "address of the metrics, health and webhook endpoint", "0.0.0.0"),
    Setting(
        "http_port", "port of /metrics, /healthz, /readyz (0: any free port, -1: off)", 8080, int
    ),
    Setting(
        "exactly_once", "events, dead letters and offsets in one Kafka transaction", False, bool
    ),
    Setting(
        "transactional_id",
        "producer transactional id with --exactly-once, stable per worker "
        "(default: GROUP.INSTANCE_ID or GROUP.HOSTNAME)",
    ),
    Setting("group_instance_id", "static group membership id, stable per worker"),
    Setting(
        "assignor",
        "partition assignment strategy: range, roundrobin or cooperative-sticky "
        "(incremental: moves only the partitions that change owner)",
        "range",
        choices=ASSIGNORS,
    ),
)


@dataclass(frozen=True)
class WorkerSettings:
    model: str
    bootstrap_servers: str
    group_id: str = "aewatch-worker"
    input_topic: tuple[str, ...] = ()
    input_pattern: str | None = None
    output_topic: str = "aewatch.anomalies"
    dlq_topic: str = "aewatch.dlq"
    state_topic: str | None = None
    max_batch: int = 4096
    max_wait_ms: int = 20
    max_poll_records: int = 5000
    commit_interval_ms: int = 1000
    session_timeout_ms: int = 10000
    max_poll_interval_ms: int = 300000
    max_record_bytes: int = 1_048_576
    order_policy: str = "reject"
    device: str = "auto"
    emit_all: bool = False
    client_id: str = "aewatch-worker"
    security_protocol: str = "PLAINTEXT"
    sasl_mechanism: str | None = None
    sasl_username: str | None = None
    sasl_password: str | None = field(default=None, repr=False)
    ssl_cafile: str | None = None
    ssl_certfile: str | None = None
    ssl_keyfile: str | None = None
    ssl_password: str | None = field(default=None, repr=False)
    stop_after_idle_s: float = 0.0
    events: str = "alarms"
    alarm_topic: str | None = None
    alarm_k: int = 3
    alarm_n: int = 5
    alarm_resolve_after: int = 10
    alarm_cooldown_s: float = 60.0
    reload_interval_s: float = 30.0
    registry_wait_s: float = 0.0
    webhook_secret: str | None = field(default=None, repr=False)
    http_host: str = "0.0.0.0"
    http_port: int = 8080
    exactly_once: bool = False
    transactional_id: str | None = None
    group_instance_id: str | None = None
    assignor: str = "range"
    tracking_uri: str | None = None

    def __post_init__(self) -> None:
        if not self.model:
            raise ConfigError("model", "is required (--model or AEWATCH_MODEL)")
        if not self.bootstrap_servers:
            raise ConfigError(
                "bootstrap_servers",
                "is required (--bootstrap-servers or AEWATCH_BOOTSTRAP_SERVERS)",
            )
        if bool(self.input_topic) == bool(self.input_pattern):
            raise ConfigError("input_topic", "give --input-topic (repeatable) or --input-pattern")
        if self.input_pattern:
            try:
                re.compile(self.input_pattern)
            except re.error as exc:
                raise ConfigError("input_pattern", f"not a regular expression: {exc}") from None
        for name in (
            "max_batch",
            "max_poll_records",
            "commit_interval_ms",
            "session_timeout_ms",
            "max_poll_interval_ms",
            "max_record_bytes",
        ):
            if getattr(self, name) < 1:
                raise ConfigError(name, f"must be >= 1, got {getattr(self, name)}")
        if self.max_wait_ms < 0 or self.stop_after_idle_s < 0:
            raise ConfigError("max_wait_ms", "max_wait_ms and stop_after_idle_s must be >= 0")
        if self.registry_wait_s < 0:
            raise ConfigError("registry_wait_s", "must be >= 0")
        if self.reload_interval_s < 0:
            raise ConfigError("reload_interval_s", "must be >= 0 (0 turns polling off)")
        if not -1 <= self.http_port <= 65535:
            raise ConfigError(
                "http_port", f"must be a port, 0 (any) or -1 (off), got {self.http_port}"
            )
        self.alarm_rules()  # validates the alarm settings, naming the one at fault
        if self.output_topic in self.input_topic or self.dlq_topic in self.input_topic:
            raise ConfigError("output_topic", "output and DLQ topics must differ from the input")
        sasl_complete = self.sasl_mechanism and self.sasl_username and self.sasl_password
        if self.security_protocol.startswith("SASL") and not sasl_complete:
            raise ConfigError(
                "sasl_mechanism",
                f"{self.security_protocol} needs "
                "--sasl-mechanism, --sasl-username and --sasl-password",
            )
        for name in ("ssl_cafile", "ssl_certfile", "ssl_keyfile"):
            path = getattr(self, name)
            if path and not os.path.isfile(path):
                raise ConfigError(name, f"no such file: {path}")

    @property
    def state_topic_name(self) -> str:
        return self.state_topic or f"{self.group_id}.aewatch-state"

    @property
    def alarm_topic_name(self) -> str:
        return self.alarm_topic or self.output_topic

    @property
    def transactional_id_value(self) -> str:
        instance = self.group_instance_id or socket.gethostname()
        return self.transactional_id or f"{self.group_id}.{instance}"

    def alarm_rules(self):
        from pipeline.worker.alarms import AlarmRules

        return AlarmRules(
            k=self.alarm_k,
            n=self.alarm_n,
            resolve_after=self.alarm_resolve_after,
            cooldown_ms=int(round(self.alarm_cooldown_s * 1000)),
        )

    def kafka_security(self) -> dict:
        """Security settings for kafka-python clients (empty ones left out)."""
        config = {"security_protocol": self.security_protocol}
        if self.sasl_mechanism:
            config.update(
                sasl_mechanism=self.sasl_mechanism,
                sasl_plain_username=self.sasl_username,
                sasl_plain_password=self.sasl_password,
            )
        for name in ("ssl_cafile", "ssl_certfile", "ssl_keyfile", "ssl_password"):
            if getattr(self, name):
                config[name] = getattr(self, name)
        return config

    def to_argv(self) -> list[str]:
        """`aewatch worker` flags that give these settings (defaults left out). Secrets are never
        put on a command line, where any process could read them: pass them as AEWATCH_
        variables; `tracking_uri` is MLFLOW_TRACKING_URI."""
        argv: list[str] = []
        for setting in SETTINGS:
            value = getattr(self, setting.name)
            if setting.secret or value is None or value == setting.default:
                continue
            if setting.type is bool:
                argv.append(setting.flag)  # a bool that differs from its default (False)
            elif setting.repeatable:
                for item in value:
                    argv += [setting.flag, str(item)]
            else:
                argv += [setting.flag, str(value)]
        return argv

    def redacted(self) -> dict:
        """The settings for logs: secrets masked."""
        secret = {s.name for s in SETTINGS if s.secret}
        return {
            f.name: ("***" if f.name in secret and getattr(self, f.name) else getattr(self, f.name))
            for f in fields(self)
        }


def _parse_bool(text: str) -> bool:
    lowered = str(text).strip().lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off", ""):
        return False
    raise ValueError(text)


def add_worker_arguments(parser: argparse.ArgumentParser) -> None:
    for setting in SETTINGS:
        kwargs: dict = {"help": f"{setting.help} [env {setting.env}]", "default": None}
        if setting.type is bool:
            kwargs["action"] = "store_const"
            kwargs["const"] = True
        elif setting.repeatable:
            kwargs["action"] = "append"
        else:
            kwargs["type"] = str
        parser.add_argument(setting.flag, dest=setting.name, **kwargs)


def settings_from_args(args: argparse.Namespace, environ: Mapping[str, str]) -> WorkerSettings:
    """Flags first, then AEWATCH_ variables, then defaults; each value converted and checked."""
    values = {}
    for setting in SETTINGS:
        raw = getattr(args, setting.name, None)
        source = setting.flag
        if raw is None and setting.env in environ:
            raw, source = environ[setting.env], setting.env
            if setting.repeatable:
                raw = [t.strip() for t in raw.split(",") if t.strip()]
        if raw is None:
            values[setting.name] = setting.default
            continue
        try:
            if setting.repeatable:
                value = tuple(raw)
            elif setting.type is bool:
                value = raw if isinstance(raw, bool) else _parse_bool(raw)
            else:
                value = setting.type(raw)
        except (TypeError, ValueError):
            raise ConfigError(setting.name, f"invalid value {raw!r} from {source}") from None
        if setting.choices and value not in setting.choices:
            raise ConfigError(
                setting.name, f"{value!r} from {source} is not one of {', '.join(setting.choices)}"
            )
        values[setting.name] = value
    return WorkerSettings(**values, tracking_uri=environ.get("MLFLOW_TRACKING_URI"))


def settings_table() -> str:
    """The worker settings as a Markdown table (the README's copy is checked against this)."""
    lines = ["| flag | environment | default | meaning |", "|---|---|---|---|"]
    for setting in SETTINGS:
        default = setting.default
        if default in (None, ()):
            shown = ""
        elif setting.secret:
            shown = "(secret)"
        else:
            shown = f"`{default}`"
        lines.append(f"| `{setting.flag}` | `{setting.env}` | {shown} | {setting.help} |")
    return "\n".join(lines)


def add_client_security_arguments(parser: argparse.ArgumentParser) -> None:
    """Kafka security flags of the companion commands (simulate, alerts)."""
    parser.add_argument("--security-protocol", default="PLAINTEXT", choices=SECURITY_PROTOCOLS)
    parser.add_argument("--sasl-mechanism", choices=SASL_MECHANISMS)
    parser.add_argument("--sasl-username")
    parser.add_argument("--sasl-password")
    parser.add_argument("--ssl-cafile")


def client_security(args: argparse.Namespace) -> dict:
    """kafka-python keyword arguments from `add_client_security_arguments` flags."""
    config = {
        "security_protocol": args.security_protocol,
        "sasl_mechanism": args.sasl_mechanism,
        "sasl_plain_username": args.sasl_username,
        "sasl_plain_password": args.sasl_password,
        "ssl_cafile": args.ssl_cafile,
    }
    return {k: v for k, v in config.items() if v}
