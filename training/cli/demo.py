"""`aewatch demo`: the whole pipeline on one machine, end to end (see `training.demo`).

Uses `KAFKA_BOOTSTRAP_SERVERS` if set, else starts the local broker; `MLFLOW_TRACKING_URI` if set,
else a sqlite store in the demo folder.
"""

from __future__ import annotations

import argparse
import os

from pipeline.settings import finite_float, random_seed
from training.demo import DEMO_KINDS, DemoSettings

__all__ = ["register_demo"]


def register_demo(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "demo",
        help="run the whole pipeline on this machine: simulate, train, promote, stream, alarm",
        description="`aewatch demo`: the whole pipeline on one machine, end to end.",
    )
    parser.add_argument("--dir", default="aewatch-demo", help="demo folder (emptied first)")
    parser.add_argument("--keys", type=int, default=8, help="machines (default: %(default)s)")
    parser.add_argument("--sensors", type=int, default=6, help="sensors per machine")
    parser.add_argument("--history", type=int, default=3000, help="training readings per machine")
    parser.add_argument("--stream", type=int, default=1500, help="live readings per machine")
    parser.add_argument("--rate", type=finite_float, default=400.0, help="live readings per second")
    parser.add_argument("--epochs", type=int, default=15)
    parser.add_argument(
        "--anomalies",
        default=",".join(DEMO_KINDS),
        help="kinds to inject into the live stream (default: %(default)s)",
    )
    parser.add_argument("--images", action="store_true", help="an image stream of digits instead")
    parser.add_argument("--seed", type=random_seed, default=7)
    parser.set_defaults(handler=_run_demo)


def _run_demo(args: argparse.Namespace) -> int:
    from pipeline.worker.cli import worker_environment
    from training.demo import run_demo

    worker_environment()  # the demo builds a worker in this process
    settings = DemoSettings(
        dir=args.dir,
        keys=args.keys,
        sensors=args.sensors,
        history=args.history,
        stream=args.stream,
        rate=args.rate,
        epochs=args.epochs,
        anomalies=tuple(k for k in args.anomalies.split(",") if k),
        images=args.images,
        seed=args.seed,
        bootstrap_servers=os.environ.get("KAFKA_BOOTSTRAP_SERVERS"),
        tracking_uri=os.environ.get("MLFLOW_TRACKING_URI"),
    )
    return 0 if run_demo(settings).get("ok") else 1
