"""Sampling uncertainty of the headline figures: a bootstrap over the evaluated examples.

Mean ± std over instructions (the protocol's figure) says how much accuracy moves with the wording;
it says nothing about how much it would move with another draw of examples. With ``n`` examples per
task that second source is about ``50 / sqrt(n * tasks)`` points for one model, which decides whether a
1-point gap between two models means anything. This module puts a number on it.

Per-example score, per task: the share of a drawn example's (instruction) predictions that are
correct, over the clean set (``clean``) or over every perturbed set (``perturbed``). Because all
instructions and sets of a task see the same sample, the mean of these scores over examples and then
over tasks is exactly ``clean_acc`` / ``perturbed_acc`` of :mod:`coin.evaluation.metrics`. The two
robustness figures, all-agree consistency and worst-case accuracy, are per-example means as well
(:func:`robustness_scores`); :func:`all_scores` puts all four side by side, and the bootstrap below covers
every column it is given.

Bootstrap: ``n_boot`` resamples of the examples, with replacement, *within each task* (each task keeps
its size and counts once, as in the metrics); a drawn example brings all its instructions and sets
along. The interval is the percentile interval at ``level``. For two models on the same sample (same
seed, same tasks), :func:`paired_delta` resamples the per-example *differences*, so the shared
difficulty of the examples cancels and the interval is much narrower than the two intervals suggest.

Not covered: the choice of instructions (the std column), the training seed, the data order.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pandas as pd

from coin.evaluation.metrics import CLEAN, json_number

N_BOOT = 2000
LEVEL = 0.95
SEED = 0
PARTS = ("clean", "perturbed")  # per-example accuracies (example_scores)
ROBUSTNESS = ("consistency", "worst_acc")  # per-example robustness figures (robustness_scores)
SCORES = (*PARTS, *ROBUSTNESS)  # every per-example score (all_scores): each gets an interval and a paired gap
# the metrics' summary figure (metrics.SUMMARY_KEYS) that each score's mean over examples, then tasks, equals
SCORE_FIGURE = {"clean": "clean_acc", "perturbed": "perturbed_acc", "consistency": "consistency",
                "worst_acc": "worst_acc"}


def example_scores(preds: pd.DataFrame, scoring: str) -> pd.DataFrame:
    """Index (task, example_id); columns ``clean`` and ``perturbed`` in percent (NaN where a part is absent)."""
    p = preds[preds["scoring"] == scoring]
    if p.empty:
        raise ValueError(f"no predictions for scoring {scoring!r} (have {sorted(preds['scoring'].unique())})")
    ok = (p["pred"] == p["label"]).astype(float) * 100.0
    part = np.where(p["set"] == CLEAN, "clean", "perturbed")
    # mean over instructions within each set first, then over the perturbed sets: every set weighs the same
    per_set = ok.groupby([p["task"], p["example_id"], p["set"], part]).mean()
    per_part = per_set.groupby(level=[0, 1, 3]).mean().unstack(level=2)
    return per_part.reindex(columns=list(PARTS)).rename_axis(index=["task", "example_id"], columns=None)


def robustness_scores(preds: pd.DataFrame, scoring: str) -> pd.DataFrame:
    """Index (task, example_id); columns ``consistency`` and ``worst_acc`` in percent (NaN where a task has no
    perturbed set): per example, the mean over the perturbed sets of 100 x [every instruction of the set gives it
    the same answer] and of 100 x [every instruction of the set answers it right].

    Every set of a task is scored on the same examples, so their mean over examples and then over tasks is exactly
    the summary's ``consistency`` / ``worst_acc`` (:mod:`coin.evaluation.metrics`: per set the share over
    examples, then the mean over tasks and over the perturbed sets). That makes the two robustness figures
    per-example means like the accuracies, so the same (paired, hierarchical) bootstrap puts intervals on them.
    """
    p = preds[(preds["scoring"] == scoring) & (preds["set"] != CLEAN)]
    index = ["task", "example_id", "set"]
    if p.empty:
        return pd.DataFrame(columns=list(ROBUSTNESS), dtype=float,
                            index=pd.MultiIndex.from_tuples([], names=["task", "example_id"]))
    grouped = p.assign(_ok=p["pred"] == p["label"]).groupby(index, sort=False)
    # an unparsed generation (pred -1) agrees with nothing, as in coin.evaluation.metrics
    # one instruction in a set has nothing to agree with: its consistency is undefined (NaN), as in the metrics
    consistency = (grouped["pred"].nunique().eq(1) & grouped["pred"].min().ge(0)) * 100.0
    per_set = pd.DataFrame({"consistency": consistency.where(grouped["instruction_id"].nunique() > 1),
                            "worst_acc": grouped["_ok"].all() * 100.0})
    return per_set.groupby(level=["task", "example_id"], sort=False).mean()


def all_scores(preds: pd.DataFrame, scoring: str) -> pd.DataFrame:
    """Index (task, example_id); columns :data:`SCORES`: :func:`example_scores` beside :func:`robustness_scores`
    (NaN where a figure is undefined: no clean set, or no perturbed set)."""
    return example_scores(preds, scoring).join(robustness_scores(preds, scoring)).reindex(columns=list(SCORES))


def _boot_means(scores: pd.DataFrame, n_boot: int, seed: int) -> dict[str, np.ndarray]:
    """Per column of ``scores``: ``n_boot`` bootstrap replicates of the mean over tasks of the mean over examples.

    A task whose column is undefined for every example (NaN: consistency where each of its perturbed sets has one
    instruction, or no clean set) is left out of that column's mean, as the metrics' mean over tasks leaves it out;
    with no task left the replicates are NaN (the figure was not evaluated). Without such a task the replicates are
    those of the plain mean over tasks, to the bit."""
    rng = np.random.default_rng(seed)
    reps = {c: np.zeros(n_boot) for c in scores.columns}
    counted = dict.fromkeys(scores.columns, 0)  # tasks in each column's mean
    for task in dict.fromkeys(scores.index.get_level_values("task")):
        block = scores.xs(task, level="task")
        idx = rng.integers(0, len(block), size=(n_boot, len(block)))  # one draw per task, shared by every column
        for c in scores.columns:
            values = block[c].to_numpy()
            if np.isnan(values).all():
                continue
            reps[c] += values[idx].mean(axis=1)
            counted[c] += 1
    return {c: r / counted[c] if counted[c] else np.full(n_boot, math.nan) for c, r in reps.items()}


def _interval(values: np.ndarray, level: float) -> tuple[float, float]:
    if np.isnan(values).any():
        return math.nan, math.nan
    lo, hi = np.quantile(values, [(1 - level) / 2, (1 + level) / 2])
    return float(lo), float(hi)


def bootstrap_ci(scores: pd.DataFrame, *, n_boot: int = N_BOOT, level: float = LEVEL,
                 seed: int = SEED) -> dict[str, float | None]:
    """``<score>_ci_low/high`` (percent) for each column of one model's scores (:func:`example_scores`:
    clean, perturbed; :func:`all_scores`: also consistency, worst_acc), None where the figure was not evaluated
    (no clean or no perturbed set)."""
    reps = _boot_means(scores, n_boot, seed)
    out: dict[str, float | None] = {}
    for c in scores.columns:
        out[f"{c}_ci_low"], out[f"{c}_ci_high"] = _interval(reps[c], level)
    return {k: json_number(v) for k, v in out.items()}  # JSON-ready: rounded, NaN (part not evaluated) -> None


def paired_delta(a: pd.DataFrame, b: pd.DataFrame, *, n_boot: int = N_BOOT, level: float = LEVEL,
                 seed: int = SEED) -> dict[str, Any]:
    """Model ``a`` minus reference ``b`` (their :func:`example_scores` or :func:`all_scores`) on the examples
    both were scored on, with paired bootstrap intervals.

    Returns, per score column, ``<score>_delta`` and ``<score>_delta_ci_low/high`` (points), and ``n_examples``
    (shared examples). Raises ``ValueError`` when the two share no example (different
    seeds, sample sizes or tasks): a paired comparison needs the same sample.
    """
    shared = a.index.intersection(b.index)
    if shared.empty:
        raise ValueError("the two models share no evaluated example: evaluate them with the same seed, "
                         "tasks and samples_per_task to compare them")
    diff = a.loc[shared] - b.loc[shared]
    reps = _boot_means(diff, n_boot, seed)
    out: dict[str, Any] = {}
    for c in diff.columns:
        out[f"{c}_delta"] = float(diff[c].groupby(level="task").mean().mean())
        out[f"{c}_delta_ci_low"], out[f"{c}_delta_ci_high"] = _interval(reps[c], level)
    return {**{k: json_number(v) for k, v in out.items()}, "n_examples": int(len(shared))}
