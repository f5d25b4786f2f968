"""A member's answer does not depend on how its records fall into polls, nor on a crash. Random
streams of every kind of record (readings, ISO times, columnar and Arrow batches, pre-cut windows,
late and duplicate readings, bad records), interleaved over partitions, give the same events, dead
letters and windows scored read in one poll, one record a poll and polls of a few records, and
when a member dies after a checkpoint and the next resumes from the commit and the state."""

from __future__ import annotations

import numpy as np
import orjson
import pytest

from pipeline.events import iso_ms
from pipeline.modalities.batches import arrow_record
from pipeline.worker.loop import Worker
from pipeline.worker.state import MemoryStateStore
from tests.worker_support import FLEET_MODEL as MODEL
from tests.worker_support import (
    FakeSink,
    FakeSource,
    Record,
    dead_letters,
    fleet,
    run_in_memory,
    settings,
    train_fleet_detector,
)

PARTITIONS = 3


@pytest.fixture(scope="module")
def detector(tmp_path_factory):
    return train_fleet_detector(tmp_path_factory.mktemp("fleet")).detector


def _key_records(rng, key: str, ts: np.ndarray, values: np.ndarray, names, length) -> list:
    """One key's records, in the order its producer sends them."""
    out: list[bytes] = []

    def reading(t, row, form=None) -> bytes:
        stamp = iso_ms(int(t)) if form == "iso" else int(t)
        return orjson.dumps(
            {"key": key, "ts": stamp, "values": dict(zip(names, row.tolist(), strict=True))}
        )

    i = 0
    while i < len(ts):
        draw = rng.random()
        if draw < 0.05 and i + 2 < len(ts):  # a batch of 2 to 6 readings, JSON or Arrow
            n = int(rng.integers(2, 7))
            t, v = ts[i : i + n], values[i : i + n].astype(np.float64)
            if rng.random() < 0.5:
                columns = {name: v[:, j].tolist() for j, name in enumerate(names)}
                out.append(orjson.dumps({"key": key, "ts": t.tolist(), "values": columns}))
            else:
                out.append(arrow_record(t, v, names))
            i += len(t)
            continue
        if draw < 0.08:
            out.append(reading(ts[i], values[i], "iso"))
        elif draw < 0.10 and i > 0:  # the previous reading again: a duplicate time
            out.append(reading(ts[i - 1], values[i - 1]))
            out.append(reading(ts[i], values[i]))
        elif draw < 0.12 and i > 3:  # a reading from before the key's latest
            out.append(reading(ts[i] - 3500, values[i]))
            out.append(reading(ts[i], values[i]))
        elif draw < 0.14 and i >= length:  # a pre-cut window of the latest readings, louder
            cut = slice(i - length, i)
            window = {
                "key": key,
                "ts_start": int(ts[cut][0]),
                "ts_end": int(ts[cut][-1]) + int(rng.integers(-1, 2)) * 500,
                "values": (values[cut] * 2.5).tolist(),
            }
            out.append(orjson.dumps(window))
            out.append(reading(ts[i], values[i]))
        elif draw < 0.17:  # a bad record, then the reading
            bad = [
                b"not json",
                orjson.dumps({"key": key, "ts": int(ts[i]), "values": {}}),
                orjson.dumps({"key": key, "ts": "soon", "values": {names[0]: 1.0}}),
                orjson.dumps({"key": key, "ts": 10**15, "values": dict.fromkeys(names, 1.0)}),
                orjson.dumps({"key": key, "ts": int(ts[i]), "values": dict.fromkeys(names, "x")}),
            ]
            out.append(bad[int(rng.integers(len(bad)))])
            out.append(reading(ts[i], values[i]))
        else:
            out.append(reading(ts[i], values[i]))
        i += 1
    return out


def _mixed(seed: int, detector) -> dict:
    """Records per partition: each key's records in order, keys interleaved at random."""
    rng = np.random.default_rng(seed)
    stream = fleet(seed=seed, keys=6, readings_per_key=240)
    names = list(detector.input.data_features)
    length = detector.input.window.length
    queues = {}
    for key in sorted(set(stream.keys.tolist())):
        ts, values, _ = stream.key_series(key)
        queues[key] = _key_records(rng, key, ts, values, names, length)
    keys = sorted(queues)
    out: dict = {("readings", p): [] for p in range(PARTITIONS)}
    cursor = dict.fromkeys(keys, 0)
    while keys:
        key = keys[int(rng.integers(len(keys)))]
        partition = ("readings", sorted(queues).index(key) % PARTITIONS)
        records = out[partition]
        value = queues[key][cursor[key]]
        records.append(Record(*partition, len(records), key.encode(), value))
        cursor[key] += 1
        if cursor[key] == len(queues[key]):
            keys.remove(key)
    return out


class RandomPolls(FakeSource):
    """Polls of 1 to `chunk` records of one or several partitions, drawn at random."""

    def __init__(self, records: dict, chunk: int, seed: int, committed=None) -> None:
        super().__init__(records, chunk, committed)
        self.rng = np.random.default_rng(seed)

    def poll(self, timeout_ms: int) -> dict:
        out = {}
        for partition, records in self.records.items():
            start = self.position[partition]
            if start < len(records) and self.rng.random() < 0.6:
                stop = start + int(self.rng.integers(1, self.chunk + 1))
                out[partition] = records[start:stop]
                self.position[partition] = start + len(out[partition])
        if not out:  # never an empty poll while records are left: idleness ends the run
            for partition, records in self.records.items():
                start = self.position[partition]
                if start < len(records):
                    out[partition] = records[start : start + 1]
                    self.position[partition] = start + 1
                    break
        return out


def _answer(detector, source, state=None) -> tuple:
    _, sink, stats = run_in_memory(detector, source, state, emit_all=True)
    return sorted(sink.values("events")), dead_letters(sink), stats.windows_scored


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_the_answer_does_not_depend_on_how_records_fall_into_polls(detector, seed):
    records = _mixed(seed, detector)
    events, dead, scored = _answer(detector, FakeSource(records, chunk=100_000))
    reasons = set(dead.values())
    assert {"decode_error", "out_of_order", "duplicate_timestamp", "bad_timestamp"} <= reasons
    assert scored > 0 and events
    one_by_one = _answer(detector, FakeSource(records, chunk=1))
    few = _answer(detector, RandomPolls(records, chunk=7, seed=seed))
    for other in (one_by_one, few):
        assert other[1] == dead
        assert other[2] == scored
        assert other[0] == events


def _by_window(events: list[bytes]) -> dict:
    """Events by id and source records (a pre-cut window over the same span of a key as one of
    its readings' windows shares that window's id)."""
    out = {}
    for event in events:
        data = orjson.loads(event)
        source = data["data"]["source"]
        out[data["id"], source["partition"], source["offset_start"], source["offset_end"]] = event
    return out


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_a_crash_anywhere_in_a_mixed_stream_loses_and_changes_no_event(detector, seed):
    """A member that checkpoints, takes more polls and dies; the next one resumes from the
    commit and the state. Every event of the uninterrupted run is sent, and each is the
    uninterrupted run's, byte for byte (a window sent before the crash may be sent again, under
    the same id)."""
    records = _mixed(seed, detector)
    events, dead, _ = _answer(detector, FakeSource(records, chunk=100_000))
    clean = _by_window(events)
    rng = np.random.default_rng(100 + seed)
    state = MemoryStateStore()
    first = Worker(settings(emit_all=True), detector, MODEL, FakeSink(), state)
    source = RandomPolls(records, chunk=25, seed=seed)
    first.attach(source)
    first.on_assigned(set(records))
    total = sum(map(len, records.values()))
    crash = rng.uniform(0.2, 0.8) * total  # records taken before the last checkpoint
    while sum(source.position.values()) < crash:
        first.process(source.poll(0))
    first.checkpoint()
    sent = _by_window(first.sink.values("events"))
    for _ in range(int(rng.integers(1, 10))):  # work after the checkpoint dies with the process
        first.process(source.poll(0))

    resumed = RandomPolls(records, chunk=25, seed=seed + 1, committed=source.latest_commits())
    after_events, after_dead, _ = _answer(detector, resumed, state=state)
    after = _by_window(after_events)
    assert sent and after.keys() - sent.keys()  # both lives sent events
    assert sent.keys() | after.keys() == clean.keys()
    assert all(after[i] == clean[i] for i in after.keys() - sent.keys())
    assert all(sent[i] == clean[i] for i in sent)
    assert {**dead_letters(first.sink), **after_dead} == dead
