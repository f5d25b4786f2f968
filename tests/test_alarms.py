"""Alarm episodes from window decisions: opening, resolving, cooldown, restart and state size."""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass

import numpy as np
import pytest

from pipeline.errors import ConfigError
from pipeline.worker.alarms import ALARM_NAMESPACE, AlarmRules, AlarmTracker
from pipeline.worker.settings import AlarmSettings

T0 = 1_767_225_600_000  # 2026-01-01T00:00:00Z
SPAN = 63_000  # 64 one-second readings per window
STRIDE = 8_000
FEATURES = ("temperature", "pressure", "vibration", "current", "voltage", "humidity")
HOT = FEATURES.index("vibration")
PART = ("sensor-readings", 0)
KEY = "pump-7"


@dataclass
class Windows:
    start: np.ndarray
    end: np.ndarray
    scores: np.ndarray
    flags: np.ndarray
    per_feature: np.ndarray


def series(flags, seed: int = 0, first: int = 0) -> Windows:
    """Windows of one key from window number `first` on: anomalous ones score above 1 and have
    large vibration errors."""
    flags = np.asarray(flags, dtype=bool)
    count = len(flags)
    rng = np.random.default_rng(seed)
    end = T0 + SPAN + STRIDE * np.arange(first, first + count, dtype=np.int64)
    scores = rng.uniform(0.05, 0.45, count)
    scores[flags] = rng.uniform(1.0, 3.0, int(flags.sum()))
    per_feature = rng.uniform(0.0, 0.2, (count, len(FEATURES)))
    per_feature[flags, HOT] += rng.uniform(1.5, 2.5, int(flags.sum()))
    per_feature[flags, FEATURES.index("current")] += 0.6
    return Windows(end - SPAN, end, scores, flags, per_feature)


def feed(tracker, w: Windows, lo: int = 0, hi: int | None = None, key=KEY, part=PART, pf=True):
    sl = slice(lo, hi)
    return tracker.update(
        key,
        part,
        w.start[sl],
        w.end[sl],
        w.scores[sl],
        w.flags[sl],
        w.per_feature[sl] if pf else None,
    )


def feed_in_chunks(tracker, w: Windows, lo: int, hi: int, rng) -> list:
    out = []
    while lo < hi:
        size = int(rng.integers(1, 40))
        out += feed(tracker, w, lo, min(hi, lo + size))
        lo += size
    return out


def stretch_flags(count: int, *stretches: tuple[int, int], noise=(), holes=()) -> np.ndarray:
    flags = np.zeros(count, dtype=bool)
    for a, b in stretches:
        flags[a:b] = True
    flags[list(noise)] = True
    flags[list(holes)] = False
    return flags


def test_a_noisy_anomalous_stretch_gives_one_episode_with_its_start_end_peak_and_features():
    flags = stretch_flags(200, (90, 120), noise=(20, 160), holes=(91, 104, 113))
    w = series(flags)
    w.scores[105] = 4.2  # the worst moment of the fault
    w.scores[[91, 104, 113]] = 0.7  # elevated, but under the threshold

    tracker = AlarmTracker(AlarmRules(), FEATURES)
    before = feed(tracker, w, 0, 100)
    assert [t.kind for t in before] == ["opened"] and tracker.open_count == 1
    after = feed(tracker, w, 100)
    assert tracker.open_count == 0

    opened, resolved = before + after
    assert resolved.kind == "resolved"
    assert opened.key == resolved.key == KEY and opened.partition == PART
    assert opened.episode_id == resolved.episode_id
    assert opened.episode_id == str(uuid.uuid5(ALARM_NAMESPACE, f"{KEY}\x1f{w.start[90]}"))
    assert opened.event_id != resolved.event_id
    # opens on the third anomalous window of 5 (one normal among them), starting at the first
    assert opened.time_ms == w.end[93]
    assert opened.start_ms == resolved.start_ms == w.start[90]
    assert opened.end_ms is None
    assert (opened.windows, opened.anomalous_windows) == (4, 3)
    assert opened.peak_score == w.scores[90:94].max()
    # resolves after 10 normal windows following the last anomalous one
    assert resolved.end_ms == w.end[119]
    assert resolved.time_ms == w.end[129]
    assert (resolved.windows, resolved.anomalous_windows) == (40, 27)
    assert resolved.peak_score == w.scores.max() == 4.2
    assert resolved.peak_ms == w.end[105]

    names = [name for name, _ in resolved.top_features]
    assert names[:2] == ["vibration", "current"] and len(names) == 3
    means = [value for _, value in resolved.top_features]
    assert means == sorted(means, reverse=True)
    assert means[0] == pytest.approx(w.per_feature[90:120][flags[90:120], HOT].mean())


def test_the_peak_is_an_anomalous_windows_when_something_else_decides_what_is_anomalous():
    """Under `--alarm-on adaptive` surprise decides, not the score: a normal window may score
    higher than the anomalous ones (in the episode's opening history or while it resolves). The
    peak is the anomalous windows' highest, so `peak_time` lies within [start, end]."""
    flags = stretch_flags(200, (90, 100))
    w = series(flags)
    w.scores[88] = 9.0  # before the episode, among its opening history: not part of it
    w.scores[[92, 105]] = [8.0, 9.5]  # one anomalous, one normal while it resolves
    w.flags[92] = False  # decided normal (the surprise was low) though it scored high
    transitions = feed(AlarmTracker(AlarmRules(), FEATURES), w)
    assert [t.kind for t in transitions] == ["opened", "resolved"]
    for transition in transitions:
        anomalous = w.flags & (w.end <= transition.time_ms)
        assert transition.peak_score == w.scores[anomalous].max() < 8.0
        assert transition.start_ms <= transition.peak_ms <= w.end[99]


def test_top_features_are_empty_without_names_or_errors():
    w = series(stretch_flags(60, (10, 30)))
    without_names = feed(AlarmTracker(AlarmRules()), w)
    without_errors = feed(AlarmTracker(AlarmRules(), FEATURES), w, pf=False)
    assert len(without_names) == len(without_errors) == 2
    assert all(t.top_features == [] for t in without_names + without_errors)
    assert [t.event_id for t in without_names] == [t.event_id for t in without_errors]


@pytest.mark.parametrize("seed", range(6))
def test_splitting_the_windows_over_calls_gives_the_same_transitions(seed):
    rng = np.random.default_rng(seed)
    flags = stretch_flags(400, (50, 80), (150, 158), (300, 340), holes=(60, 61, 310))
    flags |= rng.random(400) < 0.04  # scattered false positives
    w = series(flags, seed)
    rules = AlarmRules(cooldown_ms=16_000)
    whole = feed(AlarmTracker(rules, FEATURES), w)
    assert len({t.episode_id for t in whole}) >= 3

    tracker = AlarmTracker(rules, FEATURES)
    split = feed_in_chunks(tracker, w, 0, 400, rng)
    assert split == whole
    assert [t.event_id for t in split] == [t.event_id for t in whole]


def test_isolated_anomalous_windows_never_open_an_alarm():
    rng = np.random.default_rng(3)
    flags = np.zeros(500, dtype=bool)
    i = int(rng.integers(0, 3))
    while i < 500:  # at most 2 anomalous windows in any 5
        flags[i] = True
        i += int(rng.integers(3, 9))
    assert flags.sum() > 50
    tracker = AlarmTracker(AlarmRules(), FEATURES)
    assert feed(tracker, series(flags)) == []
    assert tracker.open_count == 0

    # the same pattern with one more anomalous window in a five-window span does open
    at = np.flatnonzero(flags)
    close = at[:-1][np.diff(at) <= 4]  # the next anomalous window is 3 or 4 windows on
    flags[close[0] + 1] = True
    assert [t.kind for t in feed(AlarmTracker(AlarmRules(), FEATURES), series(flags))] == ["opened"]


def test_the_episode_starts_at_the_earliest_anomalous_window_still_among_the_last_n():
    # window 0 has left the last 5 when window 6 makes it 3 of 5 (windows 2..6: - x - x x)
    flags = np.array([1, 0, 0, 1, 0, 1, 1, 0, 0, 0], dtype=bool)
    w = series(flags)
    (opened,) = feed(AlarmTracker(AlarmRules(), FEATURES), w)
    assert opened.time_ms == w.end[6]
    assert opened.start_ms == w.start[3]
    assert (opened.windows, opened.anomalous_windows) == (4, 3)


def _episodes(transitions) -> list[tuple[int, int | None]]:
    return [(t.start_ms, t.end_ms) for t in transitions if t.kind == "resolved"]


def test_cooldown_after_a_resolve_suppresses_a_quick_relapse():
    rules = AlarmRules()  # 60 s cooldown = 7.5 strides after the resolve at window 49
    first = (20, 40)  # resolves at window 49; windows 57 on are past the cooldown

    short_gap = series(stretch_flags(120, first, (51, 56)))
    transitions = feed(AlarmTracker(rules, FEATURES), short_gap)
    assert _episodes(transitions) == [(short_gap.start[20], short_gap.end[39])]
    assert [t.kind for t in transitions] == ["opened", "resolved"]
    assert transitions[1].time_ms == short_gap.end[49]

    long_gap = series(stretch_flags(120, first, (60, 70)))
    transitions = feed(AlarmTracker(rules, FEATURES), long_gap)
    assert _episodes(transitions) == [
        (long_gap.start[20], long_gap.end[39]),
        (long_gap.start[60], long_gap.end[69]),
    ]
    assert len({t.episode_id for t in transitions}) == 2

    # a relapse running through the end of the cooldown counts only its windows after it
    straddling = series(stretch_flags(120, first, (52, 70)))
    transitions = feed(AlarmTracker(rules, FEATURES), straddling)
    assert _episodes(transitions)[1] == (straddling.start[57], straddling.end[69])
    assert transitions[2].time_ms == straddling.end[59]

    # without a cooldown the short gap gives two episodes
    transitions = feed(AlarmTracker(AlarmRules(cooldown_ms=0), FEATURES), short_gap)
    assert len(_episodes(transitions)) == 2


def _json_only(value) -> bool:
    if isinstance(value, dict):
        return all(isinstance(k, str) and _json_only(v) for k, v in value.items())
    if isinstance(value, list):
        return all(_json_only(v) for v in value)
    return value is None or type(value) in (int, float, str)


def test_restart_from_saved_state_continues_as_if_uninterrupted():
    flags = stretch_flags(200, (40, 70), (100, 125), noise=(10, 150, 152), holes=(45, 110))
    w = series(flags, seed=5)
    rules = AlarmRules(cooldown_ms=40_000)
    whole = feed(AlarmTracker(rules, FEATURES), w)
    assert [t.kind for t in whole] == ["opened", "resolved"] * 2

    seen = set()
    for cut in range(1, 200):
        tracker = AlarmTracker(rules, FEATURES)
        before = feed(tracker, w, 0, cut)
        state = tracker.state(PART)
        assert _json_only(state)
        saved = json.loads(json.dumps(state, allow_nan=False))
        seen |= {field for entry in saved.values() for field in entry}

        restarted = AlarmTracker(rules, FEATURES)
        restarted.restore(PART, saved)
        assert restarted.open_count == tracker.open_count
        replay_from = max(0, cut - 25)
        # windows already counted change nothing ...
        assert feed(restarted, w, replay_from, cut) == []
        assert restarted.state(PART) == saved
        # ... and the rest continues the episode exactly
        after = feed(restarted, w, replay_from)
        assert before + after == whole, f"cut at window {cut}"
    # the cuts landed in history, in open episodes and in cooldowns
    assert {"e", "c", "h", "s", "f"} <= seen


def test_many_normal_keys_take_the_fast_path_and_keep_compact_state(monkeypatch):
    walks = []
    original = AlarmTracker._walk

    def counting_walk(self, st, key, *args):
        walks.append(key)
        return original(self, st, key, *args)

    monkeypatch.setattr(AlarmTracker, "_walk", counting_walk)
    w = series(np.zeros(48, dtype=bool))
    partitions = [("sensor-readings", p) for p in range(4)]
    tracker = AlarmTracker(AlarmRules(), FEATURES)
    for i in range(1000):
        part = partitions[i % 4]
        assert feed(tracker, w, 0, 40, key=f"machine-{i:04d}", part=part) == []
        assert feed(tracker, w, 30, 48, key=f"machine-{i:04d}", part=part) == []
    assert tracker.open_count == 0
    assert walks == []

    states = [tracker.state(p) for p in partitions]
    assert [len(s) for s in states] == [250] * 4
    assert all(entry == {"e": int(w.end[-1])} for s in states for entry in s.values())
    assert len(json.dumps(states[0])) < 250 * 40

    # a key with anomalies in its next windows does go through the window loop
    w = series(stretch_flags(48, (30, 48)), first=48)
    assert [t.kind for t in feed(tracker, w, key="machine-0000", part=partitions[0])] == ["opened"]
    assert walks == ["machine-0000"]


@pytest.mark.parametrize(
    ("rules", "setting"),
    [
        ({"alarm_k": 0}, "alarm_k"),
        ({"alarm_k": 6, "alarm_n": 5}, "alarm_k"),
        ({"alarm_n": 0, "alarm_k": 0}, "alarm_n"),
        ({"alarm_n": 65}, "alarm_n"),
        ({"alarm_k": 2.5}, "alarm_k"),
        ({"alarm_resolve_after": 0}, "alarm_resolve_after"),
        ({"alarm_cooldown_s": -1.0}, "alarm_cooldown_s"),
    ],
)
def test_invalid_rules_name_the_setting(rules, setting):
    with pytest.raises(ConfigError) as caught:
        AlarmSettings(**rules)
    assert caught.value.setting == setting
    assert str(caught.value).startswith(f"{setting}: ")


def test_edge_rules_are_accepted():
    assert AlarmRules(k=1, n=1, resolve_after=1, cooldown_ms=0).n == 1
    assert AlarmRules(k=64, n=64).k == 64
    edge = AlarmSettings(alarm_k=1, alarm_n=1, alarm_resolve_after=1, alarm_cooldown_s=0.0)
    assert edge.rules() == AlarmRules(k=1, n=1, resolve_after=1, cooldown_ms=0)
    assert AlarmSettings(alarm_k=64, alarm_n=64).rules().k == 64


def test_forget_drops_only_the_given_partitions():
    parts = [("sensor-readings", p) for p in range(3)]
    tracker = AlarmTracker(AlarmRules(), FEATURES)
    alarming = series(stretch_flags(40, (10, 40)))
    quiet = series(np.zeros(40, dtype=bool))
    for part in parts:
        feed(tracker, alarming, key=f"{part[1]}-hot", part=part)
        feed(tracker, quiet, key=f"{part[1]}-calm", part=part)
    assert tracker.open_count == 3
    kept = {part: tracker.state(part) for part in (parts[0], parts[2])}

    tracker.forget({parts[1], ("other-topic", 1)})
    assert tracker.open_count == 2
    assert tracker.state(parts[1]) == {}
    assert {part: tracker.state(part) for part in (parts[0], parts[2])} == kept
    # the forgotten key starts afresh: its windows are no longer known
    again = feed(tracker, alarming, key="1-hot", part=parts[1])
    assert [t.kind for t in again] == ["opened"]
    assert tracker.open_count == 3


def test_a_refused_state_part_leaves_the_open_count_as_it_was():
    """A good open episode, then a malformed entry: the part is refused (the checkpoint forgets
    the partition), and the episode read before it stayed counted in aewatch_alarms_open."""
    tracker = AlarmTracker(AlarmRules(), FEATURES)
    part = ("sensor-readings", 0)
    good = {"e": 1000, "id": "ep-1", "s": 900, "pk": 0.9, "pm": 950, "w": 3, "a": 3, "r": 0}
    with pytest.raises(KeyError):
        tracker.restore(part, {"pump-1": {**good, "l": 1000}, "pump-2": {"x": 1}})
    tracker.forget({part})
    assert tracker.open_count == 0
    tracker.restore(part, {"pump-1": {**good, "l": 1000}})
    assert tracker.open_count == 1
