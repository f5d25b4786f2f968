"""Worker scale-out and model promotion on a real broker.

1. Throughput of one and of two `aewatch worker` processes in one consumer group on the same
   pre-filled 8-partition topic (default 1,000,000 readings, window 64, stride 8, alarm mode).
   The rate is read from the group's committed offsets: readings committed between the first
   commit and the last, over the time between them, so start-up (model load, group join) and the
   idle wait before the workers stop are not counted. Runs alternate between one and two workers; medians are reported.
2. Promotion latency: a worker follows `models:/NAME@champion` (embedded MLflow, sqlite) while a
   live stream runs; each round registers a new version and runs `aewatch promote NAME`; the time
   from the command's return to the first event carrying the new version on the output topic is
   measured. It is bounded by the reload interval plus download, checks and warm-up.

    python -m benchmarks.bench_scaleout --out results [--readings 1000000]
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import threading
import time
import uuid
from pathlib import Path

import orjson

from benchmarks.bench_worker import fill, train_model
from benchmarks.common import broker_and_workdir, md_table, write_results


def worker_command(bootstrap: str, model: str, group: str, topic: str, out: str) -> list[str]:
    """`aewatch worker` on the CPU with JSON logs and no HTTP port."""
    from pipeline.worker.cli import worker_command
    from pipeline.worker.settings import WorkerSettings

    settings = WorkerSettings.build(
        model=model,
        bootstrap_servers=bootstrap,
        group_id=group,
        input_topic=(topic,),
        output_topic=out,
        dlq_topic=f"{topic}-dlq",
        device="cpu",
        http_port=-1,
    )
    return worker_command(settings)


def _committed(admin, group: str) -> int:
    from kafka.errors import KafkaError

    try:
        offsets = admin.list_group_offsets(group).get(group, {})
    except KafkaError:  # the group's coordinator is not known until a member joins
        return 0
    return sum(max(0, meta.offset) for meta in offsets.values())


def group_rate(
    bootstrap: str, topic: str, total: int, model: Path, workers: int, log: Path
) -> dict:
    """Start `workers` processes in a fresh group; rate from its committed offsets."""
    from kafka import KafkaAdminClient

    group = f"scale-{workers}-{uuid.uuid4().hex[:6]}"
    args = worker_command(bootstrap, str(model), group, topic, f"{topic}-alarms")
    args += ["--max-poll-records", "10000", "--commit-interval-ms", "500"]
    args += ["--stop-after-idle-s", "4"]
    env = dict(os.environ, OMP_NUM_THREADS=str(max(1, (os.cpu_count() or 2) // workers)))
    procs = [
        subprocess.Popen(
            [*args, "--client-id", f"w{i}"],
            stdout=open(log, "ab"),  # noqa: SIM115 - the child owns it
            stderr=subprocess.STDOUT,
            env=env,
        )
        for i in range(workers)
    ]
    admin = KafkaAdminClient(bootstrap_servers=bootstrap)
    first = last = None
    try:
        deadline = time.monotonic() + 600
        while any(p.poll() is None for p in procs):  # they stop after 4 s without input
            done = _committed(admin, group)
            now = time.monotonic()
            if first is None and done > 0:
                first = (now, done)
            if last is None or done > last[1]:
                last = (now, done)
            if now > deadline:
                raise RuntimeError(f"workers still running after 600 s; see {log}")
            time.sleep(0.05)
    finally:
        admin.close()
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
    # Commits stop short of the end by the readings open windows still need (window - 1 per key).
    if first is None or last[1] < 0.95 * total:
        raise RuntimeError(f"the group committed {last and last[1]} of {total}; see {log}")
    (t0, c0), (t1, c1) = first, last
    return {"workers": workers, "rate": (c1 - c0) / (t1 - t0), "seconds": t1 - t0}


def promotion_latency(bootstrap: str, root: Path, model_dir: Path, rounds: int, interval: float):
    """Seconds from `aewatch promote` returning to the first event of the promoted version."""
    import mlflow
    from kafka import KafkaConsumer

    from benchmarks.common import ensure_topics
    from pipeline.cli import main as cli
    from pipeline.detector import load_detector
    from pipeline.tools.simulate import simulate_fleet
    from training.register import register_version
    from training.tracking import tracking_run

    uri = f"sqlite:///{root / 'mlflow.db'}"
    mlflow.set_tracking_uri(uri)
    mlflow.create_experiment("bench-promotion", artifact_location=(root / "artifacts").as_uri())
    detector = load_detector(model_dir)
    name = "bench-fleet"

    def register() -> str:
        with tracking_run(uri, "bench-promotion", None, {}):
            return register_version(detector, model_dir, name)

    # the gates judge both versions on the training history (normal data: the false-alarm gate)
    promote = ["promote", name, "--tracking-uri", uri, "--json"]
    promote += ["--data", str(root / "history.csv"), "--key-col", "key", "--time-col", "ts"]
    register()
    if cli(promote) != 0:
        raise RuntimeError("the first version did not pass the promotion gates")
    tag = uuid.uuid4().hex[:6]
    topic, out = f"promo-{tag}", f"promo-{tag}-events"
    ensure_topics(bootstrap, {topic: {"num_partitions": 4}, out: {}})
    log = root / "promotion-worker.log"
    command = worker_command(bootstrap, f"models:/{name}@champion", f"promo-{tag}", topic, out)
    command += ["--events", "windows", "--emit-all", "--reload-interval-s", str(interval)]
    worker = subprocess.Popen(
        command,
        stdout=open(log, "ab"),  # noqa: SIM115 - the child owns it
        stderr=subprocess.STDOUT,
        env=dict(os.environ, MLFLOW_TRACKING_URI=uri),
    )
    stop = threading.Event()
    first_seen: dict[str, float] = {}

    def collect() -> None:
        consumer = KafkaConsumer(out, bootstrap_servers=bootstrap, auto_offset_reset="latest")
        while not stop.is_set():
            for records in consumer.poll(timeout_ms=100).values():
                for record in records:
                    version = orjson.loads(record.value)["data"]["model"]["version"]
                    first_seen.setdefault(version, time.monotonic())
        consumer.close()

    def feed() -> None:
        from kafka import KafkaProducer

        producer = KafkaProducer(bootstrap_servers=bootstrap, linger_ms=5)
        fleet = simulate_fleet(keys=8, readings_per_key=50_000, features=8, anomalies=(), seed=0)
        keys = [k.encode() for k in fleet.keys.tolist()]
        for i, payload in enumerate(fleet.payloads()):
            if stop.is_set():
                break
            producer.send(topic, key=keys[i], value=payload)
            if i % 100 == 99:
                time.sleep(0.05)  # ~2,000 readings/s
        producer.close()

    threads = [threading.Thread(target=f, daemon=True) for f in (collect, feed)]
    for thread in threads:
        thread.start()
    waits = []
    try:
        deadline = time.monotonic() + 120
        while "1" not in first_seen:
            if time.monotonic() > deadline or worker.poll() is not None:
                raise RuntimeError(f"the worker never served version 1; see {log}")
            time.sleep(0.1)
        for _ in range(rounds):
            version = register()
            if cli(promote) != 0:
                raise RuntimeError(f"version {version} did not pass the promotion gates")
            promoted = time.monotonic()
            deadline = promoted + interval + 120
            while version not in first_seen:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"version {version} never served; see {log}")
                time.sleep(0.02)
            waits.append(first_seen[version] - promoted)
            print(f"v{version}: first event {waits[-1]:.2f}s after promote")
    finally:
        stop.set()
        worker.terminate()
        worker.wait(timeout=60)
        for thread in threads:
            thread.join(timeout=30)
    return waits


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("results"))
    parser.add_argument("--readings", type=int, default=1_000_000)
    parser.add_argument("--keys", type=int, default=125)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=5, help="promotions to time")
    parser.add_argument("--reload-interval", type=float, default=5.0)
    args = parser.parse_args(argv)

    from benchmarks.common import ensure_topics

    with broker_and_workdir("aewatch-scale") as (bootstrap, root):
        model = train_model(root, args.keys)
        topic = f"scale-{uuid.uuid4().hex[:6]}"
        ensure_topics(bootstrap, {topic: {"num_partitions": 8}})
        per_key = args.readings // args.keys
        total = per_key * args.keys
        fill(bootstrap, topic, args.keys, per_key)
        runs: dict[int, list[dict]] = {1: [], 2: []}
        for _ in range(args.repeats):
            for workers in (1, 2):
                run = group_rate(bootstrap, topic, total, model, workers, root / "workers.log")
                runs[workers].append(run)
                print(f"{workers} worker(s): {run['rate']:,.0f} readings/s")
        waits = promotion_latency(bootstrap, root, model, args.rounds, args.reload_interval)

    one = statistics.median(r["rate"] for r in runs[1])
    two = statistics.median(r["rate"] for r in runs[2])
    result = {
        "readings": total,
        "cpu_count": os.cpu_count(),
        "runs": runs,
        "one_worker": one,
        "two_workers": two,
        "ratio": two / one,
        "reload_interval_s": args.reload_interval,
        "promotion_waits_s": waits,
        "promotion_median_s": statistics.median(waits),
        "promotion_max_s": max(waits),
    }
    markdown = "\n".join(
        [
            "## Scale-out and promotion (real broker, CPU)",
            "",
            f"{total:,} readings on 8 partitions, window 64 / stride 8, alarm mode; "
            f"{os.cpu_count()} CPU cores shared by the workers and the broker; medians of "
            f"{args.repeats} alternating runs.",
            "",
            md_table(["workers", "readings/s"], [[1, one], [2, two]]),
            "",
            f"Two workers / one: **{two / one:.2f}x**.",
            "",
            f"Promotion to first event of the new version (reload interval "
            f"{args.reload_interval:g} s, {len(waits)} promotions): median "
            f"**{statistics.median(waits):.2f} s**, max {max(waits):.2f} s.",
        ]
    )
    write_results(args.out, "scaleout", result, markdown)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
