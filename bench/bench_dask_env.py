"""One evaluation unit in a plain process vs in a Dask worker, with and without Dask's malloc setting.

    ./run.sh python bench/bench_dask_env.py [--samples 16] [--tasks sst2 rte mnli] [--threads 2 1]

Needs a trained project (outputs/train/train.json) only for its index; the unit evaluated is `base`.
Prints a Markdown table: where the unit ran, torch threads, wall, user and system CPU seconds of the
process that ran it. Variants, one after another on the same examples:

- plain process, 2 and 1 torch threads (each a fresh process, as each Dask worker is);
- Dask worker with Dask's default worker environment (``MALLOC_TRIM_THRESHOLD_=65536``, OpenMP/MKL/OpenBLAS at 1);
- Dask worker without ``MALLOC_TRIM_THRESHOLD_``, thread libraries at Dask's 1 (the flow's until RESULTS.md §18);
- Dask worker with the flow's environment (:func:`flows.pipeline._worker_environ`: thread libraries at the
  torch threads), 1 and 2 threads.
"""

from __future__ import annotations

import argparse
import resource
import shutil
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # flows/ is a project directory, not an installed package


def unit(threads: int, samples: int, tasks: list[str], out_dir: str) -> tuple[float, float, float]:
    from coin.config import load_settings
    from coin.cpus import use_torch_threads
    from coin.stages import stage_evaluate_unit

    use_torch_threads(threads)  # as the flow's evaluation task does
    s = load_settings(ROOT / "params.yaml", [f"evaluate.samples_per_task={samples}", f"paths.out_dir={out_dir}",
                                             f"evaluate.tasks=[{', '.join(tasks)}]"])
    r0, t0 = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
    stage_evaluate_unit(s, ROOT, "base")
    r1 = resource.getrusage(resource.RUSAGE_SELF)
    return time.perf_counter() - t0, r1.ru_utime - r0.ru_utime, r1.ru_stime - r0.ru_stime


def in_process(threads: int, args, out_dir: str) -> tuple[float, float, float]:
    """:func:`unit` in a fresh (spawned) process: it imports the model stack and loads the backbone inside its
    timed region, so in this script's own process a second plain row ran warm while every Dask row, in a fresh
    worker, paid those one-off costs."""
    import multiprocessing as mp
    from concurrent.futures import ProcessPoolExecutor

    with ProcessPoolExecutor(1, mp_context=mp.get_context("spawn")) as pool:
        return pool.submit(unit, threads, args.samples, args.tasks, out_dir).result()


# the worker environments compared: Dask's default; the flow's until RESULTS.md §18 (no MALLOC_TRIM_THRESHOLD_,
# Dask's 1 thread for OpenMP/MKL/OpenBLAS); the flow's now (flows.pipeline._worker_environ)
ENVS = {"dask": "Dask worker, Dask's default environment",
        "flow-before": "Dask worker, no MALLOC_TRIM_THRESHOLD_, thread libraries at Dask's 1",
        "flow": "Dask worker, the flow's environment (no MALLOC_TRIM_THRESHOLD_, thread libraries at torch's)"}


def in_dask(threads: int, args, out_dir: str, *, env: str) -> tuple[float, float, float]:
    import dask
    from distributed import Client, LocalCluster

    from coin.cpus import THREAD_VARS
    from flows.pipeline import MALLOC_VAR, _worker_environ, restore_process_env

    key = "distributed.nanny.pre-spawn-environ"
    before = dict(dask.config.get(key))
    try:
        if env == "flow":
            _worker_environ(threads)
        elif env == "flow-before":
            dask.config.set({key: {**{k: v for k, v in before.items() if k != MALLOC_VAR},
                                   **dict.fromkeys(THREAD_VARS, 1)}})
        else:
            dask.config.set({key: {**before, MALLOC_VAR: 65536, **dict.fromkeys(THREAD_VARS, 1)}})
        with LocalCluster(n_workers=1, threads_per_worker=1, processes=True, host="127.0.0.1",
                          dashboard_address=None) as cluster, Client(cluster) as client:
            return client.submit(unit, threads, args.samples, args.tasks, out_dir, pure=False).result()
    finally:
        dask.config.set({key: before})
        restore_process_env()  # what this variant's nanny wrote into this process


def main() -> None:
    from coin.argtypes import positive_int  # counts below 1 refused at the command line

    ap = argparse.ArgumentParser()
    ap.add_argument("--samples", type=positive_int, default=16)
    ap.add_argument("--tasks", nargs="+", default=["sst2", "rte", "mnli"])
    ap.add_argument("--threads", nargs="+", type=positive_int, default=[2, 1], help="torch thread counts to compare")
    args = ap.parse_args()
    tmp = tempfile.mkdtemp(prefix="bench-dask-")

    def fresh() -> str:
        """A project directory of its own per variant: a shared one would serve later variants from the
        evaluation cache (the same model and protocol) instead of computing them."""
        out = tempfile.mkdtemp(dir=tmp)
        (Path(out) / "train").mkdir()
        shutil.copy(ROOT / "outputs" / "train" / "train.json", Path(out) / "train" / "train.json")
        return out

    rows = []
    for n in args.threads:  # Dask's default environment at 1 thread only, as first measured (BENCHMARKS.md)
        rows += [("plain process", n, in_process(n, args, fresh())),
                 *[(ENVS[e], n, in_dask(n, args, fresh(), env=e)) for e in (("dask",) if n == 1 else ())
                   + ("flow-before", "flow")]]
    print(f"base model, tasks {' '.join(args.tasks)} x {args.samples} examples x 5 sets x 6 instructions\n")
    print("| where | torch threads | wall (s) | user (s) | sys (s) |\n|---|---:|---:|---:|---:|")
    for where, threads, (wall, user, sys_) in rows:
        print(f"| {where} | {threads} | {wall:.1f} | {user:.1f} | {sys_:.1f} |")
    shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    from coin.cli import run_script  # a user error in two lines, a bug with its traceback

    raise SystemExit(run_script(main))
