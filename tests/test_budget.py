"""The training budget: batch size, step minimum, learning-rate schedule, early stopping."""

from __future__ import annotations

import math

import pytest
import torch

from pipeline.detector import ModelConfig, build_model
from pipeline.errors import ConfigError
from training.budget import FitConfig, FitPlan
from training.cli.train import build_train_parser, settings_from_args
from training.fit import fit, validation_loss
from training.objectives import make_objective


@pytest.mark.parametrize(
    ("n", "batch", "epochs", "steps", "every", "patience"),
    [
        (72, 16, 400, 2000, 4, 25),  # 5 steps an epoch, a check every 4 epochs: 25 span 500 steps
        (430, 26, 118, 2006, 2, 15),  # 17 steps an epoch: 15 checks span 500 steps
        (100_000, 256, 50, 19_550, 1, 5),  # big data: the epochs and patience of a plain budget
    ],
)
def test_plan_fits_the_data(n, batch, epochs, steps, every, patience):
    plan = FitPlan.make(n, FitConfig())
    assert (plan.batch_size, plan.epochs, plan.total_steps) == (batch, epochs, steps)
    assert (plan.eval_every, plan.patience) == (every, patience)
    assert plan.warmup_steps == min(500, int(0.05 * steps))


def test_plan_limits():
    assert FitPlan.make(10, FitConfig()).batch_size == 10  # never more than the data
    assert FitPlan.make(1000, FitConfig(batch_size=64)).batch_size == 64
    capped = FitPlan.make(430, FitConfig(max_steps=500))
    assert capped.total_steps <= 500 and capped.epochs == 500 // capped.steps_per_epoch
    plain = FitPlan.make(430, FitConfig(min_steps=0, epochs=3))
    assert plain.epochs == 3
    with pytest.raises(ConfigError, match="max_steps"):
        FitConfig(max_steps=-1)
    with pytest.raises(ConfigError, match="schedule"):
        FitConfig(schedule="step")


def test_learning_rate_warms_up_then_follows_a_cosine_to_one_percent():
    settings = FitConfig(lr=1e-3)
    plan = FitPlan.make(430, settings)  # 2006 steps, 100 of warm-up
    lrs = [plan.lr_at(s, settings) for s in range(plan.total_steps)]
    assert lrs[0] == pytest.approx(1e-5) and lrs[99] == pytest.approx(1e-3)
    assert all(a <= b for a, b in zip(lrs[:100], lrs[1:100], strict=False))
    assert all(a >= b for a, b in zip(lrs[100:], lrs[101:], strict=False))
    assert lrs[-1] == pytest.approx(1e-5, rel=0.01)
    constant = FitConfig(schedule="constant")
    assert {plan.lr_at(s, constant) for s in (0, 500, 2005)} == {1e-3}


def _data(n: int, dim: int = 12, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(n, 3, generator=g)
    return (z @ torch.randn(3, dim, generator=g)).reshape(n, 1, dim)


@pytest.mark.parametrize("kind", ["undercomplete", "sparse"])  # the dense step and autograd
def test_schedule_reaches_the_optimizer_on_every_path(kind):
    config = ModelConfig(kind=kind, input_shape=(1, 12), hidden=(16,), code_size=3)
    x = _data(96)
    weights = {}
    for schedule in ("cosine", "constant"):
        torch.manual_seed(0)
        model = build_model(config)
        settings = FitConfig(min_steps=24, epochs=1, schedule=schedule, patience=0)
        result = fit(model, config, make_objective(config), x, None, settings)
        assert result.steps == 24 == result.plan.total_steps
        weights[schedule] = torch.cat([p.detach().flatten() for p in model.parameters()])
    assert not torch.allclose(weights["cosine"], weights["constant"])


def test_step_minimum_early_stopping_and_the_report():
    config = ModelConfig(input_shape=(1, 12), hidden=(32,), code_size=8)
    train, val = _data(64, seed=1), _data(32, seed=2) * 3  # a validation set it cannot fit well
    torch.manual_seed(0)
    model = build_model(config)
    settings = FitConfig(min_steps=1200, epochs=1, lr=1e-2, patience_steps=40)
    result = fit(model, config, make_objective(config), train, val, settings)
    plan = result.plan
    assert (plan.batch_size, plan.steps_per_epoch, plan.epochs) == (16, 4, 300)
    assert result.stopped_early and result.converged
    assert result.steps < plan.total_steps and result.steps == 4 * result.epochs_run
    assert result.best_step in result.eval_steps and result.best_step < result.steps
    # the best weights are restored: the model scores as well as at the best check
    assert validation_loss(model, config, val) == pytest.approx(min(result.val_losses), rel=1e-5)
    assert len(result.val_losses) == math.ceil(result.epochs_run / plan.eval_every)
    summary = result.summary()
    assert summary["plan"]["total_steps"] == plan.total_steps and summary["steps"] == result.steps


def test_a_short_plan_may_repeat_up_to_extend_to_times_the_step_minimum():
    settings = FitConfig()
    assert FitPlan.make(430, settings).cycles(settings) == 3  # 2006 steps, 3 within 8,000
    assert FitPlan.make(100_000, settings).cycles(settings) == 1  # 19,550: long enough already
    for off in (FitConfig(max_steps=3000), FitConfig(extend_to=0), FitConfig(min_steps=0)):
        assert FitPlan.make(430, off).cycles(off) == 1
    with pytest.raises(ConfigError, match="extend_to"):
        FitConfig(extend_to=-1)


def test_an_unconverged_plan_goes_on_in_warm_restarts_and_keeps_its_best():
    config = ModelConfig(input_shape=(1, 12), hidden=(32,), code_size=3)
    train, val = _data(96, seed=1), _data(48, seed=2)
    # too few steps at a slow, constant rate: still improving at the end of the plan
    settings = FitConfig(min_steps=40, epochs=1, lr=1e-3, schedule="constant")
    torch.manual_seed(0)
    once = fit(
        build_model(config),
        config,
        make_objective(config),
        train,
        val,
        FitConfig(min_steps=40, epochs=1, lr=1e-3, schedule="constant", extend_to=0),
    )
    assert not once.converged and once.cycles == 1 and once.steps == 42  # (was the default)
    torch.manual_seed(0)
    model = build_model(config)
    result = fit(model, config, make_objective(config), train, val, settings)
    plan = result.plan
    assert plan.total_steps == 42 and plan.cycles(settings) == 3
    # it went on until converged (here after a second cycle), never past the three allowed
    assert result.converged and 2 <= result.cycles <= 3
    assert result.steps == result.cycles * plan.total_steps
    assert min(result.val_losses) < 0.98 * min(once.val_losses)
    assert validation_loss(model, config, val) == pytest.approx(min(result.val_losses), rel=1e-5)
    assert result.summary()["cycles"] == result.cycles


def test_cli_defaults_auto_batch_step_minimum_and_image_widths():
    parse = build_train_parser().parse_args
    series = settings_from_args(parse(["--data", "x.csv", "--time-col", "ts"]))
    assert (series.fit.batch_size, series.fit.min_steps, series.fit.max_steps) == (0, 2000, 0)
    assert series.model.hidden == (64, 32)
    images = settings_from_args(parse(["--data", "digits"]))
    assert images.model.hidden == (256, 128) and images.model.code_size == 8
    conv = settings_from_args(parse(["--data", "digits", "--backbone", "conv"]))
    assert conv.model.hidden == (64, 32)
    given = settings_from_args(parse(["--data", "digits", "--hidden", "32", "--max-steps", "9"]))
    assert given.model.hidden == (32,) and given.fit.max_steps == 9


def test_the_progress_bar_gives_each_cycle_its_line():
    import io

    from training.progress import ProgressBar

    out = io.StringIO()
    bar = ProgressBar(stream=out)
    bar.on_plan(FitPlan.make(96, FitConfig(min_steps=0, epochs=3)))
    for epoch in range(6):  # two cycles of a 3-epoch plan
        bar.on_epoch_end(epoch, 1.0, None)
    lines = out.getvalue().split("\n")
    assert lines[0].endswith("epoch 3/3  train 1.00000") and "[" + "#" * 20 + "]" in lines[0]
    assert "epoch 4/6" in lines[1] and lines[1].endswith("epoch 6/6  train 1.00000")
    assert "." * 20 not in lines[1].split("\r")[-1]  # the second cycle's bar fills again


def test_a_step_cap_under_one_epoch_trains_one_epoch_and_says_so(caplog):
    with caplog.at_level("WARNING"):
        plan = FitPlan.make(1000, FitConfig(batch_size=64, max_steps=5))
    assert plan.epochs == 1 and plan.total_steps == 16
    assert "max_steps 5 is less than one epoch of 16 steps" in caplog.text
