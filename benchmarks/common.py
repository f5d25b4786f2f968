"""Shared pieces of the benchmarks: SKAB reading, timing, a broker, and result files."""

from __future__ import annotations

import json
import os
import platform
import statistics
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pandas as pd
import torch

SKAB_GROUPS = ("valve1", "valve2", "other")
SKAB_NON_FEATURES = ("datetime", "anomaly", "changepoint")


def skab_files(root: Path) -> list[Path]:
    """The 34 labelled SKAB runs, in a stable order."""
    files = []
    for group in SKAB_GROUPS:
        files += sorted((root / group).glob("*.csv"), key=lambda p: int(p.stem))
    if not files:
        raise SystemExit(f"no SKAB files under {root}; pass --skab DIR")
    return files


def read_skab(path: Path) -> pd.DataFrame:
    frame = pd.read_csv(path, sep=";")
    frame["datetime"] = pd.to_datetime(frame["datetime"])
    return frame.sort_values("datetime", kind="stable").reset_index(drop=True)


def skab_features(frame: pd.DataFrame) -> list[str]:
    return [c for c in frame.columns if c not in SKAB_NON_FEATURES]


def median_time(fn: Callable[[], object], repeats: int, warmup: int = 1) -> tuple[float, list]:
    """Median wall time of `fn` over `repeats` runs after `warmup` untimed runs."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        fn()
        times.append(time.perf_counter() - started)
    return statistics.median(times), times


def machine() -> dict:
    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "numpy": np.__version__,
        "cpu_threads": torch.get_num_threads(),
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "processor": platform.processor() or platform.machine(),
    }


def write_results(out_dir: Path, name: str, payload: dict, markdown: str) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    payload = {
        "benchmark": name,
        "when": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": machine(),
        **payload,
    }
    (out_dir / f"{name}.json").write_text(json.dumps(payload, indent=2) + "\n")
    (out_dir / f"{name}.md").write_text(markdown.rstrip() + "\n")
    print(markdown)


def md_table(headers: list[str], rows: list[list]) -> str:
    def cell(v):
        if isinstance(v, float):
            return f"{v:,.4g}" if abs(v) < 1000 else f"{v:,.0f}"
        return str(v)

    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


@contextmanager
def broker_and_workdir(prefix: str) -> Iterator[tuple[str, Path]]:
    """`KAFKA_BOOTSTRAP_SERVERS`, or a local broker started (and stopped) here; and a fresh
    working folder under TMPDIR."""
    from pipeline.tools.local_broker import LocalKafkaBroker

    bootstrap = os.environ.get("KAFKA_BOOTSTRAP_SERVERS")
    broker = None
    if not bootstrap:
        broker = LocalKafkaBroker(heap="2g").start()
        bootstrap = broker.bootstrap_servers
    root = Path(os.environ.get("TMPDIR", "/tmp")) / f"{prefix}-{uuid.uuid4().hex[:6]}"
    root.mkdir(parents=True)
    try:
        yield bootstrap, root
    finally:
        if broker:
            broker.stop()


def ensure_topics(bootstrap: str, topics: dict) -> None:
    """Create the topics (a spec per name) through the worker's own Kafka client."""
    from pipeline.kafka_io import open_client
    from pipeline.kafka_io.settings import KafkaConnection

    open_client(KafkaConnection(bootstrap)).ensure_topics(topics)
