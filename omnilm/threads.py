"""How many CPU threads torch uses: the physical cores this process may run on, unless told otherwise.

torch's default (every logical CPU) oversubscribes a machine that is shared or has SMT: OpenMP threads
then spin-wait on each other (measured: `omnilm train` 106 s with the default vs 13 s with one thread on
a busy 2-core VM). The choice is printed so a slow run is never a silent one.
"""

from __future__ import annotations

import os
from pathlib import Path


def available_cpus() -> set[int]:
    """Logical CPUs this process may run on (cgroup/taskset affinity, not the machine's count)."""
    if hasattr(os, "sched_getaffinity"):
        return set(os.sched_getaffinity(0))
    return set(range(os.cpu_count() or 1))


def physical_cores(cpus: set[int] | None = None) -> int:
    """Physical cores among `cpus`: SMT siblings (Linux topology files) count once."""
    cpus = available_cpus() if cpus is None else cpus
    cores = set()
    for cpu in cpus:
        topo = Path(f"/sys/devices/system/cpu/cpu{cpu}/topology")
        try:
            siblings = (topo / "thread_siblings_list").read_text().strip()
            package = (topo / "physical_package_id").read_text().strip()
        except OSError:
            siblings, package = str(cpu), "0"  # no topology (macOS, containers): count logical CPUs
        cores.add((package, siblings))
    return max(1, len(cores))


def default_threads() -> tuple[int, str]:
    """(threads, why): OMP_NUM_THREADS when set, else the physical cores available."""
    env = os.environ.get("OMP_NUM_THREADS", "").strip()
    if env.isdigit() and int(env) > 0:
        return int(env), "OMP_NUM_THREADS"
    n = physical_cores()
    return (
        n,
        f"physical cores available to this process, of {os.cpu_count()} logical CPUs; --threads N to change",
    )


def busy_note(threads: int) -> str:
    """A hint when other processes already keep the cores busy (the default stays fixed so a run's
    speed, not its thread count, is what the load changes)."""
    try:
        load = os.getloadavg()[0]
    except (OSError, AttributeError):
        return ""
    cores = len(available_cpus())
    if threads > 1 and load >= cores:
        return f"; the machine is busy (load {load:.1f} on {cores} CPUs): --threads 1 may be much faster"
    return ""


def serving_threads() -> tuple[int, str]:
    """(threads, why) for a server: OMP_NUM_THREADS when set, else the physical cores less one.

    The engine's matmuls share the machine with the server's own event loop (HTTP, JSON, detokenizing)
    and often with its clients: when every core runs an OpenMP thread, the one that loses its core to
    the event loop holds up the others at each barrier. Measured on the 2-core VM, 16 requests of a
    small Llama through the engine alone, another process busy: 2116 tokens/s with 1 thread, 114-1042
    with 2. vLLM's CPU backend likewise leaves a core to its front end."""
    env = os.environ.get("OMP_NUM_THREADS", "").strip()
    if env.isdigit() and int(env) > 0:
        return int(env), "OMP_NUM_THREADS"
    n = physical_cores()
    if n <= 1:
        return 1, "one physical core available"
    return n - 1, f"{n} physical cores available, one left to the HTTP front end; --threads N to change"


def set_threads(threads: int | None = None, serving: bool = False) -> tuple[int, str]:
    """Set torch's intra-op threads; returns (threads, why) for the log."""
    import torch

    n, why = (threads, "--threads") if threads else serving_threads() if serving else default_threads()
    torch.set_num_threads(n)
    return n, why if threads or serving else why + busy_note(n)
