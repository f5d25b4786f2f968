"""Forgotten keys (`pipeline.modalities.expiry`): a key silent for `--key-ttl-s` of event time
and more than `--reread-max` records leaves the windower, every stage and the state record; one
that still sends is kept whatever its clock says; one that comes back starts afresh. A fleet whose
keys come and go keeps a state record of the keys of the last TTL, not of every key ever seen."""

from __future__ import annotations

import numpy as np
import orjson
import pytest

from pipeline.detector import WindowSpec
from pipeline.detector.adaptive import AdaptiveSettings, RuleSettings
from pipeline.detector.adaptive_stage import AdaptiveStage
from pipeline.errors import ConfigError
from pipeline.modalities.windowing import ReadyWindows, StreamWindower
from pipeline.worker.alarms import AlarmRules, AlarmTracker
from pipeline.worker.drift import DriftStage
from pipeline.worker.state import MemoryStateStore, decode_state, encode_state
from tests.worker_support import (
    FLEET_MODEL,
    FakeSink,
    FakeSource,
    Record,
    fleet,
    settings,
    train_fleet_detector,
)

P = ("in", 0)
T0 = 1_767_225_600_000
SPEC = WindowSpec(8, 2)


def _push(windower, keys, ts, offsets) -> ReadyWindows:
    out = ReadyWindows()
    values = np.ones((len(ts), 2), np.float32)
    late, duplicate = windower.push(
        P, keys, np.asarray(ts, np.int64), values, np.asarray(offsets, np.int64), out
    )
    assert len(late) == len(duplicate) == 0
    return out


def _windower(ttl_s: float = 100.0, reread_max: int = 10) -> StreamWindower:
    """Key `quiet` sends 5 readings (one a second), then `busy` 300 (one a second)."""
    w = StreamWindower(SPEC, 2, reread_max, ttl_s)
    _push(w, ["quiet"] * 5, T0 + np.arange(5) * 1000, np.arange(5))
    _push(w, ["busy"] * 300, T0 + 5000 + np.arange(300) * 1000, 5 + np.arange(300))
    return w


def test_a_key_silent_beyond_both_limits_is_forgotten_and_the_others_are_kept():
    w = _windower()
    assert w.expire(P) == ["quiet"]
    assert set(w.resume_points(P)) == {"busy"}
    assert w.oldest_needed(P) > 5  # its held readings no longer hold the commit back
    assert w.expire(P) == []


@pytest.mark.parametrize(
    ("ttl_s", "reread_max"),
    [(0, 10), (400, 10), (100, 1000)],
    ids=["ttl-off", "within-ttl", "within-reread-max"],
)
def test_a_key_within_either_limit_is_kept(ttl_s, reread_max):
    w = _windower(ttl_s, reread_max)
    assert w.expire(P) == []
    assert set(w.resume_points(P)) == {"quiet", "busy"}


def test_a_key_that_still_sends_is_kept_whatever_its_clock_says():
    """A device whose clock went back to 1970 is far behind in event time, not in records."""
    w = StreamWindower(SPEC, 2, 10, 100.0)
    epoch = 1000 * np.arange(300, dtype=np.int64)
    keys = ["stale-clock", "busy"] * 150
    ts = np.where(np.arange(300) % 2 == 0, epoch, T0 + epoch)
    _push(w, keys, ts, np.arange(300))
    assert w.expire(P) == []


def test_a_forgotten_key_that_comes_back_starts_afresh():
    w = _windower()
    w.expire(P)
    out = _push(w, ["quiet"] * 8, T0 + 400_000 + np.arange(8) * 1000, 305 + np.arange(8))
    # a new series: its first window ends at its 8th new reading (it had 5 before)
    assert out.keys == ["quiet"]
    assert np.concatenate(out.end_ts).tolist() == [T0 + 407_000]
    assert np.concatenate(out.first_offsets).tolist() == [305]


def _saved(w: StreamWindower) -> dict:
    return decode_state(encode_state({name: part.state(P) for name, part in w.parts().items()}))


@pytest.mark.parametrize("parked", [False, True])
def test_a_restored_key_not_seen_since_is_forgotten_by_its_saved_readings(parked):
    first = _windower(ttl_s=0, reread_max=10 if parked else 10**6)
    saved = _saved(first)
    assert bool(saved["parked"]) == parked
    second = StreamWindower(SPEC, 2, 10, 100.0)
    for name, part in second.parts().items():
        part.restore(P, saved.get(name) or {})
    _push(second, ["busy"] * 300, T0 + 305_000 + np.arange(300) * 1000, 305 + np.arange(300))
    assert second.expire(P) == ["quiet"]
    assert set(_saved(second)["resume"]) == {"busy"}
    assert not _saved(second)["parked"]


def test_a_restored_key_within_reread_max_records_is_kept():
    saved = _saved(_windower(ttl_s=0, reread_max=10**6))
    second = StreamWindower(SPEC, 2, 1000, 100.0)
    for name, part in second.parts().items():
        part.restore(P, saved.get(name) or {})
    _push(second, ["busy"] * 300, T0 + 305_000 + np.arange(300) * 1000, 305 + np.arange(300))
    assert second.expire(P) == []
    assert set(_saved(second)["resume"]) == {"quiet", "busy"}


def test_every_stage_drops_the_forgotten_keys_and_keeps_the_others():
    adaptive = AdaptiveStage(AdaptiveSettings(), RuleSettings(), [1.0], "1")
    ends = np.array([T0, T0 + 1000, T0 + 2000], np.int64)
    groups = [("a", P, slice(0, 1)), ("b", P, slice(1, 2)), ("c", P, slice(2, 3))]
    adaptive.update(groups, ends, np.ones((3, 1)))
    kept = orjson.loads(orjson.dumps(adaptive.state(P)))
    adaptive.drop(P, ["b", "unknown"])
    after = adaptive.state(P)
    assert set(after["keys"]) == {"a", "c"}
    assert {k: after["keys"][k] for k in ("a", "c")} == {k: kept["keys"][k] for k in ("a", "c")}

    alarms = AlarmTracker(AlarmRules(k=1, n=1, resolve_after=1))
    for key, flag in (("a", False), ("open", True)):
        list(alarms.update(key, P, ends[:1], ends[:1], np.array([2.0]), np.array([flag]), None))
    alarms.drop(P, ["a", "open"])
    assert set(alarms.state(P)) == {"open"}  # its episode resolves if it comes back

    rng = np.random.default_rng(0)
    drift = DriftStage(rng.normal(size=1000), window=50, limit=0.25)
    for key in ("a", "b"):
        drift.update(key, P, drift.bins(rng.normal(size=60)), 0)
    drift.drop(P, ["a"])
    assert set(drift.state(P)) == {"b", "*"}
    assert drift.pooled.sum() == 50


def test_a_negative_ttl_is_refused_naming_the_setting():
    with pytest.raises(ConfigError, match="key_ttl_s"):
        settings(key_ttl_s=-1)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    return train_fleet_detector(tmp_path_factory.mktemp("fleet"))


def _generations(count: int, per_key: int = 120) -> list[list[Record]]:
    """`count` generations of the trained machines under new names, each sending `per_key`
    readings after the one before it stopped."""
    base = [
        orjson.loads(p) for p in fleet(keys=6, readings_per_key=per_key, anomalies=()).payloads()
    ]
    span = per_key * 1000
    out, offset = [], 0
    for g in range(count):
        records = []
        for reading in base:
            key = f"g{g}-{reading['key']}"
            value = orjson.dumps(dict(reading, key=key, ts=reading["ts"] + g * span))
            records.append(Record("readings", 0, offset, key.encode(), value))
            offset += 1
        out.append(records)
    return out


def _churn(detector, ttl_s: float):
    from pipeline.worker.loop import Worker

    state = MemoryStateStore()
    worker = Worker(
        settings(events="both", key_ttl_s=ttl_s, reread_max=100, commit_interval_ms=10**9),
        detector,
        FLEET_MODEL,
        FakeSink(),
        state,
    )
    worker.attach(FakeSource({("readings", 0): []}))
    worker.on_assigned({("readings", 0)})
    keys_after = []
    for records in _generations(5):
        worker.process({("readings", 0): records})
        worker.checkpoint()
        saved = decode_state(state.records[("readings", 0)])
        keys_after.append(
            {part: {k.split("-")[0] for k in saved[part]} for part in ("resume", "alarms")}
            | {"adaptive": {k.split("-")[0] for k in saved["adaptive"].get("keys", {})}}
        )
    return worker, keys_after


def test_a_fleet_whose_keys_come_and_go_keeps_the_keys_of_the_last_ttl(trained):
    """Five generations of six machines, each sending two minutes of readings after the one
    before: with a TTL of three minutes the state record holds the last two generations; with
    none, every generation ever seen."""
    worker, kept = _churn(trained.detector, ttl_s=180)
    assert [sorted(k["resume"]) for k in kept] == [
        ["g0"],
        ["g0", "g1"],
        ["g1", "g2"],
        ["g2", "g3"],
        ["g3", "g4"],
    ]
    assert all(k["alarms"] == k["resume"] == k["adaptive"] for k in kept)
    assert worker.metrics.keys_expired._value.get() == 18
    _, everything = _churn(trained.detector, ttl_s=0)
    assert everything[-1]["resume"] == {"g0", "g1", "g2", "g3", "g4"}
