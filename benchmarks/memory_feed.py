"""What one process could do if its Kafka client cost nothing: the worker fed from memory, and the
model alone.

`memory_rate` runs the worker's own loop (`pipeline.worker.loop.Worker`: decode, window, score,
adaptive stage, alarms, event encoding) over records held in memory, spread over partitions as
a poll brings them, with a sink that drops what it is sent. `model_rate` times `Detector.score`
alone on windows of the detector's shape, and `pass_beside_busy` one pass on one thread beside a
thread that runs Python all the time, as the worker's scoring thread runs beside its loop. Both on the CPU, beside the broker-backed figures of
`benchmarks.bench_clients`.
"""

from __future__ import annotations

import time
import zlib
from pathlib import Path
from typing import NamedTuple

import numpy as np

from benchmarks.bench_worker import bench_settings

__all__ = ["MemorySource", "memory_rate", "model_rate", "pass_beside_busy"]

POLL_RECORDS = 10_000  # records a poll brings, over every partition (as bench_settings)


class _Record(NamedTuple):
    topic: str
    partition: int
    offset: int
    key: bytes
    value: bytes
    headers: list
    timestamp: int


class MemorySource:
    """A group member's view of partitions held in memory ({partition: [record, ...]}): each
    poll takes the next `chunk` records of every partition; commits are not kept."""

    def __init__(self, partitions: dict, chunk: int, committed: dict | None = None) -> None:
        self.records = partitions
        self.chunk = chunk
        self.position = dict(committed or dict.fromkeys(partitions, 0))

    def poll(self, timeout_ms: int) -> dict:
        out = {}
        for partition, records in self.records.items():
            start = self.position[partition]
            if start < len(records):
                out[partition] = records[start : start + self.chunk]
                self.position[partition] = start + len(out[partition])
        return out

    def keepalive(self) -> None:
        pass

    def seek(self, offsets: dict) -> None:
        self.position.update(offsets)

    def commit(self, offsets: dict, *, wait: bool = True) -> None:
        pass

    def refused_commits(self) -> set:
        return set()

    def highwaters(self, partitions) -> dict:
        return {p: len(self.records[p]) for p in partitions if p in self.records}

    def group_metadata(self) -> None:
        return None

    def close(self) -> None:
        pass


class _DroppingSink:
    transactional = False

    def send(self, topic, key=None, value=None, headers=None, partition=None) -> None:
        pass

    def flush(self) -> None:
        pass

    def close(self) -> None:
        pass


def memory_rate(
    records: list[tuple[str, bytes]], model: Path, partitions: int, **overrides
) -> float:
    """Records/s of the worker (`bench_worker.bench_settings`, as through the broker, and
    `overrides`) over `records` (key, value), each partition's in their order, keys spread by a
    hash."""
    from pipeline.detector import load_detector
    from pipeline.events import ModelIdentity
    from pipeline.worker.loop import Worker
    from pipeline.worker.state import MemoryStateStore

    held: dict = {("memory", p): [] for p in range(partitions)}
    for key, value in records:
        name = key.encode()
        p = zlib.crc32(name) % partitions
        part = held[("memory", p)]
        part.append(_Record("memory", p, len(part), name, value, [], 0))
    held = {tp: part for tp, part in held.items() if part}
    settings = bench_settings(
        model, "memory:9092", "memory", "memory", stop_after_idle_s=0.05, **overrides
    )
    detector = load_detector(model)
    worker = Worker(
        settings,
        detector,
        ModelIdentity("memory", "1", "champion"),
        _DroppingSink(),
        MemoryStateStore(),
    )
    source = MemorySource(held, max(1, POLL_RECORDS // len(held)))
    worker.attach(source)
    worker.on_assigned(set(held))
    started = time.perf_counter()
    stats = worker.run()  # returns once idle for stop_after_idle_s, after its final checkpoint
    elapsed = time.perf_counter() - started - settings.loop.stop_after_idle_s
    if stats.records_in != len(records):
        raise RuntimeError(f"the worker took {stats.records_in} of {len(records)} records")
    return len(records) / elapsed


def model_rate(model: Path, batch: int = 2048, seconds: float = 2.0) -> float:
    """Windows/s of `Detector.score` alone (scaling, forward pass, score terms, attribution) on
    batches of `batch` random windows, after one untimed batch."""
    from pipeline.detector import load_detector

    detector = load_detector(model)
    windows = np.random.default_rng(0).normal(size=(batch, *detector.input.sample_shape))
    detector.score(windows)
    started, scored = time.perf_counter(), 0
    while time.perf_counter() - started < seconds:
        detector.score(windows)
        scored += batch
    return scored / (time.perf_counter() - started)


def pass_beside_busy(
    model: Path, windows: int = 1340, switch_intervals_ms: tuple = (5.0, 0.5), runs: int = 15
) -> dict:
    """Median milliseconds of one `Detector.score` of `windows` windows on one thread: alone, and
    beside a thread that runs Python without pause at each switch interval (the worker's loop
    holds the interpreter lock whenever it has work; each time the pass takes the lock back it
    waits up to one switch interval)."""
    import sys
    import threading

    import torch

    from pipeline.detector import load_detector

    detector = load_detector(model)
    batch = np.random.default_rng(0).normal(size=(windows, *detector.input.sample_shape))
    threads, interval = torch.get_num_threads(), sys.getswitchinterval()
    torch.set_num_threads(1)

    def median_ms() -> float:
        times = []
        for _ in range(runs):
            started = time.perf_counter()
            detector.score(batch, batch_size=len(batch))
            times.append(time.perf_counter() - started)
        return 1000 * float(np.median(times))

    stop = threading.Event()

    def busy() -> None:
        while not stop.is_set():
            sum(range(100))

    try:
        detector.score(batch, batch_size=len(batch))
        out = {"windows": windows, "alone_ms": median_ms()}
        runner = threading.Thread(target=busy, daemon=True)
        runner.start()
        try:
            for ms in switch_intervals_ms:
                sys.setswitchinterval(ms / 1000)
                out[f"beside_busy_{ms:g}ms_switch_ms"] = median_ms()
        finally:
            stop.set()
            runner.join()
    finally:
        sys.setswitchinterval(interval)
        torch.set_num_threads(threads)
    return out
