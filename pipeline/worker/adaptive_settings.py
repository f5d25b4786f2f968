"""The worker's per-key adaptive stage settings (see `pipeline.detector.adaptive`), also those of
`aewatch score --stream` and `evaluate --stream`, which replay a file through the same stage."""

from __future__ import annotations

from dataclasses import dataclass

from pipeline.detector.adaptive import AdaptiveSettings, RuleSettings
from pipeline.errors import ConfigError
from pipeline.settings import check, setting
from pipeline.worker.baselines import ADAPTIVE_COLUMNS, COLUMNS_HELP

__all__ = ["ALARM_SOURCES", "STAGE_MODES", "AdaptiveStageSettings"]

STAGE_MODES = ("on", "off")
ALARM_SOURCES = ("raw", "adaptive")
MAX_COUNT = 2**53  # window counts: exact as floats, far inside the int64 counters


@dataclass(frozen=True)
class AdaptiveStageSettings:
    """The per-key adaptive stage (see `pipeline.detector.adaptive`) and what decides a window."""

    adaptive_stage: str = setting(
        "per-key adaptive scoring: on (events carry surprise and likelihood) or off",
        "on",
        choices=STAGE_MODES,
    )
    alarm_on: str = setting(
        "what makes a window anomalous: raw (score above the calibrated threshold) or adaptive "
        "(surprise at or above --adaptive-threshold, or beyond the key's range)",
        "raw",
        choices=ALARM_SOURCES,
    )
    adaptive_columns: str = setting(COLUMNS_HELP, "score", choices=ADAPTIVE_COLUMNS)
    adaptive_short: int = setting(
        "windows in a key's short-term mean of scores", 30, minimum=1, maximum=MAX_COUNT
    )
    adaptive_long: int = setting(
        "windows in a key's long-term mean and variance", 1000, minimum=1, maximum=MAX_COUNT
    )
    adaptive_warmup: int = setting(
        "first windows of a key that only learn (surprise 0)", 200, minimum=0, maximum=MAX_COUNT
    )
    adaptive_clip: float = setting("winsorise the long-term estimate's input at this many sd", 3.0)
    adaptive_min_std: float = setting(
        "floor on the long-term sd, in units of the model's median calibration score", 0.1
    )
    adaptive_threshold: float = setting(
        "surprise (-log10 of the tail probability) at which a window is anomalous and the "
        "detection rule fires",
        5.0,
    )
    adaptive_freeze: float = setting(
        "windows at or above this surprise do not teach a key's long-term estimate (0: all do)",
        0.0,
        minimum=0,
    )
    adaptive_max_freeze: int = setting(
        "... for at most this many in a row", 1000, minimum=0, maximum=MAX_COUNT
    )
    adaptive_range: float = setting(
        "a window beyond its key's range so far by more than this share of it is anomalous at "
        "any surprise (0: off; 0.05 as in Numenta's NAB detector)",
        0.05,
        minimum=0,
    )
    adaptive_rearm: float = setting(
        "the rule re-arms once the surprise stays below this share of the threshold ...", 0.9
    )
    adaptive_quiet: int = setting("... for this many windows ...", 10, minimum=1, maximum=MAX_COUNT)
    adaptive_cooldown: int = setting(
        "... and more than this many windows passed since its last detection",
        100,
        minimum=0,
        maximum=MAX_COUNT,
    )

    def __post_init__(self) -> None:
        check(self)
        for name in ("adaptive_clip", "adaptive_min_std", "adaptive_threshold"):
            if not getattr(self, name) > 0:
                raise ConfigError(name, f"must be > 0, got {getattr(self, name)}")
        if not 0 < self.adaptive_rearm <= 1:
            raise ConfigError("adaptive_rearm", f"must be in (0, 1], got {self.adaptive_rearm}")
        if self.alarm_on == "adaptive" and not self.enabled:
            raise ConfigError("alarm_on", "adaptive needs --adaptive-stage on")

    @property
    def enabled(self) -> bool:
        return self.adaptive_stage == "on"

    def stage(self) -> AdaptiveSettings:
        return AdaptiveSettings(
            short=self.adaptive_short,
            long=self.adaptive_long,
            warmup=self.adaptive_warmup,
            clip=self.adaptive_clip,
            min_std=self.adaptive_min_std,
            freeze=self.adaptive_freeze,
            max_freeze=self.adaptive_max_freeze,
            range_tolerance=self.adaptive_range,
        )

    def rule(self) -> RuleSettings:
        return RuleSettings(
            threshold=self.adaptive_threshold,
            rearm=self.adaptive_rearm,
            quiet=self.adaptive_quiet,
            cooldown=self.adaptive_cooldown,
        )
