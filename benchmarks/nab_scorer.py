"""NAB v1.1 scoring, written from NAB's published rules and its reference code (numenta/NAB
`nab/sweeper.py`, `nab/util.py`, `nab/runner.py`), in plain numpy.

Rules (standard profile: A_TP = 1, A_FP = 0.11, A_FN = 1):

* Probation: the first ``min(floor(0.15 n), 0.15 * 5000)`` rows of a file (NAB's
  ``getProbationPeriod``: 15 %, capped at 750 rows) are not scored. A window all of whose rows lie
  in probation is not scored either (NAB builds its score parts from the scorable rows only).
* Every row gets a *sweep score*, the value it adds if it is a detection:
  - inside window k = [a, b] (width w = b - a + 1): ``sigma(-(b - i + 1) / w) / sigma(-1) * A_TP``
    with ``sigma(y) = 2 / (1 + exp(5 y)) - 1`` (so the first row of a window is worth exactly 1);
  - outside every window, before the first window: ``-A_FP``;
  - outside, after window k: ``A_FP * sigma((i - b) / (w - 1))`` (``sigma(y) = -1`` for y >= 3),
    i.e. an FP right after a window costs almost nothing, one 3 window-lengths later the full 0.11.
* A file's score at threshold t: every scorable row with ``score >= t`` is a detection; each
  window contributes the largest sweep score among its detections (= its first detection, the
  sigmoid falls along the window) or ``-A_FN`` if it has none; every detection outside the windows
  adds its (negative) sweep score. Every detection counts: NAB does not merge consecutive ones.
* One threshold for the whole corpus: NAB's optimiser sweeps every distinct score value of the
  corpus and keeps the best corpus score (ties: the highest threshold).
* Normalised score: ``100 * (S - S_null) / (S_perfect - S_null)``, with ``S_null = -A_FN * N``
  (the null detector's best: no detection) and ``S_perfect = A_TP * N``, N = number of windows.

The corpus is read in place (``combined_windows.json`` and the CSVs); nothing is copied.

Checks (`benchmarks.bench_nab` runs them every time, `tests/test_nab_scorer.py` on hand-made
cases): the null detector scores 0, a perfect one 100, and NAB's windowed Gaussian (``null_scores``,
``perfect_scores``, ``windowed_gaussian_scores`` below) 28.16 on the 24 series given, with per-file
raw scores equal to NAB's published ones at the same detections.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

__all__ = [
    "STANDARD",
    "CorpusScore",
    "NabFile",
    "corpus_sweep",
    "corpus_layout",
    "load_corpus",
    "normalised",
    "probation_length",
    "scaled_sigmoid",
    "score_detections",
    "null_scores",
    "perfect_scores",
    "windowed_gaussian_scores",
]

STANDARD = {"tpWeight": 1.0, "fpWeight": 0.11, "fnWeight": 1.0}
DEFAULT_ROOT = Path("../shared/datasets/nab")  # from the repository root, as `make bench` runs


def probation_length(n_rows: int, percent: float = 0.15) -> int:
    """NAB's getProbationPeriod: min(floor(percent * n), percent * 5000)."""
    return int(min(math.floor(percent * n_rows), percent * 5000))


def scaled_sigmoid(y: np.ndarray) -> np.ndarray:
    """sigma(y) = 2 / (1 + e^(5y)) - 1, and -1 for y >= 3 (NAB's sweeper)."""
    y = np.asarray(y, dtype=np.float64)
    out = 2.0 / (1.0 + np.exp(np.clip(5.0 * y, -700, 700))) - 1.0
    return np.where(y >= 3.0, -1.0, out)


@dataclass
class NabFile:
    """One series with its labelled windows (row indices, inclusive) and per-row sweep scores."""

    name: str  # "category/file.csv"
    timestamps: np.ndarray
    values: np.ndarray
    windows: list[tuple[int, int]]
    probation: int
    sweep: np.ndarray = field(default=None, repr=False)  # value of a detection at each row
    window_id: np.ndarray = field(default=None, repr=False)  # window index, -1 outside

    @property
    def category(self) -> str:
        return self.name.split("/")[0]

    def __len__(self) -> int:
        return len(self.values)

    @property
    def scored_windows(self) -> list[int]:
        """Windows with at least one row after probation (NAB scores only those)."""
        return [k for k, (a, b) in enumerate(self.windows) if b >= self.probation]


def _sweep_scores(
    n: int, windows: list[tuple[int, int]], cost: dict
) -> tuple[np.ndarray, np.ndarray]:
    idx = np.arange(n)
    sweep = np.full(n, -cost["fpWeight"], dtype=np.float64)  # FP before any window
    wid = np.full(n, -1, dtype=np.int64)
    max_tp = scaled_sigmoid(-1.0)
    for k, (a, b) in enumerate(windows):
        width = b - a + 1
        inside = idx[a : b + 1]
        sweep[a : b + 1] = scaled_sigmoid(-(b - inside + 1) / width) / max_tp * cost["tpWeight"]
        wid[a : b + 1] = k
        # rows after this window, up to the next window's start: FP relative to this window
        stop = windows[k + 1][0] if k + 1 < len(windows) else n
        after = idx[b + 1 : stop]
        if len(after):
            # NAB divides by (width - 1); a one-row window would divide by zero in NAB itself
            pos = (after - b) / float(max(width - 1, 1))
            sweep[b + 1 : stop] = scaled_sigmoid(pos) * cost["fpWeight"]
    return sweep, wid


def corpus_layout(root: Path | str) -> tuple[Path, Path]:
    """(labels file, data folder) of a NAB corpus: a folder holding `combined_windows.json` beside
    the category folders (as `../shared/datasets/nab`), NAB's repository (`labels/` and `data/`),
    or NAB's `data/` folder itself. A corpus that is none of these is one line, naming `root`."""
    root = Path(root)
    for labels, data in (
        (root / "combined_windows.json", root),
        (root / "labels" / "combined_windows.json", root / "data"),
        (root.parent / "labels" / "combined_windows.json", root),
    ):
        if labels.is_file() and data.is_dir():
            return labels, data
    raise FileNotFoundError(
        f"no NAB corpus under {root}: expected combined_windows.json beside the category "
        "folders, or NAB's labels/ and data/ folders"
    )


def load_corpus(root: Path | str = DEFAULT_ROOT, cost: dict = STANDARD) -> list[NabFile]:
    """Every labelled series of the corpus at `root` (see `corpus_layout`), in sorted name order,
    with NAB's sweep scores. A series the labels name without its CSV is an error naming it."""
    labels_path, data = corpus_layout(root)
    labels = json.loads(labels_path.read_text())
    missing = sorted(name for name in labels if not (data / name).is_file())
    if missing:
        raise FileNotFoundError(
            f"{labels_path} names {len(missing)} series not under {data}, e.g. {missing[0]}"
        )
    files = []
    for name in sorted(labels):
        frame = pd.read_csv(data / name)
        ts = pd.to_datetime(frame["timestamp"]).to_numpy()
        windows = []
        for start, end in labels[name]:
            a = int(np.searchsorted(ts, np.datetime64(pd.Timestamp(start))))
            b = int(np.searchsorted(ts, np.datetime64(pd.Timestamp(end))))
            if a >= len(ts) or ts[a] != np.datetime64(pd.Timestamp(start)):
                raise ValueError(f"{name}: window start {start} is not a row timestamp")
            if b >= len(ts) or ts[b] != np.datetime64(pd.Timestamp(end)):
                raise ValueError(f"{name}: window end {end} is not a row timestamp")
            windows.append((a, b))
        windows.sort()
        f = NabFile(
            name, ts, frame["value"].to_numpy(np.float64), windows, probation_length(len(ts))
        )
        f.sweep, f.window_id = _sweep_scores(len(f), windows, cost)
        files.append(f)
    return files


@dataclass
class CorpusScore:
    threshold: float
    raw: float  # S
    null: float  # S_null
    perfect: float  # S_perfect
    tp: int = 0  # windows detected
    fn: int = 0  # windows missed
    fp: int = 0  # detections outside windows
    per_file: dict = field(default_factory=dict)  # name -> (S, n_windows, tp, fn, fp)

    @property
    def normalised(self) -> float:
        return normalised(self.raw, self.null, self.perfect)

    def subset(self, names) -> CorpusScore:
        """The same threshold's figures over a subset of files (e.g. one category)."""
        rows = [self.per_file[n] for n in names]
        n_win = sum(r[1] for r in rows)
        return CorpusScore(
            self.threshold,
            sum(r[0] for r in rows),
            -STANDARD["fnWeight"] * n_win,
            STANDARD["tpWeight"] * n_win,
            sum(r[2] for r in rows),
            sum(r[3] for r in rows),
            sum(r[4] for r in rows),
            {n: self.per_file[n] for n in names},
        )


def normalised(raw: float, null: float, perfect: float) -> float:
    if perfect == null:
        return float("nan")
    return 100.0 * (raw - null) / (perfect - null)


def score_detections(
    files: list[NabFile], detections: dict[str, np.ndarray], cost: dict = STANDARD, threshold=1.0
) -> CorpusScore:
    """Corpus score of given boolean detections per file (rows in probation are ignored)."""
    total, n_win_all, tp_all, fn_all, fp_all = 0.0, 0, 0, 0, 0
    per_file = {}
    for f in files:
        det = np.asarray(detections[f.name], dtype=bool).copy()
        det[: f.probation] = False
        s, tp, fn = 0.0, 0, 0
        for k in f.scored_windows:
            rows = det & (f.window_id == k)
            if rows.any():
                s += f.sweep[rows].max()
                tp += 1
            else:
                s -= cost["fnWeight"]
                fn += 1
        out = det & (f.window_id < 0)
        s += f.sweep[out].sum()
        fp = int(out.sum())
        n_win = len(f.scored_windows)
        per_file[f.name] = (s, n_win, tp, fn, fp)
        total += s
        n_win_all += n_win
        tp_all, fn_all, fp_all = tp_all + tp, fn_all + fn, fp_all + fp
    return CorpusScore(
        float(threshold),
        total,
        -cost["fnWeight"] * n_win_all,
        cost["tpWeight"] * n_win_all,
        tp_all,
        fn_all,
        fp_all,
        per_file,
    )


def corpus_sweep(
    files: list[NabFile], scores: dict[str, np.ndarray], cost: dict = STANDARD
) -> tuple[CorpusScore, np.ndarray, np.ndarray]:
    """NAB's threshold optimisation: the corpus score at every distinct score value (a detection
    is ``score >= threshold``), exactly, in O(n log n). Returns the best threshold's CorpusScore
    (with per-file figures) and the whole curve (thresholds descending, raw scores)."""
    thr_parts, delta_parts = [], []
    n_windows = 0
    for f in files:
        s = np.asarray(scores[f.name], dtype=np.float64)
        if len(s) != len(f):
            raise ValueError(f"{f.name}: {len(s)} scores for {len(f)} rows")
        live = np.arange(len(f)) >= f.probation
        outside = live & (f.window_id < 0)
        thr_parts.append(s[outside])
        delta_parts.append(f.sweep[outside])
        for k in f.scored_windows:
            rows = np.flatnonzero(live & (f.window_id == k))
            n_windows += 1
            # as the threshold falls, the window's value is the running max of the sweep scores of
            # its rows taken in order of decreasing anomaly score (ties: together)
            order = np.argsort(-s[rows], kind="stable")
            best = np.maximum.accumulate(f.sweep[rows][order])
            best = np.maximum(best, -cost["fnWeight"])
            prev = np.concatenate([[-cost["fnWeight"]], best[:-1]])
            thr_parts.append(s[rows][order])
            delta_parts.append(best - prev)
    thr = np.concatenate(thr_parts)
    delta = np.concatenate(delta_parts)
    order = np.argsort(-thr, kind="stable")
    thr, delta = thr[order], delta[order]
    base = -cost["fnWeight"] * n_windows
    cum = base + np.cumsum(delta)
    # the score at threshold t includes every row with score >= t: the last row of each tie group
    last = np.r_[thr[1:] != thr[:-1], True]
    curve_t = np.r_[np.inf, thr[last]]
    curve_s = np.r_[base, cum[last]]
    best = int(np.argmax(curve_s))  # first maximum = highest threshold among ties
    t = curve_t[best]
    dets = {f.name: np.asarray(scores[f.name], dtype=np.float64) >= t for f in files}
    result = score_detections(files, dets, cost, threshold=t)
    assert abs(result.raw - curve_s[best]) < 1e-6 * max(1.0, abs(result.raw)), (
        result.raw,
        curve_s[best],
    )
    return result, curve_t, curve_s


def category_table(files: list[NabFile], result: CorpusScore) -> dict[str, dict]:
    """Per category at the corpus threshold: normalised score (NaN where there is no window),
    raw S, detected / missed windows, FP detections."""
    cats: dict[str, list[str]] = {}
    for f in files:
        cats.setdefault(f.category, []).append(f.name)
    out = {}
    for cat, names in sorted(cats.items()):
        sub = result.subset(names)
        out[cat] = {
            "score": sub.normalised,
            "raw": sub.raw,
            "tp": sub.tp,
            "fn": sub.fn,
            "fp": sub.fp,
        }
    out["all"] = {
        "score": result.normalised,
        "raw": result.raw,
        "tp": result.tp,
        "fn": result.fn,
        "fp": result.fp,
    }
    return out


# -- reference detectors for the checks ------------------------------------------------------------
def null_scores(f: NabFile) -> np.ndarray:
    """NAB's null detector: the same score everywhere (its best is to detect nothing)."""
    return np.full(len(f), 0.5)


def perfect_scores(f: NabFile) -> np.ndarray:
    """A detection at the first scored row of every window and nowhere else."""
    s = np.zeros(len(f))
    for a, _ in f.windows:
        s[max(a, f.probation)] = 1.0
    return s


def windowed_gaussian_scores(f: NabFile, window: int = 6400, step: int = 100) -> np.ndarray:
    """NAB's windowed Gaussian (numenta/NAB `nab/detectors/gaussian`, latest version): 1 - the
    two-sided normal tail of each value under the mean and std of the previous values (the last
    `window`, refreshed every `step`), vectorised."""
    from scipy.special import erfc

    x = f.values.astype(np.float64)
    n = len(x)
    ref = x[: min(n, window)].mean()
    c1 = np.concatenate([[0.0], np.cumsum(x - ref)])
    c2 = np.concatenate([[0.0], np.cumsum((x - ref) ** 2)])
    t = np.arange(n)
    hi = np.where(t <= window, t, window + step * ((t - window) // step))
    lo = np.maximum(hi - window, 0)
    cnt = hi - lo
    with np.errstate(invalid="ignore", divide="ignore"):
        mean = (c1[hi] - c1[lo]) / cnt
        var = (c2[hi] - c2[lo]) / cnt - mean**2
    std = np.sqrt(np.maximum(var, 0.0))
    std = np.where(std == 0.0, 1e-6, std)
    z = np.abs(x - (mean + ref)) / std
    score = 1.0 - 0.5 * erfc(z / np.sqrt(2.0))
    score[cnt == 0] = 0.0
    return score
