"""The streaming half of `aewatch demo`: live readings (or images) through a worker, events read back.

`stream_readings` starts a worker on its own topics, sends a simulated fleet's readings at a
given rate (each stamped with the time it is sent), prints alarms as they open and resolve, and
returns what came out; `stream_images` does the same for an image detector with `.npy` records.
Both reach Kafka through the worker's own client (`pipeline.kafka_io`). The training half, and
the summary of what was detected, are in `training.demo`.
"""

from __future__ import annotations

import sys
import threading
import time
import uuid
from dataclasses import dataclass, field

import numpy as np
import orjson

from pipeline.kafka_io import open_client
from pipeline.kafka_io.settings import KafkaConnection
from pipeline.tools.alerts import format_event
from pipeline.tools.simulate import FleetStream
from pipeline.worker.app import WorkerApp
from pipeline.worker.settings import WorkerSettings

__all__ = ["Collected", "iso_ms", "stream_images", "stream_readings"]


@dataclass
class Collected:
    """What the demo's consumer saw on the output topic."""

    alarms: list[dict] = field(default_factory=list)
    anomalies: list[dict] = field(default_factory=list)
    latencies_ms: list[float] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)


def iso_ms(text: str) -> float:
    """Epoch milliseconds of an event's ISO-8601 time."""
    return float(np.datetime64(text.rstrip("Z"), "ms").astype(np.int64))


def _say(text: str = "") -> None:
    print(text, flush=True)


def stream_readings(
    bootstrap: str, model: str, tracking_uri: str, stream: FleetStream, rate: float
) -> dict:
    """`stream` through a worker serving `model` (it follows the alias); returns the topics,
    when each reading was sent, the events collected, the worker's stats, threshold and version."""
    tag = uuid.uuid4().hex[:6]
    topics = {"input": f"demo-readings-{tag}", "output": f"demo-events-{tag}"}
    kafka = open_client(KafkaConnection(bootstrap))
    kafka.ensure_topics({topics["input"]: {"num_partitions": 4}, topics["output"]: {}})
    settings = WorkerSettings.build(
        model=model,
        bootstrap_servers=bootstrap,
        group_id=f"demo-{tag}",
        input_topic=(topics["input"],),
        output_topic=topics["output"],
        dlq_topic=f"demo-dlq-{tag}",
        events="both",
        http_port=0,
        reload_interval_s=5.0,
        commit_interval_ms=500,
        tracking_uri=tracking_uri,
    )
    app = WorkerApp.build(settings)
    collected = Collected()
    stop = threading.Event()

    def collect() -> None:
        consumer = kafka.tail([topics["output"]], from_beginning=True)
        while not stop.is_set():
            for records in consumer.poll(100).values():
                now_ms = time.time() * 1000
                for record in records:
                    event = orjson.loads(record.value)
                    data = event["data"]
                    end = data["window"]["end"] if "window" in data else event["time"]
                    with collected.lock:
                        if event["type"].startswith("aewatch.alarm"):
                            collected.alarms.append(event)
                            clear = "\r" + " " * 100 + "\r" if sys.stdout.isatty() else ""
                            print(f"{clear}   {format_event(event)}", flush=True)
                        else:
                            collected.anomalies.append(event)
                            collected.latencies_ms.append(now_ms - iso_ms(end))
        consumer.close()

    threads = [
        threading.Thread(target=collect, daemon=True),
        threading.Thread(target=app.run, daemon=True),
    ]
    for thread in threads:
        thread.start()
    _say(f"   worker metrics at http://127.0.0.1:{app.http.port}/metrics while it runs")
    sent_ts = _produce_live(kafka, topics["input"], stream, rate, app, collected)
    deadline = time.monotonic() + 60
    while app.worker.stats.records_in < len(stream.keys) and time.monotonic() < deadline:
        time.sleep(0.1)
    time.sleep(2.0)  # the last checkpoint and the last events reach the output topic
    stats = app.worker.stats.snapshot()
    app.stop()
    threads[1].join(timeout=60)
    app.close()
    stop.set()
    threads[0].join(timeout=10)
    return {
        "topics": topics,
        "sent_ts": sent_ts,
        "collected": collected,
        "stats": stats,
        "threshold": app.worker.detector.threshold.value,
        "model_version": app.worker.model.version,
    }


def _produce_live(kafka, topic, stream, rate, app, collected) -> np.ndarray:
    """Send the readings at `rate`, each stamped with the time it is sent; show progress."""
    producer = kafka.sink(linger_ms=5)
    names = stream.features
    keys = stream.keys.tolist()
    key_bytes = [k.encode() for k in keys]
    sent = np.zeros(len(keys), np.int64)
    last_ts: dict[str, int] = {}
    started = time.monotonic()
    shown = 0.0
    tty = sys.stdout.isatty()
    for i, (key, row) in enumerate(zip(keys, stream.values.tolist(), strict=True)):
        delay = started + i / rate - time.monotonic()
        if delay > 0:
            time.sleep(delay)
        ts = max(int(time.time() * 1000), last_ts.get(key, 0) + 1)
        last_ts[key] = sent[i] = ts
        value = orjson.dumps({"key": key, "ts": ts, "values": dict(zip(names, row, strict=True))})
        producer.send(topic, key=key_bytes[i], value=value)
        now = time.monotonic()
        if now - shown > (0.5 if tty else 5.0) or i == len(keys) - 1:
            shown = now
            with collected.lock:
                alarms = len(collected.alarms)
            line = (
                f"   sent {i + 1:,}/{len(keys):,} readings, scored "
                f"{app.worker.stats.windows_scored:,} windows, {alarms} alarm events"
            )
            print(("\r" + line) if tty else line, end="" if tty else "\n", flush=True)
    producer.flush()
    producer.close()
    if tty:
        print()
    return sent


def stream_images(
    bootstrap: str, model: str, tracking_uri: str, records: list[tuple[bytes, bytes, int]]
) -> tuple[dict, list[dict]]:
    """`records` (key, `.npy` bytes, epoch ms) through a worker serving `model` that stops once
    idle; returns its stats and the window events it produced."""
    tag = uuid.uuid4().hex[:6]
    topic, out = f"demo-images-{tag}", f"demo-image-events-{tag}"
    kafka = open_client(KafkaConnection(bootstrap))
    kafka.ensure_topics({topic: {"num_partitions": 2}, out: {}})
    settings = WorkerSettings.build(
        model=model,
        bootstrap_servers=bootstrap,
        group_id=f"demo-{tag}",
        input_topic=(topic,),
        output_topic=out,
        dlq_topic=f"demo-dlq-{tag}",
        events="windows",
        http_port=-1,
        stop_after_idle_s=5.0,
        tracking_uri=tracking_uri,
    )
    app = WorkerApp.build(settings)
    producer = kafka.sink(linger_ms=5)
    for key, value, ts_ms in records:
        producer.send(topic, key=key, value=value, headers=[("aewatch.ts", str(ts_ms).encode())])
    producer.flush()
    producer.close()
    with app:
        stats = app.run()
    consumer = kafka.tail([out], from_beginning=True)
    events, quiet = [], time.monotonic()
    while time.monotonic() - quiet < 3:
        for polled in consumer.poll(300).values():
            events.extend(orjson.loads(r.value) for r in polled)
            quiet = time.monotonic()
    consumer.close()
    return stats.snapshot(), events
