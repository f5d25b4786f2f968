"""A CPU process that trains and scores an image detector exits quietly: Triton (brought by the
CUDA wheels of torch, unused here) is not imported, and so its bindings print no `nanobind:
leaked ...` lines at interpreter exit."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")

SCRIPT = textwrap.dedent(
    """
    import sys
    from pipeline.detector import ModelConfig, load_detector
    from training.fit import FitConfig
    from training.job import CalibrationSettings, TrainSettings, train

    settings = TrainSettings(
        data="digits",
        normal_class="0",
        out=sys.argv[1],
        model=ModelConfig(kind="undercomplete", backbone="conv", hidden=(8, 16), code_size=8),
        fit=FitConfig(min_steps=0, epochs=2, batch_size=32, patience=0),
        calibration=CalibrationSettings(method="quantile", target_fpr=0.05),
        device="cpu",
    )
    result = train(settings)
    test = result.data.splits["test"]
    scores = load_detector(sys.argv[1]).score(test.images).scores
    print(len(scores), "triton" in sys.modules and sys.modules["triton"] is not None)
    """
)


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU path; CUDA machines may use Triton")
def test_training_and_scoring_images_on_cpu_leave_no_leak_lines(tmp_path: Path):
    done = subprocess.run(
        [sys.executable, "-c", SCRIPT, str(tmp_path / "det")],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=Path(__file__).resolve().parents[1],
    )
    assert done.returncode == 0, done.stderr[-2000:]
    count, triton_loaded = done.stdout.split()[-2:]
    assert int(count) > 0
    assert triton_loaded == "False"
    assert "nanobind" not in done.stderr and "leaked" not in done.stderr, done.stderr[-2000:]
