"""A fleet through the worker's own path: SKAB's 16 valve1 runs as 16 keys of one stream.

A detector is trained with `aewatch train` defaults on SKAB's `anomaly-free/anomaly-free.csv`
(undercomplete dense autoencoder, window 32, stride 1, standard scaler, 1 % target), one per
seed. The 16 valve1 runs (one machine each, each at its own level, one labelled anomaly each) are
then fed to the worker's loop in process (decoding, windowing, per-key baselines, scoring, the
adaptive stage, alarms, checkpoints; an in-memory source and sink instead of the broker), 50
readings of every key per poll, as a broker delivers interleaved keys.

Counting, per configuration and seed: an alarm *opened* inside a labelled span [first, last
labelled reading] is that span's own detection; every other opened alarm is a false alarm (also
one opened before a span that runs on into it). Medians over seeds 0, 1, 2.

The default per-key scale rule (`ratio`) was chosen on development data (SKAB valve2 and other/,
never valve1) where the model's score decides. The adaptive stage on levels gets its scale rule
and surprise threshold from the same development runs here (`select_on_dev`); only that row
counts for the target. Picking the best of the other rows by their valve1 figures would be an
oracle.

    python -m benchmarks.bench_fleet --skab ../shared/datasets/skab --out results
"""

from __future__ import annotations

import argparse
import hashlib
import itertools
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import orjson
import pandas as pd

from benchmarks.common import md_table, read_skab, skab_features, write_results
from benchmarks.memory_feed import MemorySource
from pipeline.detector import load_detector
from pipeline.events import ModelIdentity
from pipeline.worker.loop import Worker
from pipeline.worker.settings import WorkerSettings
from pipeline.worker.state import MemoryStateStore

SEEDS = (0, 1, 2)
CHUNK = 50  # readings of each key per poll
TARGET = (14, 2)  # at least 14 of 16 own detections, at most 2 false alarms
MODEL = ModelIdentity("skab", "1", "champion")
# (name, worker settings, note)
CONFIGS = (
    ("one scaler for all keys (before)", dict(), ""),
    ("per-key baselines, ratio, raw threshold", dict(key_baselines=True), "default rule"),
    (
        "per-key baselines, center, raw threshold",
        dict(key_baselines=True, baseline_scale="center"),
        "",
    ),
    (
        "per-key ratio + adaptive on levels",
        dict(key_baselines=True, alarm_on="adaptive", adaptive_columns="levels"),
        "",
    ),
    (
        "per-key center + adaptive on levels",
        dict(
            key_baselines=True,
            baseline_scale="center",
            alarm_on="adaptive",
            adaptive_columns="levels",
        ),
        "",
    ),
    (
        "per-key ratio + adaptive on window score",
        dict(key_baselines=True, alarm_on="adaptive"),
        "",
    ),
)


@dataclass
class Record:
    topic: str
    partition: int
    offset: int
    key: bytes | None
    value: bytes | None
    headers: list = field(default_factory=list)
    timestamp: int = 0


class _Sink:
    transactional = False

    def __init__(self) -> None:
        self.sent: list[tuple[str, bytes]] = []

    def send(self, topic, key=None, value=None, headers=None, partition=None) -> None:
        self.sent.append((topic, value))

    def flush(self) -> None:
        pass

    def close(self) -> None:
        pass


def read_fleet(skab: Path, groups=("valve1",)) -> tuple[list[Record], dict, list[str]]:
    """SKAB runs as keys: interleaved records, and each key's labelled spans (epoch ms)."""
    runs = [
        path
        for group in groups
        for path in sorted((skab / group).glob("*.csv"), key=lambda p: int(p.stem))
    ]
    frames, spans = {}, {}
    features: list[str] = []
    for path in runs:
        frame = read_skab(path)
        key = f"{path.parent.name}/{path.stem}"
        features = skab_features(frame)
        ts = pd.to_datetime(frame["datetime"]).to_numpy().astype("datetime64[ms]").astype(np.int64)
        labels = frame["anomaly"].to_numpy().astype(bool)
        edges = np.flatnonzero(np.diff(np.r_[0, labels.astype(int), 0]))
        spans[key] = [
            (int(ts[a]), int(ts[b - 1])) for a, b in zip(edges[::2], edges[1::2], strict=True)
        ]
        frames[key] = (ts, frame[features].to_numpy(np.float64))
    records: list[Record] = []
    longest = max(len(ts) for ts, _ in frames.values())
    for lo in range(0, longest, CHUNK):
        for key, (ts, values) in frames.items():
            for t in range(lo, min(lo + CHUNK, len(ts))):
                payload = {
                    "key": key,
                    "ts": int(ts[t]),
                    "values": dict(zip(features, values[t].tolist(), strict=True)),
                }
                records.append(
                    Record("valve1", 0, len(records), key.encode(), orjson.dumps(payload))
                )
    return records, spans, features


ROOT = Path(__file__).resolve().parents[1]


def training_code_digest(root: Path = ROOT) -> str:
    """SHA-256 (12 hex digits) of the code that decides what a training run fits (`training/`
    and `pipeline/detector/` under `root`): a cached detector is used only by the code that
    trained it."""
    digest = hashlib.sha256()
    for folder in ("training", "pipeline/detector"):
        for path in sorted((root / folder).rglob("*.py")):
            digest.update(str(path.relative_to(root)).encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()[:12]


def train(skab: Path, seed: int, cache: Path):
    out = cache / f"fleet-anomaly-free-seed{seed}-{training_code_digest()}"
    if not (out / "manifest.json").is_file():
        from training.fit import FitConfig
        from training.job import TrainSettings
        from training.job import train as run_train

        data = skab / "anomaly-free" / "anomaly-free.csv"
        settings = TrainSettings(
            data=str(data), out=str(out), time_col="datetime", fit=FitConfig(seed=seed)
        )
        result = run_train(settings)
        (out / "summary.json").write_bytes(orjson.dumps(result.summary(), default=str))
    summary = orjson.loads((out / "summary.json").read_bytes())
    return load_detector(out), summary


def run_fleet(detector, records, spans, overrides: dict) -> dict:
    base = dict(
        model="unused",
        bootstrap_servers="unused:9092",
        input_topic=("valve1",),
        output_topic="events",
        dlq_topic="dlq",
        max_wait_ms=0,
        commit_interval_ms=10_000,
        stop_after_idle_s=0.05,
        events="alarms",
        http_port=-1,
        device="cpu",
    )
    settings = WorkerSettings.build(**{**base, **overrides})
    sink = _Sink()
    worker = Worker(settings, detector, MODEL, sink, MemoryStateStore())
    worker.attach(MemorySource({("valve1", 0): records}, CHUNK * len(spans)))
    worker.on_assigned({("valve1", 0)})
    started = time.perf_counter()
    worker.run()
    seconds = time.perf_counter() - started
    opened = []
    for topic, value in sink.sent:
        event = orjson.loads(value)
        if topic == "events" and event.get("data", {}).get("state") == "opened":
            time_ms = pd.Timestamp(event["time"]).value // 1_000_000
            opened.append((event["data"]["key"], int(time_ms)))
    own, false = set(), 0
    for key, time_ms in opened:
        inside = [i for i, (a, b) in enumerate(spans.get(key, [])) if a <= time_ms <= b]
        if inside:
            own.add((key, inside[0]))
        else:
            false += 1
    return {
        "detected": len(own),
        "false_alarms": false,
        "alarms": len(opened),
        "spans": sum(len(s) for s in spans.values()),
        "seconds": round(seconds, 2),
    }


DEV_GROUPS = ("valve2", "other")
DEV_THRESHOLDS = (5.0, 6.0, 7.0)  # surprise at which a window is anomalous
# and the surprise from which a window stays out of the key's long-term estimate, as a share of
# the threshold (--adaptive-freeze: 0 off; 1: the stage never learns from a window it calls
# anomalous; 0.5: nor from one half as surprising)
DEV_FREEZE = (0.0, 0.5, 1.0)
# and the range check (--adaptive-range: the worker's default 0.05 first, so that a tie keeps it;
# 0 off)
DEV_RANGE = (0.05, 0.0)
# and the alarm rule, k of the last n windows anomalous (the worker's default 3 of 5 first, so
# that a tie keeps it; SKAB reads once a second and the windows step by one reading, so 30 of 60
# is half of the last minute)
DEV_ALARMS = ((3, 5), (10, 20), (30, 60))


def select_on_dev(skab: Path, detectors) -> tuple[dict, list]:
    """The adaptive stage on levels: scale rule, surprise threshold, freezing, the range check
    and the alarm rule chosen on development runs (valve2 and other/, never valve1) by median (own
    detections - false alarms) over the seeds, ties to fewer false alarms, then to the first in
    the grid's order."""
    records, spans, _ = read_fleet(skab, DEV_GROUPS)
    rows = []
    grid = itertools.product(("ratio", "center"), DEV_THRESHOLDS, DEV_FREEZE, DEV_RANGE, DEV_ALARMS)
    for rule, threshold, held, tolerance, (k, n) in grid:
        overrides = dict(
            key_baselines=True,
            baseline_scale=rule,
            alarm_on="adaptive",
            adaptive_columns="levels",
            adaptive_threshold=threshold,
            adaptive_freeze=threshold * held,
            adaptive_range=tolerance,
            alarm_k=k,
            alarm_n=n,
        )
        results = [run_fleet(d, records, spans, overrides) for d in detectors]
        det = statistics.median(r["detected"] for r in results)
        fa = statistics.median(r["false_alarms"] for r in results)
        rows.append({"settings": overrides, "detected": det, "false_alarms": fa})
        print(
            f"dev {rule} {threshold} freeze={threshold * held:g} range={tolerance:g} "
            f"alarm {k}/{n}: "
            f"{det}/{fa} of {results[0]['spans']}",
            flush=True,
        )
    best = max(rows, key=lambda r: (r["detected"] - r["false_alarms"], -r["false_alarms"]))
    return best["settings"], rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--skab", type=Path, default=Path("../shared/datasets/skab"))
    parser.add_argument("--out", type=Path, default=Path("results"))
    parser.add_argument("--cache", type=Path, default=Path("results/cache"))
    parser.add_argument("--seeds", type=int, nargs="+", default=list(SEEDS))
    args = parser.parse_args(argv)
    records, spans, _ = read_fleet(args.skab)
    trained, detectors = [], []
    for seed in args.seeds:
        detector, summary = train(args.skab, seed, args.cache)
        detectors.append(detector)
        trained.append({"seed": seed, "fpr_check": summary.get("fpr_check")})
    chosen, dev_rows = select_on_dev(args.skab, detectors)
    configs = (
        *CONFIGS,
        ("adaptive on levels, chosen on development runs", chosen, "development-data choice"),
    )
    runs: dict[str, list[dict]] = {name: [] for name, _, _ in configs}
    for seed, detector in zip(args.seeds, detectors, strict=True):
        for name, overrides, _ in configs:
            result = run_fleet(detector, records, spans, overrides)
            runs[name].append({"seed": seed, **result})
            print(f"seed {seed} {name}: {result}", flush=True)
    rows, payload = [], {"seeds": args.seeds, "configs": {}, "training": trained}
    payload["development"] = {"groups": DEV_GROUPS, "grid": dev_rows, "chosen": chosen}
    met_any = False
    for name, overrides, note in configs:
        det = statistics.median(r["detected"] for r in runs[name])
        fa = statistics.median(r["false_alarms"] for r in runs[name])
        met = det >= TARGET[0] and fa <= TARGET[1]
        met_any |= met and note == "development-data choice"
        per_seed = ", ".join(f"{r['detected']}/{r['false_alarms']}" for r in runs[name])
        rows.append([name, f"{det:g} / 16", f"{fa:g}", per_seed, note])
        payload["configs"][name] = {
            "settings": overrides,
            "note": note,
            "median_detected": det,
            "median_false_alarms": fa,
            "runs": runs[name],
            "meets_target": met,
        }
    payload["target_met_without_oracle"] = met_any
    table = md_table(
        ["configuration", "own detections", "false alarms", "per seed (det/fa)", "note"], rows
    )
    markdown = (
        "# SKAB valve1 as a 16-key fleet through the worker\n\n"
        f"Medians over seeds {args.seeds}; target >= {TARGET[0]} of 16 spans alarmed within "
        f"their labelled span, <= {TARGET[1]} alarms elsewhere. Chosen on {DEV_GROUPS}: "
        f"{chosen}.\n\n{table}\n"
    )
    write_results(args.out, "fleet", payload, markdown)
    print(markdown)
    return 0 if met_any else 1


if __name__ == "__main__":
    raise SystemExit(main())
