"""Wall time per stage of the default pipeline, run in-process on the current params.yaml.

    ./run.sh python bench/bench_pipeline.py [--set key=value ...]

Prints a Markdown table (stage, seconds, share of total). The stages are the same functions the
CLI, DVC and Prefect call; Prefect's own start-up is not included. On a project that has run before, a stage
that served its work from cache says so in its row (evaluation units cached, methods kept untrained): time a
fresh project (e.g. `--set paths.out_dir=outputs-bench`) to measure the work itself.
"""

from __future__ import annotations

import argparse
import time

import coin  # noqa: F401
from coin.config import load_settings, project_root
from coin.stages import STAGES


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("--set", dest="overrides", action="append", default=[])
    args = ap.parse_args()
    settings = load_settings(args.params, args.overrides)
    root = project_root(args.params)
    times: dict[str, float] = {}
    notes: dict[str, str] = {}
    for name, fn in STAGES.items():
        t0 = time.perf_counter()
        out = fn(settings, root)
        times[name] = time.perf_counter() - t0
        if isinstance(out, dict) and out.get("cached_units"):  # a rerun serves base from the evaluation cache
            notes[name] = f" (cached, not computed: {', '.join(out['cached_units'])})"
        if isinstance(out, dict) and out.get("kept"):  # a rerun keeps a method whose training would not change
            notes[name] = f" (kept, not trained: {', '.join(out['kept'])})"
    total = sum(times.values())
    print("| stage | s | share |\n|---|---:|---:|")
    for name, s in times.items():
        print(f"| {name}{notes.get(name, '')} | {s:.1f} | {100 * s / total:.0f}% |")
    print(f"| **total** | **{total:.1f}** | |")


if __name__ == "__main__":
    from coin.cli import run_script  # a user error in two lines, a bug with its traceback

    raise SystemExit(run_script(main))
