"""Stream windows across a restart: the resumed windower continues exactly where it stopped."""

from __future__ import annotations

import numpy as np
import pytest

from pipeline.detector import WindowSpec
from pipeline.state import decode_state, encode_state
from pipeline.windowing import ReadyWindows, StreamWindower

PARTITION = ("readings", 0)


def _push(windower: StreamWindower, ts, values, offsets) -> ReadyWindows:
    out = ReadyWindows()
    windower.push("k", PARTITION, ts, values, offsets, out)
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
        saved = decode_state(encode_state(first.resume_points(PARTITION))).resume
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


def test_restored_keys_hold_the_commit_until_their_readings_are_read_again():
    spec = WindowSpec(16, 4)
    ts = np.arange(200, dtype=np.int64) * 1000
    values = np.zeros((200, 1), np.float32)
    first = StreamWindower(spec, 1)
    for key, base in (("a", 0), ("b", 1)):  # two keys interleaved on one partition
        first.push(
            key, PARTITION, ts[:100], values[:100], np.arange(100) * 2 + base, ReadyWindows()
        )
    saved = first.resume_points(PARTITION)
    needed = first.oldest_needed(PARTITION)
    resumed = StreamWindower(spec, 1)
    resumed.restore(PARTITION, saved)
    assert resumed.oldest_needed(PARTITION) == needed, "nothing read yet: the same offset"
    # only key "a" has been read again: "b" still needs its readings from its resume offset
    offsets_a = np.arange(100, 200) * 2
    resumed.push("a", PARTITION, ts[100:], values[100:], offsets_a, ReadyWindows())
    assert resumed.oldest_needed(PARTITION) == saved["b"][1]
