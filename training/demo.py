"""`aewatch demo`: the whole pipeline on one machine, end to end.

Simulates a fleet of machines with several sensors, trains a denoising and an undercomplete
autoencoder on their normal history, registers both in MLflow and promotes the better one through
the promotion gates; then starts the scoring worker, streams live readings with one injected
anomaly of every kind, prints alarms as they open and resolve, and ends with a summary (injected vs
detected, false alarms, detection delay, throughput, latency) and a report (`report.png`).

It scripts the other commands as a user would (`aewatch train`, `aewatch promote`); the
streaming half is `pipeline.tools.demo_stream`. A broker given is used, else the local one is
started; a tracking URI given is used, else a sqlite store in the demo folder. Everything it
starts is stopped at the end; each run starts from an empty demo folder and uses topics of its own.
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pipeline.tools.demo_stream import iso_ms, stream_images, stream_readings
from training.demo_logs import logs_restored, quiet_logs

__all__ = ["DEMO_KINDS", "DemoSettings", "live_fleet", "run_demo", "train_flags"]

log = logging.getLogger(__name__)
SENSORS = ("pressure", "flow", "temperature", "vibration", "current", "speed", "torque", "level")
MODEL_NAME = "demo-fleet"
# Every kind the simulator makes (a stuck sensor and a tripled frequency need the default terms
# score); `benchmarks/bench_demo.py` measures what the demo finds.
DEMO_KINDS = ("spike", "level_shift", "drift", "stuck", "noise_burst", "frequency_change")
WINDOW, STRIDE = 32, 4
MARGIN = 1.6  # a live fleet drifts a little past its training period: thresholds get a margin


@dataclass(frozen=True)
class DemoSettings:
    dir: str = "aewatch-demo"  # emptied first
    keys: int = 8
    sensors: int = 6
    history: int = 3000  # training readings per machine
    stream: int = 1500  # live readings per machine
    rate: float = 400.0  # live readings per second
    epochs: int = 15
    anomalies: tuple[str, ...] = DEMO_KINDS
    images: bool = False  # an image stream of digits instead
    seed: int = 7
    bootstrap_servers: str | None = None  # else a local broker is started
    tracking_uri: str | None = None  # else a sqlite store in the demo folder


def _say(text: str = "") -> None:
    print(text, flush=True)


def run_demo(args: DemoSettings) -> dict:
    """The whole demo; returns its summary (`ok`: every injected anomaly was detected)."""
    with logs_restored():
        return _run_demo(args)


def _run_demo(args: DemoSettings) -> dict:
    from training.tracking import local_store

    quiet_logs()
    root = Path(args.dir).resolve()
    shutil.rmtree(root, ignore_errors=True)
    root.mkdir(parents=True)
    broker = None
    bootstrap = args.bootstrap_servers
    started = time.monotonic()
    try:
        if not bootstrap:
            from pipeline.tools.local_broker import LocalKafkaBroker

            _say("starting a local Kafka broker (deploy/kafka) ...")
            broker = LocalKafkaBroker().start()
            bootstrap = broker.bootstrap_servers
        tracking_uri = args.tracking_uri or local_store(root, "aewatch-demo")
        _say(f"Kafka at {bootstrap}; MLflow at {tracking_uri}; demo folder {root}")
        run = _image_demo if args.images else _series_demo
        summary = run(args, root, bootstrap, tracking_uri)
    finally:
        if broker is not None:
            broker.stop()
    summary["wall_seconds"] = round(time.monotonic() - started, 1)
    (root / "summary.json").write_text(json.dumps(summary, indent=2, default=str))
    _say(f"\nfinished in {summary['wall_seconds']:.0f} s; summary in {root / 'summary.json'}")
    return summary


# -- series ---------------------------------------------------------------------------------------
def _series_demo(args, root: Path, bootstrap: str, tracking_uri: str) -> dict:
    from pipeline.cli import main as cli
    from pipeline.tools.simulate import simulate_fleet, write_csv

    sensors = SENSORS[: args.sensors]
    kinds = args.anomalies
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
    review = live_fleet(args, sensors, kinds, max(600, args.stream), anomaly_seed=args.seed + 100)
    write_csv(root / "review.csv", review)

    common = train_flags(root / "history.csv", args.epochs)
    common += ["--tracking-uri", tracking_uri, "--no-progress"]
    common += ["--experiment", "aewatch-demo", "--register", MODEL_NAME]
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
    stream = live_fleet(args, sensors, kinds, args.stream, anomaly_seed=args.seed + 1)
    quiet_logs()
    live = stream_readings(
        bootstrap, f"models:/{MODEL_NAME}@champion", tracking_uri, stream, args.rate
    )
    summary = _series_summary(stream, live)
    _series_report(root / "report.png", stream, live, tracking_uri)
    _print_summary(summary, root, tracking_uri, live)
    from training.demo_loop import feedback_loop

    verdicts = summary.pop("verdicts")
    data = ["--data", str(root / "history.csv"), "--time-col", "ts", "--key-col", "key"]
    summary["feedback"] = feedback_loop(
        root, bootstrap, tracking_uri, live, verdicts, MODEL_NAME, data
    )
    return summary


def train_flags(history: Path, epochs: int) -> list[str]:
    """The flags of `aewatch train` the demo trains both kinds with (less where it records)."""
    flags = ["--data", str(history), "--time-col", "ts", "--key-col", "key"]
    flags += ["--label-col", "label", "--window", str(WINDOW), "--stride", str(STRIDE)]
    flags += ["--epochs", str(epochs), "--min-steps", "0"]  # --epochs is the demo's budget
    return flags + ["--device", "cpu", "--threshold-margin", str(MARGIN)]


def live_fleet(args, sensors, kinds, readings: int, *, anomaly_seed: int):
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
    from pipeline.errors import RegistryError
    from pipeline.registry.client import alias_version

    try:
        return alias_version(MODEL_NAME, "champion", tracking_uri=tracking_uri)
    except RegistryError as exc:
        raise RuntimeError("no version passed the promotion gates; nothing to serve") from exc


def _series_summary(stream, live) -> dict:
    collected, sent = live["collected"], live["sent_ts"]
    keys = stream.keys
    episodes: dict[str, dict] = {}
    for event in collected.alarms:
        data = event["data"]
        episode = episodes.setdefault(data["episode_id"], {"key": data["key"]})
        episode[data["state"]] = iso_ms(event["time"])
        episode["start"] = iso_ms(data["start"])
        if data.get("end"):
            episode["end"] = iso_ms(data["end"])
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
    opened = [eid for eid, e in episodes.items() if "opened" in e]
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
        # what an operator would answer: injected anomalies are real, the rest false alarms
        "verdicts": {
            eid: "true_positive" if eid in matched else "false_positive" for eid in opened
        },
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
                end = iso_ms(data["end"]) if data.get("end") else sent.max()
                spans[data["episode_id"]] = (iso_ms(data["start"]), end)
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
    from pipeline.modalities.images import encode_image_record

    name = "demo-digits"
    _say("\n1. training a convolutional autoencoder on scikit-learn digits: 0 is normal")
    train = ["train", "--data", "digits", "--normal-class", "0", "--backbone", "conv"]
    train += ["--kind", "undercomplete", "--hidden", "16,32", "--code-size", "8", "--lr", "0.003"]
    train += ["--epochs", str(max(args.epochs, 40)), "--min-steps", "0", "--target-fpr", "0.05"]
    train += ["--tracking-uri", tracking_uri, "--experiment", "aewatch-demo", "--register", name]
    train += ["--out", str(root / "digits"), "--no-progress", "--device", "cpu"]
    if cli(train) != 0:
        raise RuntimeError("training the image autoencoder failed")
    _say("\n2. promotion gates:")
    promote = ["promote", name, "--tracking-uri", tracking_uri, "--no-pca-gate"]  # PCA: AUROC 1
    cli([*promote, "--data", "digits", "--normal-class", "0"])

    digits = load_digits()
    rng = np.random.default_rng(args.seed)
    normal = np.flatnonzero(digits.target == 0)
    other = np.flatnonzero(digits.target != 0)
    order = np.concatenate([rng.choice(normal, 120, replace=False), rng.choice(other, 30)])
    rng.shuffle(order)
    quiet_logs()
    _say(f"\n3. streaming {len(order)} images from 3 cameras as .npy records")
    start_ms = int(time.time() * 1000)
    records = [
        (
            f"camera-{i % 3}".encode(),
            encode_image_record(digits.images[index][None].astype(np.float32)),
            start_ms + i,
        )
        for i, index in enumerate(order)
    ]
    stats, events = stream_images(bootstrap, f"models:/{name}@champion", tracking_uri, records)
    flagged = {int(iso_ms(e["data"]["image"]["time"]) - start_ms) for e in events}
    anomalous = {i for i, index in enumerate(order) if digits.target[index] != 0}
    summary = {
        "images": int(stats["windows_scored"]),
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
