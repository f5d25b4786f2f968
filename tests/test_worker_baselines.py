"""The worker's per-key baselines in memory: warm-ups, batch and stream agreeing, restarts."""

from __future__ import annotations

import numpy as np
import orjson
import pandas as pd
import pytest

from pipeline.batch import score_window_set
from pipeline.detector import cut_windows
from pipeline.worker.state import MemoryStateStore, decode_state
from tests.fleet_support import fleet_frame, machine, records_of, train_on, with_episodes
from tests.worker_support import FLEET_MODEL as MODEL
from tests.worker_support import FakeSource, checkpointed, run_in_memory

LEVELS = {"cold": -10.0, "warm": 0.0, "hot": 15.0}
ON = dict(key_baselines=True, level_half_life=300.0, events="windows", emit_all=True)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    root = tmp_path_factory.mktemp("ref")
    frame = fleet_frame({"ref": machine(9, 3000, level=0.0)}).drop(columns="machine")
    return train_on(frame, root, "ref", keyed=False)


@pytest.fixture(scope="module")
def detector(reference):
    return reference.detector


@pytest.fixture(scope="module")
def streams():
    out = {}
    for i, (key, level) in enumerate(LEVELS.items()):
        # the reference machine right after its history, each key at its own level
        values, _ = with_episodes(machine(9, 1200, level=level, skip=3000), [800], 120, feature=i)
        out[key] = values
    return out


def _events(sink):
    return {e["id"]: e["data"]["score"] for e in map(orjson.loads, sink.values("events"))}


def test_warm_up_windows_are_not_scored_and_batch_scoring_agrees_with_the_stream(detector, streams):
    worker, sink, _ = run_in_memory(
        detector, FakeSource(records_of(streams, "readings", 2), chunk=77), **ON
    )
    events = _events(sink)
    spec = detector.input.window
    warm = 1 + (10 * spec.length - spec.length) // spec.stride
    total = sum(spec.count(len(v)) for v in streams.values())
    assert len(events) == total - len(streams) * warm
    frame = fleet_frame(streams)
    windows = cut_windows(
        [
            (k, g["ts"].to_numpy(), g[[f"s{i}" for i in range(4)]].to_numpy(np.float32), None)
            for k, g in frame.groupby("machine")
        ],
        spec,
    )
    config = worker.settings.baselines.config()
    batch = score_window_set(detector, windows, model=MODEL, baselines=config)
    assert len(batch) == len(events)
    assert dict(zip(batch["event_id"], batch["score"], strict=True)) == pytest.approx(
        events, rel=1e-6
    )
    # each key at its own level: the warmed-up keys are normal before their episode
    before = pd.to_datetime(batch["window_end"]) < pd.Timestamp(frame["ts"].iloc[790])
    assert batch.loc[before, "is_anomaly"].mean() < 0.05
    # without per-key baselines the same keys look anomalous from their first windows
    plain = score_window_set(detector, windows)
    assert plain.loc[plain["key"] == "hot", "is_anomaly"].mean() > 0.9


def test_restart_from_the_state_record_continues_the_same_baselines(detector, streams):
    records = records_of(streams, "readings", 1)
    _, clean, _ = run_in_memory(detector, FakeSource(records, chunk=100), **ON)
    clean_events = _events(clean)

    state = MemoryStateStore()
    cut = {p: r[: len(r) * 2 // 5] for p, r in records.items()}  # inside the warm-up of none
    source = FakeSource(cut, chunk=100)
    first = checkpointed(detector, source, state, **ON)
    saved = decode_state(state.records[("readings", 0)])
    assert set(saved["baselines"]) == set(LEVELS)
    per_key = len(orjson.dumps(saved["baselines"])) / len(LEVELS)
    assert per_key < 250, per_key
    before = _events(first.sink)

    second = FakeSource(records, chunk=100, committed=source.latest_commits())
    _, after, _ = run_in_memory(detector, second, state, **ON)
    joined = {**before, **_events(after)}
    assert set(joined) == set(clean_events)
    assert joined == pytest.approx(clean_events, rel=1e-6)


def test_the_adaptive_stage_judges_each_features_error_and_level(detector, streams):
    overrides = dict(key_baselines=True, alarm_on="adaptive", adaptive_columns="levels")
    state = MemoryStateStore()
    source = FakeSource(records_of(streams, "readings", 1), chunk=100)
    worker, _, _ = run_in_memory(detector, source, state, **overrides, events="alarms")
    saved = decode_state(state.records[("readings", 0)])
    assert saved["adaptive"]["c"] == 2 * len(detector.input.features)
    opened = [
        orjson.loads(v)["data"]
        for v in worker.sink.values("events")
        if orjson.loads(v)["data"].get("state") == "opened"
    ]
    start = fleet_frame(streams)["ts"].iloc[0]
    elsewhere = 0
    for key in LEVELS:
        at = [
            (pd.Timestamp(o["start"]).tz_localize(None) - start).total_seconds()
            for o in opened
            if o["key"] == key
        ]
        # each key's episode (readings 800-919) alarms, from a window that holds its start
        assert any(800 - 16 < t <= 920 for t in at), (key, at)
        elsewhere += sum(not 800 - 16 < t <= 920 for t in at)
    assert elsewhere <= 1


@pytest.mark.parametrize(
    ("flags", "setting"),
    [
        (["--level-half-life", "300", "--alarm-on", "adaptive"], "level_half_life"),
        (["--adaptive-columns", "levels"], "adaptive_columns"),
    ],
)
def test_a_file_replay_refuses_what_it_would_not_replay_as_the_worker(
    reference, streams, tmp_path, capsys, flags, setting
):
    from pipeline.cli import main

    data = tmp_path / "fleet.csv"
    fleet_frame(streams).to_csv(data, index=False)
    argv = ["score", "--model", str(reference.artifact_dir), "--data", str(data)]
    argv += ["--time-col", "ts", "--key-col", "machine", "--out", str(tmp_path / "s.csv")]
    argv += ["--key-baselines", "--stream", *flags]
    assert main(argv) == 2
    assert setting in capsys.readouterr().err


def test_the_worker_refuses_level_following_for_its_model_before_any_kafka_io(reference):
    """A model whose keys have no baselines of their own cannot follow levels: the worker says
    so as soon as the model is loaded (it made its topics first, and with no broker reachable
    told of the broker instead)."""
    from pipeline.errors import ConfigError
    from pipeline.worker.app import WorkerApp
    from pipeline.worker.settings import WorkerSettings

    settings = WorkerSettings.build(
        model=str(reference.artifact_dir),
        bootstrap_servers="127.0.0.1:1",  # nothing listens there
        input_topic=("readings",),
        level_half_life=300.0,
        http_port=-1,
    )
    with pytest.raises(ConfigError) as error:
        WorkerApp.build(settings)
    assert error.value.setting == "level_half_life"
