"""`aewatch worker --processes N`: N group members on one machine, one process each.

One Python process decodes and windows about as fast as one core allows; a machine with more
cores (and one GPU that scores far more windows than one process feeds it) runs several members
of the same consumer group. Each child is `aewatch worker` with the same settings and
`--processes 1`, its own Kafka client, its own model copy on the same device (scoring stays
batched per process), and what must differ per member made distinct: the client id, a static
group instance id and the transactional id get the suffix `-i`, a fixed HTTP port becomes
`port + i`.

The supervisor forwards SIGTERM and SIGINT to its children, which finish their batch,
checkpoint and leave the group, and waits for them; one still running `STOP_GRACE_S` later is
killed (it has checkpointed, or reads again from its last commit). A child that fails ends the
others (the orchestrator restarts the whole set); children exit with the supervisor should it be
killed.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import signal
import subprocess
import sys
import time
from collections.abc import Mapping

from pipeline.settings import child_environment
from pipeline.worker.settings import WorkerSettings

__all__ = ["member_process", "member_settings", "supervise"]

log = logging.getLogger(__name__)
# How long children may take to checkpoint and leave after SIGTERM before they are killed.
STOP_GRACE_S = 60.0
_PR_SET_PDEATHSIG = 1


def member_settings(settings: WorkerSettings, index: int) -> WorkerSettings:
    """The settings of child `index`: one process, its share of the CPU threads, and its own
    ids and port."""
    kafka = settings.kafka
    changes = {"processes": 1, "cpu_threads": settings.batching.threads(settings.loop.processes)}
    changes["client_id"] = f"{kafka.client_id}-{index}"
    if kafka.group_instance_id:
        changes["group_instance_id"] = f"{kafka.group_instance_id}-{index}"
    if kafka.exactly_once:
        changes["transactional_id"] = f"{kafka.transactional_id_value}-{index}"
    if settings.http.http_port > 0:
        changes["http_port"] = settings.http.http_port + index
    return settings.replace(**changes)


def member_process(
    settings: WorkerSettings, index: int, environ: Mapping[str, str], log_format: str = "text"
) -> tuple[list[str], dict[str, str]]:
    """The command line and environment of member `index`: its settings as flags, and the
    supervisor's environment without the AEWATCH_ variables those flags give (a member reading
    `AEWATCH_PROCESSES` would supervise members of its own)."""
    from pipeline.worker.cli import worker_command

    member = member_settings(settings, index)
    return worker_command(member, log_format=log_format), child_environment(member, environ)


def _die_with_parent() -> None:  # pragma: no cover - runs in the child before exec
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


def supervise(
    settings: WorkerSettings, environ: Mapping[str, str], *, log_format: str = "text"
) -> int:
    """Run `settings.loop.processes` members until they all stop; their worst exit status."""
    children: list[subprocess.Popen] = []
    stopping = False

    def _stop(signum, _frame) -> None:
        nonlocal stopping
        stopping = True
        for child in children:
            if child.poll() is None:
                child.send_signal(signal.SIGTERM)

    previous = {s: signal.signal(s, _stop) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        for index in range(settings.loop.processes):
            if stopping:  # a signal while members start: no more of them
                break
            argv, env = member_process(settings, index, environ, log_format)
            children.append(
                subprocess.Popen(
                    argv, env=env, preexec_fn=_die_with_parent if sys.platform == "linux" else None
                )
            )
            if stopping:  # the signal came as it started: it stops with the others
                children[-1].send_signal(signal.SIGTERM)
            log.info("member %d started (pid %d)", index, children[-1].pid)
        return _wait(children, lambda: stopping, _stop)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        _reap(children)


def _wait(children: list[subprocess.Popen], stopping, stop) -> int:
    """Until every member has exited; once stopping, a member still running `STOP_GRACE_S`
    later is killed (it has checkpointed, or reads again from its last commit). The status of
    the member whose failure stopped the others, else the first other than 0."""
    worst = 0
    first = None  # the status of the member whose failure stopped the others: the cause
    stopped_at = None
    while any(child.poll() is None for child in children):
        for index, child in enumerate(children):
            code = child.poll()
            if code is not None and code != 0 and not stopping():
                log.error("member %d (pid %d) exited with %d: stopping all", index, child.pid, code)
                first = code
                stop(signal.SIGTERM, None)
        if stopping() and stopped_at is None:
            stopped_at = time.monotonic()
        if stopped_at is not None and time.monotonic() - stopped_at > STOP_GRACE_S:
            _reap(children, grace_s=0.0)
        time.sleep(0.2)
    for index, child in enumerate(children):
        log.info("member %d (pid %d) exited with %d", index, child.pid, child.returncode)
        worst = worst or child.returncode
    return exit_status(worst if first is None else first)


def exit_status(returncode: int) -> int:
    """A member's status as a shell gives it: killed by signal s (returncode -s) is 128 + s,
    not the 256 - s that `sys.exit(-s)` would make of it."""
    return 128 - returncode if returncode < 0 else returncode


def _reap(children: list[subprocess.Popen], grace_s: float | None = None) -> None:
    """SIGTERM to the members still running; those still running `grace_s` (default
    `STOP_GRACE_S`) later are killed."""
    deadline = time.monotonic() + (STOP_GRACE_S if grace_s is None else grace_s)
    for child in children:
        if child.poll() is None:
            child.send_signal(signal.SIGTERM)
    for index, child in enumerate(children):
        try:
            child.wait(max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            log.error("member %d (pid %d) did not stop in time: killed", index, child.pid)
            child.kill()
            child.wait()
