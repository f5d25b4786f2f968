"""Data-parallel training on PyTorch's own distributed engine: launch, join, reduce.

A training job runs in one of three ways:

* one process, no process group: exactly the job as it always was;
* `aewatch train --nproc-per-node N [--nnodes M --rdzv-endpoint HOST:PORT]`: this module
  launches N local ranks with `torch.distributed.launcher` (torchrun's own launcher, c10d
  rendezvous, no restarts) and, with several nodes, meets the other machines' ranks at the
  endpoint;
* under an external `torchrun`: the ranks find `RANK`, `WORLD_SIZE`, `LOCAL_RANK` and
  `MASTER_ADDR` in their environment and join.

Each rank joins the process group (gloo on CPU, NCCL on CUDA) and trains its shard of every
global batch through `DistributedDataParallel`. A rank that raises fails the job: the launcher
stops the other ranks and `launch` raises `DistributedError` naming the rank and its error.
"""

from __future__ import annotations

import logging
import sys
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch
import torch.distributed as dist

from pipeline.detector.cores import available_cores
from pipeline.errors import ConfigError, DistributedError

__all__ = [
    "BACKENDS",
    "LaunchSettings",
    "RankContext",
    "all_reduce_sums",
    "keep_triton_out",
    "launch",
]

log = logging.getLogger(__name__)

BACKENDS = ("auto", "gloo", "nccl")
_ENV_KEYS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


@dataclass(frozen=True)
class LaunchSettings:
    """How many ranks to start here and where the nodes meet; validated at start-up."""

    nproc_per_node: int = 1
    nnodes: int = 1
    rdzv_endpoint: str | None = None
    rdzv_id: str | None = None
    backend: str = "auto"

    def __post_init__(self) -> None:
        if self.nproc_per_node < 1:
            raise ConfigError("nproc_per_node", f"must be >= 1, got {self.nproc_per_node}")
        if self.nnodes < 1:
            raise ConfigError("nnodes", f"must be >= 1, got {self.nnodes}")
        if self.nnodes > 1 and not self.rdzv_endpoint:
            raise ConfigError("rdzv_endpoint", "several nodes meet at --rdzv-endpoint HOST:PORT")
        if self.backend not in BACKENDS:
            raise ConfigError("dist_backend", f"choose one of {BACKENDS}, got {self.backend!r}")

    @property
    def world_size(self) -> int:
        return self.nproc_per_node * self.nnodes

    @property
    def spawns(self) -> bool:
        """Whether this command starts ranks itself (rather than being one)."""
        return self.world_size > 1


@dataclass(frozen=True)
class RankContext:
    """This process's place in a distributed job; `RankContext()` is the one-process job."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    local_world_size: int = 1

    @property
    def is_main(self) -> bool:
        """Rank 0 alone logs, writes the artifact and registers the version."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @classmethod
    def from_environment(cls, env: Mapping[str, str]) -> RankContext | None:
        """The context torchrun (or `launch`) sets up, or None outside a distributed job."""
        if "RANK" not in env or "WORLD_SIZE" not in env:
            return None
        missing = [k for k in ("LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT") if k not in env]
        if missing:
            raise ConfigError("distributed", f"RANK is set but {', '.join(missing)} is not")
        try:
            return cls(
                rank=int(env["RANK"]),
                world_size=int(env["WORLD_SIZE"]),
                local_rank=int(env["LOCAL_RANK"]),
                local_world_size=int(env.get("LOCAL_WORLD_SIZE", env["WORLD_SIZE"])),
            )
        except ValueError as exc:
            raise ConfigError("distributed", f"not an integer in {_ENV_KEYS}: {exc}") from None

    def device(self, requested: str) -> torch.device:
        """This rank's device: `cuda:LOCAL_RANK` when CUDA is asked for (or `auto` finds it). On
        the CPU, the process takes at most its share of the cores it may use (`cpu_threads`)."""
        cuda = requested.startswith("cuda") or (requested == "auto" and torch.cuda.is_available())
        if cuda and self.distributed:
            return torch.device("cuda", self.local_rank)
        from pipeline.detector import resolve_device

        device = resolve_device(requested)
        if device.type == "cpu":
            torch.set_num_threads(min(torch.get_num_threads(), self.cpu_threads()))
        return device

    def cpu_threads(self) -> int:
        """This rank's share of the cores the process may use: a container's CPU limit, not
        every core of its node (`available_cores`)."""
        return max(1, available_cores() // self.local_world_size)

    def join(self, backend: str, device: torch.device) -> None:
        """Join the process group (env:// rendezvous); CPU ranks share the cores evenly."""
        if device.type == "cpu":
            torch.set_num_threads(self.cpu_threads())
        else:
            torch.cuda.set_device(device)
        chosen = backend if backend != "auto" else ("nccl" if device.type == "cuda" else "gloo")
        dist.init_process_group(chosen, rank=self.rank, world_size=self.world_size)
        log.info("rank %d of %d joined (%s, %s)", self.rank, self.world_size, chosen, device)

    def leave(self) -> None:
        if dist.is_initialized():
            dist.destroy_process_group()


def all_reduce_sums(values: list[float], device: torch.device) -> list[float]:
    """Element-wise sums of `values` over every rank (the values themselves outside a group)."""
    if not (dist.is_available() and dist.is_initialized()):
        return values
    tensor = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(tensor)
    return tensor.tolist()


def launch(settings: LaunchSettings, entry: Callable, *args) -> object:
    """Run `entry(*args)` on `settings.nproc_per_node` local ranks (plus the other nodes') and
    return what rank 0 returns (None when rank 0 runs on another node).

    `entry` must be importable (a module-level function): ranks are fresh processes.
    """
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    single_node = settings.nnodes == 1 and not settings.rdzv_endpoint
    config = LaunchConfig(
        min_nodes=settings.nnodes,
        max_nodes=settings.nnodes,
        nproc_per_node=settings.nproc_per_node,
        run_id=settings.rdzv_id or uuid.uuid4().hex,
        rdzv_backend="c10d",
        rdzv_endpoint="localhost:0" if single_node else settings.rdzv_endpoint,
        max_restarts=0,
        monitor_interval=0.2,
        start_method="spawn",
    )
    try:
        results = elastic_launch(config, entry)(*args)
    except ChildFailedError as exc:
        rank, message = _root_cause(exc)
        raise DistributedError(rank, message) from None
    return results.get(0)


def _root_cause(exc) -> tuple[int, str]:
    """The failed rank that raised (rather than being stopped), and its error message."""
    recorded = {
        rank: failure.message
        for rank, failure in exc.failures.items()
        if failure.error_file_data and failure.message
    }
    if recorded:
        rank = min(recorded, key=lambda r: exc.failures[r].timestamp)
        message = recorded[rank]
        return rank, message.get("message", str(message)) if isinstance(message, dict) else message
    rank, failure = exc.get_first_failure()
    return rank, f"exit code {failure.exitcode}: {failure.message}"


def keep_triton_out() -> None:
    """Where there is no CUDA device, mark Triton absent for this process. Nothing here
    compiles kernels, yet the first optimizer torch makes imports `torch._dynamo`, which imports
    Triton when the package is installed (the CUDA wheels bring it), and Triton's bindings then
    print hundreds of `nanobind: leaked ...` lines at interpreter exit."""
    if "triton" not in sys.modules and not torch.cuda.is_available():
        sys.modules["triton"] = None  # `import triton` raises ImportError: torch's probes say no
