"""How a time is read, one rule for the worker, tables of readings and the MLflow pyfunc.

A number is epoch milliseconds (a fraction cut toward zero); one that falls between 1970-01-02
and 1973 as milliseconds is epoch seconds and refused (`SECONDS_LIKE`). Text is ISO-8601: a whole
date, an optional time to any fraction, an offset in hours or hours and minutes (naive is UTC); a
year or a month alone, week dates, comma fractions and offsets with seconds are refused, as
pandas' ISO-8601 reader (tables) refuses or misreads them. Every time is held to the millisecond,
cut toward zero, before 1970 too.
"""

from __future__ import annotations

import math
import re
from datetime import UTC, datetime, timedelta

import numpy as np

__all__ = [
    "BEYOND_YEARS",
    "MS_RANGE",
    "SECONDS",
    "SECONDS_LIKE",
    "cut_to_ms",
    "parse_timestamp_ms",
    "seconds_like",
    "too_short",
]

# Epoch milliseconds from 0001-01-01 up to (not including) 10000-01-01: the times an event can
# carry (RFC 3339 has four-digit years, and so has Python's datetime).
MS_RANGE = (-62_135_596_800_000, 253_402_300_800_000)
# A number as `ts` is epoch milliseconds; one that falls between 1970-01-02 and 1973 is epoch
# seconds (the same rule as training's for numeric times). A time given as text or as an Arrow
# timestamp says what it is and is taken whatever its year.
SECONDS_LIKE = (100_000_000, 100_000_000_000)
BEYOND_YEARS = ("bad_timestamp", "'ts' in epoch ms is outside the years 1 to 9999")
SECONDS = ("bad_timestamp", "'ts' reads as 1970-1973 in epoch ms: epoch seconds? send milliseconds")

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_MICROSECOND = timedelta(microseconds=1)
_OFFSET_SECONDS = re.compile(r"[+-]\d\d:?\d\d:?\d\d").search  # past the date's 8 characters


def parse_timestamp_ms(value) -> int:
    """Epoch milliseconds from epoch ms (int or float) or an ISO-8601 string (UTC if naive)."""
    if isinstance(value, bool):
        raise ValueError("a boolean is not a timestamp")
    if isinstance(value, int | float):
        if not math.isfinite(value):
            raise ValueError("non-finite timestamp")
        if not MS_RANGE[0] <= value < MS_RANGE[1]:
            raise ValueError(f"epoch ms {value} is outside the years 1 to 9999")
        return int(value)
    if isinstance(value, str):
        text = value.strip()
        if "W" in text or "," in text:  # what tables of readings cannot read either
            raise ValueError(f"{value!r}: ISO week dates and comma fractions are not taken")
        if text.endswith("Z"):
            text = text[:-1] + "+00:00"
        if _OFFSET_SECONDS(text, 8):
            raise ValueError(f"{value!r}: a UTC offset with seconds is not taken")
        parsed = datetime.fromisoformat(text)
        if parsed.tzinfo is None:
            parsed = parsed.replace(tzinfo=UTC)
        # in whole microseconds, not float seconds (x 1000 those miss the millisecond now and then)
        micros = (parsed - _EPOCH) // _MICROSECOND
        return micros // 1000 if micros >= 0 else -(-micros // 1000)  # toward zero, as a float
    raise ValueError(f"unsupported timestamp type {type(value).__name__}")


def seconds_like(ts):
    """Which of these numeric epoch-ms times (an array, or one number) read as epoch seconds
    (`SECONDS_LIKE`)."""
    return (ts >= SECONDS_LIKE[0]) & (ts < SECONDS_LIKE[1])


def too_short(texts) -> np.ndarray:
    """Which of these time texts (a pandas Series) hold less than a whole date: a year or a
    month alone is no time of a reading; pandas reads one as its first day, the worker not."""
    return texts.astype(str).str.strip().str.len().to_numpy() < len("YYYYMMDD")


def cut_to_ms(times: np.ndarray) -> np.ndarray:
    """datetime64[ns] times cut to the millisecond toward zero, as the worker reads a time of
    any form (a table holds what the worker would; NaT stays NaT)."""
    ns = times.astype("datetime64[ns]").view(np.int64)
    cut = (ns - np.fmod(ns, 1_000_000)).view("datetime64[ns]")
    cut[np.isnat(times)] = np.datetime64("NaT")
    return cut
