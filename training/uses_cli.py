"""`aewatch encode`, `reconstruct` and `sample`: a trained detector as a dimensionality reducer, a
denoiser and (VAE) a generator.

They take `--model` like `score` (a detector folder or a registry URI) and read `--data` with the
detector's own features and window, so a row of their output lines up with a row of `score`.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from training.commands import add_data_arguments, add_model_arguments, load_from_args

if TYPE_CHECKING:  # the detector module loads torch; the parser is built without it
    from pipeline.detector import Detector

__all__ = ["register_encode", "register_reconstruct", "register_sample"]

_IMAGE_OUT = (
    "images: a folder of PNG files (the training pixel range stretched to 0..255) or a .npy "
    "array in the input's units"
)


def _report(args: argparse.Namespace, summary: dict, line: str) -> None:
    print(json.dumps(summary, default=str) if args.json else line)


# -- encode --------------------------------------------------------------------------------------
def register_encode(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "encode",
        help="the bottleneck code of every window or image (dimensionality reduction)",
        description="Write one row per window (key, window_start, window_end) or image (index, "
        "label when the source has classes) with its bottleneck code code_0 ... code_{k-1}; a "
        "VAE gives its latent mean. A non-linear alternative to PCA.",
    )
    add_model_arguments(parser)
    add_data_arguments(parser, labels=False)
    parser.add_argument(
        "--labels", dest="labels_path", help="images: a labels file for the label column"
    )
    parser.add_argument("--out", required=True, help="output .csv or .parquet")
    parser.add_argument("--json", action="store_true", help="print a JSON summary")
    parser.set_defaults(handler=_run_encode)


def _run_encode(args: argparse.Namespace) -> int:
    from training.inputs import load_for
    from training.outputs import table_out, write_table
    from training.uses import code_table

    out = table_out(args.out)
    detector, ref = load_from_args(args, require_calibrated=False)
    frame = code_table(detector, load_for(detector, args))
    write_table(frame, out)
    size = detector.config.code_size
    summary = {"model": ref.label, "rows": len(frame), "code_size": size, "out": str(out)}
    _report(args, summary, f"{len(frame)} codes of size {size} from {ref.label}; written to {out}")
    return 0


# -- reconstruct ---------------------------------------------------------------------------------
def register_reconstruct(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "reconstruct",
        help="the model's reconstruction of a series or of images (denoising)",
        description="Reconstruct every window or image with the model, in the input's units. "
        "A series comes back reading by reading (overlapping windows averaged; readings no "
        "window covers are left out) with the input's key, time and feature columns. With a "
        "denoising model this is the denoised input.",
    )
    add_model_arguments(parser)
    add_data_arguments(parser, labels=False)
    parser.add_argument(
        "--out", required=True, help=f"series: a .csv or .parquet table; {_IMAGE_OUT}"
    )
    parser.add_argument("--json", action="store_true", help="print a JSON summary")
    parser.set_defaults(handler=_run_reconstruct)


def _run_reconstruct(args: argparse.Namespace) -> int:
    from training.inputs import load_for
    from training.outputs import image_out, png_range, table_out, write_images, write_table
    from training.uses import reconstructed_series

    detector, ref = load_from_args(args, require_calibrated=False)
    series = detector.input.kind == "series"
    out = table_out(args.out) if series else image_out(args.out)
    data = load_for(detector, args)
    if series:
        frame = reconstructed_series(detector, data)
        write_table(frame, out)
        rows, what = len(frame), "readings"
    else:
        images = detector.reconstruct(data.images)
        write_images(images, out, png_range(detector.scaler, data.images))
        rows, what = len(images), "images"
    summary = {"model": ref.label, "rows": rows, "kind": detector.config.kind, "out": str(out)}
    _report(args, summary, f"{rows} {what} reconstructed by {ref.label}; written to {out}")
    return 0


# -- sample --------------------------------------------------------------------------------------
def register_sample(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "sample",
        help="new windows or images from a VAE (draws from its prior, or interpolations)",
        description="Decode codes drawn from a variational model's standard normal prior, or "
        "(--interpolate) points on the line between the latent means of two inputs. Outputs "
        "are in the input's units. Only a VAE (--kind vae) has a prior to draw from.",
    )
    add_model_arguments(parser)
    what = parser.add_mutually_exclusive_group(required=True)
    what.add_argument("--n", type=int, help="how many samples to draw from the prior")
    what.add_argument(
        "--interpolate",
        nargs=2,
        type=int,
        metavar=("A", "B"),
        help="two 0-based positions in --data, in the order `aewatch encode` lists them (the "
        "image index, or the window's row: windows of each key in time order, keys sorted); "
        "decodes --steps points from A's latent mean to B's",
    )
    parser.add_argument(
        "--steps",
        type=int,
        default=8,
        help="points with --interpolate, ends included (%(default)s)",
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of the prior draws (%(default)s)")
    add_data_arguments(parser, labels=False, required=False)
    parser.add_argument(
        "--out",
        required=True,
        help="series: a .csv or .parquet table (sample, step, features) or a .npy array "
        f"[N, W, F]; {_IMAGE_OUT}",
    )
    parser.add_argument("--json", action="store_true", help="print a JSON summary")
    parser.set_defaults(handler=_run_sample)


def _run_sample(args: argparse.Namespace) -> int:
    from training.outputs import array_out, image_out, png_range, write_images
    from training.uses import prior_samples, require_generative

    detector, ref = load_from_args(args, require_calibrated=False)
    require_generative(detector, ref.label)
    series = detector.input.kind == "series"
    out = array_out(args.out) if series else image_out(args.out)
    if args.interpolate:
        samples = _interpolation(detector, args)
        first, last = args.interpolate
        how = f"interpolated in {args.steps} steps between inputs {first} and {last}"
    else:
        samples = prior_samples(detector, args.n, seed=args.seed)
        how = f"drawn from the prior (seed {args.seed})"
    if series:
        _write_windows(samples, out, detector.input.features)
    else:
        write_images(samples, out, png_range(detector.scaler, samples))
    summary = {"model": ref.label, "samples": len(samples), "out": str(out)}
    _report(args, summary, f"{len(samples)} samples from {ref.label} {how}; written to {out}")
    return 0


def _interpolation(detector: Detector, args: argparse.Namespace) -> np.ndarray:
    """The decoded line between the two inputs of `--data` that `--interpolate` names."""
    from pipeline.errors import ConfigError
    from training.inputs import load_for
    from training.uses import interpolate

    if not args.data:
        raise ConfigError("data", "--interpolate picks its two inputs from --data; give it")
    raw = load_for(detector, args).raw
    for index in args.interpolate:
        if not 0 <= index < len(raw):
            raise ConfigError(
                "interpolate", f"{index} is not a position in {args.data} (0 .. {len(raw) - 1})"
            )
    first, last = args.interpolate
    return interpolate(detector, raw[first], raw[last], args.steps)


def _write_windows(windows: np.ndarray, out: Path, features: tuple[str, ...]) -> None:
    from training.outputs import write_array, write_table
    from training.uses import window_table

    if out.suffix.lower() == ".npy":
        write_array(windows, out)
    else:
        write_table(window_table(windows, features), out)
