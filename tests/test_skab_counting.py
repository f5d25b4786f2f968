"""How the SKAB benchmark counts a run's rows: every row, as SKAB's metric and leaderboard do,
and the rows no model trained on (from 400 on)."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np

from benchmarks.skab_honest import TRAIN_ROWS, _point_counts, metrics


def test_a_run_is_counted_over_every_row_and_over_the_rows_after_training():
    window, n = 10, 1000
    values = np.zeros((n, 2), np.float32)
    values[:, 0] = np.arange(n)  # each window's score: the row it ends at
    labels = np.zeros(n, bool)
    labels[300:320] = True  # an anomaly inside the training rows
    labels[700:800] = True
    detector = SimpleNamespace(
        input=SimpleNamespace(window=SimpleNamespace(length=window)),
        score=lambda w, attribution: SimpleNamespace(scores=w[:, -1, 0]),
    )
    later, every = _point_counts(detector, 749.5, SimpleNamespace(values=values, labels=labels))
    # flagged: rows 750 on; rows 0-8 no window ends at (normal)
    assert later.tolist() == [50, 200, 50, 300]
    assert every.tolist() == [50, 200, 70, 680]
    assert sum(every) == n and sum(later) == n - TRAIN_ROWS
    assert metrics(every)["far"] == 200 / 880 and metrics(later)["far"] == 200 / 500
