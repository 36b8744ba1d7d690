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
# the variables a thread library reads once, when it starts: OpenMP (torch's intra-op pool), MKL, OpenBLAS
THREAD_VARS = (OMP_ENV, "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")


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


def use_torch_threads(n: int) -> None:
    """Give torch ``n`` intra-op threads in this process, unless it has them already.

    Not a formality: ``torch.set_num_threads`` also sets MKL's thread count for the calling thread and turns
    MKL's dynamic threading off, and a few MKL calls give results that differ in the last bits with those
    settings. Measured (RESULTS.md §18): one backward step of a 320-step training (cit, seed 0, step 35) has
    three gradient norms, differing from the 6th digit on, depending on MKL's threads (the environment's
    ``MKL_NUM_THREADS``) and on whether ``set_num_threads`` was called; the runs then drift apart by up to a
    point of accuracy. A process whose environment already gives torch ``n`` threads (a local worker started
    with :data:`THREAD_VARS` = ``n``, or a plain ``coin`` process on an ``n``-core machine) is therefore left
    as it is, and computes exactly as a plain process does.
    """
    import torch

    if n < 1:
        raise ValueError(f"torch threads {n}: needs at least 1")
    if torch.get_num_threads() != n:
        torch.set_num_threads(n)


def thread_settings() -> dict[str, int | str | None]:
    """What decides this process's arithmetic on a CPU, for a record: torch's thread count and
    :data:`THREAD_VARS` as the environment gives them (None: unset)."""
    import torch

    return {"torch": torch.get_num_threads(), **{var: os.environ.get(var) for var in THREAD_VARS}}
