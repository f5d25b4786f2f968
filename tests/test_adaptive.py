"""The adaptive stage: batches equal one-at-a-time processing in any interleaving of keys, state
survives a JSON round trip mid-stream bit for bit, the warm-up never reports, channels combine by
their most surprising one, replays are skipped and another model version's state is not taken."""

from __future__ import annotations

import base64

import numpy as np
import orjson
import pytest

from pipeline.detector.adaptive import (
    AdaptiveLikelihood,
    AdaptiveSettings,
    DetectionRule,
    RangeCheck,
    RuleSettings,
    lifted,
    rounds,
    scores_from,
    surprise_of,
)
from pipeline.detector.adaptive_stage import AdaptiveStage, window_extremes

SMALL = AdaptiveSettings(short=5, long=200, warmup=50)
P = ("in", 0)


def _stream(seed=0, keys=7, n=3000, channels=1):
    rng = np.random.default_rng(seed)
    slots = rng.integers(0, keys, n)
    scores = rng.lognormal(0, 0.5, (n, channels)) * (1 + 20 * (rng.random((n, 1)) < 0.01))
    return slots, scores


def _groups(slots):
    """A batch of windows in the worker's layout: one group of consecutive rows per key."""
    order = np.argsort(slots, kind="stable")
    s = slots[order]
    out, start = [], 0
    for key in np.unique(s):
        count = int((s == key).sum())
        out.append((f"k{key}", P, slice(start, start + count)))
        start += count
    return order, out


def test_rounds_keep_per_key_order():
    got = rounds(np.array([3, 1, 3, 3, 0, 1]))
    assert [set(g.tolist()) for g in got] == [{0, 1, 4}, {2, 5}, {3}]


def test_batch_equals_one_at_a_time_and_the_rule_fires_once_per_excursion():
    slots, scores = _stream()
    a, b = AdaptiveLikelihood(SMALL, [1.0]), AdaptiveLikelihood(SMALL, [1.0])
    q1, live1 = a.update(slots, scores)
    parts = [b.update(slots[i : i + 1], scores[i : i + 1]) for i in range(len(slots))]
    np.testing.assert_array_equal(q1, np.concatenate([p[0] for p in parts]))
    np.testing.assert_array_equal(live1, np.concatenate([p[1] for p in parts]))
    s = surprise_of(q1, live1)
    rule = RuleSettings(threshold=1.0, quiet=3, cooldown=20)
    d1 = DetectionRule(rule).update(slots, s)
    r2 = DetectionRule(rule)
    d2 = np.concatenate([r2.update(slots[i : i + 1], s[i : i + 1]) for i in range(len(slots))])
    assert (d1 == d2).all() and d1.any()
    assert d1.sum() < (s >= 1.0).sum()  # one detection per excursion, not per window


def test_warmup_reports_nothing():
    stage = AdaptiveStage(AdaptiveSettings(warmup=100), RuleSettings(), [1.0], "m/1")
    scores = np.r_[np.ones(99), 1e6, np.ones(50)]
    out = stage.update([("k", P, slice(0, 150))], np.arange(150), scores)
    assert (out.likelihood[:100] == 0.5).all() and (out.surprise[:100] == 0).all()
    assert not out.detection[:100].any()
    assert (out.surprise[100:] > 0).all()


def _excursion(settings, length):
    """One key: 300 normal rows, `length` rows ten times higher, 300 normal rows again."""
    rng = np.random.default_rng(3)
    scores = rng.lognormal(0, 0.1, 600 + length)
    scores[300 : 300 + length] *= 10
    stage = AdaptiveLikelihood(settings, [1.0])
    means = []
    for row in scores:
        stage.update(np.zeros(1, np.int64), [row])
        means.append(float(stage.mu[0, 0]))
    return np.asarray(means), stage


def test_a_frozen_key_does_not_learn_an_anomaly_and_the_return_to_normal_is_not_new():
    held = AdaptiveSettings(short=5, long=200, warmup=50, freeze=3.0, max_freeze=500)
    means, stage = _excursion(held, 200)
    # the long-term mean stays where it was while the anomaly lasts (its first rows, before the
    # short-term mean has moved far, may still teach it a little) ...
    assert means[305:500].max() - means[305:500].min() == 0.0
    assert means[499] < 1.5 * means[299]
    # ... whereas a key that learns from every row takes the anomaly in
    learning, _ = _excursion(SMALL, 200)
    assert learning[499] > 2 * learning[299]
    assert stage.frozen[0] == 0  # learning again once back to normal


def test_a_lasting_change_is_learned_after_max_freeze_rows():
    held = AdaptiveSettings(short=5, long=200, warmup=50, freeze=3.0, max_freeze=100)
    means, _ = _excursion(held, 300)
    assert means[399] < 1.1 * means[299]  # held for 100 rows ...
    assert means[599] > 5 * means[299]  # ... then taken in while the change lasts


def test_state_written_without_the_freeze_count_is_read():
    slots, scores = _stream(2)
    stage = AdaptiveStage(SMALL, RuleSettings(threshold=2.0), [1.0], "m/1")
    order, groups = _groups(slots)
    stage.update(groups, np.arange(len(slots))[order], scores[order])
    saved = stage.state(P)
    legacy = {}
    for key, text in saved["keys"].items():
        blob = base64.b64decode(text)
        legacy[key] = base64.b64encode(blob[:8] + blob[12:]).decode()  # without the count
    other = AdaptiveStage(SMALL, RuleSettings(threshold=2.0), [1.0], "m/1")
    other.restore(P, {**saved, "keys": legacy})
    assert other.state(P) == saved


@pytest.mark.parametrize("channels,freeze", [(1, 0.0), (3, 0.0), (1, 1.5)])
def test_state_round_trip_mid_stream_is_bit_identical(channels, freeze):
    slots, scores = _stream(1, channels=channels)
    ends = np.arange(len(slots)) * 1000
    refs = np.linspace(1, 2, channels)
    settings = AdaptiveSettings(short=5, long=200, warmup=50, freeze=freeze)
    whole = AdaptiveStage(settings, RuleSettings(threshold=2.0), refs, "m/1")
    order, groups = _groups(slots)
    expected = whole.update(groups, ends[order], scores[order])
    cut = 1700
    first = AdaptiveStage(settings, RuleSettings(threshold=2.0), refs, "m/1")
    order1, groups1 = _groups(slots[:cut])
    first.update(groups1, ends[:cut][order1], scores[:cut][order1])
    saved = orjson.loads(orjson.dumps(first.state(P)))
    assert all(len(v) == 4 * -(-first.bytes_per_key // 3) for v in saved["keys"].values())
    assert first.bytes_per_key == 12 + 24 * channels + 17 + 8
    second = AdaptiveStage(settings, RuleSettings(threshold=2.0), refs, "m/1")
    second.update([("other", ("x", 1), slice(0, 3))], np.arange(3), np.ones((3, channels)))
    second.restore(P, saved)  # a new owner, other slot numbers
    order2, groups2 = _groups(slots[cut:])
    rest = second.update(groups2, ends[cut:][order2], scores[cut:][order2])
    by_row = np.empty(len(slots))
    by_row[order] = expected.surprise
    got = np.empty(len(slots) - cut)
    got[order2] = rest.surprise
    np.testing.assert_array_equal(got, by_row[cut:])
    assert (by_row > 2.0).any()
    if freeze:
        assert whole.likelihood.frozen.any() or (by_row >= freeze).any()


def test_channels_combine_by_the_most_surprising():
    rng = np.random.default_rng(3)
    quiet, loud = rng.lognormal(0, 0.2, 600), rng.lognormal(0, 0.2, 600)
    loud[500:] *= 30
    one = AdaptiveStage(SMALL, RuleSettings(), [1.0], "m")
    two = AdaptiveStage(SMALL, RuleSettings(), [1.0, 1.0], "m")
    ends = np.arange(600)
    s_loud = one.update([("k", P, slice(0, 600))], ends, loud).surprise
    s_both = two.update([("k", P, slice(0, 600))], ends, np.c_[quiet, loud]).surprise
    assert s_both[520] >= s_loud[520] > 5
    assert s_both[520] == pytest.approx(s_loud[520], rel=0.05)


def test_replayed_windows_are_skipped_and_other_versions_state_is_not_restored():
    stage = AdaptiveStage(SMALL, RuleSettings(), [1.0], "m/1")
    stage.update([("k", P, slice(0, 100))], np.arange(100), np.ones(100))
    replay = stage.update([("k", P, slice(0, 10))], np.arange(95, 105), np.full(10, 50.0))
    assert np.isnan(replay.surprise[:5]).all() and np.isfinite(replay.surprise[5:]).all()
    saved = stage.state(P)
    other = AdaptiveStage(SMALL, RuleSettings(), [1.0], "m/2")
    other.restore(P, saved)
    assert other.keys == 0
    same = AdaptiveStage(SMALL, RuleSettings(), [1.0], "m/1")
    same.restore(P, saved)
    assert same.keys == 1 and same.state(P) == saved
    same.reset([2.0], "m/2")  # a new version: every key warms up again
    out = same.update([("k", P, slice(0, 1))], np.array([200]), np.array([1e3]))
    assert out.surprise[0] == 0 and out.likelihood[0] == 0.5


def test_a_window_not_after_its_keys_earlier_ones_in_the_batch_is_skipped_as_across_batches():
    """Ends that go back within one batch (a pre-cut window behind its key's readings) are
    passed over as they are when the same windows come one batch each."""
    rng = np.random.default_rng(3)
    keys = np.array([0, 1, 0, 1, 0, 0, 1, 0, 2, 0])
    ends = np.array([10, 10, 20, 5, 20, 15, 30, 40, 1, 35])
    scores = rng.lognormal(0, 0.5, (200, 1))
    together = AdaptiveStage(SMALL, RuleSettings(), [1.0], "m/1")
    apart = AdaptiveStage(SMALL, RuleSettings(), [1.0], "m/1")
    warm = np.arange(-200, 0)  # every key past its warm-up, on the same scores
    for k in range(3):
        together.update([(f"k{k}", P, slice(0, 200))], warm, scores)
        apart.update([(f"k{k}", P, slice(0, 200))], warm, scores)
    order = np.argsort(keys, kind="stable")  # the worker's layout, each key's in arrival order
    groups, start = [], 0
    for k in np.unique(keys).tolist():
        count = int((keys == k).sum())
        groups.append((f"k{k}", P, slice(start, start + count)))
        start += count
    rows = 1.0 + np.arange(len(keys), dtype=float)
    batch = together.update(groups, ends[order], rows[order]).surprise
    one_by_one = np.array(
        [
            apart.update([(f"k{k}", P, slice(0, 1))], ends[i : i + 1], rows[i : i + 1]).surprise[0]
            for i, k in enumerate(keys.tolist())
        ]
    )
    skipped = np.isnan(one_by_one)
    assert skipped.tolist() == [0, 0, 0, 1, 1, 1, 0, 0, 0, 1]
    np.testing.assert_array_equal(np.isnan(batch), skipped[order])
    np.testing.assert_allclose(batch[~skipped[order]], one_by_one[order][~skipped[order]])
    assert together.state(P) == apart.state(P)


def _ranged(tolerance=0.05, warmup=50):
    settings = AdaptiveSettings(short=5, long=200, warmup=warmup, range_tolerance=tolerance)
    return AdaptiveStage(settings, RuleSettings(cooldown=0, quiet=1), [1.0], "m/1", 2)


@pytest.mark.parametrize("freeze", [0.0, 2.0])
def test_batches_of_the_stage_give_what_its_parts_give_row_by_row(freeze):
    """The stage's batched paths (the whole batch's tails at once without a freeze, quiet
    batches of the rule and batches within every key's range taken at once) against each part's
    `step`, one row at a time: the same outputs, and the same state after every batch."""
    settings = AdaptiveSettings(short=5, long=200, warmup=50, freeze=freeze, range_tolerance=0.05)
    rule = RuleSettings(threshold=1.0, quiet=3, cooldown=20)
    slots, scores = _stream(seed=3, keys=9, n=4000)
    rng = np.random.default_rng(3)
    drift = rng.normal(0, 0.05, (len(slots), 2)).cumsum(axis=0) * (slots[:, None] % 3 == 0)
    lo = rng.uniform(0, 1, (len(slots), 2)) + drift  # a third of the keys drift to new levels
    hi = lo + rng.uniform(0, 1, (len(slots), 2))
    parts = AdaptiveLikelihood(settings, [1.0]), DetectionRule(rule), RangeCheck(0.05, 2)
    for part in parts:
        part.ensure(9)
    likelihood, detections, ranges = parts

    stage = AdaptiveStage(settings, rule, [1.0], "m/1", 2)
    cuts = np.unique(np.r_[0, rng.integers(1, len(slots), 400), len(slots)])
    quiet_batches = detected = beyond = 0
    for a, b in zip(cuts[:-1], cuts[1:], strict=True):
        expected = {}
        for i in range(a, b):
            k = slots[i : i + 1]
            logq, live = likelihood.step(k, scores[i : i + 1])  # positive scores, scale 1
            out = ranges.step(k, lo[i : i + 1], hi[i : i + 1]) & live
            fire = detections.step(k, lifted(surprise_of(logq, live), out))
            expected[i] = scores_from(logq, live, fire, out)
        order, groups = _groups(slots[a:b])
        at = a + order
        got = stage.update(groups, at, scores[at], (lo[at], hi[at]))
        for j, row in enumerate(at.tolist()):
            for name in ("likelihood", "log_likelihood", "surprise", "detection", "beyond"):
                assert getattr(got, name)[j] == getattr(expected[row], name)[0], (name, row)
        for key in np.unique(slots[a:b]).tolist():
            slot = stage._slots[P][f"k{key}"]
            for mine, theirs in zip(stage._parts, parts, strict=True):
                assert mine.pack(slot) == theirs.pack(key), (type(mine).__name__, key, b)
        quiet_batches += not got.detection.any() and not got.beyond.any()
        detected, beyond = detected + got.detection.sum(), beyond + got.beyond.sum()
    assert detected > 10 and beyond > 5 and quiet_batches > 20


def _feed(stage, lo, hi, start=0, key="k"):
    n = len(lo)
    return stage.update([(key, P, slice(0, n))], np.arange(start, start + n), np.ones(n), (lo, hi))


def test_a_window_beyond_its_keys_range_is_detected_at_any_surprise():
    stage = _ranged()
    rng = np.random.default_rng(0)
    lo = rng.uniform(0, 1, (300, 2)) * [1, 10]
    hi = lo + 0.5
    calm = _feed(stage, lo, hi)  # range 0 .. 10.5 on the second feature
    assert not calm.beyond.any() and not calm.detection.any()
    top = hi[:, 1].max()
    width = top - lo[:, 1].min()
    highs = [top + 0.04 * width, top + 0.2 * width, top + 0.2 * width]
    out = _feed(stage, np.tile([0.5, 5.0], (3, 1)), np.c_[np.full(3, 0.9), highs], start=300)
    assert out.beyond.tolist() == [False, True, False]  # within 5 %; beyond; the range has grown
    assert out.detection.tolist() == [False, True, False]
    assert (out.surprise < 1).all()  # the likelihood alone saw nothing
    assert out.anomalous(5.0).tolist() == [False, True, False]


def test_the_range_check_waits_for_the_warm_up_and_is_off_at_zero():
    stage = _ranged(warmup=100)
    lo = np.r_[np.zeros((50, 2)), np.full((1, 2), 50.0)]
    hi = np.r_[np.ones((50, 2)), np.full((1, 2), 60.0)]
    out = _feed(stage, lo, hi)
    assert not out.beyond.any() and not out.detection.any()  # inside the warm-up
    off = _ranged(tolerance=0.0)
    assert off.range is None
    np.testing.assert_array_equal(_feed(off, lo, hi).beyond, np.zeros(51, bool))


def test_range_state_round_trips_mid_stream():
    rng = np.random.default_rng(4)
    lo = rng.normal(0, 1, (400, 2)).cumsum(axis=0) * 0.1
    hi = lo + rng.uniform(0, 1, (400, 2))
    whole = _ranged()
    expected = _feed(whole, lo, hi)
    first = _ranged()
    _feed(first, lo[:250], hi[:250])
    saved = orjson.loads(orjson.dumps(first.state(P)))
    assert first.bytes_per_key == 12 + 24 + 17 + 16 * 2 + 8
    second = _ranged()
    second.restore(P, saved)
    rest = _feed(second, lo[250:], hi[250:], start=250)
    np.testing.assert_array_equal(rest.beyond, expected.beyond[250:])
    np.testing.assert_array_equal(rest.detection, expected.detection[250:])
    assert expected.beyond.any()


@pytest.mark.parametrize("length", [1, 2, 7, 64, 65])
def test_window_extremes_are_each_features_minimum_and_maximum(length):
    windows = np.random.default_rng(length).normal(size=(9, length, 3)).astype(np.float32)
    lo, hi = window_extremes(windows)
    np.testing.assert_array_equal(lo, windows.min(axis=1))
    np.testing.assert_array_equal(hi, windows.max(axis=1))


def test_window_extremes_run_no_torch_op():
    """They run on the worker's loop thread, beside the scoring thread, on every batch: an op
    on torch's thread pool there leaves its idle threads spinning against the scorer and the
    client."""
    from torch.profiler import ProfilerActivity, profile

    windows = np.random.default_rng(0).normal(size=(1000, 64, 2)).astype(np.float32)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        lo, hi = window_extremes(windows)
    assert lo.shape == hi.shape == (1000, 2)
    assert [event.key for event in prof.key_averages()] == []


def test_a_keys_saved_state_is_its_parts_struct_layouts_in_order():
    """The state record keeps each key's parts as their `struct` formats lay them out (what
    earlier versions wrote and read), whether packed key by key or all keys at once."""
    import struct

    rng = np.random.default_rng(6)
    lo = rng.normal(0, 1, (300, 2)).cumsum(axis=0) * 0.1
    stage = _ranged()
    _feed(stage, lo, lo + 1.0)
    _feed(stage, lo[:40] * 3, lo[:40] * 3 + 2.0, key="b")
    saved = stage.state(P)
    assert set(saved["keys"]) == {"k", "b"}
    for key, slot in stage._slots[P].items():
        like, rule, ranged = stage.likelihood, stage.rule, stage.range
        fields = [*like.m[slot], *like.mu[slot], *like.var[slot]]
        blob = like.pack_format.pack(int(like.n[slot]), int(like.frozen[slot]), *fields)
        blob += rule.pack_format.pack(
            bool(rule.armed[slot]), int(rule.since[slot]), int(rule.below[slot])
        )
        blob += ranged.pack_format.pack(*ranged.lo[slot], *ranged.hi[slot])
        blob += struct.pack("<q", int(stage.last_end[slot]))
        assert base64.b64decode(saved["keys"][key]) == blob
        assert b"".join(p.pack(slot) for p in (like, rule, ranged)) == blob[:-8]
