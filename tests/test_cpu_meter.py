"""The benchmarks' CPU meter (`/proc`): a supervisor's busy member counts as its cores, and this
process's idle time does not."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

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
