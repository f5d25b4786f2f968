"""The Grafana dashboard and the Prometheus alerting rules: every metric they name is exported by
the worker or `aewatch quality`; promtool checks and unit-tests the rules; a real Prometheus
server scrapes a running worker and the join, evaluates the rules and answers every dashboard
query."""

from __future__ import annotations

import json
import re
import subprocess
import threading
import time
from pathlib import Path

import pytest
import requests
import yaml

from pipeline.quality.metrics import QualityMetrics
from pipeline.quality.tracker import QualityTracker
from pipeline.worker.metrics import WorkerMetrics

ROOT = Path(__file__).resolve().parents[1]
DASHBOARD = ROOT / "deploy" / "grafana" / "dashboards" / "aewatch.json"
RULES = ROOT / "deploy" / "prometheus" / "aewatch-rules.yml"
RULE_TESTS = ROOT / "deploy" / "prometheus" / "aewatch-rules.test.yml"
SUFFIXES = ("", "_total", "_bucket", "_sum", "_count", "_created")
# what an ops team is paged for: each needs a rule
ALERTS = {
    "AewatchLagGrowing",
    "AewatchNoRecords",
    "AewatchReloadRefused",
    "AewatchDeadLetters",
    "AewatchScoreDrift",
}


def exported() -> set[str]:
    """Every sample name the worker and `aewatch quality` can expose."""
    registries = [
        WorkerMetrics().registry,
        QualityMetrics(QualityTracker(1), threading.Lock()).registry,
    ]
    return {
        family.name + suffix
        for registry in registries
        for family in registry.collect()
        for suffix in SUFFIXES
    }


def dashboard_queries() -> list[str]:
    panels = json.loads(DASHBOARD.read_text())["panels"]
    return [target["expr"] for panel in panels for target in panel["targets"]]


def rule_queries() -> dict[str, str]:
    groups = yaml.safe_load(RULES.read_text())["groups"]
    return {rule["alert"]: rule["expr"] for group in groups for rule in group["rules"]}


def named_metrics(expr: str) -> set[str]:
    return set(re.findall(r"\baewatch_[a-zA-Z0-9_:]*", expr))


def test_every_metric_the_dashboard_and_rules_name_is_exported():
    known = exported()
    queries = dashboard_queries() + list(rule_queries().values())
    named = set().union(*(named_metrics(q) for q in queries))
    assert named - known == set()
    # the panels an ops team opens first
    for metric in (
        "aewatch_records_total",
        "aewatch_consumer_lag",
        "aewatch_end_to_end_latency_seconds_bucket",
        "aewatch_alarms_open",
        "aewatch_feedback_precision",
        "aewatch_drift_psi",
        "aewatch_model_info",
        "aewatch_model_reloads_total",
    ):
        assert metric in named, metric
    assert set(rule_queries()) >= ALERTS


def test_the_event_counters_exist_at_zero_before_the_first_event():
    # a series born at 1 with the first drift event would show no increase to the alert rule
    text = WorkerMetrics().exposition().decode()
    for kind in ("anomaly", "alarm_opened", "alarm_resolved", "drift"):
        assert f'aewatch_events_total{{type="{kind}"}} 0.0' in text


def test_the_check_finds_a_metric_nobody_exports():
    assert named_metrics("rate(aewatch_recordz_total[5m]) + aewatch_alarms_open") - exported() == {
        "aewatch_recordz_total"
    }


@pytest.mark.prometheus
def test_promtool_checks_and_unit_tests_the_rules(prometheus_bin):
    promtool = str(prometheus_bin / "promtool")
    checked = subprocess.run(
        [promtool, "check", "rules", str(RULES)], capture_output=True, text=True, timeout=60
    )
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert f"SUCCESS: {len(rule_queries())} rules found" in checked.stdout
    tested = subprocess.run(
        [promtool, "test", "rules", str(RULE_TESTS)], capture_output=True, text=True, timeout=60
    )
    assert tested.returncode == 0, tested.stdout + tested.stderr
    # every alert has a test that fires it and one that does not
    tests = yaml.safe_load(RULE_TESTS.read_text())["tests"]
    cases = [case for test in tests for case in test["alert_rule_test"]]
    assert {c["alertname"] for c in cases if c["exp_alerts"]} == set(rule_queries())
    assert {c["alertname"] for c in cases if not c["exp_alerts"]} == set(rule_queries())


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    from tests.worker_support import train_fleet_detector

    return train_fleet_detector(tmp_path_factory.mktemp("fleet"))


def _start_prometheus(prometheus_bin: Path, root: Path, targets: dict[str, int]):
    from pipeline.tools.local_broker import free_port

    config = {
        "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
        "rule_files": [str(RULES)],
        "scrape_configs": [
            {"job_name": job, "static_configs": [{"targets": [f"127.0.0.1:{port}"]}]}
            for job, port in targets.items()
        ],
    }
    (root / "prometheus.yml").write_text(yaml.safe_dump(config))
    port = free_port()
    proc = subprocess.Popen(
        [
            str(prometheus_bin / "prometheus"),
            f"--config.file={root / 'prometheus.yml'}",
            f"--storage.tsdb.path={root / 'data'}",
            f"--web.listen-address=127.0.0.1:{port}",
        ],
        stdout=open(root / "prometheus.log", "wb"),  # noqa: SIM115 - the child owns it
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    return proc, f"http://127.0.0.1:{port}"


def _query(url: str, expr: str) -> list:
    reply = requests.get(f"{url}/api/v1/query", params={"query": expr}, timeout=10).json()
    assert reply["status"] == "success", (expr, reply)
    return reply["data"]["result"]


@pytest.mark.kafka
@pytest.mark.prometheus
def test_a_real_prometheus_scrapes_the_worker_and_the_join_and_evaluates_the_rules(
    kafka_bootstrap, create_topic, prometheus_bin, trained, tmp_path
):
    import orjson

    from pipeline.kafka_io import open_client
    from pipeline.kafka_io.settings import KafkaConnection
    from pipeline.quality.cli import send_feedback
    from pipeline.quality.feedback import Feedback
    from pipeline.quality.service import QualityService, QualitySettings
    from pipeline.worker.http_server import WorkerHttpServer
    from tests.conftest import _stop_process_group
    from tests.helpers import wait_until
    from tests.kafka_support import (
        build_app,
        consume,
        names,
        produce,
        stream_items,
        worker_settings,
    )
    from tests.test_drift import _stream

    topics = names("ops")
    feedback_topic = f"{topics['output']}-fb"
    create_topic(topics["input"], partitions=2)
    settings = worker_settings(
        kafka_bootstrap,
        topics,
        trained.artifact_dir,
        events="alarms",
        drift_window=500,
        http_port=0,
        stop_after_idle_s=0,
    )
    items = stream_items(_stream(1.5, seed=4))
    produce(kafka_bootstrap, topics["input"], items)
    kafka = open_client(KafkaConnection(kafka_bootstrap))
    kafka.ensure_topics({feedback_topic: {}, topics["output"]: {}})
    quality = QualityService(
        QualitySettings(
            alarm_topic=(topics["output"],),
            feedback_topic=feedback_topic,
            dlq_topic=topics["dlq"],
            log_interval_s=0,
            http_port=0,
        ),
        kafka.tail([topics["output"], feedback_topic], from_beginning=True),
        kafka.sink(),
    )
    quality_http = WorkerHttpServer(
        "127.0.0.1",
        0,
        metrics=quality.metrics.exposition,
        live=quality.liveness,
        ready=quality.readiness,
    ).start()
    app = build_app(settings)
    threads = [threading.Thread(target=t, daemon=True) for t in (app.run, quality.run)]
    for thread in threads:
        thread.start()
    proc, url = _start_prometheus(
        prometheus_bin,
        tmp_path,
        {"aewatch-worker": app.http.port, "aewatch-quality": quality_http.port},
    )
    try:

        def scraped(expr: str):
            result = _query(url, expr)
            return float(result[0]["value"][1]) if result else None

        wait_until(
            lambda: _ready(url) and scraped("sum(aewatch_records_total)") == len(items),
            120,
            "Prometheus scraping every record the worker read",
            poll_s=0.5,
        )
        alarms = [
            orjson.loads(r.value)
            for r in consume(kafka_bootstrap, topics["output"], idle_s=2.0)
            if b"alarm.opened" in r.value
        ]
        assert alarms, "the shifted stream raised no alarm"
        now = int(time.time() * 1000)
        verdicts = [
            Feedback(
                "true_positive" if i % 2 == 0 else "false_positive",
                "op",
                now,
                a["data"]["episode_id"],
            )
            for i, a in enumerate(alarms)
        ]
        send_feedback(kafka, feedback_topic, verdicts)
        expected = sum(1 for v in verdicts if v.verdict == "true_positive") / len(verdicts)
        wait_until(
            lambda: (
                scraped("max by (model, version) (aewatch_feedback_precision)")
                == pytest.approx(expected)
            ),
            60,
            "the live precision in Prometheus",
            poll_s=0.5,
        )
        # the rules load and evaluate; the drifted stream fires the drift alert
        wait_until(
            lambda: "AewatchScoreDrift" in _firing(url), 60, "the drift alert firing", poll_s=0.5
        )
        rules = requests.get(f"{url}/api/v1/rules", timeout=10).json()["data"]["groups"][0]["rules"]
        assert {r["name"] for r in rules} == set(rule_queries())
        assert all(r["health"] == "ok" for r in rules), rules
        # every dashboard query is valid PromQL on the real server; these have data
        for expr in dashboard_queries():
            _query(url, expr)
        for expr in (
            "sum(rate(aewatch_windows_scored_total[1m]))",
            'max(aewatch_drift_psi{key="*"})',
            "max by (name, version, alias) (aewatch_model_info)",
            "sum by (topic) (aewatch_consumer_lag)",
        ):
            assert _query(url, expr), expr
    finally:
        app.stop()
        quality.stop()
        for thread in threads:
            thread.join(60)
        app.close()
        quality.tail.close()
        quality.sink.close()
        quality_http.close()
        _stop_process_group(proc)


def _ready(url: str) -> bool:
    try:
        return requests.get(f"{url}/-/ready", timeout=2).status_code == 200
    except requests.RequestException:
        return False


def _firing(url: str) -> set[str]:
    alerts = requests.get(f"{url}/api/v1/alerts", timeout=10).json()["data"]["alerts"]
    return {a["labels"]["alertname"] for a in alerts if a["state"] == "firing"}
