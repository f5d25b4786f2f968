"""Stream windows across a restart: the resumed windower continues exactly where it stopped."""

from __future__ import annotations

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
