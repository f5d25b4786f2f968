"""Sliding windows over one entity's series: the one rule both the training job and the worker use.

A series of T readings gives windows starting at 0, S, 2S, ... while a full window of length W
fits: window i covers readings [i*S, i*S + W). The worker applies the same rule to a stream, so a
window that ends at reading t exists exactly when t + 1 >= W and (t + 1 - W) % S == 0.

`WindowCarry` applies the same rule to series that arrive in chunks (files, record batches): each
key carries over only the readings a later window still needs, so the windows are exactly those
`cut_windows` gives for the whole series.

Windows overlap: at stride 1 a series of T readings gives nearly T windows, each W readings long,
so a copy of them all is W times the series. `cut_windows` therefore keeps the series once, laid
end to end, with each window's first row (`SlidingWindows`); a window is copied out only when
asked for, a batch at a time.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass

import numpy as np

from pipeline.errors import ConfigError, DataError

__all__ = [
    "SlidingWindows",
    "WindowCarry",
    "WindowSet",
    "WindowSpec",
    "cut_windows",
    "sliding_windows",
    "window_starts",
]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class WindowSpec:
    """Window length W and stride S, in readings."""

    length: int
    stride: int = 1

    def __post_init__(self) -> None:
        if self.length < 1:
            raise ConfigError("window", f"length must be >= 1, got {self.length}")
        if self.stride < 1:
            raise ConfigError("stride", f"must be >= 1, got {self.stride}")

    def count(self, n_readings: int) -> int:
        """How many windows a series of `n_readings` gives."""
        return 0 if n_readings < self.length else (n_readings - self.length) // self.stride + 1

    def ends_window(self, position: int) -> bool:
        """Whether the reading at 0-based `position` in a series is the last of a window."""
        return position + 1 >= self.length and (position + 1 - self.length) % self.stride == 0

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> WindowSpec:
        return cls(length=int(data["length"]), stride=int(data["stride"]))


def window_starts(n_readings: int, spec: WindowSpec) -> np.ndarray:
    """Start positions of every window of a series of `n_readings`."""
    return np.arange(spec.count(n_readings), dtype=np.int64) * spec.stride


def sliding_windows(values: np.ndarray, spec: WindowSpec, *, source: str = "series") -> np.ndarray:
    """Cut `values` [T, F] into windows [N, W, F] (a copy, contiguous, float32).

    Raises DataError when the series is shorter than one window.
    """
    return np.ascontiguousarray(_window_view(values, spec, source), dtype=np.float32)


def _window_view(values: np.ndarray, spec: WindowSpec, source: str) -> np.ndarray:
    """The windows of `values` [T, F] as a strided view [N, W, F] (no copy)."""
    if values.ndim != 2:
        raise DataError(f"{source}: expected a [time, feature] array, got shape {values.shape}")
    n = spec.count(len(values))
    if n == 0:
        raise DataError(
            f"{source}: {len(values)} readings is too few for one window of {spec.length}"
        )
    view = np.lib.stride_tricks.sliding_window_view(values, spec.length, axis=0)
    # sliding_window_view puts the window axis last: [T-W+1, F, W] -> every S-th, as [N, W, F].
    return view[:: spec.stride].transpose(0, 2, 1)


class SlidingWindows:
    """Windows [N, W, F] of series laid end to end in `rows` [R, F]: window i is rows
    `starts[i]` to `starts[i] + W`. Indexing copies out the windows asked for (an int gives a
    view of one); `np.asarray` copies them all, W times the rows."""

    ndim = 3

    def __init__(self, rows: np.ndarray, starts: np.ndarray, length: int) -> None:
        self.rows, self.starts, self.length = rows, np.asarray(starts, np.int64), length
        self._steps = np.arange(length, dtype=np.int64)

    @property
    def shape(self) -> tuple[int, int, int]:
        return (len(self.starts), self.length, self.rows.shape[1])

    @property
    def dtype(self) -> np.dtype:
        return self.rows.dtype

    def __len__(self) -> int:
        return len(self.starts)

    def __getitem__(self, index) -> np.ndarray:
        if isinstance(index, tuple):
            return self[index[0]][(slice(None),) * (not np.isscalar(index[0])) + index[1:]]
        if np.isscalar(index):
            start = self.starts[index]
            return self.rows[start : start + self.length]
        return self.rows[self.starts[index][:, None] + self._steps]

    def __array__(self, dtype=None, copy=None) -> np.ndarray:
        whole = self[:]
        return whole if dtype is None else whole.astype(dtype, copy=False)

    def astype(self, dtype, copy: bool = True) -> np.ndarray:
        return np.asarray(self, dtype)

    def subset(self, index) -> SlidingWindows:
        """The windows at `index`, still uncopied."""
        return SlidingWindows(self.rows, self.starts[index], self.length)


@dataclass(frozen=True)
class WindowSet:
    """Windows cut from one or more entities' series, with where each came from.

    `end_labels` is the label of each window's last reading (the decision a stream has at that
    moment); `any_labels` is whether any reading in the window is labelled anomalous.
    """

    windows: np.ndarray | SlidingWindows
    keys: np.ndarray
    start_times: np.ndarray
    end_times: np.ndarray
    end_labels: np.ndarray | None = None
    any_labels: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.windows)

    def subset(self, index: np.ndarray) -> WindowSet:
        pick = lambda a: None if a is None else a[index]  # noqa: E731
        windows = self.windows
        return WindowSet(
            windows.subset(index) if isinstance(windows, SlidingWindows) else windows[index],
            self.keys[index],
            self.start_times[index],
            self.end_times[index],
            pick(self.end_labels),
            pick(self.any_labels),
        )


def cut_windows(groups, spec: WindowSpec, *, source: str = "series") -> WindowSet:
    """Cut windows from `groups`: an iterable of (key, times [T], values [T, F], labels [T] or
    None), each series in time order. Keys shorter than one window give no windows; if no key
    has enough readings, that is a DataError."""
    parts: dict[str, list] = {k: [] for k in ("w", "i", "k", "s", "e", "el", "al")}
    longest, has_labels, rows = 0, False, 0
    short: list[str] = []
    for key, times, values, labels in groups:
        longest = max(longest, len(values))
        if spec.count(len(values)) == 0:
            short.append(f"{key!r} ({len(values)})")
            continue
        starts = window_starts(len(values), spec)
        ends = starts + spec.length - 1
        parts["w"].append(_series_rows(values, f"{source} key {key!r}"))
        parts["i"].append(starts + rows)
        rows += len(values)
        parts["k"].append(np.full(len(starts), key, dtype=object))
        parts["s"].append(np.asarray(times)[starts])
        parts["e"].append(np.asarray(times)[ends])
        if labels is not None:
            has_labels = True
            labels = np.asarray(labels).astype(bool)
            parts["el"].append(labels[ends])
            # any label in [start, end]: a running count over the series
            csum = np.concatenate([[0], np.cumsum(labels)])
            parts["al"].append((csum[ends + 1] - csum[starts]) > 0)
    if not parts["w"]:
        raise DataError(
            f"{source}: the longest series has {longest} readings, too few for one window "
            f"of {spec.length}"
        )
    if short:
        log.warning(
            "%s: %d key(s) have fewer readings than one window of %d and give no windows: %s",
            source,
            len(short),
            spec.length,
            ", ".join(short[:10]) + (", ..." if len(short) > 10 else ""),
        )
    return WindowSet(
        SlidingWindows(_joined(parts["w"]), np.concatenate(parts["i"]), spec.length),
        np.concatenate(parts["k"]),
        np.concatenate(parts["s"]),
        np.concatenate(parts["e"]),
        np.concatenate(parts["el"]) if has_labels else None,
        np.concatenate(parts["al"]) if has_labels else None,
    )


def _series_rows(values, source: str) -> np.ndarray:
    values = np.asarray(values)
    if values.ndim != 2:
        raise DataError(f"{source}: expected a [time, feature] array, got shape {values.shape}")
    return values


def _joined(series: list[np.ndarray]) -> np.ndarray:
    """The keys' series copied once, end to end, into one contiguous float32 array."""
    shapes = {values.shape[1:] for values in series}
    if len(shapes) > 1:
        raise DataError(f"series differ in their number of features: {sorted(shapes)}")
    out = np.empty((sum(map(len, series)), *series[0].shape[1:]), np.float32)
    at = 0
    for values in series:
        out[at : at + len(values)] = values
        at += len(values)
    return out


@dataclass
class _Tail:
    """The readings of one key a later window may still need, and the series position of the
    first of them."""

    position: int
    times: np.ndarray
    values: np.ndarray
    labels: np.ndarray | None


class WindowCarry:
    """Windows of per-key series that arrive in chunks, in time order within each key.

    `push(key, times, values, labels)` returns the windows the chunk completes (or None): those
    `cut_windows` would give for the key's whole series, including windows that span chunks.
    Each key carries at most W - 1 readings between chunks.
    """

    def __init__(self, spec: WindowSpec) -> None:
        self.spec = spec
        self._tails: dict[str, _Tail] = {}

    def push(
        self,
        key: str,
        times: np.ndarray,
        values: np.ndarray,
        labels: np.ndarray | None = None,
    ) -> WindowSet | None:
        tail = self._tails.get(key)
        position = 0
        if tail is not None:
            position = tail.position
            times = np.concatenate([tail.times, times])
            values = np.concatenate([tail.values, values])
            if labels is not None:
                labels = np.concatenate([tail.labels, labels])
        stride = self.spec.stride
        # Windows start at series positions 0, S, 2S, ...: the first one at or after `position`.
        first = -position % stride
        count = self.spec.count(len(values) - first) if len(values) > first else 0
        out = None
        if count:
            segment = (
                key,
                times[first:],
                values[first:],
                None if labels is None else labels[first:],
            )
            out = cut_windows([segment], self.spec, source=f"key {key!r}")
        keep = min(first + count * stride, len(values))  # where the next window starts
        self._tails[key] = _Tail(
            position + keep,
            times[keep:].copy(),
            values[keep:].copy(),
            None if labels is None else labels[keep:].copy(),
        )
        return out
