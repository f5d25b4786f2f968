"""Writing what the commands produce: tables (CSV or Parquet, by extension) and images (a folder
of PNG files or one `.npy` array).

The file name says the format, so a command checks `--out` before any work is done and a typo in
the extension fails at once rather than after scoring a large file. An output that is the command's
input is refused (`usable_out`), and files appear whole or not at all: each is written under a
temporary name in its folder and renamed into place.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable
from contextlib import suppress
from pathlib import Path

import numpy as np
import pandas as pd

from pipeline.detector import Scaler
from pipeline.errors import ConfigError
from pipeline.modalities.images import encode_image_record

__all__ = [
    "TABLE_SUFFIXES",
    "array_out",
    "image_out",
    "usable_out",
    "png_range",
    "table_out",
    "write_array",
    "write_images",
    "write_table",
]

TABLE_SUFFIXES = (".csv", ".parquet")
_ARRAY_SUFFIX = ".npy"


def table_out(out: str | Path, setting: str = "out") -> Path:
    """`out` as a table path; anything but .csv or .parquet is a setting error."""
    path = Path(out)
    if path.suffix.lower() not in TABLE_SUFFIXES:
        raise ConfigError(setting, f"{out}: write tables to a .csv or .parquet file")
    return _not_a_folder(path, setting)


def array_out(out: str | Path, setting: str = "out") -> Path:
    """`out` as a table or a `.npy` array (windows as [N, W, F])."""
    path = Path(out)
    if path.suffix.lower() not in (*TABLE_SUFFIXES, _ARRAY_SUFFIX):
        raise ConfigError(setting, f"{out}: write windows to a .csv, .parquet or .npy file")
    return _not_a_folder(path, setting)


def _not_a_folder(path: Path, setting: str) -> Path:
    if path.is_dir():
        raise ConfigError(setting, f"{path} is a folder; give the file to write")
    return path


def image_out(out: str | Path, setting: str = "out") -> Path:
    """`out` as an image destination: a `.npy` file, or a new or empty folder (no extension) for
    PNGs (a folder's old pictures would be read back with the new ones)."""
    path = Path(out)
    if path.suffix.lower() == _ARRAY_SUFFIX:
        return _not_a_folder(path, setting)
    if path.is_dir():
        if any(path.iterdir()):
            raise ConfigError(setting, f"{out}: the folder holds files; give a new or empty one")
        return path
    if path.exists():
        raise ConfigError(setting, f"{out} is a file; give a folder for PNG files or a .npy file")
    if not path.suffix:
        return path
    raise ConfigError(setting, f"{out}: write images to a folder of PNG files or to a .npy file")


def usable_out(
    out: str | Path, data: str | Path | None, setting: str = "out", *, model: str | None = None
) -> None:
    """Refuse an output that would overwrite the command's input, land in its input folder or
    in the detector's folder (`model`, when one is a folder), or that cannot be written
    (checked by making and removing a file beside it), before any work."""
    if model is not None and Path(model).is_dir():
        target, folder = Path(out).resolve(), Path(model).resolve()
        if target == folder or folder in target.parents:
            raise ConfigError(
                setting, f"{out} is in the detector's folder (--model); write the output elsewhere"
            )
    if data is not None:
        target, source = Path(out), Path(data)
        same = target.resolve() == source.resolve()
        if not same and target.exists() and source.exists():
            same = os.path.samefile(target, source)
        if same:
            raise ConfigError(setting, f"{out} is the input (--data); write the output elsewhere")
        if source.is_dir() and source.resolve() in target.resolve().parents:
            raise ConfigError(
                setting,
                f"{out} is inside the input folder (--data), which would read it as input next "
                "time; write the output elsewhere",
            )
    writable(Path(out).parent, out, setting)


def writable(folder: Path, out: str | Path, setting: str = "out") -> None:
    """ConfigError unless something can be created in `folder` (or in the nearest folder above
    it that exists, where `folder` is still to be made)."""
    existing = folder
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        raise ConfigError(setting, f"{out}: cannot be created under {existing}, a file")
    try:
        os.rmdir(tempfile.mkdtemp(prefix=".aewatch-", dir=existing))
    except OSError as exc:
        raise ConfigError(
            setting, f"{out}: cannot write under {existing} ({exc.strerror})"
        ) from None


def atomic_write(out: Path, write: Callable[[Path], None], *, folder: bool = False) -> Path:
    """`write(temporary)` in `out`'s folder, then rename it to `out`; nothing is left behind
    when writing fails, and an existing `out` stays as it was. With `folder`, `temporary` is a
    folder to fill, renamed in place of `out` when that is absent or empty: never a folder half
    written."""
    out.parent.mkdir(parents=True, exist_ok=True)
    if folder:
        temporary = Path(
            tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".partial", dir=out.parent)
        )
    else:
        handle, name = tempfile.mkstemp(prefix=f".{out.name}.", suffix=out.suffix, dir=out.parent)
        os.close(handle)
        temporary = Path(name)
    try:
        write(temporary)
        if folder and out.is_dir():
            out.rmdir()  # empty, or the rename below says why not
        os.replace(temporary, out)
    finally:
        if folder:
            shutil.rmtree(temporary, ignore_errors=True)
        else:
            with suppress(FileNotFoundError):
                temporary.unlink()
    return out


def write_table(frame: pd.DataFrame, out: Path) -> Path:
    if out.suffix.lower() == ".csv":
        return atomic_write(out, lambda path: frame.to_csv(path, index=False))
    return atomic_write(out, lambda path: frame.to_parquet(path, index=False))


def write_array(array: np.ndarray, out: Path) -> Path:
    """A plain `.npy` (float32, no pickle), readable back as `--data`."""
    values = np.ascontiguousarray(array, dtype=np.float32)

    def save(path: Path) -> None:
        with open(path, "wb") as handle:
            np.save(handle, values, allow_pickle=False)

    return atomic_write(out, save)


def png_range(scaler: Scaler, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-channel pixel values that PNG black and white stand for.

    A min-max scaler (the default for images) knows the training range, so every file written
    for one detector uses the same mapping and 0..255 training data stays as it was; with any
    other scaler the range of the images being written is used."""
    if scaler.kind == "minmax":
        low = np.asarray(scaler.center, dtype=np.float64)
        return low, low + np.asarray(scaler.scale, dtype=np.float64)
    return images.min(axis=(0, 2, 3)).astype(np.float64), images.max(axis=(0, 2, 3)).astype(
        np.float64
    )


def write_images(images: np.ndarray, out: Path, value_range: tuple[np.ndarray, np.ndarray]) -> Path:
    """Images [N, C, H, W] as `.npy` (the input's units, exactly) or as PNG files `00000.png`,
    ... in the folder `out`, `value_range` stretched to 0..255 and clipped."""
    if out.suffix.lower() == _ARRAY_SUFFIX:
        return write_array(images, out)
    low, high = (np.asarray(v, dtype=np.float64)[None, :, None, None] for v in value_range)
    span = np.where(high > low, high - low, 1.0)
    pixels = np.rint(np.clip((images - low) / span, 0.0, 1.0) * 255.0).astype(np.uint8)
    width = max(5, len(str(len(images) - 1)))

    def save(folder: Path) -> None:
        for index, picture in enumerate(pixels):
            (folder / f"{index:0{width}d}.png").write_bytes(encode_image_record(picture, "png"))

    return atomic_write(out, save, folder=True)
