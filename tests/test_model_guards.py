"""Settings that would give a silently useless or runaway result: BCE scoring of values beyond
[0, 1], a code as large as the input of an "undercomplete" model, and an unbounded sample count."""

from __future__ import annotations

import logging

import pytest
import torch

from pipeline.detector.scoring import element_errors
from pipeline.errors import ConfigError
from training.sources import ModelSource
from training.uses import MAX_SAMPLES, SampleSettings


def test_bce_scores_a_spike_beyond_the_scaled_range_above_clean_values():
    recon = torch.full((1, 6), 0.9)
    clean = torch.tensor([[0.0, 0.2, 0.5, 0.8, 0.95, 1.0]])
    spike = torch.tensor([[1.0, 1.05, 1.5, 3.0, -0.5, -2.0]])
    clean_errors = element_errors(recon, clean, "bce")
    spike_errors = element_errors(recon, spike, "bce")
    assert spike_errors[0, 1:4].tolist() == sorted(spike_errors[0, 1:4].tolist())
    assert spike_errors[0, 2] > clean_errors.max(), "a spike outside [0, 1] is never lower"
    assert (
        spike_errors[0, 5]
        > spike_errors[0, 4]
        > element_errors(recon, torch.zeros(1, 6), "bce")[0, 0]
    )
    assert spike_errors[0, 0] == clean_errors[0, 5], "nothing changes inside [0, 1]"


def test_an_undercomplete_code_as_large_as_the_input_is_warned_about(caplog):
    from pipeline.detector import ModelConfig
    from training.job import warn_code_size

    with caplog.at_level(logging.WARNING):
        warn_code_size(ModelConfig(kind="undercomplete", code_size=64).with_input_shape((4, 3)))
    assert any(
        "code_size 64" in r.getMessage() and "12 inputs" in r.getMessage() for r in caplog.records
    )
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        warn_code_size(ModelConfig(kind="undercomplete", code_size=4).with_input_shape((4, 3)))
        warn_code_size(ModelConfig(kind="denoising", code_size=64).with_input_shape((4, 3)))
    assert not caplog.records, "a smaller code, or an overcomplete kind meant to be, is fine"


@pytest.mark.parametrize("n", [0, -1, MAX_SAMPLES + 1, 100_000_000])
def test_sample_counts_are_bounded_before_anything_loads(n):
    with pytest.raises(ConfigError, match="^n:"):
        SampleSettings(ModelSource("no-such-folder"), "out.npy", n=n)
