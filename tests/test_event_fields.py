"""Fields of window events worked out for a whole batch at once: the same as the one-at-a-time
definitions (uuid5 ids, RFC 3339 times, a window's top features and steps)."""

import uuid
from datetime import UTC, datetime, timedelta

import numpy as np
import pytest

from pipeline.detector import InputSpec, WindowSpec
from pipeline.detector.scoring import Scores
from pipeline.events import (
    _NAMESPACE,
    ModelIdentity,
    drift_event_id,
    event_id,
    event_ids,
    iso_ms,
    iso_ms_many,
)
from pipeline.modalities.readings import MS_RANGE
from pipeline.modalities.series import TOP_FEATURES, TOP_STEPS, SeriesModality


def test_event_ids_are_the_uuid5_of_model_key_and_window_end():
    rng = np.random.default_rng(3)
    model = ModelIdentity("pümp-ae", "12")
    keys = [f"machine-{i}-ß" for i in rng.integers(0, 10**6, 500)]
    ends = rng.integers(MS_RANGE[0], MS_RANGE[1], 500).tolist()
    expected = [
        str(uuid.uuid5(_NAMESPACE, f"{model.name}\x1f{model.version}\x1f{key}\x1f{end}"))
        for key, end in zip(keys, ends, strict=True)
    ]
    assert event_ids(model, keys, ends) == expected
    assert [event_id(model, k, e) for k, e in zip(keys, ends, strict=True)] == expected
    assert event_ids(model, [], []) == []
    drift = f"drift\x1f{model.name}\x1f{model.version}\x1f*\x1f5"
    assert drift_event_id(model, "*", 5, pooled=True) == str(uuid.uuid5(_NAMESPACE, drift))
    assert drift_event_id(model, "k", 5) == str(uuid.uuid5(_NAMESPACE, drift.replace("*", "k")))
    # a key named `*` crossing with the pooled statistic is a second event, not a repeat of it
    assert drift_event_id(model, "*", 5) != drift_event_id(model, "*", 5, pooled=True)


def test_times_are_exact_milliseconds_over_the_whole_range():
    rng = np.random.default_rng(4)
    ms = np.concatenate(
        [
            rng.integers(MS_RANGE[0], MS_RANGE[1], 20_000),
            [MS_RANGE[0], MS_RANGE[1] - 1, -1, 0, 999, 1_767_225_600_123, 9_000_000_000_081],
        ]
    )
    epoch = datetime(1970, 1, 1, tzinfo=UTC)
    expected = []
    for m in ms.tolist():
        d = epoch + timedelta(milliseconds=m)
        expected.append(
            f"{d.year:04d}-{d.month:02d}-{d.day:02d}T{d.hour:02d}:{d.minute:02d}:{d.second:02d}"
            f".{m % 1000:03d}Z"
        )
    assert iso_ms_many(ms) == expected
    assert [iso_ms(int(m)) for m in ms] == expected
    # (float seconds would give .080 for the last one)
    assert iso_ms(9_000_000_000_081) == "2255-03-14T16:00:00.081Z"


@pytest.mark.parametrize("terms", [False, True], ids=["error score", "terms score"])
def test_a_batch_of_event_details_is_each_window_on_its_own(terms):
    rng = np.random.default_rng(5)
    n, length, features = 40, 16, 6
    names = tuple(f"s{j}" for j in range(features))
    per_feature = rng.random((n, features)).astype(np.float32)
    per_feature[::4, 2] = per_feature[::4, 4]  # ties keep the features' order
    per_step = rng.random((n, length)).astype(np.float32)
    per_step[1::3, 7] = per_step[1::3, 3]
    scored = Scores(
        scores=per_feature.sum(1),
        per_feature=per_feature,
        per_step=per_step,
        terms=rng.integers(0, 4, (n, features)) if terms else None,
        term_names=("error", "variance", "roughness", "centroid") if terms else (),
    )
    modality = SeriesModality(InputSpec("series", names, WindowSpec(length, 4)))
    rows = np.array([0, 3, 4, 9, 17, 39])
    starts = rng.integers(0, 2 * 10**12, len(rows))
    ends = starts + 15_000
    details = modality.event_details(scored, rows, starts, ends)
    assert len(details) == len(rows)
    for detail, i, start, end in zip(details, rows, starts, ends, strict=True):
        top = sorted(range(features), key=lambda f: (-per_feature[i, f], f))[:TOP_FEATURES]
        steps = sorted(range(length), key=lambda s: (-per_step[i, s], s))[:TOP_STEPS]
        expected_top = []
        for f in top:
            item = {"name": names[f], "error": float(per_feature[i, f])}
            if terms:
                item["term"] = scored.term_names[int(scored.terms[i, f])]
            expected_top.append(item)
        assert detail == {
            "window": {
                "start": iso_ms(int(start)),
                "end": iso_ms(int(end)),
                "length": length,
                "stride": 4,
            },
            "top_features": expected_top,
            "top_steps": [{"index": s, "error": float(per_step[i, s])} for s in steps],
        }
