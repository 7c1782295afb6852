"""CPU threading for every command: passive waiting, and as many threads as cores this process may use.

PyTorch's CPU wheels run their parallel regions on GNU OpenMP, whose idle threads spin on a core for a while
before sleeping, and use as many threads as the machine has cores. On a shared machine both hurt badly: each
spinning thread takes a core another process needed, and threads are made for cores a container's quota
(cgroup) or the CPU affinity never gives us. A CLI run on a busy 2-core machine was about 20x slower than
with `OMP_WAIT_POLICY=PASSIVE` (`benchmarks/cli_threading.py` measures it).

So the CLI calls `configure_threads` before anything imports torch (libgomp reads its environment once, when
torch loads it): `OMP_WAIT_POLICY=PASSIVE` unless the user chose a policy, and the thread count from
`--threads`, else the user's `OMP_NUM_THREADS`, else the cores actually available (affinity and cgroup CPU
quota) shared among this machine's processes of an `accelerate launch` / `torchrun` world.
"""

from __future__ import annotations

import math
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import MutableMapping

# cgroup v2 (`cpu.max`: "QUOTA PERIOD" or "max PERIOD") and v1 (`cpu.cfs_quota_us`, -1 = none).
CGROUP_V2 = Path("/sys/fs/cgroup/cpu.max")
CGROUP_V1 = (Path("/sys/fs/cgroup/cpu/cpu.cfs_quota_us"), Path("/sys/fs/cgroup/cpu/cpu.cfs_period_us"))
THREAD_VARIABLES = ("OMP_NUM_THREADS", "MKL_NUM_THREADS")


def cgroup_cpu_limit(v2: Path = CGROUP_V2, v1: tuple[Path, Path] = CGROUP_V1) -> float | None:
    """CPUs this cgroup may use per period (e.g. 1.5), or None when no quota is set or readable."""
    try:
        quota, period = v2.read_text().split()[:2]
        return None if quota == "max" else int(quota) / int(period)
    except (OSError, ValueError):
        pass
    try:
        quota, period = (int(p.read_text()) for p in v1)
        return None if quota <= 0 else quota / period
    except (OSError, ValueError):
        return None


def available_cores(limit: float | None = None) -> int:
    """Cores this process may run on: its CPU affinity, capped by the cgroup quota (rounded up)."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    limit = cgroup_cpu_limit() if limit is None else limit
    if limit is not None:
        cores = min(cores, max(1, math.ceil(limit)))
    return max(1, cores)


def default_threads(environ: MutableMapping[str, str] = os.environ, cores: int | None = None) -> int:
    """The available cores shared among the processes that torchrun / accelerate started on this machine."""
    cores = available_cores() if cores is None else cores
    try:
        local_processes = max(1, int(environ.get("LOCAL_WORLD_SIZE", "1")))
    except ValueError:
        local_processes = 1
    return max(1, cores // local_processes)


def configure_threads(threads: int | None = None, environ: MutableMapping[str, str] = os.environ,
                      cores: int | None = None) -> int:
    """Set the threading environment (before torch is imported) and, if torch is already loaded, its
    intra-op thread count. `threads`: the user's `--threads`; None keeps their OMP_NUM_THREADS or picks
    `default_threads`. Returns the thread count in force."""
    environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    if threads is None:
        try:
            threads = int(environ["OMP_NUM_THREADS"])
        except (KeyError, ValueError):
            threads = default_threads(environ, cores)
    threads = max(1, threads)
    for name in THREAD_VARIABLES:
        environ[name] = str(threads)
    torch = sys.modules.get("torch")
    if torch is not None and torch.get_num_threads() != threads:
        torch.set_num_threads(threads)
    return threads


def threads_from_argv(argv: list[str]) -> int | None:
    """The value of `--threads N` / `--threads=N` before the parser runs (which imports torch for some
    commands); None when absent or not a whole number >= 1 (the parser then reports it)."""
    for i, arg in enumerate(argv):
        if arg == "--":
            break
        value = arg.split("=", 1)[1] if arg.startswith("--threads=") else (
            argv[i + 1] if arg == "--threads" and i + 1 < len(argv) else None)
        if value is not None:
            return int(value) if value.isdigit() and int(value) >= 1 else None
    return None


@dataclass
class Threads:
    """The flag every command has (`concept_erase.cli` adds it to each)."""

    threads: int | None = field(default=None, metadata={
        "help": "CPU threads for torch (default: $OMP_NUM_THREADS, else the cores this process may use, by CPU "
                "affinity and cgroup quota, shared among local accelerate processes)", "min": 1})

    def __post_init__(self):
        from .cli_args import check_fields

        check_fields(self)
