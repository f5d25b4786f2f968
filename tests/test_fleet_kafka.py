"""A fleet through the real broker: machines at their own levels, trained with `aewatch train`
on one machine of their kind. With per-key baselines no key alarms at its start, and the
injected episodes are alarmed; with one scaler for all keys, every key alarms at once."""

from __future__ import annotations

import orjson
import pandas as pd
import pytest

from pipeline.cli import main
from tests.fleet_support import fleet_frame, machine, records_of, with_episodes
from tests.kafka_support import consume, produce, run_worker, worker_settings
from tests.kafka_support import names as topic_names

pytestmark = pytest.mark.kafka

LEVELS = {"m-cold": -12.0, "m-cool": -4.0, "m-mid": 0.0, "m-warm": 6.0, "m-hot": 15.0}
CLEAN = "m-mid"  # no episode
EPISODE_AT, EPISODE_LEN, READINGS = 1100, 150, 1600


@pytest.fixture(scope="module")
def fleet():
    series, spans = {}, {}
    for i, (key, level) in enumerate(LEVELS.items()):
        values = machine(9, READINGS, level=level, skip=3000)  # right after its history
        if key != CLEAN:
            values, _ = with_episodes(values, [EPISODE_AT], EPISODE_LEN, size=5.0, feature=i % 4)
            spans[key] = (EPISODE_AT, EPISODE_AT + EPISODE_LEN - 1)
        series[key] = values
    return series, spans


@pytest.fixture(scope="module")
def detector_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("fleet-train")
    history = fleet_frame({"ref": machine(9, 3000, level=0.0)}).drop(columns="machine")
    history.to_csv(root / "history.csv", index=False)
    argv = (
        f"train --data {root / 'history.csv'} --time-col ts --epochs 12 --min-steps 0 "
        f"--patience 0 --hidden 32 --code-size 4 --target-fpr 0.002 --device cpu "
        f"--out {root / 'det'} "
        f"--tracking-uri sqlite:///{root / 'mlflow.db'} --json"
    )
    assert main(argv.split()) == 0
    return root / "det"


def _opened(bootstrap: str, topic: str) -> dict[str, list[int]]:
    """Per key: the reading index (seconds from its start) at which each alarm opened."""
    out: dict[str, list[int]] = {}
    start = pd.Timestamp(fleet_frame({"k": machine(0, 1, level=0.0)})["ts"].iloc[0])
    for record in consume(bootstrap, topic):
        event = orjson.loads(record.value)
        if event["data"].get("state") == "opened":
            at = int((pd.Timestamp(event["time"]).tz_localize(None) - start).total_seconds())
            out.setdefault(event["data"]["key"], []).append(at)
    return out


def test_keys_at_their_own_levels_alarm_at_their_episodes_not_at_their_start(
    kafka_bootstrap, create_topic, fleet, detector_dir
):
    series, spans = fleet
    names = topic_names("fleet")
    create_topic(names["input"], partitions=2)
    records = records_of(series, names["input"], 2)
    produce(
        kafka_bootstrap,
        names["input"],
        [(r.key, r.value) for part in records.values() for r in part],
    )
    settings = worker_settings(
        kafka_bootstrap, names, detector_dir, events="alarms", key_baselines=True
    )
    _, stats = run_worker(settings)
    assert stats.records_in == sum(len(v) for v in series.values())
    opened = _opened(kafka_bootstrap, names["output"])
    for key in LEVELS:
        first, last = spans.get(key, (None, None))
        at = opened.get(key, [])
        if first is None:
            assert at == [], f"{key} has no episode but alarmed at {at}"
            continue
        assert any(first <= t <= last for t in at), f"{key}: episode not alarmed ({at})"
        assert all(t >= first for t in at), f"{key} alarmed before its episode ({at})"

    # the same stream with one scaler for all keys: the far keys alarm from their first windows
    before = {**topic_names("fleet-before"), "input": names["input"]}
    _, _ = run_worker(worker_settings(kafka_bootstrap, before, detector_dir, events="alarms"))
    opened = _opened(kafka_bootstrap, before["output"])
    assert all(min(opened.get(k, [10**9])) < 200 for k in ("m-cold", "m-hot")), opened
