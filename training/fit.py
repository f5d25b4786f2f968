"""The generic training loop: AdamW, mini-batches, a step budget with warm-up and a cosine
learning-rate schedule, early stopping on validation loss that restores the best weights. The
budget (`FitConfig`, `FitPlan`) is written in `training.budget`; `FitResult` reports the plan,
the steps taken, the best step and whether the run converged.

It knows nothing of MLflow or files; it reports through callbacks. In one process the whole
training split lives in one tensor on the device and batches are gathered by index, so an epoch
is a tight loop with no DataLoader and no per-batch host synchronisation. With the same seed a CPU
run is bit-for-bit repeatable. On CUDA, bf16 autocast is used when `amp` is on.

In a distributed job (a `RankContext` with several ranks) the model trains through
`DistributedDataParallel`: every rank draws the same permutation, takes its share of each global
batch (`TensorBatches`), and its loss is weighted by that share, so the averaged gradient is the
global batch's. Data larger than memory arrives as a `BatchSource` instead of a tensor. Train and
validation losses are summed over ranks, so every rank takes the same early-stopping decision.
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Protocol

import torch
from torch import nn

from pipeline.detector.models import ModelConfig
from pipeline.detector.scoring import score_tensor
from pipeline.errors import ConfigError, ModelError
from training.budget import FitConfig, FitPlan, converged
from training.data.window_tensor import held
from training.dense_step import DenseStep
from training.distributed import RankContext, all_reduce_sums, keep_triton_out
from training.objectives import Objective

__all__ = [
    "BatchSource",
    "Callback",
    "FitConfig",
    "FitResult",
    "FitPlan",
    "TensorBatches",
    "fit",
    "validation_loss",
]

Batch = tuple[torch.Tensor, float]
"""A mini-batch and its loss weight: this rank's share of the global batch times the number of
ranks (1.0 in one process), so that averaging the ranks' gradients gives the global batch's."""


@dataclass
class FitResult:
    train_losses: list[float] = field(default_factory=list)
    val_losses: list[float] = field(default_factory=list)
    best_epoch: int = 0
    stopped_early: bool = False
    seconds: float = 0.0
    windows_seen: int = 0
    plan: FitPlan | None = None
    steps: int = 0
    best_step: int = 0
    eval_steps: list[int] = field(default_factory=list)
    converged: bool = False
    cycles: int = 1  # cycles of the plan run (more than one: an unconverged short plan went on)

    def summary(self) -> dict:
        """What the run reports: its plan, the steps taken and whether it converged."""
        return {
            "plan": self.plan.to_dict() if self.plan else None,
            "steps": self.steps,
            "best_step": self.best_step,
            "epochs": self.epochs_run,
            "stopped_early": self.stopped_early,
            "converged": self.converged,
            "cycles": self.cycles,
        }

    @property
    def epochs_run(self) -> int:
        return len(self.train_losses)

    @property
    def kept_val_loss(self) -> float | None:
        """The validation loss of the weights kept (those of the best evaluation)."""
        if not self.val_losses:
            return None
        if len(self.eval_steps) == len(self.val_losses) and self.best_step in self.eval_steps:
            return self.val_losses[self.eval_steps.index(self.best_step)]
        return min(self.val_losses)

    @property
    def windows_per_second(self) -> float:
        return self.windows_seen / self.seconds if self.seconds > 0 else math.nan


class Callback(Protocol):
    """Told each epoch's losses (val_loss None between validation checks); a callback with an
    `on_plan(plan)` method is also told the run's `FitPlan` before the first epoch."""

    def on_epoch_end(self, epoch: int, train_loss: float, val_loss: float | None) -> None: ...


@torch.no_grad()
def validation_loss(
    model: nn.Module, config: ModelConfig, x: torch.Tensor, batch_size: int = 4096
) -> float:
    """Mean anomaly score on clean inputs in eval mode: the quantity early stopping watches."""
    was_training = model.training
    model.eval()
    total = 0.0
    for start in range(0, len(x), batch_size):
        scores, _, _ = score_tensor(model, config, x[start : start + batch_size], attribution=False)
        total += float(scores.sum())
    model.train(was_training)
    return total / max(1, len(x))


class BatchSource(Protocol):
    """Where an epoch's mini-batches come from, on the training device."""

    def epoch(self, epoch: int) -> Iterator[Batch]: ...


class TensorBatches:
    """Shuffled mini-batches of a tensor: a fresh permutation every epoch from one seeded
    generator. With several ranks every rank draws the same permutation and takes every
    world-th window of each global batch; a last global batch smaller than the number of ranks
    is left out of that epoch."""

    def __init__(
        self, x: torch.Tensor, batch_size: int, seed: int, context: RankContext | None = None
    ) -> None:
        self.x, self.batch_size = x, batch_size
        self.context = context or RankContext()
        self.generator = torch.Generator(device="cpu").manual_seed(seed)

    def epoch(self, epoch: int) -> Iterator[Batch]:
        n, size = len(self.x), self.batch_size
        rank, world = self.context.rank, self.context.world_size
        order = torch.randperm(n, generator=self.generator).to(self.x.device)
        for start in range(0, n, size):
            index = order[start : start + size]
            if world == 1:
                yield self.x.index_select(0, index), 1.0
            elif len(index) >= world:
                mine = index[rank::world]
                yield self.x.index_select(0, mine), len(mine) * world / len(index)


@torch.no_grad()
def _score_totals(
    model: nn.Module, config: ModelConfig, batches: Iterable[torch.Tensor]
) -> tuple[float, int]:
    """Sum of clean-input anomaly scores and their count, in eval mode."""
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    for batch in batches:
        scores, _, _ = score_tensor(model, config, batch, attribution=False)
        total, count = total + float(scores.sum()), count + len(batch)
    model.train(was_training)
    return total, count


def _global_validation_loss(
    model: nn.Module,
    config: ModelConfig,
    val: torch.Tensor | Callable[[], Iterable[torch.Tensor]],
    context: RankContext,
    device: torch.device,
) -> float | None:
    """Validation loss over every rank's share: each rank scores its part, the sums are added."""
    if held(val):
        shard = val[context.rank :: context.world_size]
        batches = (shard[i : i + 4096] for i in range(0, len(shard), 4096))
    else:
        batches = val()
    total, count = all_reduce_sums(list(_score_totals(model, config, batches)), device)
    return total / count if count else None


class _ObjectiveModule(nn.Module):
    """The objective as a module, so `DistributedDataParallel` sees it as the forward pass."""

    def __init__(self, model: nn.Module, objective: Objective) -> None:
        super().__init__()
        self.model, self.objective = model, objective

    def forward(self, batch: torch.Tensor) -> torch.Tensor:
        return self.objective(self.model, batch)


class _DistributedStep:
    """A training step through `DistributedDataParallel`: the gradients of the weighted loss are
    averaged over ranks during backward; then AdamW on every rank alike."""

    def __init__(
        self, model: nn.Module, objective: Objective, settings: FitConfig, amp: bool
    ) -> None:
        from torch.nn.parallel import DistributedDataParallel

        device = next(model.parameters()).device
        self.device_type, self.amp = device.type, amp
        ids = [device.index] if device.type == "cuda" else None
        self.ddp = DistributedDataParallel(_ObjectiveModule(model, objective), device_ids=ids)
        self.optimizer = torch.optim.AdamW(
            model.parameters(), lr=settings.lr, weight_decay=settings.weight_decay, fused=True
        )

    def set_lr(self, lr: float) -> None:
        for group in self.optimizer.param_groups:
            group["lr"] = lr

    def __call__(self, batch: torch.Tensor, weight: float) -> torch.Tensor:
        with torch.autocast(self.device_type, dtype=torch.bfloat16, enabled=self.amp):
            loss = self.ddp(batch)
        self.optimizer.zero_grad(set_to_none=True)
        (loss * weight).backward()
        self.optimizer.step()
        return loss.detach().float()


class _AutogradStep:
    """The general step: the kind's objective through autograd and `torch.optim.AdamW`."""

    def __init__(self, model: nn.Module, objective: Objective, settings: FitConfig, amp: bool):
        self.model, self.objective, self.amp = model, objective, amp
        self.device_type = next(model.parameters()).device.type
        self.optimizer = torch.optim.AdamW(
            model.parameters(), lr=settings.lr, weight_decay=settings.weight_decay, fused=True
        )

    def set_lr(self, lr: float) -> None:
        for group in self.optimizer.param_groups:
            group["lr"] = lr

    def __call__(self, batch: torch.Tensor) -> torch.Tensor:
        with torch.autocast(self.device_type, dtype=torch.bfloat16, enabled=self.amp):
            loss = self.objective(self.model, batch)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        return loss.detach().float()


def fit(
    model: nn.Module,
    config: ModelConfig,
    objective: Objective,
    train: torch.Tensor | BatchSource,
    val: torch.Tensor | Callable[[], Iterable[torch.Tensor]] | None,
    settings: FitConfig,
    callbacks: Sequence[Callback] = (),
    *,
    context: RankContext | None = None,
    device: torch.device | None = None,
    n_train: int | None = None,
) -> FitResult:
    """Train `model` in place; keeps the best validation weights.

    `train` is the scaled training split as one tensor, or a `BatchSource` (data larger than
    memory, built with `settings.resolved_batch_size(n_train)`; then `n_train`, the number of
    training windows, must be given for the plan); `val` a tensor or a function returning an
    iterable of batches. With a distributed `context` the ranks train one model together (see
    the module notes).
    """
    context = context or RankContext()
    device = device or (train.device if held(train) else torch.device("cpu"))
    keep_triton_out()
    torch.manual_seed(settings.seed)
    if held(train):
        n_train = len(train)
        plan = FitPlan.make(n_train, settings)
        train = TensorBatches(train, plan.batch_size, settings.seed, context)
    else:
        if n_train is None:
            raise ConfigError("n_train", "a BatchSource needs the number of training windows")
        plan = FitPlan.make(n_train, settings)
    use_amp = settings.amp and device.type == "cuda"
    joined = context.distributed
    if joined:
        step = _DistributedStep(model, objective, settings, use_amp)
        set_lr = step.set_lr
    elif not use_amp and DenseStep.supports(model, config):
        dense = DenseStep(model, config, lr=settings.lr, weight_decay=settings.weight_decay)
        step = lambda batch, weight: dense(batch)  # noqa: E731 - one process: weight is 1

        def set_lr(lr: float) -> None:
            dense.hyper["lr"] = lr

    else:
        autograd = _AutogradStep(model, objective, settings, use_amp)
        step = lambda batch, weight: autograd(batch)  # noqa: E731
        set_lr = autograd.set_lr
    for callback in callbacks:
        if hasattr(callback, "on_plan"):
            callback.on_plan(plan)
    result = FitResult(plan=plan)
    best, best_state, waited = math.inf, None, 0
    counter = [0]
    cycle_start = [0]  # the step the current cycle of the plan began at

    def scheduled(batch: torch.Tensor, weight: float) -> torch.Tensor:
        set_lr(plan.lr_at(counter[0] - cycle_start[0], settings))
        counter[0] += 1
        return step(batch, weight)

    if joined:
        scheduled.ddp = step.ddp  # _train_epoch joins through it
    started = time.perf_counter()
    model.train()
    cycles = plan.cycles(settings)
    for epoch in range(plan.epochs * cycles):
        local = epoch % plan.epochs  # the epoch within its cycle
        if local == 0 and epoch:  # a cycle ended unconverged: go on, a warm restart
            watched_curve = result.val_losses if result.val_losses else result.train_losses
            if converged(result.best_step, counter[0], watched_curve):
                break
            cycle_start[0], waited = counter[0], 0
            result.cycles += 1
        running, seen = _train_epoch(scheduled, train.epoch(epoch), device, joined)
        if joined:
            running, seen = all_reduce_sums([float(running), float(seen)], device)
        evaluate = (local + 1) % plan.eval_every == 0 or local + 1 == plan.epochs
        if not evaluate:
            val_loss = None
        elif held(val) and not joined:
            val_loss = validation_loss(model, config, val) if len(val) else None
        elif val is not None:
            val_loss = _global_validation_loss(model, config, val, context, device)
        else:
            val_loss = None
        result.windows_seen += int(seen)
        train_loss = float(running) / seen if seen else math.nan
        result.train_losses.append(train_loss)
        if val_loss is not None:
            result.val_losses.append(val_loss)
        for callback in callbacks:
            callback.on_epoch_end(epoch, train_loss, val_loss)
        if not math.isfinite(train_loss):
            raise ModelError(
                f"training loss became {train_loss} at epoch {epoch + 1}: the fit diverged; "
                f"try a lower --lr (it was {settings.lr:g})"
            )
        if not evaluate:
            continue
        watched = val_loss if val_loss is not None else train_loss
        result.eval_steps.append(counter[0])
        if best_state is None or watched < best * (1 - settings.min_delta):
            best, waited, result.best_epoch, result.best_step = watched, 0, epoch, counter[0]
            best_state = copy.deepcopy(model.state_dict())
        else:
            waited += 1
            if settings.patience and waited > plan.patience:
                result.stopped_early = True
                break
    result.steps = counter[0]
    result.seconds = time.perf_counter() - started
    if best_state is not None:
        model.load_state_dict(best_state)
    watched_curve = result.val_losses if result.val_losses else result.train_losses
    result.converged = result.stopped_early or converged(
        result.best_step, result.steps, watched_curve
    )
    model.eval()
    return result


def _train_epoch(
    step: Callable[[torch.Tensor, float], torch.Tensor],
    batches: Iterator[Batch],
    device: torch.device,
    joined: bool,
) -> tuple[torch.Tensor, int]:
    """One pass over the batches: the summed batch losses (on the device) and the window count.
    Ranks whose share runs out early stay in step with the others through `Join`."""
    running = torch.zeros((), device=device)
    seen = 0
    if joined:
        from torch.distributed.algorithms.join import Join

        with Join([step.ddp]):
            for batch, weight in batches:
                running += step(batch, weight) * len(batch)
                seen += len(batch)
    else:
        for batch, weight in batches:
            running += step(batch, weight) * len(batch)
            seen += len(batch)
    return running, seen
