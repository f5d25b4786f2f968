"""Faults the worker must ride out, against real services: a broker restart mid-stream, an
MLflow server that is not there when the worker starts."""

from __future__ import annotations

import dataclasses
import threading
import time

import orjson
import pytest

from pipeline.errors import RegistryError
from pipeline.kafka_io import ensure_topics
from pipeline.local_broker import LocalKafkaBroker, free_port
from pipeline.worker_cli import build_worker, close_worker
from tests.helpers import wait_until
from tests.kafka_support import consume, names, produce, stream_items, worker_settings
from tests.test_worker_production import all_window_ids
from tests.worker_support import fleet, train_fleet_detector


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    return train_fleet_detector(tmp_path_factory.mktemp("fleet"))


@pytest.mark.kafka
@pytest.mark.faults
def test_the_worker_rides_out_a_broker_restart(trained, kafka_bootstrap):
    # a broker of this test's own, so that stopping it disturbs nothing else
    broker = LocalKafkaBroker().start()
    try:
        bootstrap = broker.bootstrap_servers
        topics = names("restart")
        ensure_topics(bootstrap, {topics["input"]: {"num_partitions": 2}})
        stream = fleet(seed=71, keys=4, readings_per_key=1500)
        items = stream_items(stream)
        half = len(items) // 2
        produce(bootstrap, topics["input"], items[:half])
        settings = worker_settings(
            bootstrap, topics, trained.artifact_dir, emit_all=True, stop_after_idle_s=0
        )
        worker = build_worker(settings)
        runner = threading.Thread(target=worker.run, daemon=True)
        runner.start()
        try:
            wait_until(lambda: worker.stats.records_in >= half, 60, "the first half")
            broker.stop(remove_data=False)
            time.sleep(3.0)
            broker.start()
            back = time.monotonic()
            produce(bootstrap, topics["input"], items[half:])
            seen = worker.stats.records_in
            wait_until(lambda: worker.stats.records_in > seen, 60, "reading after the restart")
            recovered_s = time.monotonic() - back
            wait_until(lambda: worker.stats.records_in >= len(items), 60, "the second half")
            assert runner.is_alive(), "the worker kept running through the outage"
        finally:
            worker.stop()
            runner.join(timeout=60)
            close_worker(worker)
        assert recovered_s <= 30, f"took {recovered_s:.1f}s to read again after the restart"
        ids = {orjson.loads(r.value)["id"] for r in consume(bootstrap, topics["output"])}
        assert ids == all_window_ids(trained, stream), "nothing lost across the restart"
    finally:
        broker.stop()


def test_an_unreachable_registry_at_start_is_a_clear_error_not_a_hang():
    settings = worker_settings(
        "127.0.0.1:9",
        names("nomlflow"),
        "models:/pumps@champion",
        tracking_uri=f"http://127.0.0.1:{free_port()}",
    )
    started = time.monotonic()
    with pytest.raises(RegistryError, match="models:/pumps@champion"):
        build_worker(settings)
    assert time.monotonic() - started < 20, "fails at once by default"

    patient = dataclasses.replace(settings, registry_wait_s=3.0)
    started = time.monotonic()
    with pytest.raises(RegistryError, match="models:/pumps@champion"):
        build_worker(patient)
    assert 3.0 <= time.monotonic() - started < 30, "retried for registry_wait_s, then failed"
