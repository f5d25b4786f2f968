"""Per-key baselines of a stream: which center and scale each key's windows are scored with.

The same object serves the worker (one per partition, its state in the state topic) and batch
scoring (`pipeline.batch`), so a file scored per key and the same readings streamed agree.

- A key seen in training (the detector's `KeyStats`) is scored with its training statistics.
- A key not seen in training, with `warmup` on, learns its baseline from its first
  `warmup_readings` readings (10 windows' worth unless set), counted through its windows so that a
  replay never counts a reading twice: all W readings of its first window, then the newest
  min(S, W) of each next. Windows that end inside the warm-up are not scored and cannot alarm.
  Then mean_k is the warm-up mean and, by `scale_rule`:

      ratio  (default): scale_k = sd_warm / rho (rho at the warm-up's span, from the manifest):
                        a short warm-up sees only short-span spread, rho turns it into the
                        long-run spread the model's scaler was fitted on;
      center:           scale_k = the detector's scale (only the level is the key's own);

  floored at 1 % of the detector's scale (a sensor constant during the warm-up). Calendar inputs
  (functions of the time) keep the detector's center and scale, here and in level following.
- Any other key (warm-up off) is scored with the detector's scaler, as without baselines.

Level following (`half_life` > 0 readings, off by default): mean_k moves by an exponentially
weighted mean of the readings of windows judged normal (not flagged), half of its weight older than
`half_life` readings. The readings enter accumulators as their windows are decided and are folded
into mean_k at the end of each block of `FOLLOW_BLOCK` scored windows: the windows of block b are
scored with the baseline as it stood after block b - 1, so results do not depend on how windows
were batched (`take` never plans a key's windows past the end of its current block). The scale is
never followed.

State per key (`state`, JSON with base64 little-endian arrays): a finished baseline is its count,
mean and scale as float32 (F = 8: about 110 bytes); following adds the block position, a float64
accumulator and its decay (about 120 bytes more); a warm-up in progress keeps a float64 running
mean and sum of squares. Values are rounded to float32 where they are set, so a restart from the
state continues exactly. A key of the training set also saves a checksum of its training
statistics: a record written under another version (retrained on the key, or no longer trained on
it) is not restored, and the key starts as a hot reload would start it.
"""

from __future__ import annotations

import base64
import zlib
from dataclasses import dataclass

import numpy as np

from pipeline.detector.baselines import KeyStats
from pipeline.errors import ConfigError

__all__ = [
    "FOLLOW_BLOCK",
    "SCALE_RULES",
    "WARMUP_WINDOWS",
    "BaselineConfig",
    "KeyBaselines",
    "check_baselines",
    "check_following",
]

SCALE_RULES = ("ratio", "center")
WARMUP_WINDOWS = 10  # default warm-up: ten windows' worth of readings
FOLLOW_BLOCK = 64  # scored windows between two folds of level following
MIN_SCALE_RATIO = 0.01


@dataclass(frozen=True)
class BaselineConfig:
    """How keys' baselines are kept (the worker's `baselines` group builds one)."""

    warmup: bool = False
    warmup_readings: int = 0  # 0: WARMUP_WINDOWS windows' worth
    scale_rule: str = "ratio"
    half_life: float = 0.0  # readings; 0: no level following

    def __post_init__(self) -> None:
        if self.scale_rule not in SCALE_RULES:
            raise ConfigError("baseline_scale", f"must be one of {', '.join(SCALE_RULES)}")
        if self.warmup_readings < 0 or self.half_life < 0:
            raise ConfigError("baseline_warmup", "warm-up and half-life must be >= 0")

    @property
    def follow_rate(self) -> float:
        return 0.0 if not self.half_life else 1.0 - 0.5 ** (1.0 / self.half_life)


def _pack(array: np.ndarray, dtype: str) -> str:
    return base64.b64encode(np.ascontiguousarray(array, dtype=dtype).tobytes()).decode()


def _unpack(text: str, dtype: str) -> np.ndarray:
    return np.frombuffer(base64.b64decode(text), dtype=dtype).astype(np.float64)


class _Key:
    __slots__ = ("acc", "block_left", "decay", "mean", "n", "planned", "scale", "wm2", "wmean")

    def __init__(self, n_features: int) -> None:
        self.n = 0  # readings taken by the warm-up
        self.wmean = np.zeros(n_features)  # warm-up running mean and sum of squares (float64)
        self.wm2 = np.zeros(n_features)
        self.mean: np.ndarray | None = None  # the baseline, float32 values held as float64
        self.scale: np.ndarray | None = None
        self.block_left = FOLLOW_BLOCK
        self.acc = np.zeros(n_features)  # the block's following accumulator and decay
        self.decay = 1.0
        self.planned = 0  # windows taken for scoring whose decisions are not back yet


def check_following(config: BaselineConfig, detector) -> None:
    """Level following moves keys' own baselines: refuse it where no key would have one (no
    warm-up, a detector trained without per-key statistics), as it would silently do nothing."""
    trained = detector.baselines is not None and bool(detector.baselines.keys)
    if config.half_life and not (config.warmup or trained):
        raise ConfigError(
            "level_half_life",
            "follows per-key baselines: give --key-baselines too (or serve a detector trained "
            "with --key-baselines); without them there is no level to follow",
        )


def check_baselines(detector) -> None:
    """`ConfigError` unless keys of `detector` can have their own baselines: a series detector
    with a standard scaler (or none)."""
    if detector.input.kind != "series" or detector.scaler.kind not in ("standard", "none"):
        raise ConfigError(
            "key_baselines", "per-key baselines need a series detector with a standard scaler"
        )


class KeyBaselines:
    """The baselines of the keys of one partition (worker) or one file (batch)."""

    def __init__(self, config: BaselineConfig, detector) -> None:
        check_baselines(detector)
        self.config = config
        spec = detector.input.window
        self.length, self.stride = spec.length, spec.stride
        self.c = np.asarray(detector.scaler.center, np.float64)
        self.s = np.asarray(detector.scaler.scale, np.float64)
        stats = detector.baselines or KeyStats()
        self.warmup_n = config.warmup_readings or WARMUP_WINDOWS * spec.length
        self.rho = stats.rho_for(self.warmup_n, len(self.c))
        self.trained = stats.keys
        self.marks: dict[str, str] = {}  # `_trained_mark` of each trained key, once
        self.keys: dict[str, _Key] = {}
        # calendar inputs are functions of the time, not a machine's level: they keep the
        # detector's center and scale through a warm-up and level following
        self.sensors = np.ones(len(self.c), dtype=bool)
        self.sensors[len(self.c) - len(detector.input.calendar) :] = False

    def _get(self, key: str) -> _Key:
        st = self.keys.get(key)
        if st is None:
            st = self.keys[key] = _Key(len(self.c))
            if key in self.trained:
                mean, scale, _ = self.trained[key]
                st.mean = np.asarray(mean, np.float32).astype(np.float64)
                st.scale = np.asarray(scale, np.float32).astype(np.float64)
        return st

    def ready(self, key: str) -> bool:
        return self._get(key).mean is not None

    # -- planning a batch ------------------------------------------------------------------------
    def take(self, key: str, windows: np.ndarray) -> tuple[int, int]:
        """A key's next windows (time order): (how many belong to its warm-up, how many of the
        rest may be scored now). The warm-up takes its windows here; with level following the
        rest stops at the end of the key's current block (the others wait for the next pass)."""
        st = self._get(key)
        warm = 0
        if st.mean is None:
            if not self.config.warmup:
                return 0, len(windows)
            warm = self._warm(st, windows)
        now = len(windows) - warm
        if self.config.follow_rate and st.mean is not None:
            now = min(now, st.block_left - st.planned)
            st.planned += now
        return warm, now

    def _warm(self, st: _Key, windows: np.ndarray) -> int:
        for i, window in enumerate(windows):
            rows = window if st.n == 0 else window[-min(self.stride, self.length) :]
            for row in np.asarray(rows, np.float64):  # Welford, bounded by the warm-up
                st.n += 1
                delta = row - st.wmean
                st.wmean += delta / st.n
                st.wm2 += delta * (row - st.wmean)
            if st.n >= self.warmup_n:
                self._finish_warmup(st)
                return i + 1
        return len(windows)

    def _finish_warmup(self, st: _Key) -> None:
        sd = np.sqrt(st.wm2 / st.n)
        scale = sd / self.rho if self.config.scale_rule == "ratio" else self.s.copy()
        scale = np.where(sd > 0, np.maximum(scale, MIN_SCALE_RATIO * self.s), self.s)
        st.mean = _f32(np.where(self.sensors, st.wmean, self.c))
        st.scale = _f32(np.where(self.sensors, scale, self.s))
        st.wmean, st.wm2 = np.zeros_like(st.wmean), np.zeros_like(st.wm2)

    def scaling(self, key: str) -> tuple[np.ndarray, np.ndarray]:
        """(center, scale) a key's windows are scored with now."""
        st = self._get(key)
        if st.mean is None:
            return self.c, self.s
        return st.mean, st.scale

    # -- decisions back: level following --------------------------------------------------------
    def follow(self, key: str, windows: np.ndarray, normal: np.ndarray) -> None:
        """The decisions of windows `take` planned (time order): the readings of normal ones
        enter the block's accumulator, which is folded into the mean at the block's end."""
        rate = self.config.follow_rate
        st = self._get(key)
        if not rate or st.mean is None:
            return
        st.planned = max(0, st.planned - len(windows))
        keep = 1.0 - rate
        newest = min(self.stride, self.length)
        for window, ok in zip(windows, normal, strict=True):
            if ok:
                for row in np.asarray(window[-newest:], np.float64):
                    st.acc = keep * st.acc + rate * row
                    st.decay *= keep
            st.block_left -= 1
            if st.block_left == 0:
                if st.decay < 1.0:
                    followed = st.decay * st.mean + st.acc
                    st.mean = _f32(np.where(self.sensors, followed, st.mean))
                st.acc, st.decay, st.block_left = np.zeros_like(st.acc), 1.0, FOLLOW_BLOCK

    # -- state -----------------------------------------------------------------------------------
    def _trained_mark(self, key: str) -> str | None:
        """Which training statistics a key of the training set started from (None for a key
        the detector was not trained on): a record of another version's are not restored."""
        if key not in self.trained:
            return None
        mark = self.marks.get(key)
        if mark is None:
            mean, scale, _ = self.trained[key]
            packed = np.asarray([*mean, *scale], "<f4").tobytes()
            mark = self.marks[key] = f"{zlib.crc32(packed):08x}"
        return mark

    def state(self, key: str) -> dict:
        st = self._get(key)
        mark = self._trained_mark(key)
        if st.mean is None:
            return {"n": st.n, "wm": _pack(st.wmean, "<f8"), "w2": _pack(st.wm2, "<f8")}
        out = {"n": st.n, "m": _pack(st.mean, "<f4"), "s": _pack(st.scale, "<f4")}
        if mark is not None:
            out["t"] = mark
        if self.config.follow_rate:
            out["b"] = st.block_left
            if st.decay < 1.0:
                out["a"], out["d"] = _pack(st.acc, "<f8"), st.decay
        return out

    def restore(self, key: str, entry: dict) -> None:
        """A key's saved state, unless it was saved under other statistics than this detector
        gives the key (a version trained on it anew, or one that no longer was): the key then
        starts as `use` would have it (its training statistics, or a warm-up)."""
        if entry.get("t") != self._trained_mark(key):
            return
        st = self.keys[key] = _Key(len(self.c))
        st.n = int(entry.get("n", 0))
        if "m" in entry:
            st.mean, st.scale = _unpack(entry["m"], "<f4"), _unpack(entry["s"], "<f4")
            if len(st.mean) != len(self.c):  # another detector's width: learn again
                del self.keys[key]
                return
            st.block_left = int(entry.get("b", FOLLOW_BLOCK))
            if "a" in entry:
                st.acc, st.decay = _unpack(entry["a"], "<f8"), float(entry["d"])
        elif "wm" in entry:
            st.wmean, st.wm2 = _unpack(entry["wm"], "<f8"), _unpack(entry["w2"], "<f8")

    def use(self, detector) -> None:
        """A new detector version: its training keys take their new statistics; keys that
        learned theirs in a warm-up keep them (they are in the readings' own units)."""
        fresh = KeyBaselines(self.config, detector)
        learned = {
            k: v for k, v in self.keys.items() if k not in self.trained and k not in fresh.trained
        }
        self.__dict__.update(fresh.__dict__)
        self.keys.update(learned)


def _f32(values: np.ndarray) -> np.ndarray:
    return np.asarray(values, np.float32).astype(np.float64)
