"""Seeded synthetic data shared by the tests."""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd

from pipeline.detector.artifact import SEAL, manifest_seal
from pipeline.tools.synthetic import Injection, inject, normal_series


def series_frame(
    n_keys: int = 3, n: int = 2000, n_features: int = 6, *, seed: int = 0, start="2026-01-01"
) -> pd.DataFrame:
    frames = []
    for k in range(n_keys):
        values = normal_series(n, n_features, seed=seed * 100 + k)
        frame = pd.DataFrame(values, columns=[f"s{i}" for i in range(n_features)])
        frame.insert(0, "machine", f"m{k}")
        frame.insert(0, "ts", pd.date_range(start, periods=n, freq="s"))
        frames.append(frame)
    return pd.concat(frames, ignore_index=True)


def edit_manifest(
    directory: Path, change: Callable[[dict], object], *, seal: bool = True, indent=None
) -> dict:
    """Apply `change` to the detector manifest in `directory` and write it back, sealed again
    (as an editor who knows the seal would: the checks behind it still refuse what they must)
    unless `seal` is False. Returns the manifest written."""
    path = Path(directory) / "manifest.json"
    manifest = json.loads(path.read_text())
    change(manifest)
    if seal:
        manifest[SEAL] = manifest_seal(manifest)
    path.write_text(json.dumps(manifest, indent=indent))  # (json writes NaN and Infinity)
    return manifest


def write_series_csv(path: Path, **kwargs) -> Path:
    series_frame(**kwargs).to_csv(path, index=False)
    return path


def anomalous_windows(
    values: np.ndarray, kind: str, window: int, count: int, *, seed: int = 0
) -> np.ndarray:
    """`count` windows of `values` each holding one injected anomaly of `kind` throughout."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(count):
        start = int(rng.integers(0, len(values) - window))
        feature = int(rng.integers(values.shape[1]))
        broken = inject(values, Injection(kind, start, window, feature), rng=rng)
        out.append(broken[start : start + window])
    return np.stack(out)


def labelled_series_csv(path: Path, *, n_keys: int = 2, n: int = 3000, seed: int = 0) -> Path:
    """Series with a labelled level shift on one sensor of key m1 near the end."""
    frame = series_frame(n_keys=n_keys, n=n, seed=seed)
    frame["label"] = 0
    rows = frame.index[(frame["machine"] == "m1")][n - 300 : n - 240]
    frame.loc[rows, "s2"] += 4 * frame["s2"].std()
    frame.loc[rows, "label"] = 1
    frame.to_csv(path, index=False)
    return path


def train_series_detector(data: Path, out: Path, *, score: str = "auto", **model):
    """A small detector trained and calibrated on `data` (columns ts, machine, s*, label)."""
    from pipeline.detector import ModelConfig
    from training.fit import FitConfig
    from training.job import CalibrationSettings, TrainSettings, train

    settings = TrainSettings(
        data=str(data),
        time_col="ts",
        key_col="machine",
        label_col="label",
        window=8,
        stride=2,
        out=str(out),
        model=ModelConfig(**{"hidden": (32,), "code_size": 8, **model}),
        fit=FitConfig(min_steps=0, schedule="constant", epochs=8, batch_size=64, patience=0),
        calibration=CalibrationSettings(method="quantile", target_fpr=0.01),
        device="cpu",
        score=score,
    )
    return train(settings)


def register_result(tracking_uri: str, result, name: str) -> str:
    from training.register import register_version
    from training.tracking import tracking_run

    with tracking_run(tracking_uri, "tests", None, {"kind": result.detector.config.kind}):
        return register_version(result.detector, result.artifact_dir, name, data=result.data)


def metric_values(text: str) -> dict:
    """Prometheus text exposition as {(sample name, sorted labels): value}."""
    from prometheus_client.parser import text_string_to_metric_families

    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def wait_until(condition, timeout_s: float, what: str, poll_s: float = 0.05) -> float:
    """Seconds until `condition()` holds; fails the test after `timeout_s`."""
    import time

    started = time.monotonic()
    while not condition():
        assert time.monotonic() - started < timeout_s, f"{what} did not happen in {timeout_s}s"
        time.sleep(poll_s)
    return time.monotonic() - started


class HostilePickle:
    """Pickled, it runs a shell command when loaded: what a hostile weights file would do."""

    def __init__(self, marker) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def peak_growth(setup: str, measured: str, size: str) -> float:
    """Peak resident memory that `measured` adds, in multiples of the bytes `size` evaluates to,
    run in a fresh interpreter after `setup` (Python source, from the repository root). The peak
    is the process's own high-water mark, reset before `measured` (`ru_maxrss` would also hold
    that of the process it was forked from)."""
    import subprocess
    import sys
    import textwrap

    script = "\n".join(
        [
            textwrap.dedent(setup),
            "def _status(field):",
            "    for line in open('/proc/self/status'):",
            "        if line.startswith(field + ':'):",
            "            return int(line.split()[1]) * 1024",
            "open('/proc/self/clear_refs', 'w').write('5')  # resets the high-water mark",
            "before = _status('VmRSS')",
            textwrap.dedent(measured),
            f"print((_status('VmHWM') - before) / ({size}))",
        ]
    )
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, check=True, timeout=300
    )
    return float(done.stdout.strip().splitlines()[-1])
