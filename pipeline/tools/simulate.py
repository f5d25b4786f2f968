"""`aewatch simulate`: a multi-sensor fleet on Kafka with injected anomalies and a ground truth.

Each key is a machine with correlated sensors (shared seasonal drivers, a slow cycle, a random
walk, noise); anomalies of the named kinds (spike, level_shift, drift, stuck, noise_burst,
frequency_change) are injected on one sensor of some keys. Readings are JSON
`{"key", "ts" (epoch ms), "values": {sensor: number}}` with the Kafka message key = the key;
with `--batch N`, each record carries N consecutive readings of one key, as columnar JSON
`{"key", "ts": [...], "values": {sensor: [...]}}` or an Arrow IPC record batch (`--format arrow`).
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import orjson

from pipeline.errors import ConfigError
from pipeline.kafka_io.settings import add_connection_arguments, connection_from_args, topic_name
from pipeline.settings import count, non_negative, random_seed, whole
from pipeline.tools.synthetic import ANOMALY_KINDS, Injection, inject, normal_series

__all__ = ["FleetStream", "TruthRow", "register_simulate", "simulate_fleet"]

log = logging.getLogger(__name__)
MAX_PERIOD_MS = 86_400_000  # the slowest --rate: a reading of each key a day
RECORD_LIMIT = 1_048_576  # the most a record may hold: the sink's and brokers' default


@dataclass(frozen=True)
class TruthRow:
    key: str
    kind: str
    feature: str
    start_index: int
    end_index: int  # inclusive
    start_ms: int
    end_ms: int


@dataclass
class FleetStream:
    """Readings of every key, interleaved in time order, and what was injected where."""

    keys: np.ndarray  # [N] str
    ts_ms: np.ndarray  # [N] int64
    values: np.ndarray  # [N, F] float32
    labels: np.ndarray  # [N] 0/1
    features: tuple[str, ...]
    truth: list[TruthRow]

    def payloads(self) -> list[bytes]:
        names = self.features
        return [
            orjson.dumps(
                {"key": k, "ts": int(t), "values": dict(zip(names, row.tolist(), strict=True))}
            )
            for k, t, row in zip(self.keys.tolist(), self.ts_ms, self.values, strict=True)
        ]

    def batches(self, size: int, form: str = "json") -> list[tuple[str, bytes]]:
        """(key, record) of `size` consecutive readings of one key each (the last of a key may
        hold fewer), in the time order of their first readings."""
        from pipeline.modalities.batches import arrow_record

        names, chunks = self.features, []
        for key in dict.fromkeys(self.keys.tolist()):
            rows = np.flatnonzero(self.keys == key)
            for low in range(0, len(rows), size):
                chunks.append((int(rows[low]), key, rows[low : low + size]))
        chunks.sort(key=lambda chunk: chunk[0])
        out = []
        for _, key, rows in chunks:
            ts, values = self.ts_ms[rows], self.values[rows].astype(np.float64)
            if form == "arrow":
                out.append((key, arrow_record(ts, values, names)))
            else:
                columns = {name: values[:, i].tolist() for i, name in enumerate(names)}
                record = {"key": key, "ts": ts.tolist(), "values": columns}
                out.append((key, orjson.dumps(record)))
        return out

    def key_series(self, key: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        mask = self.keys == key
        return self.ts_ms[mask], self.values[mask], self.labels[mask]


def simulate_fleet(
    *,
    keys: int = 4,
    readings_per_key: int = 2500,
    features: int | tuple[str, ...] = 6,
    anomalies: tuple[str, ...] = ANOMALY_KINDS,
    anomalous_keys: int | None = None,
    anomaly_length: int = 40,
    magnitude: float = 1.5,
    start_ms: int = 1_767_225_600_000,
    period_ms: int = 1000,
    seed: int = 0,
    warmup: int = 0,
    skip: int = 0,
    anomaly_seed: int | None = None,
) -> FleetStream:
    """A fleet in time order. The first `warmup` readings of every key stay normal; anomalies
    (one per kind, cycling over the anomalous keys) are placed without overlap after that.

    The machines are fixed by `seed`; `skip` continues their series after that many readings
    (train on the first part of a fleet, stream its future), and `anomaly_seed` varies where
    anomalies land."""
    names = (
        tuple(features)
        if isinstance(features, tuple | list)
        else tuple(f"sensor_{i}" for i in range(int(features)))
    )
    for kind in anomalies:
        if kind not in ANOMALY_KINDS:
            raise ConfigError("anomalies", f"unknown kind {kind!r}; choose from {ANOMALY_KINDS}")
    rng = np.random.default_rng(seed if anomaly_seed is None else anomaly_seed)
    key_names = [f"machine-{i:03d}" for i in range(keys)]
    n_bad = keys if anomalous_keys is None else min(anomalous_keys, keys)
    per_key_values, per_key_labels, truth = [], [], []
    plan: dict[int, list[str]] = {i: [] for i in range(n_bad)}
    for j, kind in enumerate(anomalies):
        if n_bad:
            plan[j % n_bad].append(kind)
    for index, key in enumerate(key_names):
        values = normal_series(skip + readings_per_key, len(names), seed=seed * 1000 + index)
        values = values[skip:]
        labels = np.zeros(readings_per_key, np.int8)
        kinds = plan.get(index, [])
        free = readings_per_key - warmup
        slot = free // max(1, len(kinds))
        if kinds and slot < anomaly_length + 10:
            raise ConfigError("readings_per_key", "too few readings for the anomalies asked for")
        for k, kind in enumerate(kinds):
            lo = warmup + k * slot + 5
            start = int(rng.integers(lo, lo + slot - anomaly_length - 5))
            feature = int(rng.integers(len(names)))
            values = inject(
                values,
                Injection(kind, start, anomaly_length, feature),
                rng=rng,
                magnitude=magnitude,
            )
            labels[start : start + anomaly_length] = 1
            truth.append(
                TruthRow(
                    key,
                    kind,
                    names[feature],
                    start,
                    start + anomaly_length - 1,
                    start_ms + (skip + start) * period_ms,
                    start_ms + (skip + start + anomaly_length - 1) * period_ms,
                )
            )
        per_key_values.append(values)
        per_key_labels.append(labels)
    # interleave: reading i of every key, then reading i + 1, ...
    order_keys = np.tile(np.asarray(key_names, dtype=object), readings_per_key)
    steps = np.arange(skip, skip + readings_per_key, dtype=np.int64)
    ts = np.repeat(start_ms + steps * period_ms, keys)
    stacked = np.stack(per_key_values, axis=1).reshape(-1, len(names))
    labels = np.stack(per_key_labels, axis=1).reshape(-1)
    return FleetStream(order_keys, ts, stacked.astype(np.float32), labels, names, truth)


def write_csv(path: Path, fleet: FleetStream) -> None:
    """The readings as a table the training job reads: ts (UTC), key, one column per sensor,
    label (1 inside an injected anomaly)."""
    import pandas as pd

    frame = pd.DataFrame(fleet.values, columns=list(fleet.features))
    frame.insert(0, "key", fleet.keys)
    frame.insert(0, "ts", pd.to_datetime(fleet.ts_ms, unit="ms", utc=True))
    frame["label"] = fleet.labels.astype(int)
    path.parent.mkdir(parents=True, exist_ok=True)
    frame.to_csv(path, index=False)


def write_truth(path: Path, truth: list[TruthRow]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(TruthRow.__dataclass_fields__))
        writer.writeheader()
        writer.writerows(asdict(row) for row in truth)


def register_simulate(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "simulate",
        help="produce a simulated sensor fleet with injected anomalies to Kafka",
        description=__doc__.splitlines()[0],
    )
    parser.add_argument("--bootstrap-servers", help="the broker (not needed with only --csv)")
    parser.add_argument(
        "--topic", type=topic_name, help="topic for the readings (not needed with only --csv)"
    )
    parser.add_argument(
        "--csv", help="also write the readings to this CSV (ts, key, sensors, label), e.g. to train"
    )
    parser.add_argument(
        "--skip", type=whole, default=0, help="continue each machine after this many readings"
    )
    parser.add_argument("--keys", type=count, default=4, help="machines (default: %(default)s)")
    parser.add_argument("--readings", type=count, default=2500, help="readings per machine")
    parser.add_argument(
        "--features",
        default="6",
        help="number of sensors, or comma-separated names (default: %(default)s)",
    )
    parser.add_argument(
        "--anomalies",
        default=",".join(ANOMALY_KINDS),
        help="kinds to inject, comma-separated ('' for none)",
    )
    parser.add_argument("--anomalous-keys", type=whole, help="machines that get anomalies")
    parser.add_argument("--warmup", type=whole, default=0, help="normal readings first, per key")
    parser.add_argument(
        "--rate",
        type=non_negative,
        default=0.0,
        help="readings per second in total (0: as fast as possible)",
    )
    parser.add_argument(
        "--live",
        action="store_true",
        help="stamp readings with the current time instead of a fixed start: with --rate from "
        "now on, as they go out; without, the series ends now",
    )
    parser.add_argument(
        "--batch",
        type=count,
        default=1,
        help="readings of one key per record (1: one reading per record, the default)",
    )
    parser.add_argument(
        "--format",
        choices=("json", "arrow"),
        default="json",
        help="form of batched records: columnar JSON or Arrow IPC (default: %(default)s)",
    )
    parser.add_argument("--seed", type=random_seed, default=0)
    parser.add_argument("--truth", help="write the injected anomalies to this CSV")
    add_connection_arguments(parser)
    parser.set_defaults(handler=_run_simulate)


def _run_simulate(args: argparse.Namespace) -> int:
    if not args.csv and not (args.bootstrap_servers and args.topic):
        raise ConfigError("topic", "give --bootstrap-servers and --topic, or --csv, or both")
    for name in ("csv", "truth"):
        path = getattr(args, name)
        if path and Path(path).is_dir():
            raise ConfigError(name, f"{path} is a folder; give the file to write")
    if args.csv and args.truth and Path(args.csv).resolve() == Path(args.truth).resolve():
        raise ConfigError("truth", f"{args.truth} is also --csv: write the truth elsewhere")
    if args.rate and 1000 * args.keys / args.rate > MAX_PERIOD_MS:
        raise ConfigError("rate", f"{args.rate:g} readings/s gives each key less than one a day")
    features = (
        tuple(args.features.split(",")) if not args.features.isdigit() else int(args.features)
    )
    if features == 0 or (isinstance(features, tuple) and not all(features)):
        raise ConfigError(
            "features", f"give a number of at least 1 or names, got {args.features!r}"
        )
    if isinstance(features, tuple):  # the CSV's other columns; and a name twice is one column
        taken = [n for n in features if n in ("ts", "key", "label") or features.count(n) > 1]
        if taken:
            raise ConfigError(
                "features", f"{taken[0]!r} is taken (by ts, key, label or another feature)"
            )
    kinds = tuple(k for k in args.anomalies.split(",") if k)
    period_ms = max(1, int(1000 * args.keys / args.rate)) if args.rate else 1000
    start_ms = 1_767_225_600_000
    if args.live:  # paced: from now on, as the readings go out; as fast as possible: up to now
        ahead = 0 if args.rate else args.readings - 1
        start_ms = int(time.time() * 1000) - (args.skip + ahead) * period_ms
    fleet = simulate_fleet(
        keys=args.keys,
        readings_per_key=args.readings,
        features=features,
        anomalies=kinds,
        anomalous_keys=args.anomalous_keys,
        warmup=args.warmup,
        seed=args.seed,
        start_ms=start_ms,
        period_ms=period_ms,
        skip=args.skip,
    )
    for name, path, write in (("truth", args.truth, write_truth), ("csv", args.csv, write_csv)):
        if path:
            try:
                write(Path(path), fleet.truth if name == "truth" else fleet)
            except OSError as exc:
                raise ConfigError(name, f"cannot write {path}: {exc.strerror or exc}") from None
    if not args.topic:
        print(json.dumps({"readings": len(fleet.keys), "keys": args.keys, "csv": args.csv}))
        return 0
    from pipeline.kafka_io import open_client

    if args.batch > 1:
        records = fleet.batches(args.batch, args.format)
    else:
        records = list(zip(fleet.keys.tolist(), fleet.payloads(), strict=True))
    largest = max(len(payload) for _, payload in records)
    if largest > RECORD_LIMIT:
        raise ConfigError(
            "batch",
            f"a record of {args.batch} reading(s) is {largest:,} bytes, over the {RECORD_LIMIT:,} "
            "a Kafka record may hold; give a smaller --batch",
        )
    kafka = open_client(connection_from_args(args, args.bootstrap_servers))
    kafka.check()
    if kafka.missing_topic(args.topic):
        raise ConfigError(
            "topic",
            f"{args.topic} does not exist and the broker does not create topics on first use: "
            "create it, or give --topic an existing one",
        )
    sink = kafka.sink(linger_ms=10)
    started = time.monotonic()
    for i, (key, payload) in enumerate(records):
        if args.rate:
            delay = started + i * args.batch / args.rate - time.monotonic()
            if delay > 0:
                time.sleep(delay)
        sink.send(args.topic, key=key.encode(), value=payload)
    sink.flush()
    sink.close()
    print(
        json.dumps(
            {
                "readings": len(fleet.keys),
                "keys": args.keys,
                "anomalies": len(fleet.truth),
                "seconds": time.monotonic() - started,
            }
        )
    )
    return 0
