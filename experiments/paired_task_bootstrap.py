"""Paired difference of two sets of adapters on one evaluation, seed by seed: a hierarchical bootstrap.

    ./run.sh python experiments/paired_task_bootstrap.py \
        --a outputs/eval-a/predictions.jsonl:s0,s1,s2 --b outputs/eval-b/predictions.jsonl:r0,r1,r2

Each side is an evaluation's ``predictions.jsonl`` and its models, in seed order: the i-th model of A is paired
with the i-th of B (same training seed). Every model must have scored the same examples under the same
instructions. Per model and example, the score is the share of instructions answered right (the protocol's
per-example clean accuracy). The interval resamples the examples within each task as the study does
(``coin.study.aggregate.example_weights``, every task weighted equally as in the protocol's average) and the seeds
as pairs: the study draws each method's seeds apart, here the i-th model of A and of B share their training seed.
Used for RESULTS.md §19 (sst2 on its whole validation split). Prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import pandas as pd

from coin.study.aggregate import example_weights, point_weights, task_codes


def per_example(path: Path, models: list[str]) -> pd.DataFrame:
    """Rows (task, example_id), one column per model: the share of instructions it answered right (percent)."""
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return per_example_frame(pd.DataFrame(rows), models, where=str(path))


def per_example_frame(df: pd.DataFrame, models: list[str], where: str = "predictions") -> pd.DataFrame:
    """:func:`per_example` of prediction rows already loaded (columns model, task, example_id, correct)."""
    df = df[df["model"].isin(models)]
    missing = sorted(set(models) - set(df["model"]))
    if missing:
        raise SystemExit(f"{where}: no predictions of model(s) {missing}")
    table = df.pivot_table(index=["task", "example_id"], columns="model", values="correct", aggfunc="mean") * 100
    return table[models]


def paired_difference(a: pd.DataFrame, b: pd.DataFrame, *, n_boot: int = 2000, seed: int = 0) -> dict:
    """A - B, both :func:`per_example` tables over the same examples, column i of each from training seed i: the
    protocol's task-weighted average per seed, its mean, and a 95% interval that draws the examples within each
    task and the seeds as pairs."""
    if a.shape[1] != b.shape[1]:
        raise SystemExit(f"A has {a.shape[1]} models, B {b.shape[1]}: pair them seed by seed")
    if not a.index.equals(b.index):
        raise SystemExit("the two evaluations scored different examples; evaluate both on the same sample")
    diff = (a.to_numpy() - b.to_numpy()).T                  # (seeds, examples)
    codes = task_codes(a.index)
    w0 = point_weights(codes)                                # the protocol's average: tasks weighted equally
    rng = np.random.default_rng(seed)
    weights = example_weights(codes, n_boot, rng)            # the study's draw of examples within each task
    n_seeds = diff.shape[0]
    pick = rng.integers(0, n_seeds, size=(n_boot, n_seeds))  # seed pairs with replacement (paired draw)
    reps = np.take_along_axis(weights @ diff.T, pick, axis=1).mean(axis=1)
    per_seed = diff @ w0
    lo, hi = np.quantile(reps, [0.025, 0.975])
    return {"a": (a.to_numpy().T @ w0).round(2).tolist(), "b": (b.to_numpy().T @ w0).round(2).tolist(),
            "difference_per_seed": per_seed.round(2).tolist(), "difference": round(float(per_seed.mean()), 2),
            "ci95": [round(float(lo), 2), round(float(hi), 2)],
            "seeds_same_sign": int(np.sum(np.sign(per_seed) == np.sign(per_seed.mean()))),
            "examples": int(diff.shape[1]), "n_boot": n_boot}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--a", required=True, help="PREDICTIONS:MODEL,MODEL,... (seed order)")
    ap.add_argument("--b", required=True, help="PREDICTIONS:MODEL,MODEL,... (seed order, paired with --a)")
    ap.add_argument("--n-boot", type=int, default=2000)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    sides = []
    for spec in (args.a, args.b):
        path, _, models = spec.rpartition(":")
        sides.append(per_example(Path(path), models.split(",")))
    a, b = sides
    print(json.dumps(paired_difference(a, b, n_boot=args.n_boot, seed=args.seed)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
