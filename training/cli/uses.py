"""`aewatch encode`, `reconstruct` and `sample`: a trained detector as a dimensionality reducer, a
denoiser and (VAE) a generator.

They take `--model` like `score` (a detector folder or a registry URI) and read `--data` with the
detector's own features and window, so a row of their output lines up with a row of `score`. Each
builds its settings and calls one function of `training.uses`.
"""

from __future__ import annotations

import argparse
import json

from pipeline.settings import random_seed
from training.cli.args import add_data_arguments, add_model_arguments, data_source, model_source

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
    from training.uses import EncodeSettings, encode_file

    s = encode_file(EncodeSettings(model_source(args), data_source(args), args.out))
    line = f"{s['rows']} codes of size {s['code_size']} from {s['model']}; written to {s['out']}"
    _report(args, s, line)
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
    from training.uses import ReconstructSettings, reconstruct_file

    s = reconstruct_file(ReconstructSettings(model_source(args), data_source(args), args.out))
    what = s.pop("what")
    line = f"{s['rows']} {what} reconstructed by {s['model']}; written to {s['out']}"
    _report(args, s, line)
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
    parser.add_argument(
        "--seed", type=random_seed, default=0, help="seed of the prior draws (%(default)s)"
    )
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
    from training.uses import SampleSettings, sample_file

    settings = SampleSettings(
        model_source(args),
        args.out,
        n=args.n,
        interpolate=tuple(args.interpolate) if args.interpolate else None,
        steps=args.steps,
        seed=args.seed,
        data=data_source(args),
    )
    s = sample_file(settings)
    how = s.pop("how")
    _report(args, s, f"{s['samples']} samples from {s['model']} {how}; written to {s['out']}")
    return 0
