"""`aewatch worker --processes N` against the real broker: N members of one group share the
partitions and score every window; SIGTERM to the supervisor stops every child cleanly."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time

import orjson
import pytest

from pipeline.worker.cli import worker_command
from pipeline.worker.settings import WorkerSettings
from pipeline.worker.supervisor import member_settings
from tests.kafka_support import consume, names, produce, stream_items, worker_settings
from tests.worker_support import flags_by_window, fleet, train_fleet_detector

pytestmark = pytest.mark.kafka


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    return train_fleet_detector(tmp_path_factory.mktemp("fleet"))


def _pids(text: str) -> list[int]:
    return [int(p) for p in re.findall(r"member \d+ started \(pid (\d+)\)", text)]


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie is not alive
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().split(")")[-1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def test_members_get_distinct_ids_and_ports(trained):
    settings = worker_settings(
        "127.0.0.1:1",
        names("ids"),
        trained.artifact_dir,
        processes=3,
        exactly_once=True,
        group_instance_id="pod-a",
        http_port=9000,
    )
    members = [member_settings(settings, i) for i in range(3)]
    assert [m.loop.processes for m in members] == [1, 1, 1]
    assert len({m.kafka.transactional_id_value for m in members}) == 3
    assert len({m.kafka.group_instance_id for m in members}) == 3
    assert [m.http.http_port for m in members] == [9000, 9001, 9002]


@pytest.mark.parametrize(
    ("processes", "cores", "threads"),
    [(1, 2, 2), (2, 2, 1), (1, 16, 16), (4, 16, 4), (16, 16, 1), (3, 1, 1)],
)
def test_cpu_threads_default_to_each_members_share_of_the_cores(processes, cores, threads):
    batching = WorkerSettings.build(model="m", bootstrap_servers="b:1", input_topic=("t",)).batching
    assert batching.threads(processes, cores) == threads
    chosen = batching.__class__(cpu_threads=6)
    assert chosen.threads(processes, cores) == 6


@pytest.mark.parametrize(
    ("files", "cores"),
    [
        ({"cpu.max": "200000 100000\n"}, 2),  # a container limited to 2 CPUs (cgroup v2)
        ({"cpu.max": "150000 100000\n"}, 2),  # 1.5 CPUs: rounded up
        ({"cpu.max": "50000 100000\n"}, 1),
        ({"cpu.max": "max 100000\n"}, None),  # no limit: every core it may run on
        ({"cpu/cpu.cfs_quota_us": "100000\n", "cpu/cpu.cfs_period_us": "100000\n"}, 1),  # v1
        ({"cpu/cpu.cfs_quota_us": "-1\n", "cpu/cpu.cfs_period_us": "100000\n"}, None),
        ({}, None),
    ],
)
def test_the_cores_a_container_may_use_follow_its_cpu_limit(tmp_path, files, cores):
    from pipeline.detector.cores import available_cores

    for name, text in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    every = len(os.sched_getaffinity(0))
    assert available_cores(tmp_path) == min(every, cores or every)


def test_members_get_their_share_of_cpu_threads(trained):
    settings = worker_settings("127.0.0.1:1", names("thr"), trained.artifact_dir, processes=2)
    members = [member_settings(settings, i) for i in range(2)]
    assert [m.batching.cpu_threads for m in members] == [settings.batching.threads(2)] * 2
    chosen = settings.replace(cpu_threads=3)
    assert member_settings(chosen, 1).batching.cpu_threads == 3


def test_two_processes_share_the_partitions_and_score_every_window(
    kafka_bootstrap, create_topic, trained, tmp_path
):
    topics = names("procs")
    create_topic(topics["input"], partitions=4)
    stream = fleet(seed=8, keys=6, readings_per_key=800)
    produce(kafka_bootstrap, topics["input"], stream_items(stream))
    settings = worker_settings(
        kafka_bootstrap,
        topics,
        trained.artifact_dir,
        emit_all=True,
        processes=2,
        stop_after_idle_s=6.0,
        commit_interval_ms=300,
    )
    log = tmp_path / "supervisor.log"
    with open(log, "wb") as out:
        code = subprocess.run(
            worker_command(settings), stdout=out, stderr=subprocess.STDOUT, timeout=400
        ).returncode
    text = log.read_text()
    assert code == 0, text[-3000:]
    assert len(_pids(text)) == 2
    windows, _, _ = flags_by_window(stream, trained.detector)
    events = [orjson.loads(r.value) for r in consume(kafka_bootstrap, topics["output"])]
    assert len({e["id"] for e in events}) == len(windows), "every window scored"
    assert text.count("stopped: ") == 2
    share = settings.batching.threads(2)
    assert text.count(f"({share} CPU threads)") == 2, "each member scores with its share"


def test_sigterm_stops_every_member_cleanly(kafka_bootstrap, create_topic, trained, tmp_path):
    topics = names("procterm")
    create_topic(topics["input"], partitions=2)
    produce(kafka_bootstrap, topics["input"], stream_items(fleet(seed=9, readings_per_key=300)))
    settings = worker_settings(
        kafka_bootstrap, topics, trained.artifact_dir, processes=2, stop_after_idle_s=0.0
    )
    log = tmp_path / "supervisor.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(worker_command(settings), stdout=out, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 180
        while log.read_text().count('"msg": "assigned [(') < 2:  # both members joined
            assert proc.poll() is None, log.read_text()[-3000:]
            assert time.monotonic() < deadline, "the members did not start"
            time.sleep(0.3)
        time.sleep(2)
        pids = _pids(log.read_text())
        assert len(pids) == 2 and all(_alive(p) for p in pids)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=90) == 0, log.read_text()[-3000:]
    text = log.read_text()
    assert text.count('"msg": "stopped: ') == 2, "each member finished and left"
    assert not any(_alive(p) for p in pids)


def test_a_member_that_does_not_stop_is_killed_after_the_grace(monkeypatch):
    from pipeline.worker import supervisor

    monkeypatch.setattr(supervisor, "STOP_GRACE_S", 1.0)
    stuck = (
        "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); "
        "print('ready', flush=True); time.sleep(600)"
    )
    child = subprocess.Popen([sys.executable, "-c", stuck], stdout=subprocess.PIPE)
    try:
        assert child.stdout.readline() == b"ready\n"
        child.send_signal(signal.SIGTERM)
        codes: list[int] = []
        waiter = threading.Thread(
            target=lambda: codes.append(supervisor._wait([child], lambda: True, None)),
            daemon=True,
        )
        waiter.start()
        waiter.join(30)
        # as a shell shows a process killed by SIGKILL (it was -9, which exit() made 247)
        assert codes == [128 + signal.SIGKILL], "the supervisor waits on a member past its grace"
    finally:
        if child.poll() is None:
            child.kill()
        child.wait()


class _Member:
    """A member process that exits with `code` at its `exits_at`-th look, or when stopped."""

    def __init__(self, pid: int, code: int | None, exits_at: int = 0) -> None:
        self.pid, self.code, self.exits_at, self.looks = pid, code, exits_at, 0
        self.returncode: int | None = None

    def poll(self) -> int | None:
        self.looks += 1
        if self.returncode is None and self.code is not None and self.looks > self.exits_at:
            self.returncode = self.code
        return self.returncode

    def send_signal(self, signum) -> None:
        if self.returncode is None:
            self.returncode = -signum

    def wait(self, timeout=None) -> int | None:
        return self.poll()

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)


def test_the_supervisor_exits_with_the_status_of_the_member_that_failed():
    from pipeline.worker.supervisor import _wait

    # member 1 fails (a broker nobody answers for: 2); member 0 is stopped by the supervisor
    members = [_Member(100, None), _Member(101, 2, exits_at=1)]
    stopping = []

    def stop(signum, _frame):
        stopping.append(signum)
        for member in members:
            member.send_signal(signum)

    status = _wait(members, lambda: bool(stopping), stop)
    assert [m.returncode for m in members] == [-signal.SIGTERM, 2]
    assert status == 2  # (was -15, the stopped member's, which the shell showed as 241)


def test_a_signal_while_members_start_starts_no_more_and_stops_the_started(monkeypatch):
    """SIGTERM as member 0 of 6 started: the others were started all the same and only killed
    when the 60 s grace ran out (the supervisor exited 61 s after the signal)."""
    from pipeline.worker import supervisor

    started: list[_Member] = []

    def popen(argv, env, preexec_fn):
        started.append(_Member(200 + len(started), None))
        if len(started) == 1:
            os.kill(os.getpid(), signal.SIGTERM)  # the orchestrator stops the pod now
        return started[-1]

    monkeypatch.setattr(supervisor.subprocess, "Popen", popen)
    settings = WorkerSettings.build(
        model="m", bootstrap_servers="127.0.0.1:1", input_topic=("t",), processes=6
    )
    begun = time.monotonic()
    status = supervisor.supervise(settings, {})
    assert time.monotonic() - begun < 5
    assert [m.returncode for m in started] == [-signal.SIGTERM]
    assert status == 128 + signal.SIGTERM
