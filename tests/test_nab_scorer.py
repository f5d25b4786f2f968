"""The NAB scorer of `benchmarks.bench_nab` on hand-computed cases: NAB's scaled sigmoid, its
probation, a detection's worth inside, before and after a window, one window counting once, a
missed window, the normalisation, and the threshold sweep against scoring at each threshold."""

from __future__ import annotations

import math

import numpy as np
import pytest

from benchmarks.nab_scorer import (
    STANDARD,
    NabFile,
    _sweep_scores,
    corpus_sweep,
    perfect_scores,
    probation_length,
    scaled_sigmoid,
    score_detections,
)


def _sigma(y: float) -> float:
    return 2.0 / (1.0 + math.exp(5.0 * y)) - 1.0


def _file(n: int = 100, windows=((40, 49),), name: str = "cat/a.csv") -> NabFile:
    f = NabFile(name, np.arange(n), np.zeros(n), list(windows), probation_length(n))
    f.sweep, f.window_id = _sweep_scores(n, list(windows), STANDARD)
    return f


def _score(f: NabFile, rows) -> float:
    det = np.zeros(len(f), bool)
    det[list(rows)] = True
    return score_detections([f], {f.name: det}).raw


def test_sigmoid_and_probation_follow_nab():
    assert scaled_sigmoid(-1.0) == pytest.approx(0.986614, abs=1e-6)
    assert scaled_sigmoid(0.0) == 0.0 and scaled_sigmoid(3.0) == -1.0
    assert probation_length(100) == 15
    assert probation_length(4032) == 604 and probation_length(22695) == 750  # capped


def test_a_detection_is_worth_what_nab_says():
    f = _file()
    assert _score(f, [40]) == pytest.approx(1.0)  # the window's first row
    assert _score(f, [49]) == pytest.approx(_sigma(-0.1) / _sigma(-1.0))  # its last: 0.2482
    assert _score(f, [40, 45, 49]) == pytest.approx(1.0)  # only the first counts
    assert _score(f, []) == -1.0  # missed
    assert _score(f, [20]) == pytest.approx(-1.0 - 0.11)  # before the window, and a miss
    after = 0.11 * _sigma(3 / 9)  # 3 rows after a 10-row window: scaled by sigma((i - b)/(w - 1))
    assert _score(f, [40, 52]) == pytest.approx(1.0 + after)
    assert after == pytest.approx(-0.075049, abs=1e-6)
    assert _score(f, [40, 90]) == pytest.approx(1.0 - 0.11)  # far after: the full cost
    assert _score(f, [10, 40]) == pytest.approx(1.0)  # probation rows are not scored


def test_normalisation_and_the_threshold_sweep():
    files = [_file(), _file(200, ((60, 79), (150, 159)), "cat/b.csv")]
    perfect, _, _ = corpus_sweep(files, {f.name: perfect_scores(f) for f in files})
    assert perfect.normalised == pytest.approx(100.0)
    null, _, _ = corpus_sweep(files, {f.name: np.full(len(f), 0.5) for f in files})
    assert null.normalised == pytest.approx(0.0) and null.raw == -3.0
    rng = np.random.default_rng(0)
    scores = {f.name: rng.random(len(f)) for f in files}
    best, thresholds, curve = corpus_sweep(files, scores)
    for t in thresholds[1::25]:
        direct = score_detections(files, {n: s >= t for n, s in scores.items()})
        assert direct.raw == pytest.approx(curve[np.flatnonzero(thresholds == t)[0]])
    assert best.raw == pytest.approx(curve.max())
    # one window found at its first row, one missed, one FP long after: (1 - 1 - 0.11 + 1) ...
    half = score_detections(
        files,
        {
            "cat/a.csv": np.isin(np.arange(100), [40]),
            "cat/b.csv": np.isin(np.arange(200), [60, 199]),
        },
    )
    assert half.tp == 2 and half.fn == 1 and half.fp == 1
    raw = 1.0 + 1.0 - 1.0 + 0.11 * _sigma((199 - 159) / 9)
    assert half.raw == pytest.approx(raw)
    assert half.normalised == pytest.approx(100 * (raw + 3) / 6)


def _write_corpus(data, labels_path) -> None:
    """Three series of 600 five-minute rows: one window in `realTweets/a.csv` and in
    `realTraffic/b.csv`, none in `artificialNoAnomaly/c.csv`."""
    import json

    import pandas as pd

    ts = pd.date_range("2015-01-01", periods=600, freq="5min")
    rng = np.random.default_rng(0)
    windows = {}
    series = (
        ("realTweets/a.csv", 450),
        ("realTraffic/b.csv", 500),
        ("artificialNoAnomaly/c.csv", None),
    )
    for name, spike in series:
        values = np.sin(np.arange(600) / 20) + 0.05 * rng.standard_normal(600)
        if spike is not None:
            values[spike] += 8.0
        (data / name).parent.mkdir(parents=True, exist_ok=True)
        pd.DataFrame({"timestamp": ts.strftime("%Y-%m-%d %H:%M:%S"), "value": values}).to_csv(
            data / name, index=False
        )
        windows[name] = (
            [] if spike is None else [[f"{ts[spike - 20]}.000000", f"{ts[spike + 20]}.000000"]]
        )
    labels_path.parent.mkdir(parents=True, exist_ok=True)
    labels_path.write_text(json.dumps(windows))


def test_the_corpus_is_found_in_each_of_nabs_layouts(tmp_path):
    from benchmarks.nab_scorer import corpus_layout, load_corpus

    flat = tmp_path / "flat"
    _write_corpus(flat, flat / "combined_windows.json")
    repo = tmp_path / "NAB"
    _write_corpus(repo / "data", repo / "labels" / "combined_windows.json")
    assert corpus_layout(flat) == (flat / "combined_windows.json", flat)
    for root in (repo, repo / "data"):
        assert corpus_layout(root) == (repo / "labels" / "combined_windows.json", repo / "data")
    names = [f.name for f in load_corpus(repo)]
    assert names == ["artificialNoAnomaly/c.csv", "realTraffic/b.csv", "realTweets/a.csv"]
    with pytest.raises(FileNotFoundError, match="no NAB corpus under"):
        corpus_layout(tmp_path)
    (repo / "data" / "realTweets" / "a.csv").unlink()
    with pytest.raises(FileNotFoundError, match="names 1 series not under .*realTweets/a.csv"):
        load_corpus(repo)


def test_the_benchmark_reports_the_categories_the_corpus_has(tmp_path):
    import json

    from benchmarks import bench_nab

    repo = tmp_path / "NAB"
    _write_corpus(repo / "data", repo / "labels" / "combined_windows.json")
    out = tmp_path / "results"
    bench_nab.main(["--nab", str(repo / "data"), "--kinds", "pca", "--out", str(out)])
    result = json.loads((out / "nab.json").read_text())
    rows = result["results"]["pca"]["median"]["on+rule"]
    assert set(rows) >= {"realTraffic", "realTweets", "all"}
    assert "artificialNoAnomaly" not in rows  # no window: its false positives count in "all"
    assert "| all 3 |" in (out / "nab.md").read_text()
