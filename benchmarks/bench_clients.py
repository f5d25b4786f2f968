"""Kafka clients, record forms and processes, side by side on one broker in one run.

On one pre-filled topic of single-reading JSON records (default 200,000 readings: 125 machines,
8 sensors, 8 partitions) and the same readings as batched records of 100 (columnar JSON and Arrow
IPC), in rounds that alternate every measurement (median of `--repeats`):

  - each client's ceiling: consume every record and do nothing else, and consume + `orjson.loads`
    of every value (kafka-python, confluent-kafka);
  - the aewatch worker (window 64, stride 8, dense autoencoder, CPU) on each client, and on
    confluent-kafka and from memory also with `--switch-interval-ms 0` (the interpreter's 5 ms
    instead of the loop's 0.5 ms);
  - the worker on batched records (confluent);
  - the same worker fed from memory (no Kafka) on each form, and the model alone
    (`benchmarks.memory_feed`): what one process could do if its client cost nothing; and one
    scoring pass on one thread alone and beside a thread that runs Python without pause, at
    the interpreter's 5 ms switch interval and the loop's 0.5 ms;
  - `aewatch worker --processes 1` and `--processes 2` (confluent), on a topic filled once the
    members have joined, timed from outside by the group's committed offsets;
  - p99 latency from a reading's timestamp to its event at half the measured single-process rate
    (median of `--repeats` runs, after a stream that warms the broker up and is not measured).

    python -m benchmarks.bench_clients --out results [--readings 200000] [--repeats 3]

The figures depend on the machine's load: quote the ratios of one run.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import time
import uuid
from pathlib import Path

import orjson

from benchmarks.bench_worker import (
    FEATURES,
    STRIDE,
    _fleet,
    latency,
    train_model,
    warm_broker,
    worker_rate,
)
from benchmarks.common import (
    CpuMeter,
    broker_and_workdir,
    ensure_topics,
    md_table,
    write_results,
)
from benchmarks.memory_feed import memory_rate, model_rate, pass_beside_busy

BATCH = 100
PARTITIONS = 8
CLIENTS = ("kafka-python", "confluent")
# The worker beside itself with `--switch-interval-ms 0`: the interpreter's own switch interval.
DEFAULT_SWITCH = "interpreter's 5 ms switch interval"


def fill(bootstrap: str, topic: str, records: list[tuple[str, bytes]]) -> None:
    from confluent_kafka import Producer

    producer = Producer(
        {"bootstrap.servers": bootstrap, "linger.ms": 20, "compression.type": "lz4"}
    )
    for key, value in records:
        while True:
            try:
                producer.produce(topic, value, key.encode())
                break
            except BufferError:
                producer.poll(0.05)
    producer.flush()


def consume_rate(bootstrap: str, topic: str, total: int, client: str, decode: bool) -> float:
    """Records/s of a plain consumer reading the whole topic (and decoding every value)."""
    loads = orjson.loads
    group = f"ceiling-{uuid.uuid4().hex[:8]}"
    seen, started = 0, None
    if client == "kafka-python":
        from kafka import KafkaConsumer

        consumer = KafkaConsumer(
            topic,
            bootstrap_servers=bootstrap,
            group_id=group,
            auto_offset_reset="earliest",
            enable_auto_commit=False,
            max_poll_records=10000,
            fetch_max_wait_ms=10,
        )
        while seen < total:
            for records in consumer.poll(timeout_ms=200).values():
                started = started or time.perf_counter()
                if decode:
                    for record in records:
                        loads(record.value)
                seen += len(records)
    else:
        from confluent_kafka import Consumer

        from pipeline.kafka_io.confluent_records import FETCHING

        consumer = Consumer(
            {
                "bootstrap.servers": bootstrap,
                "group.id": group,
                "auto.offset.reset": "earliest",
                "enable.auto.commit": False,
                **FETCHING,  # as the worker fetches
            }
        )
        consumer.subscribe([topic])
        while seen < total:
            messages = consumer.consume(10000, 0.2)
            if messages:
                started = started or time.perf_counter()
                if decode:
                    for message in messages:
                        loads(message.value())
                seen += len(messages)
    elapsed = time.perf_counter() - started
    consumer.close()
    return seen / elapsed


def assignments(log: Path, start: int = 0) -> int:
    """How many partition assignments the members logged past byte `start` of their log."""
    with open(log, "rb") as lines:
        lines.seek(start)
        return lines.read().count(b'"msg": "assigned [(')


def processes_rate(
    bootstrap: str,
    records: list,
    model: Path,
    processes: int,
    log: Path,
    tag: str,
    cpu: dict | None = None,
    device: str = "cpu",
    partitions: int = PARTITIONS,
) -> float:
    """Readings/s of `aewatch worker --processes N --device D` on a topic of its own
    (`partitions` of them), filled once every member has joined (so the group's start-up is not
    timed), from the group's committed offsets: from the first commit that moved to the first
    past three quarters of the topic (the commits stay behind the readings that open windows
    still need). With `cpu` (a dict), the cores the members and the broker used over that span
    (`CpuMeter`) are put in it."""
    import signal

    from confluent_kafka import Consumer, TopicPartition

    from pipeline.worker.cli import worker_command
    from pipeline.worker.settings import WorkerSettings

    group = f"procs-{processes}-{tag}"
    topic = f"clients-procs-{processes}-{tag}"
    ensure_topics(bootstrap, {topic: {"num_partitions": partitions}})
    settings = WorkerSettings.build(
        model=str(model),
        bootstrap_servers=bootstrap,
        group_id=group,
        input_topic=(topic,),
        output_topic=f"{topic}-events",
        dlq_topic=f"{topic}-dlq",
        device=device,
        events="both",
        http_port=-1,
        commit_interval_ms=250,
        max_poll_records=10000,
        kafka_client="confluent",
        processes=processes,
    )
    total = len(records)
    watcher = Consumer({"bootstrap.servers": bootstrap, "group.id": group})
    assigned = [TopicPartition(topic, p) for p in range(partitions)]
    first = last = None
    with open(log, "ab") as out:
        start = out.tell()  # the log may hold earlier runs' lines
        proc = subprocess.Popen(worker_command(settings), stdout=out, stderr=subprocess.STDOUT)
        meter = CpuMeter(tree=proc.pid)
        try:
            deadline = time.monotonic() + 300
            while assignments(log, start) < processes:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"--processes {processes} did not join; see {log}")
                time.sleep(0.2)
            time.sleep(3.0)  # the last rebalance settles
            fill(bootstrap, topic, records)
            base = 0
            while proc.poll() is None and time.monotonic() < deadline + 600:
                done = sum(max(0, tp.offset) for tp in watcher.committed(assigned, timeout=10))
                now = time.perf_counter()
                if done and first is None:
                    first, base = now, done
                    meter.begin()
                if done >= 0.75 * total:
                    last = now
                    if cpu is not None:
                        cpu.update(meter.end())
                    break
                time.sleep(0.05)
        finally:
            proc.send_signal(signal.SIGTERM)
            proc.wait(timeout=120)
    watcher.close()
    if first is None or last is None or last <= first:
        raise RuntimeError(f"--processes {processes} did not finish the topic; see {log}")
    return (done - base) / (last - first)


def _worker_cores(cpu: dict, whose: str) -> dict | None:
    """A `CpuMeter` reading as (worker, broker) cores; None when the span was not timed."""
    if not cpu:
        return None
    return {"worker": cpu[whose], "broker": cpu["broker"], "seconds": cpu["seconds"]}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("results"))
    parser.add_argument("--readings", type=int, default=200_000)
    parser.add_argument("--keys", type=int, default=125)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--latency-seconds", type=float, default=15.0)
    args = parser.parse_args(argv)

    with broker_and_workdir("aewatch-clients") as (bootstrap, root):
        model = train_model(root, min(args.keys, 25))
        stream = _fleet(args.keys, args.readings // args.keys)
        total = len(stream.keys)
        tag = uuid.uuid4().hex[:6]
        topics = {form: f"clients-{form}-{tag}" for form in ("single", "json", "arrow")}
        ensure_topics(bootstrap, {t: {"num_partitions": PARTITIONS} for t in topics.values()})
        readings = list(zip(stream.keys.tolist(), stream.payloads(), strict=True))
        fill(bootstrap, topics["single"], readings)
        batches = {form: stream.batches(BATCH, form) for form in ("json", "arrow")}
        for form, records in batches.items():
            fill(bootstrap, topics[form], records)
        print(f"filled {total:,} readings; {len(batches['json']):,} batched records per form")

        rates: dict[str, list[float]] = {}
        cores: dict[str, list[dict]] = {}  # per worker figure: the cores it and the broker used

        def note(name: str, value: float, cpu: dict | None = None) -> None:
            rates.setdefault(name, []).append(value)
            used = ""
            if cpu:
                cores.setdefault(name, []).append(cpu)
                used = f" ({cpu['worker']:.2f} cores, broker {cpu['broker']:.2f})"
            print(f"  {name}: {value:,.0f} readings/s{used}", flush=True)

        def worker(name: str, form: str, client: str, run: str, **overrides) -> None:
            """The worker over the topic of `form` on `client`, in readings/s."""
            count = total if form == "single" else len(batches[form])
            cpu: dict = {}
            rate, _ = worker_rate(
                bootstrap,
                topics[form],
                count,
                model,
                f"{run}-{tag}",
                cpu=cpu,
                kafka_client=client,
                **overrides,
            )
            note(name, rate * total / count, _worker_cores(cpu, "self"))

        for repeat in range(args.repeats):
            print(f"round {repeat + 1}")
            for client in CLIENTS:
                note(
                    f"{client} consume",
                    consume_rate(bootstrap, topics["single"], total, client, False),
                )
                note(
                    f"{client} consume+decode",
                    consume_rate(bootstrap, topics["single"], total, client, True),
                )
                worker(f"worker {client}", "single", client, f"{client}-{repeat}")
            worker(
                f"worker confluent, {DEFAULT_SWITCH}",
                "single",
                "confluent",
                f"switch-{repeat}",
                switch_interval_ms=0,
            )
            for form in ("json", "arrow"):
                worker(
                    f"worker confluent, batches of {BATCH} ({form})",
                    form,
                    "confluent",
                    f"{form}-{repeat}",
                )
            note("worker fed from memory (no Kafka)", memory_rate(readings, model, PARTITIONS))
            note(
                f"worker fed from memory, {DEFAULT_SWITCH}",
                memory_rate(readings, model, PARTITIONS, switch_interval_ms=0),
            )
            for form in ("json", "arrow"):
                rate = memory_rate(batches[form], model, PARTITIONS) * total / len(batches[form])
                note(f"worker fed from memory, batches of {BATCH} ({form})", rate)
            note(f"model alone, windows/s x stride {STRIDE}", model_rate(model) * STRIDE)
            for n in (1, 2):
                log = root / f"processes-{n}.log"
                cpu = {}
                rate = processes_rate(bootstrap, readings, model, n, log, f"{repeat}-{tag}", cpu)
                note(f"worker confluent --processes {n}", rate, _worker_cores(cpu, "members"))

        median = {name: statistics.median(values) for name, values in rates.items()}
        beside = pass_beside_busy(model)
        print(f"one scoring pass beside a busy Python thread: {beside}")
        single = median["worker confluent"]
        warm_broker(bootstrap, model, single / 2, args.keys, root, kafka_client="confluent")
        runs = []
        for _ in range(args.repeats):  # one run's p99 is a few events: the median of runs
            runs.append(
                latency(
                    bootstrap,
                    model,
                    single / 2,
                    args.latency_seconds,
                    args.keys,
                    root,
                    kafka_client="confluent",
                )
            )
            print(f"latency at {runs[-1]['achieved_rate']:,.0f}/s: p99 {runs[-1]['p99_ms']:.1f} ms")
        live = {
            name: statistics.median(run[name] for run in runs)
            for name in ("achieved_rate", "p50_ms", "p99_ms", "events")
        }
        live["keys"], live["runs"] = runs[0]["keys"], runs

    ratios = {
        f"worker {c} / its consume+decode": median[f"worker {c}"] / median[f"{c} consume+decode"]
        for c in CLIENTS
    }
    ratios["worker confluent / worker kafka-python"] = single / median["worker kafka-python"]
    for path, plain in (
        ("worker confluent", "worker confluent"),
        ("worker fed from memory", "worker fed from memory (no Kafka)"),
    ):
        ratios[f"{path}: loop's switch interval / {DEFAULT_SWITCH}"] = (
            median[plain] / median[f"{path}, {DEFAULT_SWITCH}"]
        )
    ratios["processes 2 / processes 1"] = (
        median["worker confluent --processes 2"] / median["worker confluent --processes 1"]
    )
    best_batched = max(
        median[f"worker confluent, batches of {BATCH} ({f})"] for f in ("json", "arrow")
    )
    targets = {
        "worker_at_least_0.8x_its_client_decode_ceiling": all(
            ratios[f"worker {c} / its consume+decode"] >= 0.8 for c in CLIENTS
        ),
        "confluent_at_least_400k_readings_s": single >= 400_000,
        "batched_at_least_2m_readings_s": best_batched >= 2_000_000,
        "two_processes_at_least_1.8x_one": ratios["processes 2 / processes 1"] >= 1.8,
        "p99_at_most_100ms_at_half_rate": live["p99_ms"] <= 100,
    }
    rows = [[name, value, min(rates[name]), max(rates[name])] for name, value in median.items()]
    cpu_median = {
        name: {
            "worker": statistics.median(c["worker"] for c in runs),
            "broker": statistics.median(c["broker"] for c in runs),
            "us_per_reading": statistics.median(
                1e6 * c["worker"] / rate for c, rate in zip(runs, rates[name], strict=True)
            ),
        }
        for name, runs in cores.items()
        if len(runs) == len(rates[name])
    }
    markdown = "\n".join(
        [
            "## Kafka clients, batched records and processes (real broker, CPU)",
            "",
            f"{total:,} readings, {args.keys} machines, {FEATURES} sensors, {PARTITIONS} "
            f"partitions; batched topics hold the same readings {BATCH} to a record. Medians of "
            f"{args.repeats} rounds, every measurement in every round.",
            "",
            md_table(["path", "readings/s (median)", "min", "max"], rows),
            "",
            md_table(["ratio", "value"], [[k, f"{v:.2f}"] for k, v in ratios.items()]),
            "",
            "CPU over each worker figure's timed span (medians; a core is one CPU second per "
            "second): the worker's process or members, the broker, and the worker's CPU per "
            "reading. What more processes can add is bounded by the cores these leave.",
            "",
            md_table(
                ["path", "worker cores", "broker cores", "worker CPU us / reading"],
                [
                    [name, used["worker"], used["broker"], used["us_per_reading"]]
                    for name, used in cpu_median.items()
                ],
            ),
            "",
            f"Latency at {live['achieved_rate']:,.0f} readings/s (half the single-process "
            f"confluent rate, {live['keys']} machines), median of {len(runs)} runs: p50 **{live['p50_ms']:.1f} ms**, "
            f"p99 **{live['p99_ms']:.1f} ms** ({live['events']:,.0f} events a run; p99 of each: "
            + ", ".join(f"{run['p99_ms']:.0f}" for run in runs)
            + " ms).",
            "",
            f"One scoring pass of {beside['windows']:,} windows on one thread (median): alone "
            f"{beside['alone_ms']:.1f} ms; beside a thread that runs Python without pause (as "
            "the worker's loop does while it has work): "
            + ", ".join(
                f"{value:.1f} ms at a {name.split('_')[2][:-2]} ms switch interval"
                for name, value in beside.items()
                if name.startswith("beside_busy")
            )
            + " (`--switch-interval-ms`).",
            "",
            f"Targets met: {targets}",
        ]
    )
    write_results(
        args.out,
        "clients_throughput",
        {
            "readings": total,
            "rates": rates,
            "median": median,
            "ratios": ratios,
            "cpu": cores,
            "cpu_median": cpu_median,
            "latency": live,
            "scoring_pass_beside_busy_thread": beside,
            "targets": targets,
        },
        markdown,
    )
    return 0 if all(targets.values()) else 1


if __name__ == "__main__":
    raise SystemExit(main())
