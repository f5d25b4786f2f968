"""Stream windows across a restart: the resumed windower continues exactly where it stopped."""

from __future__ import annotations

import base64

import numpy as np
import pytest

from pipeline.detector import WindowSpec
from pipeline.modalities.windowing import ReadyWindows, StreamWindower
from pipeline.worker.state import decode_state, encode_state

PARTITION = ("readings", 0)


def _push(windower: StreamWindower, ts, values, offsets) -> ReadyWindows:
    out = ReadyWindows()
    windower.push(PARTITION, ["k"] * len(ts), ts, values, offsets, out)
    return out


@pytest.mark.parametrize(("length", "stride"), [(16, 4), (8, 8), (5, 1), (4, 6)])
def test_a_restart_at_any_reading_gives_the_uninterrupted_windows(length, stride):
    spec = WindowSpec(length, stride)
    n = 90
    rng = np.random.default_rng(length * 10 + stride)
    ts = np.arange(n, dtype=np.int64) * 1000
    values = rng.normal(size=(n, 2)).astype(np.float32)
    offsets = np.arange(n, dtype=np.int64) * 3 + 7  # other keys' records in between
    full = _push(StreamWindower(spec, 2), ts, values, offsets)
    full_ends, full_windows = np.concatenate(full.end_ts), np.concatenate(full.windows)
    for cut in range(1, n):
        first = StreamWindower(spec, 2)
        before = _push(first, ts[:cut], values[:cut], offsets[:cut])
        saved = decode_state(encode_state({"resume": first.resume_points(PARTITION)}))["resume"]
        resumed = StreamWindower(spec, 2)
        resumed.restore(PARTITION, saved)
        # a restarted member re-reads from the committed offset: the oldest reading still needed
        start = int(np.searchsorted(offsets, saved["k"][1]))
        after = _push(resumed, ts[start:], values[start:], offsets[start:])
        ends = np.concatenate(before.end_ts + after.end_ts) if full.end_ts else np.zeros(0)
        assert np.array_equal(ends, full_ends), f"cut {cut}: windows lost or repeated"
        if after.windows:
            np.testing.assert_array_equal(
                np.concatenate(after.windows),
                full_windows[len(full_ends) - len(np.concatenate(after.end_ts)) :],
            )


@pytest.mark.parametrize(("length", "stride", "per_record"), [(16, 4, 7), (8, 8, 100), (5, 1, 3)])
def test_a_restart_after_any_batched_record_gives_the_uninterrupted_windows(
    length, stride, per_record
):
    """Readings of a batched record share its offset: the record is read again from there and
    the readings of it that were taken before are skipped by their timestamp."""
    spec = WindowSpec(length, stride)
    n = 210
    rng = np.random.default_rng(length + per_record)
    ts = np.arange(n, dtype=np.int64) * 1000
    values = rng.normal(size=(n, 2)).astype(np.float32)
    offsets = np.arange(n, dtype=np.int64) // per_record
    full = _push(StreamWindower(spec, 2), ts, values, offsets)
    full_ends = np.concatenate(full.end_ts)
    for cut in range(per_record, n, per_record):  # a member stops after a whole record
        first = StreamWindower(spec, 2)
        before = _push(first, ts[:cut], values[:cut], offsets[:cut])
        saved = decode_state(encode_state({"resume": first.resume_points(PARTITION)}))["resume"]
        resumed = StreamWindower(spec, 2)
        resumed.restore(PARTITION, saved)
        start = int(np.searchsorted(offsets, saved["k"][1]))  # the whole record, again
        after = _push(resumed, ts[start:], values[start:], offsets[start:])
        ends = np.concatenate(before.end_ts + after.end_ts)
        assert np.array_equal(ends, full_ends), f"cut {cut}: windows lost, moved or repeated"


def test_restored_keys_hold_the_commit_until_their_readings_are_read_again():
    spec = WindowSpec(16, 4)
    ts = np.arange(200, dtype=np.int64) * 1000
    values = np.zeros((200, 1), np.float32)
    first = StreamWindower(spec, 1)
    for key, base in (("a", 0), ("b", 1)):  # two keys interleaved on one partition
        first.push(
            PARTITION,
            [key] * 100,
            ts[:100],
            values[:100],
            np.arange(100) * 2 + base,
            ReadyWindows(),
        )
    saved = first.resume_points(PARTITION)
    needed = first.oldest_needed(PARTITION)
    resumed = StreamWindower(spec, 1)
    resumed.restore(PARTITION, saved)
    assert resumed.oldest_needed(PARTITION) == needed, "nothing read yet: the same offset"
    # only key "a" has been read again: "b" still needs its readings from its resume offset
    offsets_a = np.arange(100, 200) * 2
    resumed.push(PARTITION, ["a"] * 100, ts[100:], values[100:], offsets_a, ReadyWindows())
    assert resumed.oldest_needed(PARTITION) == saved["b"][1]


def _reference(spec: WindowSpec, keys, ts, values):
    """Reading by reading, key by key: the windows and rejections the stream rules define."""
    accepted: dict[str, list[int]] = {}
    latest: dict[str, int] = {}
    windows, late, duplicate = [], [], []
    for i, (key, t) in enumerate(zip(keys, ts.tolist(), strict=True)):
        if key in latest and t <= latest[key]:
            (late if t < latest[key] else duplicate).append(i)
            continue
        latest[key] = t
        rows = accepted.setdefault(key, [])
        rows.append(i)
        position = len(rows) - 1
        if position + 1 >= spec.length and (position + 1 - spec.length) % spec.stride == 0:
            windows.append((key, rows[-spec.length :]))
    return windows, late, duplicate


def _stream(rng, n: int, n_keys: int, disorder: float):
    keys = [f"k{j}" for j in rng.integers(0, n_keys, n)]
    ts = np.arange(n, dtype=np.int64) * 10
    shuffled = rng.random(n) < disorder  # some readings late or repeating an earlier time
    ts[shuffled] -= rng.integers(0, 40, shuffled.sum()) * 10
    values = rng.normal(size=(n, 3)).astype(np.float32)
    offsets = np.arange(n, dtype=np.int64) + 100
    return keys, ts, values, offsets


def _by_key(out: ReadyWindows) -> dict[str, list]:
    """Each key's windows in order: (end ts, first offset, last offset, values)."""
    found: dict[str, list] = {}
    if not out.windows:
        return found
    windows, ends = np.concatenate(out.windows), np.concatenate(out.end_ts)
    firsts, lasts = np.concatenate(out.first_offsets), np.concatenate(out.last_offsets)
    row = 0
    for key, count in zip(out.keys, out.counts, strict=True):
        for i in range(row, row + count):
            found.setdefault(key, []).append(
                (int(ends[i]), int(firsts[i]), int(lasts[i]), windows[i])
            )
        row += count
    return found


@pytest.mark.parametrize(("length", "stride", "disorder"), [(16, 4, 0.0), (8, 3, 0.1), (4, 6, 0.2)])
def test_many_keys_in_any_chunks_give_the_reading_by_reading_windows(length, stride, disorder):
    spec = WindowSpec(length, stride)
    rng = np.random.default_rng(length + stride)
    keys, ts, values, offsets = _stream(rng, 4000, 40, disorder)
    expected, late_ref, duplicate_ref = _reference(spec, keys, ts, values)
    windower, out = StreamWindower(spec, 3), ReadyWindows()
    late, duplicate, start = [], [], 0
    while start < len(ts):
        stop = start + int(rng.integers(1, 400))
        got_late, got_duplicate = windower.push(
            PARTITION,
            keys[start:stop],
            ts[start:stop],
            values[start:stop],
            offsets[start:stop],
            out,
        )
        late += (got_late + start).tolist()
        duplicate += (got_duplicate + start).tolist()
        start = stop
    assert late == late_ref and duplicate == duplicate_ref
    found = _by_key(out)
    assert sum(map(len, found.values())) == len(expected)
    position = {key: 0 for key in found}
    for key, rows in expected:
        end_ts, first, last, window = found[key][position[key]]
        position[key] += 1
        assert (end_ts, first, last) == (
            int(ts[rows[-1]]),
            int(offsets[rows[0]]),
            int(offsets[rows[-1]]),
        )
        np.testing.assert_array_equal(window, values[rows])


def test_many_keys_restart_at_any_cut_without_losing_or_repeating_a_window():
    spec = WindowSpec(8, 3)
    rng = np.random.default_rng(7)
    keys, ts, values, offsets = _stream(rng, 600, 5, 0.0)
    full = ReadyWindows()
    StreamWindower(spec, 3).push(PARTITION, keys, ts, values, offsets, full)
    full_windows = _by_key(full)
    for cut in range(1, len(ts), 37):
        first, before = StreamWindower(spec, 3), ReadyWindows()
        first.push(PARTITION, keys[:cut], ts[:cut], values[:cut], offsets[:cut], before)
        committed = first.oldest_needed(PARTITION)
        saved = decode_state(encode_state({"resume": first.resume_points(PARTITION)}))["resume"]
        resumed, after = StreamWindower(spec, 3), ReadyWindows()
        resumed.restore(PARTITION, saved)
        start = int(np.searchsorted(offsets, committed))  # re-read from the commit, in chunks
        for lo in range(start, len(ts), 50):
            hi = lo + 50
            resumed.push(PARTITION, keys[lo:hi], ts[lo:hi], values[lo:hi], offsets[lo:hi], after)
        got = _by_key(before)
        for key, rows in _by_key(after).items():
            got.setdefault(key, []).extend(rows)
        assert got.keys() == full_windows.keys()
        for key, rows in full_windows.items():
            assert [r[:3] for r in got[key]] == [r[:3] for r in rows], f"cut {cut}, key {key}"
            np.testing.assert_array_equal(
                np.stack([r[3] for r in got[key]]), np.stack([r[3] for r in rows])
            )


def test_forgotten_partitions_free_their_keys_and_others_keep_their_windows():
    spec = WindowSpec(4, 2)
    other = ("readings", 1)
    rng = np.random.default_rng(3)
    keys, ts, values, offsets = _stream(rng, 400, 20, 0.0)
    windower = StreamWindower(spec, 3)
    windower.push(PARTITION, keys, ts, values, offsets, ReadyWindows())
    windower.push(other, ["b"] * 5, ts[:5], values[:5], offsets[:5], ReadyWindows())
    windower.forget({PARTITION})
    assert windower.resume_points(PARTITION) == {} and windower.oldest_needed(PARTITION) is None
    # a key of the forgotten partition starts afresh (a slot freed by another key may serve it)
    again = ReadyWindows()
    windower.push(PARTITION, ["k0"] * 4, ts[:4], values[:4], offsets[:4], again)
    assert again.counts == [1] and np.array_equal(again.windows[0][0], values[:4])
    # the other partition's key continues where it was: position 5 ends its next window
    more = ReadyWindows()
    windower.push(other, ["b"] * 2, ts[5:7], values[5:7], offsets[5:7], more)
    assert more.counts == [1]
    np.testing.assert_array_equal(more.windows[0][0], values[2:6])


def _saved(windower: StreamWindower) -> dict:
    """The windower's parts of a state record, through the record's encoding."""
    parts = {name: part.state(PARTITION) for name, part in windower.parts().items()}
    return decode_state(encode_state(parts))


@pytest.mark.parametrize("reread_max", [0, 4, 10**6])
@pytest.mark.parametrize(("length", "stride", "per_record"), [(16, 4, 1), (8, 8, 5), (5, 1, 3)])
def test_a_restart_with_parked_readings_gives_the_uninterrupted_windows(
    length, stride, per_record, reread_max
):
    """A key parked at a checkpoint (its held readings in the state record, the commit past
    them) continues the same windows after a restart from that commit, at any cut, for single
    and batched records, and ends in the state of an uninterrupted run."""
    spec = WindowSpec(length, stride)
    n = 120
    rng = np.random.default_rng(length + per_record)
    ts = np.arange(n, dtype=np.int64) * 1000
    values = rng.normal(size=(n, 2)).astype(np.float32)
    offsets = (np.arange(n, dtype=np.int64) // per_record) * 5  # other keys' records between
    uninterrupted = StreamWindower(spec, 2, reread_max)
    full = _push(uninterrupted, ts, values, offsets)
    full_ends, full_windows = np.concatenate(full.end_ts), np.concatenate(full.windows)
    parked = 0
    for cut in range(per_record, n, per_record):
        first = StreamWindower(spec, 2, reread_max)
        before = _push(first, ts[:cut], values[:cut], offsets[:cut])
        saved = _saved(first)
        oldest = first.oldest_needed(PARTITION)
        committed = int(offsets[cut - 1]) + 1 if oldest is None else oldest
        parked += bool(saved.get("parked"))
        resumed = StreamWindower(spec, 2, reread_max)
        resumed.restore(PARTITION, saved["resume"])
        resumed.parked.restore(PARTITION, saved.get("parked", {}))
        start = int(np.searchsorted(offsets, committed))
        after = _push(resumed, ts[start:], values[start:], offsets[start:])
        ends = np.concatenate(before.end_ts + after.end_ts)
        assert np.array_equal(ends, full_ends), f"cut {cut}: windows lost or repeated"
        done = len(ends) - sum(map(len, after.end_ts))
        np.testing.assert_array_equal(np.concatenate(after.windows), full_windows[done:])
        assert _saved(resumed) == _saved(uninterrupted)
    assert (parked > 0) == (reread_max < 10**6)


def test_a_parked_keys_readings_read_again_after_a_restart_are_skipped():
    """Key "slow" (a reading every 10th record) is parked while "fast" holds the commit a few
    records back: the records read again after a restart hold readings of "slow" that were
    taken before (they are in its parked readings) and must neither repeat its windows nor
    count as out of order."""
    spec = WindowSpec(8, 2)
    n = 400
    offsets = np.arange(n, dtype=np.int64)
    keys = ["slow" if o % 10 == 0 else "fast" for o in offsets.tolist()]
    ts = offsets * 1000
    values = np.random.default_rng(0).normal(size=(n, 2)).astype(np.float32)

    def push(windower, start, stop):
        out = ReadyWindows()
        part = (column[start:stop] for column in (keys, ts, values, offsets))
        late, duplicate = windower.push(PARTITION, *part, out)
        assert len(late) == len(duplicate) == 0
        if not out.counts:
            return []
        names = np.repeat(out.keys, out.counts).tolist()
        return list(zip(names, np.concatenate(out.end_ts).tolist(), strict=True))

    whole = push(StreamWindower(spec, 2, 30), 0, n)
    overlapping = 0
    for cut in range(1, n):
        first = StreamWindower(spec, 2, 30)
        before = push(first, 0, cut)
        saved = _saved(first)
        committed = first.oldest_needed(PARTITION)
        parked = saved.get("parked", {}).get("keys", {})
        if "slow" in parked and committed <= parked["slow"]["next"] - 1:
            overlapping += 1
        resumed = StreamWindower(spec, 2, 30)
        resumed.restore(PARTITION, saved["resume"])
        resumed.parked.restore(PARTITION, saved.get("parked", {}))
        after = push(resumed, committed, n)
        assert sorted(before + after) == sorted(whole), f"cut {cut}"
    assert overlapping > 0


def _parked_state(keys: int = 1, n: int = 6, after: int = 50) -> tuple[StreamWindower, dict]:
    """A windower (window 8, stride 2) whose `keys` keys sent `n` readings each, then one other
    key `after`: the first keys are parked (reread_max 10)."""
    windower = StreamWindower(WindowSpec(8, 2), 2, 10)
    names = [f"k{i}" for i in range(keys) for _ in range(n)] + ["busy"] * after
    total = len(names)
    ts = 1_767_225_600_000 + np.arange(total, dtype=np.int64) * 1000
    values = np.random.default_rng(1).normal(size=(total, 2)).astype(np.float32)
    windower.push(PARTITION, names, ts, values, np.arange(total, dtype=np.int64), ReadyWindows())
    return windower, _saved(windower)


@pytest.mark.parametrize(
    ("corrupt", "reason"),
    [
        (lambda p: {**p, "head": "9"}, "not {'head'"),
        (lambda p: {**p, "keys": [1]}, "not {'head'"),
        (lambda p: {"head": p["head"], "keys": {"k0": [1]}}, "not an object"),
        (lambda p: _key(p, values="!!"), "Non-base64|base64"),
        (lambda p: _key(p, values=base64.b64encode(bytes(44)).decode()), "11 values of 2 features"),
        (
            lambda p: _key(p, values=base64.b64encode(bytes(47)).decode()),
            "multiple of element size",
        ),
        (lambda p: _key(p, ts=p["keys"]["k0"]["ts"][::-1]), "timestamps increasing"),
        (lambda p: _key(p, next=0), "offsets before 'next'"),
        (lambda p: _key(p, ts=[True] * 6), "must be counts"),
    ],
    ids=["head", "keys", "key", "base64", "length", "bytes", "order", "next", "bool"],
)
def test_parked_readings_that_are_not_so_are_refused(corrupt, reason):
    _, saved = _parked_state()
    assert list(saved["parked"]["keys"]) == ["k0"]
    resumed = StreamWindower(WindowSpec(8, 2), 2, 10)
    resumed.restore(PARTITION, saved["resume"])
    with pytest.raises(ValueError, match=reason):
        resumed.parked.restore(PARTITION, corrupt(saved["parked"]))


def _key(parked: dict, **fields) -> dict:
    return {**parked, "keys": {"k0": {**parked["keys"]["k0"], **fields}}}


def test_parked_readings_stay_within_their_budget_furthest_behind_first(monkeypatch):
    """200 quiet keys of 6 held readings of 2 values (6 x 48 bytes at most each): 50 fit a
    budget of 50 x 288 bytes, the furthest behind first, and the 51st key's oldest reading is
    where the commit stays."""
    monkeypatch.setattr("pipeline.modalities.parking.PARKED_BYTES", 50 * 288 + 287)
    windower, saved = _parked_state(keys=200)
    assert list(saved["parked"]["keys"]) == [f"k{i}" for i in range(50)]
    assert len(encode_state({"parked": saved["parked"]})) < 50 * 288
    assert windower.oldest_needed(PARTITION) == 50 * 6


def test_a_state_record_beyond_its_limit_is_refused_naming_its_partition(monkeypatch):
    from pipeline.worker.state import KafkaStateStore

    monkeypatch.setattr("pipeline.worker.state.STATE_RECORD_MAX", 1000)
    sent = []
    store = KafkaStateStore(type("Sink", (), {"send": lambda *a, **k: sent.append(a)})(), None, "s")
    store.save(PARTITION, {"resume": {"k": [1, 2]}})
    with pytest.raises(
        ValueError, match="state record of readings:0 is 1[0-9]{3} bytes, over 1000"
    ):
        store.save(PARTITION, {"resume": {f"k{i}": [1, 2] for i in range(100)}})
    assert len(sent) == 1


def test_an_empty_key_is_a_key_like_any_other():
    """A reading whose key is "" keeps its resume point and holds the commit like the others
    (its slot was left out of the partition's keys, and a restart lost its windows)."""
    windower = StreamWindower(WindowSpec(8, 2), 2)
    n = 12
    keys = ["", "a"] * n
    ts = np.repeat(np.arange(n, dtype=np.int64) * 1000, 2)
    values = np.ones((2 * n, 2), np.float32)
    windower.push(PARTITION, keys, ts, values, np.arange(2 * n, dtype=np.int64), ReadyWindows())
    points = windower.resume_points(PARTITION)
    assert set(points) == {"", "a"}
    assert windower.oldest_needed(PARTITION) == min(points[""][1], points["a"][1])
    assert points[""][1] % 2 == 0  # its own offsets, the even ones
