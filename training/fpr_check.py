"""When is a held-out false-positive rate far above its target? `train` warns, `promote` refuses.

Windows cut with stride S < W overlap: neighbours share W - S readings, so their exceedances come
in runs and n windows carry far fewer than n independent trials. An exact binomial interval on n
windows is then too narrow: a well-calibrated detector looks significantly above its target much
more often than 5 % of the time (simulated with stride-1 windows and the split sizes of a SKAB
training run: 34 % of calibrated detectors at a 1 % target).

Rule: n_eff = max(1, floor(n S / W)) (the non-overlapping windows the split holds; n for images
and for S >= W), k_eff = round(rate n_eff); the rate is far above the target when the exact
(Clopper-Pearson) lower bound at 95 % of k_eff / n_eff exceeds it. Simulated, it fires for 1.2 %
of calibrated detectors, and for 11 %, 24 % and 55 % of those whose true rate is 3, 5 and 10
times the target.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

__all__ = ["FprCheck", "check_fpr", "effective_n"]


@dataclass(frozen=True)
class FprCheck:
    rate: float
    n: int
    n_eff: int
    k_eff: int
    low: float
    high: float
    target: float
    far_above: bool

    def message(self) -> str:
        return (
            f"the held-out false-positive rate {self.rate:.2%} is far above the target "
            f"{self.target:.2%}: its 95% lower bound is {self.low:.2%} (exact interval on "
            f"{self.n_eff} effectively independent windows of {self.n}). The threshold will "
            "raise far more alarms than asked for; the usual cause is a change between the "
            "training and the test period: train on data that covers it, or recalibrate"
        )

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> FprCheck:
        return cls(**{k: data[k] for k in cls.__dataclass_fields__})


def effective_n(n: int, window: int, stride: int) -> int:
    """Non-overlapping windows among `n` windows of `window` readings cut every `stride`."""
    if stride >= window:
        return max(1, n)
    return max(1, (n * stride) // window)


def clopper_pearson(k: int, n: int, confidence: float = 0.95) -> tuple[float, float]:
    from scipy import stats

    alpha = 1.0 - confidence
    low = 0.0 if k == 0 else float(stats.beta.ppf(alpha / 2, k, n - k + 1))
    high = 1.0 if k == n else float(stats.beta.ppf(1 - alpha / 2, k + 1, n - k))
    return low, high


def check_fpr(
    false_positives: int, n: int, target: float, window: int = 1, stride: int = 1
) -> FprCheck:
    """The rule of the module notes for `false_positives` of `n` windows."""
    rate = false_positives / n
    n_eff = effective_n(n, window, stride)
    k_eff = int(round(rate * n_eff))
    low, high = clopper_pearson(k_eff, n_eff)
    return FprCheck(rate, n, n_eff, k_eff, low, high, float(target), low > target)


def window_of(detector) -> tuple[int, int]:
    """(W, S) of a series detector; (1, 1) for images (every image is its own trial)."""
    spec = detector.input.window
    return (spec.length, spec.stride) if spec is not None else (1, 1)
