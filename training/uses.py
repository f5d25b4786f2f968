"""The other uses of a trained detector: codes, reconstructions and (VAE) samples.

The same registered artifact that scores a stream also gives a compact code per window or image
(a non-linear alternative to PCA), a cleaned-up reconstruction (the denoised input, for a
denoising model) and, for a variational model, new windows or images drawn from its prior. All
of them are in the input's units: the detector's scaler is applied on the way in and undone on
the way out.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import torch

from pipeline.detector import Detector, window_starts
from pipeline.errors import ConfigError, DataError
from training.inputs import DetectorData

__all__ = [
    "code_table",
    "interpolate",
    "overlap_average",
    "prior_samples",
    "reconstructed_series",
    "require_generative",
    "window_table",
]


def code_table(detector: Detector, data: DetectorData) -> pd.DataFrame:
    """One row per window (key, window_start, window_end) or image (index, and label when the
    source has classes), followed by the code columns code_0 ... code_{k-1}."""
    codes = detector.encode(data.raw)
    if data.windows is not None:
        frame = pd.DataFrame(
            {
                "key": data.windows.keys.astype(str),
                "window_start": data.windows.start_times,
                "window_end": data.windows.end_times,
            }
        )
    else:
        frame = pd.DataFrame({"index": np.arange(len(codes))})
        if data.classes is not None:
            frame["label"] = data.classes
    names = [f"code_{i}" for i in range(codes.shape[1])]
    return pd.concat([frame, pd.DataFrame(codes, columns=names)], axis=1)


def overlap_average(
    windows: np.ndarray, starts: np.ndarray, n_readings: int
) -> tuple[np.ndarray, np.ndarray]:
    """Readings [T, F] from overlapping windows [N, W, F] that start at `starts`: each reading is
    the mean of every window covering it. Also returns which of the `n_readings` positions any
    window covers (with a stride above 1 a series' last readings may lie in none); the values
    are those of the covered positions only."""
    total = np.zeros((n_readings, windows.shape[2]), dtype=np.float64)
    count = np.zeros(n_readings, dtype=np.int64)
    for offset in range(windows.shape[1]):
        # starts are distinct, so one offset adds at most once to each reading
        total[starts + offset] += windows[:, offset]
        count[starts + offset] += 1
    covered = count > 0
    return total[covered] / count[covered, None], covered


def reconstructed_series(detector: Detector, data: DetectorData) -> pd.DataFrame:
    """The model's reconstruction of a series, reading by reading, in the input's units.

    Columns are those of the input (key, time, then the detector's features), so the output can
    be read back with the same flags. Readings no window covers are left out."""
    table, windows = data.table, data.windows
    recon = detector.reconstruct(windows.windows)
    ids = [c for c in (table.key_col, table.time_col) if c is not None]
    parts, used = [], 0
    for key, rows in table.groups():
        starts = window_starts(len(rows), data.spec)
        mine = slice(used, used + len(starts))
        used += len(starts)
        if len(starts) == 0:
            continue
        if not (windows.keys[mine] == key).all():
            raise DataError(f"{table.source}: windows of key {key!r} are out of order")
        values, covered = overlap_average(recon[mine], starts, len(rows))
        part = rows.loc[rows.index[covered], ids].reset_index(drop=True)
        parts.append(pd.concat([part, pd.DataFrame(values, columns=list(table.features))], axis=1))
    return pd.concat(parts, ignore_index=True)


def require_generative(detector: Detector, source: str) -> None:
    """Sampling needs a prior to draw from: only a variational model has one."""
    kind = detector.config.kind
    if kind != "vae":
        raise ConfigError(
            "model",
            f"{source} is a {kind} model; sampling needs a variational one (trained with "
            "--kind vae), whose codes follow a standard normal prior",
        )


def prior_samples(detector: Detector, n: int, *, seed: int = 0) -> np.ndarray:
    """`n` windows or images decoded from codes drawn from the VAE's N(0, I) prior, in the
    input's units. The same seed gives the same samples on any device."""
    if n < 1:
        raise ConfigError("n", f"must be >= 1, got {n}")
    generator = torch.Generator().manual_seed(seed)
    codes = torch.randn(n, detector.config.code_size, generator=generator)
    return detector.decode(codes.numpy())


def interpolate(detector: Detector, first: np.ndarray, last: np.ndarray, steps: int) -> np.ndarray:
    """`steps` windows or images decoded from evenly spaced points on the line between the
    latent means of the raw inputs `first` and `last` (both ends included)."""
    if steps < 2:
        raise ConfigError("steps", f"must be >= 2 (both ends are included), got {steps}")
    ends = detector.encode(np.stack([first, last]))
    weights = np.linspace(0.0, 1.0, steps, dtype=np.float32)[:, None]
    return detector.decode((1.0 - weights) * ends[0] + weights * ends[1])


def window_table(windows: np.ndarray, features: tuple[str, ...]) -> pd.DataFrame:
    """Windows [N, W, F] as a long table: sample, step (0 .. W-1), then one column per feature."""
    n, length, _ = windows.shape
    frame = pd.DataFrame(
        {"sample": np.repeat(np.arange(n), length), "step": np.tile(np.arange(length), n)}
    )
    values = pd.DataFrame(
        windows.reshape(n * length, -1).astype(np.float64), columns=list(features)
    )
    return pd.concat([frame, values], axis=1)
