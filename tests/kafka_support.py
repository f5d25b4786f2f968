"""Helpers for tests against the real broker: topic names, producing, consuming, worker runs."""

from __future__ import annotations

import subprocess
import time
import uuid
from pathlib import Path

from kafka import KafkaAdminClient, KafkaConsumer, KafkaProducer
from kafka.admin import ConfigResource, ConfigResourceType

from pipeline.kafka_io import open_client
from pipeline.kafka_io.settings import KafkaConnection
from pipeline.tools.simulate import FleetStream
from pipeline.worker.app import WorkerApp
from pipeline.worker.cli import worker_command, worker_environment
from pipeline.worker.settings import WorkerSettings


def names(prefix: str) -> dict:
    tag = uuid.uuid4().hex[:8]
    return {
        "input": f"{prefix}-in-{tag}",
        "output": f"{prefix}-out-{tag}",
        "dlq": f"{prefix}-dlq-{tag}",
        "group": f"{prefix}-g-{tag}",
    }


def produce(bootstrap: str, topic: str, items) -> None:
    """items: (key, value) or (key, value, headers)."""
    producer = KafkaProducer(bootstrap_servers=bootstrap, linger_ms=5)
    for item in items:
        key, value, *headers = item
        producer.send(topic, key=key, value=value, headers=headers[0] if headers else None)
    producer.flush()
    producer.close()


def stream_items(stream: FleetStream) -> list:
    return [(k.encode(), v) for k, v in zip(stream.keys.tolist(), stream.payloads(), strict=True)]


def consume(
    bootstrap: str,
    topic: str,
    idle_s: float = 3.0,
    *,
    committed_only: bool = False,
    security: dict | None = None,
) -> list:
    consumer = KafkaConsumer(
        topic,
        bootstrap_servers=bootstrap,
        group_id=None,
        auto_offset_reset="earliest",
        enable_auto_commit=False,
        isolation_level="read_committed" if committed_only else "read_uncommitted",
        **(security or {}),
    )
    out, last = [], time.monotonic()
    while time.monotonic() - last < idle_s:
        for records in consumer.poll(timeout_ms=300).values():
            out.extend(records)
            last = time.monotonic()
    consumer.close()
    return out


def worker_settings(bootstrap: str, names: dict, model, **kwargs) -> WorkerSettings:
    kwargs.setdefault("events", "windows")
    kwargs.setdefault("http_port", -1)
    kwargs.setdefault("stop_after_idle_s", 4.0)
    kwargs.setdefault("session_timeout_ms", 6000)
    kwargs.setdefault("commit_interval_ms", 500)
    return WorkerSettings.build(
        model=str(model),
        bootstrap_servers=bootstrap,
        group_id=names["group"],
        input_topic=(names["input"],),
        output_topic=names["output"],
        dlq_topic=names["dlq"],
        device="cpu",
        **kwargs,
    )


def ensure_topics(bootstrap: str, topics: dict, connection: KafkaConnection | None = None) -> None:
    """Create the topics (a spec per name) through the worker's own Kafka client."""
    open_client(connection or KafkaConnection(bootstrap)).ensure_topics(topics)


def topic_settings(bootstrap: str, topic: str, *names: str) -> dict:
    """The broker's answer for a topic: its partition count and replication factor, and the
    value of each named setting with where it comes from (`DYNAMIC_TOPIC_CONFIG`: the topic's
    own)."""
    admin = KafkaAdminClient(bootstrap_servers=bootstrap)
    try:
        (described,) = admin.describe_topics([topic])
        found = admin.describe_configs(
            [ConfigResource(ConfigResourceType.TOPIC, topic, configs=dict.fromkeys(names))],
            config_filter="all",
        )["topic"][topic]
    finally:
        admin.close()
    partitions = described["partitions"]
    return {
        "partitions": len(partitions),
        "replication_factor": len(partitions[0]["replica_nodes"]),
        **{name: (entry["value"], entry["config_source"]) for name, entry in found.items()},
    }


def build_app(settings: WorkerSettings) -> WorkerApp:
    """The worker as `aewatch worker` builds it, in the environment that command sets."""
    worker_environment()
    return WorkerApp.build(settings)


def run_worker(settings: WorkerSettings):
    with build_app(settings) as app:
        stats = app.run()
    return app.worker, stats


def worker_process(
    bootstrap: str, names: dict, model, log: Path, *extra: str, env: dict | None = None
) -> subprocess.Popen:
    """`aewatch worker` as a process of its own (JSON logs appended to `log`)."""
    settings = worker_settings(
        bootstrap,
        names,
        model,
        stop_after_idle_s=5.0,
        commit_interval_ms=300,
        max_poll_records=500,
    )
    return subprocess.Popen(
        [*worker_command(settings), *extra],
        stdout=open(log, "ab"),  # noqa: SIM115 - the child owns it
        stderr=subprocess.STDOUT,
        start_new_session=True,
        env=env,
    )


def wait_for_log(proc: subprocess.Popen, log: Path, needle: bytes, timeout_s: float = 90) -> None:
    deadline = time.monotonic() + timeout_s
    while needle not in log.read_bytes():
        assert proc.poll() is None, log.read_text()[-3000:]
        assert time.monotonic() < deadline, f"{needle!r} not logged in {timeout_s}s"
        time.sleep(0.1)
