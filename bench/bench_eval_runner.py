"""The pipeline's evaluation on one local Dask worker: a worker process against a worker thread in the flow's process.

    ./run.sh python bench/bench_eval_runner.py [--project DIR] [--samples 16] [--tasks sst2 rte mnli] [--reps 3]

What the flow pays besides the evaluation itself. Each rep runs a Prefect flow whose one task is the
pipeline's ``evaluate-unit`` task (model ``base``) on :func:`flows.pipeline.eval_task_runner` with one local
worker, once as a process (``processes=True``: the cluster, a nanny and a worker process that imports the
stack and starts its own Prefect client, then shuts down; the default) and once as a thread in this process
(``processes=False``). This process has not trained, unlike the pipeline's (BENCHMARKS.md: there the thread was slower);
the two alternate which goes first, so drifts in machine speed hit both, after one untimed warm-up flow of each
(Prefect's temporary server and the first imports would otherwise land in rep 0). Prints a Markdown table: the
flow's wall time, the unit's own evaluation time (``wall_time_s``) and the difference, the runner's overhead.

Needs a project that has trained (``<project>/outputs/train/train.json``, for its index); the unit scored is
``base``, each rep into a fresh output directory (nothing cached).
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # flows/ is a project directory, not an installed package


def main() -> None:
    from coin.argtypes import positive_int  # counts below 1 refused at the command line

    ap = argparse.ArgumentParser()
    ap.add_argument("--project", type=Path, default=ROOT, help="a project that has run `coin train`")
    ap.add_argument("--samples", type=positive_int, default=16)
    ap.add_argument("--tasks", nargs="+", default=["sst2", "rte", "mnli"])
    ap.add_argument("--reps", type=positive_int, default=3)
    ap.add_argument("--threads", type=positive_int, default=2, help="torch threads of the unit")
    args = ap.parse_args()

    from prefect import flow
    from prefect.cache_policies import NO_CACHE

    from flows.pipeline import eval_task_runner, evaluate_unit_task

    index = args.project / "outputs" / "train" / "train.json"
    if not index.exists():
        sys.exit(f"{index} is missing: run `./run.sh coin train` (or the pipeline) in {args.project} first")
    unit = evaluate_unit_task.with_options(cache_policy=NO_CACHE, persist_result=False, refresh_cache=True)

    @flow(name="bench-eval-runner")
    def one(params: str, overrides: list[str]) -> dict:
        return unit.submit(params, overrides, "base", None, args.threads).result()

    def run(processes: bool, samples: int) -> tuple[float, dict]:
        out = Path(tempfile.mkdtemp(prefix="bench-runner-"))
        (out / "train").mkdir()
        shutil.copy(index, out / "train" / "train.json")
        overrides = [f"evaluate.samples_per_task={samples}", f"paths.out_dir={out}",
                     f"evaluate.tasks=[{', '.join(args.tasks)}]"]
        runner = eval_task_runner(1, processes=processes)
        t0 = time.perf_counter()
        rec = one.with_options(task_runner=runner)(str(args.project / "params.yaml"), overrides)
        wall = time.perf_counter() - t0
        shutil.rmtree(out, ignore_errors=True)
        pid_here = rec["executor"]["pid"] == os.getpid()
        assert pid_here != processes, rec["executor"]  # the runner ran the unit where it says
        return wall, rec

    # untimed warm-up, one flow of each kind: Prefect's temporary server starts in this process and the model stack
    # is imported into it once, costs that otherwise landed inside rep 0's first (process) row
    for processes in (True, False):
        run(processes, 1)
    results: dict[bool, list[tuple[float, float]]] = {True: [], False: []}
    for rep in range(args.reps):
        for processes in ((True, False) if rep % 2 == 0 else (False, True)):  # alternate which goes first
            wall, rec = run(processes, args.samples)
            results[processes].append((wall, float(rec["wall_time_s"])))
            where = "process" if processes else "thread "
            print(f"rep {rep}: {where} flow {wall:.1f} s, unit {rec['wall_time_s']:.1f} s", flush=True)

    print(f"\nbase model, tasks {' '.join(args.tasks)} x {args.samples} examples, {args.threads} torch threads, "
          f"{args.reps} reps each, alternating\n")
    print("| one local worker | flow wall (s) | unit's evaluation (s) | overhead (s) |\n|---|---:|---:|---:|")
    for processes, label in ((True, "a process (default)"), (False, "a thread in the flow's process")):
        walls = [w for w, _ in results[processes]]
        units = [u for _, u in results[processes]]
        over = [w - u for w, u in results[processes]]
        print(f"| {label} | {statistics.median(walls):.1f} | {statistics.median(units):.1f} | "
              f"{statistics.median(over):.1f} (min {min(over):.1f}, max {max(over):.1f}) |")
    saved = statistics.median(w for w, _ in results[True]) - statistics.median(w for w, _ in results[False])
    print(f"\nmedian flow wall saved by the thread: {saved:.1f} s")


if __name__ == "__main__":
    from coin.cli import run_script  # a user error in two lines, a bug with its traceback

    raise SystemExit(run_script(main))
