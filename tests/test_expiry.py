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
    assert set(alarms.state(P)) == {"open"}  # an open episode is resolved first, not dropped

    rng = np.random.default_rng(0)
    drift = DriftStage(rng.normal(size=1000), window=50, limit=0.25)
    for key in ("a", "b"):
        drift.update(key, P, drift.bins(rng.normal(size=60)), 0)
    drift.drop(P, ["a"])
    assert set(drift.state(P)) == {"b", "*"}
    assert drift.pooled.sum() == 50


def test_an_alarm_open_on_a_forgotten_key_resolves_at_its_last_window():
    alarms = AlarmTracker(AlarmRules(k=2, n=3, resolve_after=5))
    ends = T0 + 1000 * np.arange(1, 7, dtype=np.int64)
    flags = np.array([False, True, True, False, True, False])
    scores = np.where(flags, 3.0, 0.5)
    opened = alarms.update("gone", P, ends - 1000, ends, scores, flags, None)
    alarms.update("quiet", P, ends - 1000, ends, scores * 0, flags & False, None)
    assert [t.kind for t in opened] == ["opened"] and alarms.open_count == 1

    [resolved] = alarms.resolve_silent(P, ["gone", "quiet", "unknown"])
    assert (resolved.kind, resolved.cause, resolved.key) == ("resolved", "silence", "gone")
    assert resolved.episode_id == opened[0].episode_id
    assert resolved.time_ms == ends[-1]  # the end of its last window
    assert resolved.end_ms == ends[4]  # the end of its last anomalous window
    assert (resolved.windows, resolved.anomalous_windows) == (5, 3)
    assert alarms.open_count == 0
    alarms.drop(P, ["gone", "quiet"])
    assert alarms.state(P) == {}
    assert alarms.resolve_silent(P, ["gone"]) == []


def test_a_negative_ttl_is_refused_naming_the_setting():
    with pytest.raises(ConfigError, match="key_ttl_s"):
        settings(key_ttl_s=-1)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    return train_fleet_detector(tmp_path_factory.mktemp("fleet"))


def _generations(count: int, per_key: int = 120, fault: int = 0) -> list[list[Record]]:
    """`count` generations of the trained machines under new names, each sending `per_key`
    readings after the one before it stopped; with `fault`, the first generation's first machine
    reads 20 times its values in its last `fault` readings."""
    base = [
        orjson.loads(p) for p in fleet(keys=6, readings_per_key=per_key, anomalies=()).payloads()
    ]
    span = per_key * 1000
    first = base[0]["key"]
    last_ts = max(r["ts"] for r in base if r["key"] == first)
    out, offset = [], 0
    for g in range(count):
        records = []
        for reading in base:
            key = f"g{g}-{reading['key']}"
            values = reading["values"]
            if g == 0 and reading["key"] == first and reading["ts"] > last_ts - 1000 * fault:
                values = {name: 20.0 * v + 20.0 for name, v in values.items()}
            reading = dict(reading, key=key, ts=reading["ts"] + g * span, values=values)
            value = orjson.dumps(reading)
            records.append(Record("readings", 0, offset, key.encode(), value))
            offset += 1
        out.append(records)
    return out


def _churn(detector, ttl_s: float, fault: int = 0, sink=None, state=None):
    from pipeline.worker.loop import Worker

    state = state or MemoryStateStore()
    worker = Worker(
        settings(events="both", key_ttl_s=ttl_s, reread_max=100, commit_interval_ms=10**9),
        detector,
        FLEET_MODEL,
        sink or FakeSink(),
        state,
    )
    worker.attach(FakeSource({("readings", 0): []}))
    worker.on_assigned({("readings", 0)})
    keys_after = []
    for records in _generations(5, fault=fault):
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


def test_an_alarm_open_when_its_key_falls_silent_resolves_when_the_key_is_forgotten(trained):
    """A machine whose readings go wild just before it stops sending: its alarm opens, and
    resolves, with the header saying why, at the checkpoint that forgets it, not never."""
    steps: list[str] = []

    class Sink(FakeSink):
        def send(self, topic, key=None, value=None, headers=None, partition=None):
            super().send(topic, key, value, headers, partition)
            steps.append("resolved" if b"aewatch.alarm.resolved" in value else "event")

        def flush(self):
            super().flush()
            steps.append("flush")

    class Store(MemoryStateStore):
        def save(self, partition, parts):
            steps.append("state")
            return super().save(partition, parts)

    sink = Sink()
    worker, kept = _churn(trained.detector, ttl_s=180, fault=30, sink=sink, state=Store())
    # the event is durable before the state record that no longer holds the episode
    after = steps[steps.index("resolved") :]
    assert after.index("flush") < after.index("state")
    alarms = [
        (orjson.loads(value), dict(headers))
        for _, _, value, headers in sink.sent
        if b"aewatch.alarm." in value
    ]
    [(opened, _), (resolved, headers)] = alarms
    assert opened["type"] == "aewatch.alarm.opened" and opened["subject"].startswith("g0-")
    assert resolved["type"] == "aewatch.alarm.resolved"
    assert resolved["data"]["episode_id"] == opened["data"]["episode_id"]
    assert headers == {"aewatch.alarm.resolved_by": b"silence"}
    # at the end of the key's last window (anomalous, as the fault lasts to the end)
    windows = [
        orjson.loads(v)
        for t, k, v, _ in sink.sent
        if k == opened["subject"].encode() and b"aewatch.anomaly.v1" in v
    ]
    assert resolved["time"] == resolved["data"]["end"] == max(e["time"] for e in windows)
    assert kept[2]["alarms"] == {"g1", "g2"}  # g0 left with its episode
    assert worker.alarms.open_count == 0
    assert worker.metrics.alarms_open._value.get() == 0


def test_an_image_key_silent_beyond_both_limits_is_forgotten_like_a_series_key():
    from pipeline.modalities.image import ImageKeys

    keys = ImageKeys(reread_max=10, key_ttl_s=100.0)
    keys.saw(P, ["quiet"] * 5, (T0 + np.arange(5) * 1000).tolist(), list(range(5)))
    for i in range(300):  # one a second; `reset`'s clock is back in 1970, but it still sends
        keys.saw(P, ["busy", "reset"], [T0 + 5000 + i * 1000, i * 1000], [5 + 2 * i, 6 + 2 * i])
    restored = ImageKeys(reread_max=10, key_ttl_s=100.0)
    restored.restore(P, orjson.loads(orjson.dumps(keys.state(P))))
    for tracker in (keys, restored):
        assert tracker.expire(P) == ["quiet"]
        assert set(tracker.state(P)) == {"busy", "reset"}
        assert tracker.expire(P) == []
    for ttl_s, reread_max in ((0, 10), (400, 10), (100, 1000)):
        kept = ImageKeys(reread_max, ttl_s)
        kept.restore(P, {"quiet": [T0, 0], "busy": [T0 + 305_000, 605]})
        assert kept.expire(P) == []


def test_the_image_intake_forgets_by_the_worker_settings():
    """The worker hands `--key-ttl-s` and `--reread-max` to whichever intake its model needs."""
    from pipeline.detector import InputSpec
    from pipeline.modalities.image import ImageModality

    intake = ImageModality(InputSpec("image", image_shape=(1, 8, 8))).intake(
        1000, 7, key_ttl_s=5, max_future_s=60, wall_ms=lambda: 0.0
    )
    assert (intake.windows.ttl_ms, intake.windows.reread_max) == (5000, 7)
    assert intake.windows.parts() == {"resume": intake.windows}
