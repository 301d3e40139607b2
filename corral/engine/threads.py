"""How many threads the kernels use: the cores nobody else is using, unless told.

A decode step is a chain of parallel calls with a barrier after each. When another process holds one
of the cores, a thread placed there makes every barrier wait for the scheduler to give it a slice back:
llama.cpp's 2-thread decode measured 20 tokens/s on an idle 2-core machine and 2.4 with one core busy.
So Corral counts the cores that are free when it loads a model (/proc/stat over a short window, less
this process's own use) and uses that many; `--threads` (or `threads=`) overrides. Its kernel threads
also never busy-wait for long, and yield while they do (kernels/pool.c).
"""

from __future__ import annotations

import logging
import os
import time

import torch

log = logging.getLogger("corral.engine")


def _machine_busy_ticks() -> int | None:
    """Clock ticks all CPUs spent not idle since boot (Linux), or None."""
    try:
        with open("/proc/stat") as f:
            fields = [int(v) for v in f.readline().split()[1:]]
    except (OSError, ValueError):
        return None
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
    return sum(fields[:8]) - idle  # user nice system idle iowait irq softirq steal (guest is inside user)


def _own_ticks() -> int:
    t = os.times()
    return round((t.user + t.system) * os.sysconf("SC_CLK_TCK"))


def free_cores(window_s: float = 0.2) -> int:
    """The cores this process may run on, less those other processes kept busy over window_s (>= 1)."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    busy0, own0, t0 = _machine_busy_ticks(), _own_ticks(), time.perf_counter()
    if busy0 is None:
        return cores
    time.sleep(window_s)
    busy1, own1, elapsed = _machine_busy_ticks(), _own_ticks(), time.perf_counter() - t0
    others = max(0, (busy1 - busy0) - (own1 - own0)) / os.sysconf("SC_CLK_TCK") / elapsed  # cores' worth
    # a core counts as taken when another process used more than ~half of it
    return max(1, min(cores, cores - int(others + 0.4)))


def use_threads(requested: int | None = None) -> int:
    """Set torch's (and so the kernels') thread count: `requested`, or the free cores. Returns it."""
    if requested is not None:
        if requested < 1:
            raise ValueError(f"threads must be >= 1, got {requested}")
        n = requested
    else:
        n = free_cores()
        cores = os.cpu_count() or 1
        if n < cores:
            log.info("%d of %d cores are busy with other work: using %d threads (set --threads to override)",
                     cores - n, cores, n)
    torch.set_num_threads(n)
    return n
