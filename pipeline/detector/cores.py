"""The hardware a process may use: the CPU cores, for the worker's scoring threads and training's
ranks alike, and the names of devices (checked with the settings, before torch is imported).

A container's CPU limit is a cgroup quota, not fewer visible cores: `os.cpu_count()` and torch's
default thread count see every core of the node, so a pod limited to 2 CPUs on a 64-core node
would run 64 threads against its quota.
"""

from __future__ import annotations

import math
import os
import re
from pathlib import Path

__all__ = ["CGROUP", "available_cores", "device_problem"]

CGROUP = Path("/sys/fs/cgroup")
_DEVICE = re.compile(r"auto|cpu|cuda(:\d+)?")


def device_problem(name: str) -> str | None:
    """Why `name` is not a device name (auto, cpu or cuda[:N]); None when it is one."""
    if _DEVICE.fullmatch(name):
        return None
    return f"unknown device {name!r}; use auto, cpu or cuda[:N]"


def available_cores(cgroup: Path = CGROUP) -> int:
    """The cores this process may use: those it may run on, fewer under a CPU quota (a
    container's CPU limit: cgroup v2 `cpu.max`, or v1 `cpu.cfs_quota_us`), rounded up."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else 0
    cores = cores or os.cpu_count() or 1
    quota = _cpu_quota(cgroup)
    return max(1, min(cores, math.ceil(quota))) if quota else cores


def _cpu_quota(cgroup: Path) -> float | None:
    """CPUs' worth of time the cgroup may take per period; None without a limit."""
    try:
        limit, period = (cgroup / "cpu.max").read_text().split()[:2]
        return None if limit == "max" else int(limit) / int(period)
    except (OSError, ValueError):
        pass
    try:
        limit = int((cgroup / "cpu" / "cpu.cfs_quota_us").read_text())
        period = int((cgroup / "cpu" / "cpu.cfs_period_us").read_text())
    except (OSError, ValueError):
        return None
    return limit / period if limit > 0 and period > 0 else None
