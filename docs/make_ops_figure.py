"""Draw the README's picture of the operations dashboard from a real run (`docs/ops-dashboard.png`).

Trains a small detector on a simulated fleet, then runs, on this machine, the scoring worker,
`aewatch quality` and a real Prometheus server (the binaries `make prometheus` builds) scraping
both every 2 s with aewatch's alerting rules, for `--minutes`: live readings with injected
anomalies at `--rate` readings/s, every sensor shifted by 1.5 standard deviations for the last
third (score drift), and an operator who judges each alarm some seconds after it opens (true if
it overlaps an injected anomaly). At the end it asks Prometheus, with `query_range`, the PromQL of
the dashboard's main panels (`deploy/grafana/dashboards/aewatch.json`) and draws the answers with
matplotlib: a rendering of those panels, not a Grafana screenshot.

    python docs/make_ops_figure.py --bootstrap-servers 127.0.0.1:9092 --minutes 4
"""

from __future__ import annotations

import argparse
import json
import subprocess
import tempfile
import threading
import time
import uuid
from pathlib import Path

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import orjson  # noqa: E402
import requests  # noqa: E402
import yaml  # noqa: E402

from pipeline.cli import main  # noqa: E402
from pipeline.kafka_io import open_client  # noqa: E402
from pipeline.kafka_io.settings import KafkaConnection  # noqa: E402
from pipeline.quality.cli import send_feedback  # noqa: E402
from pipeline.quality.feedback import Feedback  # noqa: E402
from pipeline.quality.service import QualityService, QualitySettings  # noqa: E402
from pipeline.tools.local_broker import free_port  # noqa: E402
from pipeline.tools.simulate import simulate_fleet, write_csv  # noqa: E402
from pipeline.worker.app import WorkerApp  # noqa: E402
from pipeline.worker.http_server import WorkerHttpServer  # noqa: E402
from pipeline.worker.settings import WorkerSettings  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
PANELS = [  # dashboard panel titles drawn, in order
    "Throughput (records/s)",
    "Consumer lag (records)",
    "End-to-end latency",
    "Alarm rate (per hour)",
    "Precision from operator feedback",
    "Score drift (PSI)",
]
KEYS, SENSORS, HISTORY = 6, 4, 4000


def _train(root: Path) -> Path:
    history = simulate_fleet(keys=KEYS, readings_per_key=HISTORY, features=SENSORS, anomalies=())
    write_csv(root / "history.csv", history)
    args = ["train", "--data", str(root / "history.csv"), "--time-col", "ts", "--key-col", "key"]
    args += ["--window", "16", "--stride", "4", "--epochs", "10", "--out", str(root / "det")]
    args += ["--label-col", "label", "--no-progress", "--device", "cpu"]
    args += ["--tracking-uri", f"sqlite:///{root}/m.db"]
    assert main(args) == 0
    return root / "det"


def _live(minutes: float, rate: float):
    per_key = int(minutes * 60 * rate / KEYS)
    fleet = simulate_fleet(
        keys=KEYS, readings_per_key=per_key, features=SENSORS, skip=HISTORY, warmup=100,
        anomaly_seed=3, magnitude=3.0, anomaly_length=60,
    )  # fmt: skip
    values = fleet.values.copy()
    third = 2 * len(values) // 3
    values[third:] += 1.5 * values[:third].std(axis=0)
    return fleet, values


def _produce(kafka, topic, fleet, values, rate, sent_at, stop):
    sink = kafka.sink(linger_ms=5)
    names, start = fleet.features, time.monotonic()
    for i, (key, row) in enumerate(zip(fleet.keys.tolist(), values.tolist(), strict=True)):
        if stop.is_set():
            break
        delay = start + i / rate - time.monotonic()
        if delay > 0:
            time.sleep(delay)
        now = int(time.time() * 1000)
        sent_at.append((key, now, int(fleet.labels[i])))
        payload = {"key": key, "ts": now, "values": dict(zip(names, row, strict=True))}
        sink.send(topic, key=key.encode(), value=orjson.dumps(payload))
    sink.flush()
    sink.close()


def _operator(kafka, topics, sent_at, stop, judge_after_s=8.0):
    """Judge each alarm `judge_after_s` after it opens: true if its span overlaps an injected
    anomaly of its key."""
    tail, judged, waiting = kafka.tail([topics["output"]], from_beginning=True), set(), []
    while not stop.is_set():
        for records in tail.poll(500).values():
            for record in records:
                event = orjson.loads(record.value)
                if event["type"] == "aewatch.alarm.opened":
                    waiting.append((time.monotonic() + judge_after_s, event["data"]))
        due = [d for t, d in waiting if t <= time.monotonic() and d["episode_id"] not in judged]
        waiting = [(t, d) for t, d in waiting if t > time.monotonic()]
        if due:
            truth = np.asarray([(k, ts, label) for k, ts, label in list(sent_at)], dtype=object)
            verdicts = []
            for data in due:
                mask = (truth[:, 0] == data["key"]) & (truth[:, 2] == 1)
                start = int(np.datetime64(data["start"].rstrip("Z"), "ms").astype(np.int64))
                hit = bool(np.any(np.abs(truth[mask, 1].astype(np.int64) - start) < 30_000))
                verdict = "true_positive" if hit else "false_positive"
                now = int(time.time() * 1000)
                verdicts.append(Feedback(verdict, "operator", now, episode_id=data["episode_id"]))
                judged.add(data["episode_id"])
            send_feedback(kafka, topics["feedback"], verdicts)
    tail.close()


def _query_range(url: str, expr: str, start: float, end: float) -> list:
    params = {"query": expr, "start": start, "end": end, "step": 5}
    reply = requests.get(f"{url}/api/v1/query_range", params=params, timeout=30).json()
    assert reply["status"] == "success", reply
    return reply["data"]["result"]


def _draw(url: str, start: float, end: float, out: Path) -> None:
    panels = {
        p["title"]: p
        for p in json.loads((ROOT / "deploy/grafana/dashboards/aewatch.json").read_text())["panels"]
    }
    fig, axes = plt.subplots(2, 3, figsize=(15, 7.5))
    for ax, title in zip(axes.flat, PANELS, strict=True):
        for target in panels[title]["targets"]:
            for series in _query_range(url, target["expr"], start, end):
                t = np.asarray([float(v[0]) for v in series["values"]]) - start
                y = np.asarray([float(v[1]) for v in series["values"]])
                label = target["legendFormat"]
                for name, value in series["metric"].items():
                    label = label.replace("{{" + name + "}}", value)
                ax.plot(t / 60, y, label=label, linewidth=1.2)
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("minutes", fontsize=8)
        ax.tick_params(labelsize=8)
        if ax.lines:
            ax.legend(fontsize=7, loc="upper left")
    fig.suptitle(
        "aewatch operations dashboard, main panels: the dashboard's PromQL against a real "
        "Prometheus scraping a real run, rendered with matplotlib (not a Grafana screenshot)",
        fontsize=10,
    )
    fig.tight_layout()
    fig.savefig(out, dpi=110)


def run(args: argparse.Namespace) -> None:
    root = Path(tempfile.mkdtemp(prefix="aewatch-ops-figure-"))
    detector = _train(root)
    tag = uuid.uuid4().hex[:6]
    topics = {n: f"ops-fig-{n}-{tag}" for n in ("input", "output", "dlq", "feedback")}
    kafka = open_client(KafkaConnection(args.bootstrap_servers))
    kafka.ensure_topics({topics["input"]: {"num_partitions": 4}, topics["output"]: {}})
    settings = WorkerSettings.build(
        model=str(detector), bootstrap_servers=args.bootstrap_servers, group_id=f"fig-{tag}",
        input_topic=(topics["input"],), output_topic=topics["output"], dlq_topic=topics["dlq"],
        http_port=0, device="cpu", drift_window=200,
    )  # fmt: skip
    app = WorkerApp.build(settings)
    quality = QualityService(
        QualitySettings(
            alarm_topic=(topics["output"],),
            feedback_topic=topics["feedback"],
            dlq_topic=topics["dlq"],
            log_interval_s=0,
            http_port=0,
        ),  # fmt: skip
        kafka.tail([topics["output"], topics["feedback"]], from_beginning=True),
        kafka.sink(),
    )
    http = WorkerHttpServer(
        "127.0.0.1", 0, metrics=quality.metrics.exposition, live=quality.liveness,
        ready=quality.readiness,
    ).start()  # fmt: skip
    config = {
        "global": {"scrape_interval": "2s", "evaluation_interval": "2s"},
        "rule_files": [str(ROOT / "deploy/prometheus/aewatch-rules.yml")],
        "scrape_configs": [
            {"job_name": "aewatch-worker", "static_configs": [{"targets": [f"127.0.0.1:{app.http.port}"]}]},
            {"job_name": "aewatch-quality", "static_configs": [{"targets": [f"127.0.0.1:{http.port}"]}]},
        ],
    }  # fmt: skip
    (root / "prometheus.yml").write_text(yaml.safe_dump(config))
    port = free_port()
    prometheus = subprocess.Popen(
        [str(Path(args.prometheus_dir) / "prometheus"), f"--config.file={root / 'prometheus.yml'}",
         f"--storage.tsdb.path={root / 'tsdb'}", f"--web.listen-address=127.0.0.1:{port}"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    url, stop, sent_at = f"http://127.0.0.1:{port}", threading.Event(), []
    fleet, values = _live(args.minutes, args.rate)
    threads = [
        threading.Thread(target=app.run, daemon=True),
        threading.Thread(target=quality.run, daemon=True),
        threading.Thread(target=_operator, args=(kafka, topics, sent_at, stop), daemon=True),
    ]
    for thread in threads:
        thread.start()
    start = time.time()
    try:
        _produce(kafka, topics["input"], fleet, values, args.rate, sent_at, stop)
        time.sleep(15)
        _draw(url, start, time.time(), Path(args.out) / "ops-dashboard.png")
    finally:
        stop.set()
        app.stop()
        quality.stop()
        for thread in threads:
            thread.join(30)
        app.close()
        http.close()
        prometheus.terminate()
        prometheus.wait(30)
    print(f"wrote {Path(args.out) / 'ops-dashboard.png'}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bootstrap-servers", required=True)
    parser.add_argument(
        "--prometheus-dir", default=str(Path.home() / ".cache/aewatch/prometheus-v0.316.0")
    )
    parser.add_argument("--minutes", type=float, default=4.0)
    parser.add_argument("--rate", type=float, default=60.0, help="readings per second")
    parser.add_argument("--out", default=str(ROOT / "docs"))
    run(parser.parse_args())
