"""The budget of a training run, fixed before it starts: batch size, epochs and optimizer
steps, the learning-rate schedule, the validation cadence and the early-stopping patience.

The budget fits the data: the batch size defaults to clamp(n // 16, 16, 256) windows (never
more than n), and a run takes at least `min_steps` optimizer steps (epochs = max(epochs,
ceil(min_steps / steps per epoch)), optionally capped by `max_steps` in whole epochs, at least
one), so ~500 images get ~2,000
steps instead of ~100, while data with more than epochs * batch_max windows (12,800 at the
defaults) trains exactly as many epochs as a plain epoch budget. The learning rate warms up
linearly over 5 % of the planned steps (at most 500), then follows a cosine to 1 % of `lr` at the
planned end, set before every optimizer step. Validation loss is computed at most `max_evals`
times (every ceil(epochs / max_evals) epochs); patience is max(`patience` evaluations, the
evaluations that span `patience_steps` optimizer steps), so big data keeps 5 epochs and small
data waits 500 steps; an evaluation counts as better when it improves the best by more than
`min_delta` relative. A run has converged when it stopped early, reached its best before the
last 10 % of its steps, or improved the watched loss by less than 1 % over its last 20 % of
evaluations.

A short plan that ends unconverged goes on (`FitPlan.cycles`): while the planned steps are fewer
than `extend_to` x `min_steps` (8,000 at the defaults) and no `max_steps` is set, another cycle of
the same plan follows (a warm restart: warm-up, then the cosine again; patience counts afresh),
until the run converges, stops early or the next cycle would pass that many steps. The best
validation weights are kept across cycles, so a cycle that does not improve them costs time only.
A series of 10,320 readings (about 6,300 training windows, batch 256, 25 steps an epoch) plans
2,000 steps and ends there unconverged, at validation error 0.024 against PCA's 0.015; 8,000
steps bring it to 0.008.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

from pipeline.errors import ConfigError

__all__ = ["NOT_CONVERGED", "SCHEDULES", "FitConfig", "FitPlan", "converged"]

log = logging.getLogger(__name__)

NOT_CONVERGED = (
    "training did not converge in %d steps (best at step %d): consider a larger --min-steps or "
    "--epochs"
)


SCHEDULES = ("cosine", "constant")


@dataclass(frozen=True)
class FitConfig:
    epochs: int = 50  # at least this many epochs (unless max_steps caps them)
    batch_size: int = 0  # 0: auto, clamp(n_train // batch_divisor, batch_min, batch_max)
    min_steps: int = 2000  # at least this many optimizer steps
    max_steps: int = 0  # 0: no cap
    lr: float = 1e-3
    schedule: str = "cosine"
    warmup: float = 0.05  # fraction of the planned steps ...
    warmup_max: int = 500  # ... but at most this many
    final_lr: float = 0.01  # the cosine ends at lr * final_lr
    weight_decay: float = 1e-4
    patience: int = 5  # evaluations without improvement, at least ...
    patience_steps: int = 500  # ... and at least the evaluations that span this many steps
    min_delta: float = 1e-4  # relative improvement of the best validation loss that counts
    max_evals: int = 100
    seed: int = 0
    amp: bool = True
    batch_divisor: int = 16
    batch_min: int = 16
    batch_max: int = 256
    extend_to: int = 4  # an unconverged short plan repeats up to extend_to * min_steps (0: off)

    def __post_init__(self) -> None:
        for name in ("epochs", "max_evals", "batch_divisor", "batch_min", "batch_max"):
            if getattr(self, name) < 1:
                raise ConfigError(name, f"must be >= 1, got {getattr(self, name)}")
        for name in ("batch_size", "min_steps", "max_steps", "warmup_max", "extend_to"):
            if getattr(self, name) < 0:
                raise ConfigError(name, f"must be >= 0 (0: auto/off), got {getattr(self, name)}")
        if self.lr <= 0:
            raise ConfigError("lr", f"must be > 0, got {self.lr}")
        if self.schedule not in SCHEDULES:
            raise ConfigError("schedule", f"choose one of {', '.join(SCHEDULES)}")
        if not 0 <= self.warmup < 1:
            raise ConfigError("warmup", f"must be in [0, 1), got {self.warmup}")
        if not 0 <= self.final_lr <= 1:
            raise ConfigError("final_lr", f"must be in [0, 1], got {self.final_lr}")
        for name in ("patience_steps", "patience", "weight_decay", "min_delta"):
            if getattr(self, name) < 0:
                raise ConfigError(name, f"must be >= 0, got {getattr(self, name)}")
        if self.batch_min > self.batch_max:
            raise ConfigError("batch_min", "must be <= batch_max")

    def resolved_batch_size(self, n_train: int) -> int:
        """The global batch size for `n_train` training windows."""
        if self.batch_size:
            return max(1, min(self.batch_size, n_train))
        auto = min(self.batch_max, max(self.batch_min, n_train // self.batch_divisor))
        return max(1, min(auto, n_train))


@dataclass(frozen=True)
class FitPlan:
    """The budget of one run, fixed before it starts."""

    n_train: int
    batch_size: int
    steps_per_epoch: int
    epochs: int
    total_steps: int
    warmup_steps: int
    eval_every: int  # epochs between validation evaluations
    patience: int  # evaluations

    @classmethod
    def make(cls, n_train: int, settings: FitConfig) -> FitPlan:
        batch = settings.resolved_batch_size(n_train)
        per_epoch = max(1, math.ceil(n_train / batch))
        epochs = max(settings.epochs, math.ceil(settings.min_steps / per_epoch))
        if settings.max_steps:
            if settings.max_steps < per_epoch:
                log.warning(
                    "max_steps %d is less than one epoch of %d steps (%d windows in batches "
                    "of %d): one epoch is trained",
                    settings.max_steps,
                    per_epoch,
                    n_train,
                    batch,
                )
            epochs = max(1, min(epochs, settings.max_steps // per_epoch))
        total = epochs * per_epoch
        warmup = (
            0
            if settings.schedule == "constant"
            else min(settings.warmup_max, int(settings.warmup * total))
        )
        every = max(1, math.ceil(epochs / settings.max_evals))
        patience = max(settings.patience, math.ceil(settings.patience_steps / (every * per_epoch)))
        return cls(n_train, batch, per_epoch, epochs, total, warmup, every, patience)

    def cycles(self, settings: FitConfig) -> int:
        """How many cycles of this plan a run may take: more than one only for a plan shorter
        than `extend_to` x `min_steps` without a `max_steps` cap (see the module notes)."""
        ceiling = settings.extend_to * settings.min_steps
        if settings.max_steps or not self.total_steps or self.total_steps >= ceiling:
            return 1
        return max(1, ceiling // self.total_steps)

    def lr_at(self, step: int, settings: FitConfig) -> float:
        """The learning rate of optimizer step `step` (0-based)."""
        if settings.schedule == "constant":
            return settings.lr
        if step < self.warmup_steps:
            return settings.lr * (step + 1) / self.warmup_steps
        t = min(1.0, (step - self.warmup_steps) / max(1, self.total_steps - self.warmup_steps))
        floor = settings.final_lr
        return settings.lr * (floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * t)))

    def to_dict(self) -> dict:
        return dict(self.__dict__)


def converged(best_step: int, steps: int, curve: list[float]) -> bool:
    """The best was reached before the last 10 % of the run, or the last 20 % of the epochs
    improved the watched loss by less than 1 % (relative)."""
    if len(curve) < 2 or not steps:  # one check says nothing about convergence
        return False
    if best_step < 0.9 * steps:
        return True
    head = curve[: max(1, int(0.8 * len(curve)))]
    return (min(head) - min(curve)) / max(abs(min(head)), 1e-12) < 0.01
