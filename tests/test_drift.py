"""Score drift: the PSI statistic and its reservoirs, and drift events from the worker on the real
broker (a shifted stream raises them, a stationary one does not), continued across a restart."""

from __future__ import annotations

import dataclasses

import jsonschema
import numpy as np
import orjson
import pytest

from pipeline.events import DRIFT_SCHEMA, event_schema
from pipeline.worker.drift import BINS, DriftStage, _Reservoir, psi
from tests.worker_support import fleet

P = ("in", 0)


def test_psi_is_small_for_calibration_shares_and_large_for_a_shift():
    assert psi(np.full(BINS, 50)) == pytest.approx(0.0)
    shifted = np.array([0, 0, 0, 0, 0, 50, 50, 100, 150, 150])
    assert psi(shifted) > 1.0
    rng = np.random.default_rng(0)
    cal = rng.normal(size=5000)
    stage = DriftStage(cal, window=500, limit=0.25)
    assert np.bincount(stage.bins(cal), minlength=BINS) == pytest.approx(np.full(BINS, 500), abs=2)


def test_a_reservoir_holds_exactly_the_last_window_of_bins():
    rng = np.random.default_rng(1)
    reservoir, seen = _Reservoir(64), []
    for size in rng.integers(1, 90, size=60):
        bins = rng.integers(0, BINS, size=size).astype(np.uint8)
        reservoir.push(bins)
        seen.extend(bins.tolist())
        last = np.asarray(seen[-64:], dtype=np.uint8)
        assert reservoir.ordered().tolist() == last.tolist()
        assert reservoir.counts.tolist() == np.bincount(last, minlength=BINS).tolist()


def test_the_state_round_trips_and_pooled_counts_follow_forget():
    rng = np.random.default_rng(2)
    stage = DriftStage(rng.normal(size=1000), window=100, limit=0.25)
    for key in ("a", "b"):
        stage.update(key, P, stage.bins(rng.normal(size=150)), 0)
    stage.update("c", ("in", 1), stage.bins(rng.normal(2.0, size=120)), 0)
    saved = orjson.loads(orjson.dumps(stage.state(P)))
    other = DriftStage(rng.normal(size=1000), window=100, limit=0.25)
    other.edges = stage.edges
    other.restore(P, saved)
    assert other.state(P) == stage.state(P)
    assert other.pooled.sum() == 200
    stage.forget({("in", 1)})
    assert stage.pooled.tolist() == other.pooled.tolist()


def test_a_key_named_like_the_pooled_statistic_is_a_key_of_its_own():
    rng = np.random.default_rng(5)
    cal = rng.normal(size=2000)
    stage = DriftStage(cal, window=100, limit=0.25, key_limit=0.25)
    _, first = stage.update("*", P, stage.bins(rng.normal(3.0, size=100)), 10)
    stage.update("a", P, stage.bins(rng.normal(3.0, size=100)), 10)
    assert first is not None and first.key == "*" and not first.pooled
    assert stage.limit_of(first) == stage.key_limit
    _, pooled = stage._judge("*", stage, stage.pooled, 10)
    assert pooled is not None and pooled.pooled
    assert stage.pooled_drifting and stage.keys[P]["*"].drifting

    saved = orjson.loads(orjson.dumps(stage.state(P)))
    other = DriftStage(cal, window=100, limit=0.25, key_limit=0.25)
    other.restore(P, saved)
    assert other.keys[P]["*"].ordered().tolist() == stage.keys[P]["*"].ordered().tolist()
    assert other.keys[P]["*"].drifting and other.pooled_drifting
    assert other.pooled.tolist() == stage.pooled.tolist()
    # a record of a worker that knew no key `*`: the entry is the pooled flag alone
    older = DriftStage(cal, window=100, limit=0.25)
    older.restore(P, {"*": {"drifting": True}})
    assert older.pooled_drifting and "*" not in older.keys.get(P, {})


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    from tests.worker_support import train_fleet_detector

    return train_fleet_detector(tmp_path_factory.mktemp("fleet"))


def _stream(shift: float, seed: int):
    """Four machines' next readings, no injected anomaly; after the first third, every sensor
    moves by `shift` (in units of its spread over that third)."""
    from tests.worker_support import fleet

    stream = fleet(seed=seed, keys=4, readings_per_key=3000, anomalies=())
    values = stream.values.copy()
    third = len(values) // 3
    values[third:] += shift * values[:third].std(axis=0)
    return dataclasses.replace(stream, values=values)


def _drift_events(bootstrap: str, topic: str) -> list[dict]:
    from tests.kafka_support import consume

    events = [orjson.loads(r.value) for r in consume(bootstrap, topic, idle_s=2.0)]
    return [e for e in events if e["type"] == "aewatch.drift.v1"]


@pytest.mark.kafka
@pytest.mark.parametrize("shift", [0.0, 1.5], ids=["stationary", "shifted"])
def test_drift_events_fire_on_a_shifted_stream_and_not_on_a_stationary_one(
    kafka_bootstrap, create_topic, trained, shift
):
    from tests.helpers import metric_values
    from tests.kafka_support import build_app, names, produce, stream_items, worker_settings

    topics = names("drift")
    create_topic(topics["input"], partitions=2)
    settings = worker_settings(
        kafka_bootstrap,
        topics,
        trained.artifact_dir,
        events="alarms",
        drift_window=500,
        drift_psi=0.25,
        drift_key_psi=3.0,
    )
    items = stream_items(_stream(shift, seed=4))
    half = len(items) // 2
    # two lives of the worker: the reservoirs continue from the state topic
    for part in (items[:half], items[half:]):
        produce(kafka_bootstrap, topics["input"], part)
        with build_app(settings) as app:
            app.run()
            figures = metric_values(app.worker.metrics.exposition().decode())
    drift = _drift_events(kafka_bootstrap, topics["output"])
    validator = jsonschema.Draft202012Validator(event_schema(DRIFT_SCHEMA))
    for event in drift:
        validator.validate(event)
    pooled = figures[("aewatch_drift_psi", (("key", "*"),))]
    if shift == 0:
        assert drift == []
        assert pooled < 0.25
    else:
        keys = [e["data"]["key"] for e in drift]
        assert sorted(keys) == ["*", *(f"machine-00{i}" for i in range(4))]  # once each
        for event in drift:
            limit = 0.25 if event["data"]["key"] == "*" else 3.0
            assert event["data"]["limit"] == limit <= event["data"]["value"]
        assert pooled >= 0.25


def _psi_keys(worker) -> set[str]:
    return {
        sample.labels["key"]
        for metric in worker.metrics.registry.collect()
        if metric.name == "aewatch_drift_psi"
        for sample in metric.samples
    }


def test_a_revoked_partitions_keys_leave_the_per_key_drift_gauge(trained):
    """After a rebalance the keys' new owner reports their drift; the value this member last
    set would stay behind, stale, next to it (and a fleet whose keys come and go would grow
    the gauge without end)."""
    from tests.worker_support import FakeSource, partitioned, run_in_memory

    stream = fleet(seed=3, keys=4, readings_per_key=600, anomalies=())
    records = partitioned(stream, "readings", 2)
    worker, _, _ = run_in_memory(
        trained.detector, FakeSource(records, chunk=400), drift_window=50, events="alarms"
    )
    by_partition = {p: {r.key.decode() for r in rs} for p, rs in records.items()}
    assert (
        _psi_keys(worker) == {"*"} | by_partition[("readings", 0)] | by_partition[("readings", 1)]
    )
    worker.on_revoked({("readings", 1)})
    assert _psi_keys(worker) == {"*"} | by_partition[("readings", 0)]


def test_tied_calibration_scores_give_no_drift_for_scores_drawn_from_them():
    """60 % of the calibration scores equal (a model that reconstructs most normal windows
    exactly): the cut points repeat, the bins do not hold 10 % each, and scores drawn from the
    calibration sample itself read as PSI 3.2, far past any limit. Each bin is now judged
    against its calibration share."""
    rng = np.random.default_rng(0)
    calibration = np.concatenate([np.zeros(600), rng.exponential(size=400)])
    stage = DriftStage(calibration, window=500, limit=0.25)
    same = np.bincount(stage.bins(rng.choice(calibration, 500)), minlength=BINS)
    assert psi(same, stage.expected) < 0.05
    shifted = np.bincount(stage.bins(rng.exponential(size=500) + 1.0), minlength=BINS)
    assert psi(shifted, stage.expected) > 1.0
    untied = DriftStage(rng.exponential(size=1000), window=500, limit=0.25)
    assert untied.expected is None  # deciles: the equal shares, as before


def test_the_worker_exports_its_pooled_limit_beside_the_pooled_statistic(trained):
    """The alert rule compares the pooled PSI with the worker's own --drift-psi (it compared
    with a fixed 0.25: a worker run at 0.5 was alerted on at 0.25), and nothing is exported
    where the statistic is off."""
    from tests.worker_support import FakeSource, in_memory_worker

    source = FakeSource({("readings", 0): []})
    worker, _ = in_memory_worker(trained.detector, source, drift_window=50, drift_psi=0.5)
    text = worker.metrics.exposition().decode()
    assert 'aewatch_drift_psi_limit{key="*"} 0.5' in text
    off, _ = in_memory_worker(trained.detector, source)
    assert "aewatch_drift_psi_limit{" not in off.metrics.exposition().decode()
