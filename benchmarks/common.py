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


def _proc_stats() -> dict[int, tuple[str, int, float]]:
    """pid -> (command name, parent pid, CPU seconds so far) of every process on this machine
    (Linux `/proc`; empty elsewhere)."""
    tick = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
    out = {}
    for entry in Path("/proc").glob("[0-9]*/stat"):
        try:
            text = entry.read_text()
        except OSError:
            continue  # ended meanwhile
        name = text[text.index("(") + 1 : text.rindex(")")]
        fields = text[text.rindex(")") + 2 :].split()
        out[int(entry.parent.name)] = (
            name,
            int(fields[1]),
            (int(fields[11]) + int(fields[12])) / tick,
        )
    return out


def _is_broker(pid: int) -> bool:
    """Whether process `pid` runs a Kafka broker (`kafka.Kafka` among its arguments)."""
    try:
        arguments = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return False  # ended meanwhile
    return b"kafka.Kafka" in arguments


class CpuMeter:
    """CPU seconds spent between two readings by this process, by the processes descended from
    `tree` (a supervisor's members) and by the Kafka broker (a `java` process here whose main
    class is `kafka.Kafka`; none when the broker runs elsewhere), for the cores a figure took
    beside its readings/s."""

    def __init__(self, tree: int | None = None) -> None:
        self.tree = tree
        self.start: dict[str, float] | None = None
        self.started = 0.0

    def _read(self) -> dict[str, float]:
        procs = _proc_stats()
        members, frontier = set(), [self.tree] if self.tree else []
        while frontier:
            parent = frontier.pop()
            members.add(parent)
            frontier += [pid for pid, (_, ppid, _) in procs.items() if ppid == parent]
        return {
            "self": time.process_time(),
            "members": sum(procs[pid][2] for pid in members if pid in procs),
            "broker": sum(
                cpu for pid, (name, _, cpu) in procs.items() if name == "java" and _is_broker(pid)
            ),
        }

    def begin(self) -> None:
        self.start, self.started = self._read(), time.perf_counter()

    def end(self) -> dict[str, float]:
        """Cores used since `begin` (CPU seconds per second of wall time), and the seconds."""
        now, seconds = self._read(), time.perf_counter() - self.started
        cores = {name: (now[name] - self.start[name]) / seconds for name in now}
        return {**cores, "seconds": seconds}


def ensure_topics(bootstrap: str, topics: dict) -> None:
    """Create the topics (a spec per name) through the worker's own Kafka client."""
    from pipeline.kafka_io import open_client
    from pipeline.kafka_io.settings import KafkaConnection

    open_client(KafkaConnection(bootstrap)).ensure_topics(topics)
