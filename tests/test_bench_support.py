"""Pieces of the benchmarks: the CPU meter (`/proc`) counts a supervisor's busy member as its
cores and not this process's idle time, and as the broker's cores only the JVM that runs Kafka;
the processes figure waits for its own members' joins, not for those an earlier run wrote into
the same log; the GPU benchmark's process counts are checked before any work."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from benchmarks import bench_gpu
from benchmarks.bench_clients import assignments
from benchmarks.common import CpuMeter, _proc_stats

SPIN = "import time\nend = time.process_time() + 10\nwhile time.process_time() < end: pass\n"
# a supervisor that starts a spinning member and waits for it
PARENT = f"import subprocess, sys\nsubprocess.run([sys.executable, '-c', {SPIN!r}])\n"


def test_a_supervisors_busy_member_counts_and_this_process_does_not():
    parent = subprocess.Popen([sys.executable, "-c", PARENT], start_new_session=True)
    try:
        time.sleep(1.0)  # the member has started spinning
        meter = CpuMeter(tree=parent.pid)
        meter.begin()
        time.sleep(1.0)
        used = meter.end()
    finally:
        os.killpg(parent.pid, signal.SIGKILL)
        parent.wait()
    assert 0.3 < used["members"] <= 1.2  # one spinning member: about a core (less when busy)
    assert used["self"] < 0.2  # this process slept
    assert 0.9 < used["seconds"] < 2.0


def test_joins_are_counted_from_where_this_run_began_its_log(tmp_path):
    log = tmp_path / "processes-2.log"
    earlier = "{\"msg\": \"assigned [('t', 0), ('t', 1)] (state for 0)\"}\n"
    log.write_text(earlier * 2 + '{"msg": "member 0 exited with 0"}\n')
    with open(log, "ab") as out:
        start = out.tell()
        out.write(earlier.replace("'t'", "'u'").encode())
    assert assignments(log, start) == 1  # this run's member; the earlier run's two do not count
    assert assignments(log) == 3


SPIN_JAVA = """public class Spin {
    public static void main(String[] args) {
        long end = System.nanoTime() + 10_000_000_000L;
        double x = 0;
        while (System.nanoTime() < end) { x += Math.sqrt(x + 1); }
        System.out.println(x);
    }
}
"""


def _runs_kafka(pid: int) -> bool:
    try:
        return b"kafka.Kafka" in Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return False  # ended meanwhile


def test_the_broker_is_the_java_process_running_kafka_and_no_other(tmp_path):
    source = tmp_path / "Spin.java"
    source.write_text(SPIN_JAVA)
    # two spinning JVMs, one of them with the broker's main class among its arguments
    other = subprocess.Popen(["java", str(source)], start_new_session=True)
    broker = subprocess.Popen(["java", str(source), "kafka.Kafka"], start_new_session=True)
    try:
        time.sleep(3.0)  # both compiled their source and spin
        meter = CpuMeter()
        meter.begin()
        before = _proc_stats()
        time.sleep(1.5)
        after = _proc_stats()
        used = meter.end()
    finally:
        for proc in (other, broker):
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    spent = {p.pid: (after[p.pid][2] - before[p.pid][2]) / used["seconds"] for p in (other, broker)}
    assert spent[other.pid] > 0.2 and spent[broker.pid] > 0.2  # both spun
    # brokers already running here (the suite's, or one starting beside it) count as brokers too
    brokers = [p for p in after.keys() & before.keys() - {broker.pid} if _runs_kafka(p)]
    running = sum(after[p][2] - before[p][2] for p in brokers) / used["seconds"]
    # the brokers' CPU, not the other JVM's (ticks of 10 ms, read at slightly other times)
    expected = spent[broker.pid] + running
    assert expected - 0.05 < used["broker"] < expected + spent[other.pid] / 2


def test_the_gpu_benchmark_refuses_more_processes_than_partitions_before_any_work(capsys):

    with pytest.raises(SystemExit) as exited:
        bench_gpu.main(["--end-to-end", "--processes", "1", "40", "--partitions", "32"])
    assert exited.value.code == 2
    assert "--processes: each count must be 1..--partitions (32)" in capsys.readouterr().err


def test_the_fleet_benchmarks_cached_detector_is_keyed_on_the_training_code(tmp_path):
    """A detector cached by the fleet benchmark is reused only by the code that trained it: a
    change to training or to the detector core makes a new key, other code does not."""
    from benchmarks.bench_fleet import training_code_digest

    for name in ("training/fit.py", "pipeline/detector/scaler.py", "pipeline/worker/loop.py"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text("x = 1\n")
    first = training_code_digest(tmp_path)
    (tmp_path / "pipeline/worker/loop.py").write_text("x = 2\n")
    assert training_code_digest(tmp_path) == first
    keys = {first}
    for name in ("training/fit.py", "pipeline/detector/scaler.py", "training/new.py"):
        (tmp_path / name).write_text("x = 3\n")
        keys.add(training_code_digest(tmp_path))
    assert len(keys) == 4
    (tmp_path / "training/new.py").rename(tmp_path / "training/renamed.py")
    assert training_code_digest(tmp_path) not in keys  # a file's name counts too
