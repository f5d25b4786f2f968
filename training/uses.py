"""The other uses of a trained detector: codes, reconstructions and (VAE) samples.

The same registered artifact that scores a stream also gives a compact code per window or image
(a non-linear alternative to PCA), a cleaned-up reconstruction (the denoised input, for a
denoising model) and, for a variational model, new windows or images drawn from its prior. All
of them are in the input's units: the detector's scaler is applied on the way in and undone on
the way out. `encode_file`, `reconstruct_file` and `sample_file` are what `aewatch encode`,
`reconstruct` and `sample` run; a row of their output lines up with a row of `aewatch score`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from pipeline.detector import Detector, window_starts
from pipeline.errors import ConfigError, DataError
from training.data.for_detector import ALL, DataSource, load_for
from training.data.prepared import SeriesSplits
from training.outputs import (
    array_out,
    image_out,
    png_range,
    table_out,
    usable_out,
    write_array,
    write_images,
    write_table,
)
from training.sources import ModelSource

__all__ = [
    "EncodeSettings",
    "ReconstructSettings",
    "SampleSettings",
    "code_table",
    "encode_file",
    "interpolate",
    "overlap_average",
    "prior_samples",
    "reconstruct_file",
    "reconstructed_series",
    "require_generative",
    "sample_file",
    "window_table",
]


@dataclass(frozen=True)
class EncodeSettings:
    model: ModelSource
    data: DataSource
    out: str


@dataclass(frozen=True)
class ReconstructSettings:
    model: ModelSource
    data: DataSource
    out: str


MAX_SAMPLES = 100_000
"""The most windows or images `aewatch sample` draws or interpolates in one run (they are held
in memory); draw more with several runs and seeds."""


@dataclass(frozen=True)
class SampleSettings:
    model: ModelSource
    out: str
    n: int | None = None  # draws from the prior, or:
    interpolate: tuple[int, int] | None = None  # two positions in `data`
    steps: int = 8
    seed: int = 0
    data: DataSource | None = None

    def __post_init__(self) -> None:
        for name in ("n", "steps"):
            value = getattr(self, name)
            if value is not None and not 1 <= value <= MAX_SAMPLES:
                raise ConfigError(name, f"must be between 1 and {MAX_SAMPLES:,}, got {value:,}")
        data = None if self.data is None else self.data.path
        usable_out(self.out, data, model=self.model.uri)


def code_table(detector: Detector, data) -> pd.DataFrame:
    """One row per window (key, window_start, window_end) or image (index, and label when the
    source has classes), followed by the code columns code_0 ... code_{k-1}."""
    codes = detector.encode(data.raw(ALL), scaling=data.scaling(detector, ALL))
    names = [f"code_{i}" for i in range(codes.shape[1])]
    return pd.concat([data.index_frame(ALL), pd.DataFrame(codes, columns=names)], axis=1)


def encode_file(settings: EncodeSettings) -> dict:
    out = table_out(settings.out)
    usable_out(out, settings.data.path, model=settings.model.uri)
    detector, ref = settings.model.load(require_calibrated=False)
    frame = code_table(detector, load_for(detector, settings.data))
    write_table(frame, out)
    return {
        "model": ref.label,
        "rows": len(frame),
        "code_size": detector.config.code_size,
        "out": str(out),
    }


def reconstructed_series(detector: Detector, data: SeriesSplits) -> pd.DataFrame:
    """The model's reconstruction of a series, reading by reading, in the input's units.

    Columns are those of the input (key, time, then the detector's features), so the output can
    be read back with the same flags. Readings no window covers are left out."""
    table, windows = data.tables[ALL], data.parts[ALL]
    recon = detector.reconstruct(windows.windows, scaling=data.scaling(detector, ALL))
    ids = [c for c in (table.key_col, table.time_col) if c is not None]
    parts, used = [], 0
    for key, rows in table.groups():
        starts = window_starts(len(rows), detector.input.window)
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


class _SeriesOutput:
    """Series: reconstructions reading by reading in a table; samples as windows, in a table
    (sample, step, features) or a `.npy` array [N, W, F]."""

    what = "readings"
    reconstruction_out = staticmethod(table_out)
    samples_out = staticmethod(array_out)

    @staticmethod
    def write_reconstruction(detector: Detector, data, out: Path) -> int:
        frame = reconstructed_series(detector, data)
        write_table(frame, out)
        return len(frame)

    @staticmethod
    def write_samples(detector: Detector, samples: np.ndarray, out: Path) -> None:
        if out.suffix.lower() == ".npy":
            write_array(samples, out)
        else:
            write_table(window_table(samples, detector.input.features), out)


class _ImageOutput:
    """Images: a folder of PNG files (the training pixel range stretched to 0..255) or a `.npy`
    array in the input's units."""

    what = "images"
    reconstruction_out = samples_out = staticmethod(image_out)

    @staticmethod
    def write_reconstruction(detector: Detector, data, out: Path) -> int:
        images = data.raw(ALL)
        write_images(detector.reconstruct(images), out, png_range(detector.scaler, images))
        return len(images)

    @staticmethod
    def write_samples(detector: Detector, samples: np.ndarray, out: Path) -> None:
        write_images(samples, out, png_range(detector.scaler, samples))


# The training side of each input modality (`pipeline.modalities`): what its outputs are.
_OUTPUTS = {"series": _SeriesOutput, "image": _ImageOutput}


def reconstruct_file(settings: ReconstructSettings) -> dict:
    usable_out(settings.out, settings.data.path, model=settings.model.uri)
    detector, ref = settings.model.load(require_calibrated=False)
    output = _OUTPUTS[detector.input.kind]
    out = output.reconstruction_out(settings.out)
    rows = output.write_reconstruction(detector, load_for(detector, settings.data), out)
    return {
        "model": ref.label,
        "rows": rows,
        "what": output.what,
        "kind": detector.config.kind,
        "out": str(out),
    }


def sample_file(settings: SampleSettings) -> dict:
    detector, ref = settings.model.load(require_calibrated=False)
    require_generative(detector, ref.label)
    output = _OUTPUTS[detector.input.kind]
    out = output.samples_out(settings.out)
    if settings.interpolate:
        samples = _interpolation(detector, settings)
        first, last = settings.interpolate
        how = f"interpolated in {settings.steps} steps between inputs {first} and {last}"
    else:
        samples = prior_samples(detector, settings.n, seed=settings.seed)
        how = f"drawn from the prior (seed {settings.seed})"
    output.write_samples(detector, samples, out)
    return {"model": ref.label, "samples": len(samples), "how": how, "out": str(out)}


def _interpolation(detector: Detector, settings: SampleSettings) -> np.ndarray:
    """The decoded line between the two inputs of `data` that `interpolate` names."""
    if settings.data is None:
        raise ConfigError("data", "--interpolate picks its two inputs from --data; give it")
    raw = load_for(detector, settings.data).raw(ALL)
    for index in settings.interpolate:
        if not 0 <= index < len(raw):
            raise ConfigError(
                "interpolate",
                f"{index} is not a position in {settings.data.path} (0 .. {len(raw) - 1})",
            )
    first, last = settings.interpolate
    return interpolate(detector, raw[first], raw[last], settings.steps)


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
