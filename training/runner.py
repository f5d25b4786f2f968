"""A training job with its record: in one process, or as one rank of a distributed job.

`run_training` is what `aewatch train` does in every process: fit through `train` and, on rank 0
alone, the MLflow run (parameters, per-epoch losses, figures, the artifact) and the registered
version. `run_job` runs it the way the command line asks: here, as this process's rank of a
torchrun job, or on ranks it launches (whose entry, `training.cli.train.run_rank_process`, reads
its place from the environment the launcher set).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from pipeline.errors import ConfigError
from training.distributed import LaunchSettings, RankContext, launch
from training.job import TrainSettings, check_scale, train

__all__ = ["RunOptions", "TrainJob", "run_job", "run_training"]


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

    def __post_init__(self) -> None:
        """A name the registry takes and `models:/NAME@ALIAS` can say, checked before training."""
        name = self.register
        if name is not None and (not name.strip() or any(c in name for c in "/:@")):
            raise ConfigError(
                "register", f"{name!r} is not a model name (not blank, without '/', ':' or '@')"
            )


def run_training(
    settings: TrainSettings, options: RunOptions, context: RankContext | None = None
) -> dict | None:
    """Train, record and register; returns the summary on rank 0 and None on the others."""
    from training.progress import ProgressBar
    from training.register import log_run_figures, register_version
    from training.tracking import (
        MlflowEpochLogger,
        flatten_params,
        log_artifacts,
        log_fit_summary,
        log_quality,
        log_trained,
        tracking_run,
    )

    context = context or RankContext()
    if not context.is_main:
        train(settings, context=context)
        return None
    callbacks = [MlflowEpochLogger()]
    progress = ProgressBar() if options.progress else None
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
        log_trained(result)
        log_quality(result)
        log_run_figures(result)
        log_artifacts(result.artifact_dir, "detector_files")
        result.run_id = run.info.run_id
        if options.register:
            result.version = register_version(
                result.detector, result.artifact_dir, options.register, data=result.data
            )
    return result.summary()


@dataclass(frozen=True)
class TrainJob:
    """Everything `aewatch train` was asked: what to train, where to record it, on how many
    ranks."""

    train: TrainSettings
    options: RunOptions
    launch: LaunchSettings = LaunchSettings()


def run_job(
    job: TrainJob, joined: RankContext | None, rank_entry: Callable | None = None
) -> dict | None:
    """Train as the job asks: in this process, as `joined` (this process's place in a job an
    external launcher started), or on ranks launched here that enter at `rank_entry`. Returns
    the summary where rank 0 ran, else None."""
    if joined is not None and job.launch.spawns:
        raise ConfigError(
            "nproc_per_node",
            "this process is already a rank of a torchrun job; give the "
            "process and node counts to torchrun only",
        )
    check_scale(job.train, distributed=job.launch.spawns or joined is not None)
    if joined is None or joined.is_main:
        job.train.check_out()
    if joined is not None:
        return run_rank(job.train, job.options, joined)
    if job.launch.spawns:
        return launch(job.launch, rank_entry, job.train, job.options)
    return run_training(job.train, job.options)


def run_rank(settings: TrainSettings, options: RunOptions, context: RankContext) -> dict | None:
    """One rank of a distributed job, from joining the process group to leaving it."""
    context.join(options.backend, context.device(settings.device))
    try:
        return run_training(settings, options, context)
    finally:
        context.leave()
