"""Scaled training windows on the training device, cut from their scaled series a batch at a time.

At stride 1 the windows of a series are W times the series; a tensor of them all was the largest
thing training held (with the windows themselves, 4.2 GB for 300,000 readings of 38 sensors at
window 32). `WindowTensor` holds the scaled rows once ([R, F]) and the first row of each window,
and answers what training asks of its input tensor: its length, `index_select` of a shuffled
batch, slices for validation, and chunks of flat windows for PCA's closed-form fit. Each answer is
a copy of the windows asked for, the same values a whole tensor would have given.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch

from pipeline.detector import Scaler
from pipeline.detector.windows import SlidingWindows

__all__ = ["FlatWindows", "WindowTensor", "extremes", "held", "scaled_windows"]


class WindowTensor:
    """Windows [N, W, F]: window i is `rows[starts[i] : starts[i] + W]`."""

    def __init__(self, rows: torch.Tensor, starts: torch.Tensor, length: int) -> None:
        self.rows, self.length = rows, length
        self.starts = starts.to(device=rows.device, dtype=torch.int64)
        self._steps = torch.arange(length, device=rows.device)

    @property
    def device(self) -> torch.device:
        return self.rows.device

    @property
    def dtype(self) -> torch.dtype:
        return self.rows.dtype

    @property
    def shape(self) -> torch.Size:
        return torch.Size((len(self.starts), self.length, self.rows.shape[1]))

    def __len__(self) -> int:
        return len(self.starts)

    def index_select(self, dim: int, index: torch.Tensor) -> torch.Tensor:
        if dim != 0:
            raise ValueError("windows are selected along their first axis")
        return self._cut(self.starts.index_select(0, index.to(self.starts.device)))

    def __getitem__(self, index) -> torch.Tensor:
        if isinstance(index, int):
            start = int(self.starts[index])
            return self.rows[start : start + self.length]
        return self._cut(self.starts[index])

    def _cut(self, starts: torch.Tensor) -> torch.Tensor:
        return self.rows[starts[:, None] + self._steps]

    def subset(self, index: torch.Tensor) -> WindowTensor:
        """The windows at `index`, still uncopied."""
        return WindowTensor(self.rows, self.starts.index_select(0, index), self.length)

    def reshape(self, n: int, rest: int) -> FlatWindows:
        """The windows flattened to [N, W * F], for code that reads them chunk by chunk."""
        if n != len(self) or rest != -1:
            raise ValueError(f"windows flatten to ({len(self)}, -1), not ({n}, {rest})")
        return FlatWindows(self)


class FlatWindows:
    """Flat windows [N, W * F] as PCA's fit reads them: `shape`, `device`, `split` into chunks,
    and `to` a dtype, which copies them all (the fit does so only when they are few)."""

    def __init__(self, windows: WindowTensor) -> None:
        self.windows = windows
        n, length, features = windows.shape
        self.shape = torch.Size((n, length * features))
        self.device = windows.device

    def split(self, size: int) -> Iterator[torch.Tensor]:
        for start in range(0, self.shape[0], size):
            part = self.windows[start : start + size]
            yield part.reshape(len(part), -1)

    def to(self, dtype: torch.dtype) -> torch.Tensor:
        return torch.cat(list(self.split(65_536))).to(dtype)


def scaled_windows(
    windows: SlidingWindows, scaler: Scaler, scaling, keys, device: torch.device
) -> WindowTensor:
    """`windows` scaled as `Detector.score` scales them (by `scaler`, or per window by
    `scaling`, its key's (center, scale) [N, F]), on `device`: their rows scaled once."""
    rows = torch.from_numpy(_scaled_rows(windows, scaler, scaling, keys)).to(device)
    return WindowTensor(rows, torch.from_numpy(windows.starts), windows.length)


def _scaled_rows(windows: SlidingWindows, scaler: Scaler, scaling, keys) -> np.ndarray:
    """The rows under `windows`, scaled as their windows would be: by `scaler`, or by each
    window's (center, scale) [N, F] of its key (the same for every window of a key, whose
    windows cover rows of its own)."""
    if scaling is None:
        return scaler.transform(windows.rows, axis=-1)
    center = np.zeros_like(windows.rows)
    scale = np.ones_like(windows.rows)
    starts = windows.starts
    runs = np.flatnonzero(np.r_[True, keys[1:] != keys[:-1]])  # the first window of each run
    lows = np.minimum.reduceat(starts, runs).tolist()
    highs = (np.maximum.reduceat(starts, runs) + windows.length).tolist()
    for first, low, high in zip(runs.tolist(), lows, highs, strict=True):
        center[low:high], scale[low:high] = scaling[0][first], scaling[1][first]
    out = np.subtract(windows.rows, center, dtype=np.float32)
    return np.divide(out, scale, out=out)


def extremes(x: torch.Tensor | WindowTensor, chunk: int = 8192) -> tuple[float, float]:
    """The smallest and largest value of any window, a chunk of windows at a time."""
    low, high = float("inf"), float("-inf")
    for start in range(0, len(x), chunk):
        part = x[start : start + chunk]
        low, high = min(low, float(part.min())), max(high, float(part.max()))
    return low, high


def held(x) -> bool:
    """Whether `x` is training input held whole on the device (a tensor or a `WindowTensor`),
    rather than a stream of batches."""
    return isinstance(x, torch.Tensor | WindowTensor)
