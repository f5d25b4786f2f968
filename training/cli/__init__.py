"""The training side's commands (plugins of `aewatch`, see `pipeline.cli`).

Each command turns its flags (and, only here, the environment) into one frozen settings object
and calls one library function: `train` (`training.runner.run_job`), `score` and `evaluate`
(`training.scoring`), `recalibrate` (`training.recalibrate`), `promote` (`training.promote`),
`encode`, `reconstruct` and `sample` (`training.uses`), `demo` (`training.demo`). `args` holds
the flags several of them share.
"""
