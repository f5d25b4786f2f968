"""Calendar inputs: the phase of the day and of the week as (sin, cos) columns of a series.

A model that sees only a short window cannot tell 3 a.m. from 3 p.m.; on a stream with a daily
cycle some phases then look anomalous however normal they are. With calendar inputs the detector's
features end with these columns, computed from each reading's timestamp (UTC) the same way by the
training job, batch scoring and the worker: readings carry only the data features.

The `auto` rule of `aewatch train --calendar auto`: a period's phase becomes an input only when
the training rows cover at least two of its periods (time of day from 2 days, day of week from 14
days); a phase the model never saw would look anomalous.
"""

from __future__ import annotations

import numpy as np

__all__ = ["CALENDAR_KINDS", "auto_calendar", "calendar_columns", "calendar_names"]

DAY_MS = 86_400_000
PERIOD_MS = {"tod": DAY_MS, "dow": 7 * DAY_MS}
CALENDAR_KINDS = tuple(PERIOD_MS)


def calendar_names(kinds: tuple[str, ...]) -> tuple[str, ...]:
    """The feature names the kinds add, in order: `tod_sin`, `tod_cos`, `dow_sin`, `dow_cos`."""
    return tuple(f"{kind}_{part}" for kind in kinds for part in ("sin", "cos"))


def calendar_columns(ts_ms: np.ndarray, kinds: tuple[str, ...]) -> np.ndarray:
    """[N, 2 * len(kinds)] float64 columns of epoch-ms timestamps."""
    ts = np.asarray(ts_ms, dtype=np.int64)
    columns = []
    for kind in kinds:
        period = PERIOD_MS[kind]
        phase = (2.0 * np.pi / period) * np.mod(ts, period).astype(np.float64)
        columns += [np.sin(phase), np.cos(phase)]
    return np.stack(columns, axis=1) if columns else np.zeros((len(ts), 0))


def auto_calendar(span_ms: int) -> tuple[str, ...]:
    """The kinds that training rows covering `span_ms` support (at least two periods each)."""
    return tuple(kind for kind, period in PERIOD_MS.items() if span_ms >= 2 * period)
