"""Pieces of the benchmarks: the CPU meter (`/proc`) counts a supervisor's busy member as its
cores and not this process's idle time; the processes figure waits for its own members' joins,
not for those an earlier run wrote into the same log."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

from benchmarks.bench_clients import assignments
from benchmarks.common import CpuMeter

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
