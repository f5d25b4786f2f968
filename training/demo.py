"""`aewatch demo`: the whole pipeline on one machine, end to end.

Simulates a fleet of machines with several sensors, trains a denoising and an undercomplete
autoencoder on their normal history, registers both in MLflow and promotes the better one through
the promotion gates; then starts the scoring worker, streams live readings with one injected
anomaly of every kind, prints alarms as they open and resolve, and ends with a summary (injected vs
detected, false alarms, detection delay, throughput, latency) and a report (`report.png`).

Uses `KAFKA_BOOTSTRAP_SERVERS` if set, else starts the local broker; `MLFLOW_TRACKING_URI` if set,
else a sqlite store in the demo folder. Everything it starts is stopped at the end; each run
starts from an empty demo folder and uses topics of its own.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import sys
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import orjson

__all__ = ["register_demo"]

log = logging.getLogger(__name__)
SENSORS = ("pressure", "flow", "temperature", "vibration", "current", "speed", "torque", "level")
MODEL_NAME = "demo-fleet"
# Kinds injected by default. Two are left out because these dense autoencoders, scored by the
# mean reconstruction error over all sensors, catch them only sometimes (measured on this demo's
# fleet, 3 of 5 windows above the threshold: a tripled frequency in 4 of 8 placements, a stuck
# sensor in 0 of 10); `--anomalies` adds them back.
DEMO_KINDS = ("spike", "level_shift", "drift", "noise_burst")
WINDOW, STRIDE = 32, 4


def register_demo(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "demo",
        help="run the whole pipeline on this machine: simulate, train, promote, stream, alarm",
        description=__doc__.splitlines()[0],
    )
    parser.add_argument("--dir", default="aewatch-demo", help="demo folder (emptied first)")
    parser.add_argument("--keys", type=int, default=8, help="machines (default: %(default)s)")
    parser.add_argument("--sensors", type=int, default=6, help="sensors per machine")
    parser.add_argument("--history", type=int, default=3000, help="training readings per machine")
    parser.add_argument("--stream", type=int, default=1500, help="live readings per machine")
    parser.add_argument("--rate", type=float, default=400.0, help="live readings per second")
    parser.add_argument("--epochs", type=int, default=15)
    parser.add_argument(
        "--anomalies",
        default=",".join(DEMO_KINDS),
        help="kinds to inject into the live stream (default: %(default)s)",
    )
    parser.add_argument("--images", action="store_true", help="an image stream of digits instead")
    parser.add_argument("--seed", type=int, default=7)
    parser.set_defaults(handler=_run_demo)


@dataclass
class Collected:
    """What the demo's consumer saw on the output topic."""

    alarms: list[dict] = field(default_factory=list)
    anomalies: list[dict] = field(default_factory=list)
    latencies_ms: list[float] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)


def _quiet_logs() -> None:
    """Only warnings from aewatch and MLflow, only errors from kafka-python (again after each
    sub-command, which configures logging afresh)."""
    for noisy in ("pipeline", "training", "mlflow", "alembic"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    for handler in logging.getLogger().handlers:
        handler.addFilter(_QuietKafka())


class _QuietKafka(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not record.name.startswith("kafka") or record.levelno >= logging.ERROR


def _say(text: str = "") -> None:
    print(text, flush=True)


def _run_demo(args: argparse.Namespace) -> int:
    from pipeline.worker.cli import worker_environment
    from training.tracking import local_store

    _quiet_logs()
    worker_environment()
    root = Path(args.dir).resolve()
    shutil.rmtree(root, ignore_errors=True)
    root.mkdir(parents=True)
    broker = None
    bootstrap = os.environ.get("KAFKA_BOOTSTRAP_SERVERS")
    started = time.monotonic()
    try:
        if not bootstrap:
            from pipeline.tools.local_broker import LocalKafkaBroker

            _say("starting a local Kafka broker (deploy/kafka) ...")
            broker = LocalKafkaBroker().start()
            bootstrap = broker.bootstrap_servers
        tracking_uri = os.environ.get("MLFLOW_TRACKING_URI") or local_store(root, "aewatch-demo")
        _say(f"Kafka at {bootstrap}; MLflow at {tracking_uri}; demo folder {root}")
        run = _image_demo if args.images else _series_demo
        summary = run(args, root, bootstrap, tracking_uri)
    finally:
        if broker is not None:
            broker.stop()
    summary["wall_seconds"] = round(time.monotonic() - started, 1)
    (root / "summary.json").write_text(json.dumps(summary, indent=2, default=str))
    _say(f"\nfinished in {summary['wall_seconds']:.0f} s; summary in {root / 'summary.json'}")
    return 0 if summary.get("ok") else 1


# -- series ---------------------------------------------------------------------------------------
def _series_demo(args, root: Path, bootstrap: str, tracking_uri: str) -> dict:
    from pipeline.cli import main as cli
    from pipeline.tools.simulate import simulate_fleet, write_csv

    sensors = SENSORS[: args.sensors]
    kinds = tuple(k for k in args.anomalies.split(",") if k)
    _say(f"\n1. simulating {args.keys} machines x {len(sensors)} sensors: normal history")
    history = simulate_fleet(
        keys=args.keys,
        readings_per_key=args.history,
        features=sensors,
        anomalies=(),
        seed=args.seed,
    )
    write_csv(root / "history.csv", history)
    # labelled data the promotion gates judge both versions on
    review = _live_fleet(args, sensors, kinds, max(600, args.stream), anomaly_seed=args.seed + 100)
    write_csv(root / "review.csv", review)

    common = ["--data", str(root / "history.csv"), "--time-col", "ts", "--key-col", "key"]
    common += ["--label-col", "label", "--window", str(WINDOW), "--stride", str(STRIDE)]
    common += ["--epochs", str(args.epochs), "--tracking-uri", tracking_uri, "--no-progress"]
    common += ["--experiment", "aewatch-demo", "--register", MODEL_NAME, "--device", "cpu"]
    # a live fleet drifts a little past its training period: thresholds get a margin
    common += ["--threshold-margin", "1.6"]
    promote = ["promote", MODEL_NAME, "--tracking-uri", tracking_uri]
    promote += ["--data", str(root / "review.csv"), "--time-col", "ts", "--key-col", "key"]
    promote += ["--label-col", "label"]
    for step, kind in enumerate(("denoising", "undercomplete"), start=2):
        _say(f"\n{step}. training a {kind} autoencoder and registering it in MLflow")
        out = ["--kind", kind, "--out", str(root / kind)]
        if cli(["train", *common, *out]) != 0:
            raise RuntimeError(f"training the {kind} autoencoder failed")
        _say(f"\n   promotion gates for the {kind} version (challenger vs champion):")
        cli(promote)
    champion = _champion(tracking_uri)
    _say(f"\n   serving {MODEL_NAME} v{champion} (@champion)")

    _say(f"\n4. streaming {args.keys * args.stream:,} live readings at {args.rate:,.0f}/s")
    stream = _live_fleet(args, sensors, kinds, args.stream, anomaly_seed=args.seed + 1)
    live = _stream_through_worker(args, root, bootstrap, tracking_uri, stream)
    summary = _series_summary(stream, live)
    _series_report(root / "report.png", stream, live, tracking_uri)
    _print_summary(summary, root, tracking_uri, live)
    return summary


def _live_fleet(args, sensors, kinds, readings: int, *, anomaly_seed: int):
    """The same machines after their training history, with one anomaly of each kind."""
    from pipeline.tools.simulate import simulate_fleet

    return simulate_fleet(
        keys=args.keys,
        readings_per_key=readings,
        features=sensors,
        anomalies=kinds,
        anomalous_keys=min(len(kinds), args.keys),
        seed=args.seed,
        skip=args.history,
        warmup=150,
        anomaly_seed=anomaly_seed,
        magnitude=3.5,
        anomaly_length=60,
    )


def _champion(tracking_uri: str) -> str:
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)
    try:
        return str(client.get_model_version_by_alias(MODEL_NAME, "champion").version)
    except Exception as exc:  # the registry's not-found error
        raise RuntimeError("no version passed the promotion gates; nothing to serve") from exc


def _stream_through_worker(args, root, bootstrap, tracking_uri, stream) -> dict:
    from pipeline.kafka_io import open_client
    from pipeline.kafka_io.settings import KafkaConnection
    from pipeline.tools.alerts import format_event
    from pipeline.worker.app import WorkerApp
    from pipeline.worker.settings import WorkerSettings

    _quiet_logs()
    tag = uuid.uuid4().hex[:6]
    topics = {"input": f"demo-readings-{tag}", "output": f"demo-events-{tag}"}
    kafka = open_client(KafkaConnection(bootstrap))
    kafka.ensure_topics({topics["input"]: {"num_partitions": 4}, topics["output"]: {}})
    settings = WorkerSettings.build(
        model=f"models:/{MODEL_NAME}@champion",
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
                            collected.latencies_ms.append(now_ms - _iso_ms(end))
        consumer.close()

    threads = [
        threading.Thread(target=collect, daemon=True),
        threading.Thread(target=app.run, daemon=True),
    ]
    for thread in threads:
        thread.start()
    _say(f"   worker metrics at http://127.0.0.1:{app.http.port}/metrics while it runs")
    sent_ts = _produce_live(kafka, topics["input"], stream, args.rate, app.worker, collected)
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


def _produce_live(kafka, topic, stream, rate, worker, collected) -> np.ndarray:
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
                f"{worker.stats.windows_scored:,} windows, {alarms} alarm events"
            )
            print(("\r" + line) if tty else line, end="" if tty else "\n", flush=True)
    producer.flush()
    producer.close()
    if tty:
        print()
    return sent


def _iso_ms(text: str) -> float:
    return float(np.datetime64(text.rstrip("Z"), "ms").astype(np.int64))


def _series_summary(stream, live) -> dict:
    collected, sent = live["collected"], live["sent_ts"]
    keys = stream.keys
    episodes: dict[str, dict] = {}
    for event in collected.alarms:
        data = event["data"]
        episode = episodes.setdefault(data["episode_id"], {"key": data["key"]})
        episode[data["state"]] = _iso_ms(event["time"])
        episode["start"] = _iso_ms(data["start"])
        if data.get("end"):
            episode["end"] = _iso_ms(data["end"])
    slack_ms = 2 * WINDOW * float(np.median(np.diff(np.sort(sent[keys == keys[0]]))))
    per_kind, matched = [], set()
    for truth in stream.truth:
        key_ts = sent[keys == truth.key]
        start, end = key_ts[truth.start_index], key_ts[truth.end_index]
        hits = [
            (eid, e)
            for eid, e in episodes.items()
            if e["key"] == truth.key
            and "opened" in e
            and e["start"] <= end + slack_ms
            and e.get("end", e["opened"]) + slack_ms >= start
        ]
        matched.update(eid for eid, _ in hits)
        delay = min((e["opened"] - start) / 1000 for _, e in hits) if hits else None
        per_kind.append(
            {
                "kind": truth.kind,
                "key": truth.key,
                "sensor": truth.feature,
                "detected": bool(hits),
                "delay_s": None if delay is None else round(delay, 2),
            }
        )
    false_alarms = [e for eid, e in episodes.items() if eid not in matched]
    latencies = np.asarray(collected.latencies_ms)
    stats = live["stats"]
    duration_s = (sent.max() - sent.min()) / 1000
    detected = [k for k in per_kind if k["detected"]]
    delays = [k["delay_s"] for k in detected]
    return {
        "ok": len(detected) == len(per_kind),
        "injected": len(per_kind),
        "detected": len(detected),
        "anomalies": per_kind,
        "false_alarms": len(false_alarms),
        "episodes": len(episodes),
        "detection_delay_s": {
            "median": float(np.median(delays)) if delays else None,
            "max": max(delays) if delays else None,
        },
        "readings": int(stats["records_in"]),
        "windows_scored": int(stats["windows_scored"]),
        "throughput_readings_per_s": round(stats["records_in"] / max(duration_s, 1e-9), 1),
        "latency_ms": {
            "p50": float(np.percentile(latencies, 50)) if len(latencies) else None,
            "p99": float(np.percentile(latencies, 99)) if len(latencies) else None,
            "events": int(len(latencies)),
        },
        "model_version": live["model_version"],
        "topics": live["topics"],
    }


def _print_summary(summary: dict, root: Path, tracking_uri: str, live: dict) -> None:
    _say("\n5. summary")
    for item in summary.get("anomalies", []):
        found = f"detected after {item['delay_s']:.1f} s" if item["detected"] else "NOT detected"
        _say(f"   {item['kind']:17s} on {item['key']} ({item['sensor']}): {found}")
    _say(
        f"   {summary['detected']}/{summary['injected']} injected anomalies detected, "
        f"{summary['false_alarms']} false alarm{'' if summary['false_alarms'] == 1 else 's'} "
        f"({summary['episodes']} alarm episodes)"
    )
    delay = summary["detection_delay_s"]
    if delay.get("median") is not None:
        _say(f"   detection delay: median {delay['median']:.1f} s, max {delay['max']:.1f} s")
    latency = summary["latency_ms"]
    if latency["p50"] is not None:
        _say(
            f"   reading-to-event latency: p50 {latency['p50']:.0f} ms, p99 "
            f"{latency['p99']:.0f} ms ({latency['events']} events)"
        )
    _say(
        f"   worker: {summary['readings']:,} readings, {summary['windows_scored']:,} windows "
        f"scored, {summary['throughput_readings_per_s']:,.0f} readings/s (the stream's pace)"
    )
    _say("\nwhere to look next:")
    if tracking_uri.startswith("sqlite:"):
        _say(f"   mlflow ui --backend-store-uri {tracking_uri}   (runs, registry, figures)")
    else:
        _say(f"   the MLflow UI at {tracking_uri}")
    _say(f"   topics: {live['topics']['input']} (readings), {live['topics']['output']} (events)")
    _say(f"   report: {root / 'report.png'}")


def _series_report(path: Path, stream, live, tracking_uri: str) -> None:
    """Per machine with an injected anomaly: its sensors, the window scores, the threshold and
    the alarms, on the time of the stream."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from pipeline.registry.client import load_model

    detector, _ = load_model(f"models:/{MODEL_NAME}@champion", tracking_uri=tracking_uri)
    sent = live["sent_ts"]
    t0 = sent.min()
    truths = stream.truth
    fig, axes = plt.subplots(
        2 * len(truths), 1, figsize=(12, 2.6 * len(truths)), sharex=True, squeeze=False
    )
    spec = detector.input.window
    for row, truth in enumerate(truths):
        mask = stream.keys == truth.key
        values, ts = stream.values[mask], (sent[mask] - t0) / 1000
        top, bottom = axes[2 * row, 0], axes[2 * row + 1, 0]
        z = (values - values.mean(0)) / (values.std(0) + 1e-9)
        top.plot(ts, z, linewidth=0.6)
        top.axvspan(ts[truth.start_index], ts[truth.end_index], color="red", alpha=0.15)
        top.set_ylabel("sensors (z)")
        top.set_title(f"{truth.key}: injected {truth.kind} on {truth.feature}", fontsize=9)
        windows = np.lib.stride_tricks.sliding_window_view(values, spec.length, axis=0)
        ends = np.arange(spec.length - 1, len(values), spec.stride)
        scores = detector.score(windows[ends - spec.length + 1].transpose(0, 2, 1)).scores
        bottom.plot(ts[ends], scores, color="black", linewidth=0.8, label="window score")
        bottom.axhline(live["threshold"], color="orange", linestyle="--", label="threshold")
        spans: dict[str, tuple[float, float]] = {}
        for event in live["collected"].alarms:
            data = event["data"]
            if data["key"] == truth.key:  # resolved: start..end; still open: start..now
                end = _iso_ms(data["end"]) if data.get("end") else sent.max()
                spans[data["episode_id"]] = (_iso_ms(data["start"]), end)
        for start, end in spans.values():
            bottom.axvspan((start - t0) / 1000, (end - t0) / 1000, color="purple", alpha=0.2)
        bottom.set_ylabel("score")
        bottom.set_yscale("log")
    axes[-1, 0].set_xlabel("seconds into the stream (purple: alarm episodes; red: injected)")
    axes[1, 0].legend(loc="upper right", fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


# -- images ---------------------------------------------------------------------------------------
def _image_demo(args, root: Path, bootstrap: str, tracking_uri: str) -> dict:
    from sklearn.datasets import load_digits

    from pipeline.cli import main as cli
    from pipeline.kafka_io import open_client
    from pipeline.kafka_io.settings import KafkaConnection
    from pipeline.modalities.images import encode_image_record
    from pipeline.worker.app import WorkerApp
    from pipeline.worker.settings import WorkerSettings

    name = "demo-digits"
    _say("\n1. training a convolutional autoencoder on scikit-learn digits: 0 is normal")
    train = ["train", "--data", "digits", "--normal-class", "0", "--backbone", "conv"]
    train += ["--kind", "undercomplete", "--hidden", "16,32", "--code-size", "8"]
    train += ["--epochs", str(max(args.epochs, 40)), "--lr", "0.003", "--target-fpr", "0.05"]
    train += ["--tracking-uri", tracking_uri, "--experiment", "aewatch-demo", "--register", name]
    train += ["--out", str(root / "digits"), "--no-progress", "--device", "cpu"]
    if cli(train) != 0:
        raise RuntimeError("training the image autoencoder failed")
    _say("\n2. promotion gates:")
    cli(
        ["promote", name, "--tracking-uri", tracking_uri, "--data", "digits", "--normal-class", "0"]
    )

    digits = load_digits()
    rng = np.random.default_rng(args.seed)
    normal = np.flatnonzero(digits.target == 0)
    other = np.flatnonzero(digits.target != 0)
    order = np.concatenate([rng.choice(normal, 120, replace=False), rng.choice(other, 30)])
    rng.shuffle(order)
    tag = uuid.uuid4().hex[:6]
    topic, out = f"demo-images-{tag}", f"demo-image-events-{tag}"
    kafka = open_client(KafkaConnection(bootstrap))
    kafka.ensure_topics({topic: {"num_partitions": 2}, out: {}})
    settings = WorkerSettings.build(
        model=f"models:/{name}@champion",
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
    _quiet_logs()
    app = WorkerApp.build(settings)
    producer = kafka.sink(linger_ms=5)
    _say(f"\n3. streaming {len(order)} images from 3 cameras as .npy records")
    start_ms = int(time.time() * 1000)
    for i, index in enumerate(order):
        image = digits.images[index][None].astype(np.float32)
        headers = [("aewatch.ts", str(start_ms + i).encode())]
        producer.send(
            topic,
            key=f"camera-{i % 3}".encode(),
            value=encode_image_record(image),
            headers=headers,
        )
    producer.flush()
    producer.close()
    try:
        stats = app.run()
    finally:
        app.close()
    consumer = kafka.tail([out], from_beginning=True)
    events, quiet = [], time.monotonic()
    while time.monotonic() - quiet < 3:
        for records in consumer.poll(300).values():
            events.extend(orjson.loads(r.value) for r in records)
            quiet = time.monotonic()
    consumer.close()
    flagged = {int(_iso_ms(e["data"]["image"]["time"]) - start_ms) for e in events}
    anomalous = {i for i, index in enumerate(order) if digits.target[index] != 0}
    summary = {
        "images": int(stats.windows_scored),
        "anomalous_images": len(anomalous),
        "detected": len(flagged & anomalous),
        "false_alarms": len(flagged - anomalous),
        "ok": len(flagged & anomalous) >= 0.8 * len(anomalous),
    }
    _say("\n4. summary")
    _say(
        f"   {summary['detected']}/{summary['anomalous_images']} other digits raised an event; "
        f"{summary['false_alarms']} of {len(order) - len(anomalous)} zeros did"
    )
    return summary
