"""The generic training loop: AdamW, mini-batches, early stopping on validation loss.

It knows nothing of MLflow or files; it reports through callbacks. The whole training split lives
in one tensor on the device and batches are gathered by index, so an epoch is a tight loop with no
DataLoader and no per-batch host synchronisation. With the same seed a CPU run is bit-for-bit
repeatable. On CUDA, bf16 autocast is used when `amp` is on.
"""

from __future__ import annotations

import copy
import math
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol

import torch
from torch import nn

from pipeline.detector.models import ModelConfig
from pipeline.detector.scoring import score_tensor
from pipeline.errors import ConfigError
from training.dense_step import DenseStep
from training.objectives import Objective

__all__ = ["Callback", "FitConfig", "FitResult", "ProgressBar", "fit", "validation_loss"]


@dataclass(frozen=True)
class FitConfig:
    epochs: int = 50
    batch_size: int = 256
    lr: float = 1e-3
    weight_decay: float = 1e-4
    patience: int = 5
    min_delta: float = 0.0
    seed: int = 0
    amp: bool = True

    def __post_init__(self) -> None:
        for name in ("epochs", "batch_size"):
            if getattr(self, name) < 1:
                raise ConfigError(name, f"must be >= 1, got {getattr(self, name)}")
        if self.lr <= 0:
            raise ConfigError("lr", f"must be > 0, got {self.lr}")
        if self.patience < 0 or self.weight_decay < 0 or self.min_delta < 0:
            raise ConfigError("patience", "patience, weight_decay and min_delta must be >= 0")


@dataclass
class FitResult:
    train_losses: list[float] = field(default_factory=list)
    val_losses: list[float] = field(default_factory=list)
    best_epoch: int = 0
    stopped_early: bool = False
    seconds: float = 0.0
    windows_seen: int = 0

    @property
    def epochs_run(self) -> int:
        return len(self.train_losses)

    @property
    def windows_per_second(self) -> float:
        return self.windows_seen / self.seconds if self.seconds > 0 else math.nan


class Callback(Protocol):
    def on_epoch_end(self, epoch: int, train_loss: float, val_loss: float | None) -> None: ...


class ProgressBar:
    """A one-line progress display on stderr with the running losses."""

    def __init__(self, epochs: int, stream=sys.stderr) -> None:
        self.epochs, self.stream = epochs, stream

    def on_epoch_end(self, epoch: int, train_loss: float, val_loss: float | None) -> None:
        done = int(20 * (epoch + 1) / self.epochs)
        val = "" if val_loss is None else f"  val {val_loss:.5f}"
        end = "\n" if epoch + 1 == self.epochs else ""
        self.stream.write(
            f"\r[{'#' * done}{'.' * (20 - done)}] epoch {epoch + 1}/{self.epochs}"
            f"  train {train_loss:.5f}{val}{end}"
        )
        self.stream.flush()

    def close(self) -> None:
        self.stream.write("\n")
        self.stream.flush()


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


class _AutogradStep:
    """The general step: the kind's objective through autograd and `torch.optim.AdamW`."""

    def __init__(self, model: nn.Module, objective: Objective, settings: FitConfig, amp: bool):
        self.model, self.objective, self.amp = model, objective, amp
        self.device_type = next(model.parameters()).device.type
        self.optimizer = torch.optim.AdamW(
            model.parameters(), lr=settings.lr, weight_decay=settings.weight_decay, fused=True
        )

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
    train: torch.Tensor,
    val: torch.Tensor | None,
    settings: FitConfig,
    callbacks: Sequence[Callback] = (),
) -> FitResult:
    """Train `model` in place on the scaled `train` tensor; keeps the best validation weights."""
    device = train.device
    torch.manual_seed(settings.seed)
    generator = torch.Generator(device="cpu").manual_seed(settings.seed)
    use_amp = settings.amp and device.type == "cuda"
    if not use_amp and DenseStep.supports(model, config):
        step = DenseStep(model, config, lr=settings.lr, weight_decay=settings.weight_decay)
    else:
        step = _AutogradStep(model, objective, settings, use_amp)
    result = FitResult()
    best, best_state, waited = math.inf, None, 0
    n, size = len(train), settings.batch_size
    started = time.perf_counter()
    model.train()
    for epoch in range(settings.epochs):
        order = torch.randperm(n, generator=generator).to(device)
        running = torch.zeros((), device=device)
        for start in range(0, n, size):
            batch = train.index_select(0, order[start : start + size])
            running += step(batch) * len(batch)
        result.windows_seen += n
        train_loss = float(running) / n
        val_loss = validation_loss(model, config, val) if val is not None and len(val) else None
        result.train_losses.append(train_loss)
        if val_loss is not None:
            result.val_losses.append(val_loss)
        for callback in callbacks:
            callback.on_epoch_end(epoch, train_loss, val_loss)
        if not math.isfinite(train_loss):
            raise FloatingPointError(f"training loss became {train_loss} at epoch {epoch + 1}")
        watched = val_loss if val_loss is not None else train_loss
        if watched < best - settings.min_delta:
            best, waited, result.best_epoch = watched, 0, epoch
            best_state = copy.deepcopy(model.state_dict())
        else:
            waited += 1
            if settings.patience and waited > settings.patience:
                result.stopped_early = True
                break
    result.seconds = time.perf_counter() - started
    if best_state is not None:
        model.load_state_dict(best_state)
    model.eval()
    return result
