"""A training job with its record: in one process, or as one rank of a distributed job.

`run_training` is what `aewatch train` does in every process: fit through `train` and, on rank 0
alone, the MLflow run (parameters, per-epoch losses, figures, the artifact) and the registered
version. `run_rank` is the entry of a rank started by `training.distributed.launch` or by an
external torchrun: it reads its place from the environment the launcher set (this is the edge of
a rank's process), joins the process group, runs the job and leaves.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from training.distributed import RankContext
from training.job import TrainSettings, train

__all__ = ["RunOptions", "run_rank", "run_training"]


@dataclass(frozen=True)
class RunOptions:
    """Where the run is recorded and how the job reports; the same on every rank."""

    tracking_uri: str
    experiment: str = "aewatch"
    run_name: str | None = None
    register: str | None = None
    progress: bool = True
    backend: str = "auto"
    log_level: str = "INFO"
    log_format: str = "text"


def run_training(
    settings: TrainSettings, options: RunOptions, context: RankContext | None = None
) -> dict | None:
    """Train, record and register; returns the summary on rank 0 and None on the others."""
    import mlflow

    from training.fit import ProgressBar
    from training.register import log_run_figures, register_version
    from training.tracking import (
        MlflowEpochLogger,
        flatten_params,
        log_fit_summary,
        log_quality,
        tracking_run,
    )

    context = context or RankContext()
    if not context.is_main:
        train(settings, context=context)
        return None
    callbacks = [MlflowEpochLogger()]
    progress = ProgressBar(settings.fit.epochs) if options.progress else None
    if progress:
        callbacks.append(progress)
    params = flatten_params(settings)
    if context.distributed:
        params.update(world_size=str(context.world_size), dist_backend=options.backend)
    with tracking_run(options.tracking_uri, options.experiment, options.run_name, params) as run:
        result = train(settings, callbacks, context=context)
        if progress and result.fit.stopped_early:
            progress.close()
        log_fit_summary(result.fit)
        log_quality(result)
        log_run_figures(result)
        mlflow.log_artifacts(str(result.artifact_dir), artifact_path="detector_files")
        result.run_id = run.info.run_id
        if options.register:
            result.version = register_version(
                result.detector, result.artifact_dir, options.register, data=result.data
            )
    return result.summary()


def run_rank(settings: TrainSettings, options: RunOptions) -> dict | None:
    """One rank of a distributed job, from joining the process group to leaving it."""
    from pipeline.cli import configure_logging

    configure_logging(options.log_level, options.log_format)
    context = RankContext.from_environment(os.environ)
    if context is None:
        raise RuntimeError("run_rank needs the environment of a torch.distributed launcher")
    context.join(options.backend, context.device(settings.device))
    try:
        return run_training(settings, options, context)
    finally:
        context.leave()
