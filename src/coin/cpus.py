"""How many CPU cores this process may use: the one answer every worker count and torch thread count uses.

``os.cpu_count()`` counts the machine's cores, not the ones this process may run on: under ``taskset``,
a cgroup cpuset (Docker ``--cpuset-cpus``, Slurm, Kubernetes) or a shared machine it over-counts, and
torch threads then outnumber the cores and slow each other down. :func:`cpu_budget` answers, in order:

1. an explicit value (a caller's argument);
2. ``OMP_NUM_THREADS`` when set to a positive integer (the usual way to cap a process's threads);
3. the cores in this process's affinity mask (``os.sched_getaffinity(0)``, Linux);
4. ``os.cpu_count()`` (other systems), at least 1.

A leaf module: it imports nothing of ``coin``.
"""

from __future__ import annotations

import os

OMP_ENV = "OMP_NUM_THREADS"


def affinity_cpus() -> int:
    """The cores this process may run on (its affinity mask), else ``os.cpu_count()``; at least 1."""
    getaffinity = getattr(os, "sched_getaffinity", None)
    if getaffinity is not None:
        try:
            return max(1, len(getaffinity(0)))
        except OSError:
            pass
    return max(1, os.cpu_count() or 1)


def _omp_threads() -> int | None:
    raw = os.environ.get(OMP_ENV, "").strip()
    try:
        n = int(raw)
    except ValueError:
        return None  # unset, empty or not a number (OpenMP ignores it too)
    return n if n > 0 else None


def cpu_budget(explicit: int | None = None) -> int:
    """The CPU cores this process should use: ``explicit``, else ``OMP_NUM_THREADS``, else its affinity mask."""
    if explicit is not None:
        if explicit < 1:
            raise ValueError(f"CPU count {explicit}: needs at least 1")
        return explicit
    return _omp_threads() or affinity_cpus()


def threads_per_worker(workers: int, cpus: int | None = None) -> int:
    """Torch threads for each of ``workers`` local worker processes sharing :func:`cpu_budget` (at least 1)."""
    return max(1, cpu_budget(cpus) // max(1, workers))
