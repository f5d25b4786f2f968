"""Hot reload against a real MLflow server (and the real broker): promotions swap the model
without a restart; broken versions are refused while the old one keeps serving."""

from __future__ import annotations

import base64
import dataclasses
import errno
import hashlib
import hmac
import pickle
import shutil
import tempfile
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import orjson
import pytest
import requests
import torch
from mlflow import MlflowClient

from pipeline.detector import artifact
from pipeline.detector.artifact import sha256_file
from pipeline.registry import follower as follower_module
from pipeline.registry.client import load_model
from pipeline.registry.follower import ModelFollower
from pipeline.tools.local_broker import free_port
from pipeline.worker.app import WorkerApp
from pipeline.worker.cli import worker_environment
from pipeline.worker.http_server import WorkerHttpServer
from tests.helpers import (
    HostilePickle,
    edit_manifest,
    metric_values,
    register_result,
    wait_until,
)
from tests.kafka_support import build_app, consume, names, produce, stream_items, worker_settings
from tests.worker_support import (
    FakeSource,
    flags_by_window,
    fleet,
    in_memory_worker,
    train_fleet_detector,
)

pytestmark = pytest.mark.mlflow_server


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    return train_fleet_detector(tmp_path_factory.mktemp("fleet"))


def _copy(result, root: Path, name: str) -> Path:
    target = root / name
    shutil.copytree(result.artifact_dir, target)
    return target


def renamed_features(result, root: Path) -> Path:
    target = _copy(result, root, "renamed")

    def rename(manifest: dict) -> None:
        manifest["input"]["features"] = [f"x_{f}" for f in manifest["input"]["features"]]

    edit_manifest(target, rename)
    return target


def nan_weights(result, root: Path) -> Path:
    target = _copy(result, root, "nan")
    state = torch.load(target / "weights.pt", weights_only=True)
    first = next(k for k, v in state.items() if v.is_floating_point())
    state[first] = torch.full_like(state[first], float("nan"))
    torch.save(state, target / "weights.pt")
    edit_manifest(target, lambda m: m["weights"].update(sha256=sha256_file(target / "weights.pt")))
    return target


def newer_format(result, root: Path) -> Path:
    target = _copy(result, root, "newer")
    edit_manifest(target, lambda manifest: manifest.update(format_version=99))
    return target


def pickled_weights(result, root: Path, marker: Path) -> Path:
    """A pickle where the state_dict belongs, with a manifest hash that matches it."""
    target = _copy(result, root, "pickled")
    with open(target / "weights.pt", "wb") as handle:
        pickle.dump({"encoder.1.weight": HostilePickle(marker)}, handle)
    edit_manifest(target, lambda m: m["weights"].update(sha256=sha256_file(target / "weights.pt")))
    return target


def _register_dir(tracking_uri: str, result, directory: Path, name: str) -> str:
    return register_result(
        tracking_uri,
        SimpleNamespace(detector=result.detector, artifact_dir=directory, data=None),
        name,
    )


def _metrics(port: int) -> dict:
    return metric_values(requests.get(f"http://127.0.0.1:{port}/metrics", timeout=5).text)


@pytest.mark.kafka
def test_promotions_swap_the_model_while_streaming_and_broken_versions_are_refused(
    kafka_bootstrap, create_topic, mlflow_server, trained, tmp_path, monkeypatch
):
    name = f"reload-{tmp_path.name[-8:]}"
    client = MlflowClient(mlflow_server)
    v1 = register_result(mlflow_server, trained, name)
    v2 = register_result(mlflow_server, trained, name)
    v3 = register_result(mlflow_server, trained, name)
    client.set_model_version_tag(name, v3, "aewatch.weights_sha256", "0" * 64)
    v4 = _register_dir(mlflow_server, trained, renamed_features(trained, tmp_path), name)
    v5 = _register_dir(mlflow_server, trained, nan_weights(trained, tmp_path), name)
    with monkeypatch.context() as newer_aewatch:  # a later release registers format 99
        newer_aewatch.setattr(artifact, "FORMAT_VERSION", 99)
        v6 = _register_dir(mlflow_server, trained, newer_format(trained, tmp_path), name)
    marker = tmp_path / "pickle-ran"
    v7 = _register_dir(mlflow_server, trained, pickled_weights(trained, tmp_path, marker), name)
    client.set_registered_model_alias(name, "champion", v1)

    scratch = tmp_path / "scratch"
    scratch.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))
    topics = names("reload")
    create_topic(topics["input"], partitions=2)
    stream = fleet(seed=31, keys=4, readings_per_key=3500)
    items = stream_items(stream)
    port = free_port()
    settings = worker_settings(
        kafka_bootstrap,
        topics,
        f"models:/{name}@champion",
        emit_all=True,
        reload_interval_s=1.0,
        http_port=port,
        stop_after_idle_s=6.0,
        tracking_uri=mlflow_server,
    )
    app = build_app(settings)
    runner = threading.Thread(target=app.run, daemon=True)
    runner.start()

    def feed():  # ~42 s of readings at ~330 per second
        for start in range(0, len(items), 100):
            produce(kafka_bootstrap, topics["input"], items[start : start + 100])
            time.sleep(0.3)

    feeder = threading.Thread(target=feed, daemon=True)
    feeder.start()
    try:
        wait_until(lambda: app.worker.stats.windows_scored > 50, 60, "scoring with version 1")
        promoted_at = time.time()
        client.set_registered_model_alias(name, "champion", v2)
        swap_s = wait_until(lambda: app.worker.model.version == v2, 15, "the swap to version 2")
        refusals = {
            v3: "sha256",
            v4: "features",
            v5: "non_finite_weights",
            v6: "manifest",
            v7: "weights",
        }
        for version, reason in refusals.items():
            client.set_registered_model_alias(name, "champion", version)
            key = ("aewatch_model_reloads_total", (("outcome", "refused"), ("reason", reason)))
            wait_until(lambda key=key: _metrics(port).get(key) == 1, 15, f"refusal of {reason}")
            assert app.worker.model.version == v2
        assert not marker.exists(), "the pickle was refused before any code in it ran"
        # every version's download is gone once it is loaded or refused
        assert sorted(p.name for p in scratch.iterdir() if p.name.startswith("aewatch-")) == []
        metrics = _metrics(port)
        info = ("aewatch_model_info", (("alias", "champion"), ("name", name), ("version", v2)))
        assert metrics[info] == 1
        assert (
            metrics[("aewatch_model_reloads_total", (("outcome", "loaded"), ("reason", "")))] == 1
        )
        assert feeder.is_alive(), "the promotions happened while the stream was running"
        feeder.join()
        runner.join(timeout=120)
        assert not runner.is_alive()
    finally:
        app.stop()
        runner.join(timeout=60)
        app.close()

    records = consume(kafka_bootstrap, topics["output"])
    events = [orjson.loads(r.value) for r in records]
    windows, _, _ = flags_by_window(stream, trained.detector)
    covered = {(e["subject"], e["data"]["window"]["end"]) for e in events}
    assert len(covered) == len(windows), "every window scored: nothing dropped across the swap"
    by_partition: dict[int, list[str]] = {}
    for record, event in zip(records, events, strict=True):
        by_partition.setdefault(record.partition, []).append(event["data"]["model"]["version"])
    for versions in by_partition.values():
        assert set(versions) == {v1, v2}
        first_new = versions.index(v2)
        assert set(versions[first_new:]) == {v2}, "no version-1 event after the swap"
    first_v2_ms = min(
        r.timestamp
        for r, e in zip(records, events, strict=True)
        if e["data"]["model"]["version"] == v2
    )
    assert first_v2_ms / 1000 - promoted_at <= settings.registry.reload_interval_s + 10
    assert swap_s <= settings.registry.reload_interval_s + 10


def test_the_registry_webhook_triggers_a_reload_and_needs_its_signature(
    mlflow_server, trained, tmp_path
):
    name = f"hook-{tmp_path.name[-8:]}"
    client = MlflowClient(mlflow_server)
    v1 = register_result(mlflow_server, trained, name)
    v2 = register_result(mlflow_server, trained, name)
    client.set_registered_model_alias(name, "champion", v1)
    detector, ref = load_model(
        f"models:/{name}@champion", tracking_uri=mlflow_server, download_dir=tmp_path / "dl"
    )
    follower = ModelFollower(  # interval 0: the webhook is the only trigger
        f"models:/{name}@champion",
        detector,
        ref,
        tracking_uri=mlflow_server,
        device="cpu",
        interval_s=0,
    ).start()
    secret = "webhook-secret"
    server = WorkerHttpServer(
        "127.0.0.1",
        0,
        metrics=lambda: b"",
        live=lambda: (True, {}),
        ready=lambda: (True, {}),
        on_alias_created=follower.trigger,
        webhook_secret=secret,
    ).start()
    url = f"http://127.0.0.1:{server.port}/webhooks/mlflow"
    try:
        body = orjson.dumps(
            {
                "entity": "model_version_alias",
                "action": "created",
                "data": {"name": name, "alias": "champion", "version": v2},
            }
        )
        unsigned = requests.post(url, data=body, timeout=5)
        assert unsigned.status_code == 401
        stamp = str(int(time.time()))
        forged = hmac.new(b"wrong", f"d.{stamp}.".encode() + body, hashlib.sha256).digest()
        headers = {
            "X-MLflow-Delivery-Id": "d",
            "X-MLflow-Timestamp": stamp,
            "X-MLflow-Signature": "v1," + base64.b64encode(forged).decode(),
        }
        assert requests.post(url, data=body, headers=headers, timeout=5).status_code == 401
        time.sleep(1.0)
        assert follower.take() is None, "nothing reloads without a valid delivery"

        client.create_webhook(
            name=f"aewatch-{name}",
            url=url,
            events=["model_version_alias.created"],
            secret=secret,
        )
        time.sleep(1.5)  # the server caches its webhook list (MLFLOW_WEBHOOK_CACHE_TTL=1 here)
        client.set_registered_model_alias(name, "champion", v2)
        taken = []
        wait_until(lambda: taken.append(follower.take()) or taken[-1] is not None, 30, "the reload")
        assert taken[-1][1].version == v2 and taken[-1][1].alias == "champion"
    finally:
        server.close()
        follower.close()


def _following(tracking_uri: str, name: str, tmp_path: Path):
    """The version @champion names, loaded, and a follower of the alias woken by hand
    (`check()`), with the outcomes it reports: (detector, follower, outcomes)."""
    detector, ref = load_model(
        f"models:/{name}@champion", tracking_uri=tracking_uri, download_dir=tmp_path / "dl"
    )
    outcomes: list[tuple[str, str]] = []
    follower = ModelFollower(
        f"models:/{name}@champion",
        detector,
        ref,
        tracking_uri=tracking_uri,
        device="cpu",
        interval_s=0,
        on_outcome=lambda outcome, reason: outcomes.append((outcome, reason)),
    )
    return detector, follower, outcomes


def test_a_version_the_settings_cannot_serve_is_refused_and_tried_again_once_moved_back(
    mlflow_server, trained, tmp_path
):
    name = f"serve-{tmp_path.name[-8:]}"
    client = MlflowClient(mlflow_server)
    v1 = register_result(mlflow_server, trained, name)
    robust = _copy(trained, tmp_path, "robust")  # per-key baselines take a standard scaler
    edit_manifest(robust, lambda m: m["scaler"].update(kind="robust"))
    v2 = _register_dir(mlflow_server, trained, robust, name)
    v3 = register_result(mlflow_server, trained, name)
    good_tag = client.get_model_version(name, v3).tags["aewatch.weights_sha256"]
    client.set_model_version_tag(name, v3, "aewatch.weights_sha256", "0" * 64)
    client.set_registered_model_alias(name, "champion", v1)
    detector, follower, outcomes = _following(mlflow_server, name, tmp_path)
    worker, _ = in_memory_worker(detector, FakeSource({}), follower=follower, key_baselines=True)
    assert follower.accepts == worker.accepts

    client.set_registered_model_alias(name, "champion", v2)
    assert follower.check() == "refused" and outcomes[-1] == ("refused", "key_baselines")
    assert follower.take() is None and worker.detector is detector

    client.set_registered_model_alias(name, "champion", v3)
    assert follower.check() == "refused" and outcomes[-1] == ("refused", "sha256")
    client.set_model_version_tag(name, v3, "aewatch.weights_sha256", good_tag)  # mended
    assert follower.check() == "unchanged"  # while the alias stays on it
    client.set_registered_model_alias(name, "champion", v1)
    assert follower.check() == "unchanged"
    client.set_registered_model_alias(name, "champion", v3)  # moved away and back
    assert follower.check() == "ready"
    taken = follower.take()
    worker.swap_model(taken[0], taken[1].identity())
    assert worker.model.version == v3

    # an alias deleted from a registry that answers: missing, not unreachable, not refused
    client.delete_registered_model_alias(name, "champion")
    follower.interval_s = 30.0
    follower.start()
    try:
        follower.trigger(name, "champion", "")
        wait_until(lambda: outcomes[-1][0] != "refused", 30, "the look at the deleted alias")
    finally:
        follower.close()
    assert outcomes[-1] == ("missing", "alias") and follower.take() is None


def test_with_no_interval_the_webhook_alone_wakes_the_follower(trained):
    registry = worker_settings("unused:9092", names("hook0"), "models:/fleet@champion").registry
    registry = dataclasses.replace(registry, reload_interval_s=0.0)
    ref = SimpleNamespace(version="1")
    make = WorkerApp._follower
    assert make(registry, "cpu", trained.detector, ref) is None  # nothing would wake it
    follower = make(registry, "cpu", trained.detector, ref, webhook=True)
    assert follower is not None and follower.interval_s == 0


def test_a_download_that_fails_for_a_local_cause_is_tried_again(
    mlflow_server, trained, tmp_path, monkeypatch
):
    name = f"disk-{tmp_path.name[-8:]}"
    client = MlflowClient(mlflow_server)
    v1 = register_result(mlflow_server, trained, name)
    v2 = register_result(mlflow_server, trained, name)
    client.set_registered_model_alias(name, "champion", v1)
    detector, follower, outcomes = _following(mlflow_server, name, tmp_path)
    client.set_registered_model_alias(name, "champion", v2)

    def full_disk(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    with monkeypatch.context() as full:
        full.setattr(follower_module, "load_model", full_disk)
        assert follower.check() == "failed" and outcomes[-1] == ("failed", "ENOSPC")
    assert follower.check() == "ready" and follower.take()[1].version == v2


def test_an_unreachable_registry_is_retried_with_backoff(trained):
    worker_environment()  # as in the worker's process: the follower paces the retries
    outcomes: list[tuple[float, str]] = []
    follower = ModelFollower(
        "models:/nowhere@champion",
        trained.detector,
        SimpleNamespace(version="1"),
        tracking_uri=f"http://127.0.0.1:{free_port()}",
        device="cpu",
        interval_s=0.05,
        max_backoff_s=0.8,
        on_outcome=lambda outcome, reason: outcomes.append((time.monotonic(), outcome)),
    )
    follower.start()
    try:
        wait_until(lambda: len(outcomes) >= 4, 60, "four attempts")
    finally:
        follower.close()
    assert {o for _, o in outcomes} == {"unreachable"}
    gaps = [b[0] - a[0] for a, b in zip(outcomes, outcomes[1:], strict=False)]
    # waits of 0.2, 0.4 and 0.8 s (a quarter of the cap, doubling); a late wake-up only adds
    assert [round(g, 2) >= w for g, w in zip(gaps, (0.2, 0.4, 0.8), strict=False)] == [True] * 3
    assert gaps[2] - gaps[0] > 0.3, f"the wait grows: {gaps}"
    assert follower.take() is None and follower.serving is trained.detector
