"""What a model that reads nothing would score on the evaluated sample: the majority-class and chance rates.

Why: GLUE validation samples are not balanced (sst2's seeded sample of 100 can be 57% one label). A
classifier that always answers the most frequent label scores the *majority rate* without reading the
input, so an accuracy means something only next to it: 55% on such a sample is *worse* than a constant.
The chance rate (100 / number of labels) is the other floor, the one of a uniformly random guess.

Both are computed here, once, from the predictions table's ``task``, ``example_id`` and ``label``
columns, so they are exactly those of the *scored* sample (not of the full split), whatever the scoring
modes, sets and instructions: every instruction and set of a task sees the same examples, and an example
has one label. Every consumer (``metrics.json``, the report's tables and plots, the promotion gate's
majority rule) reads them from here.

Averages are unweighted means over tasks, like every average of :mod:`coin.evaluation.metrics` (each task
counts once, whatever its sample size), so ``clean_acc - majority`` compares like with like.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import pandas as pd

from coin.data.tasks import get_task
from coin.evaluation.metrics import AVG, CLEAN, REFERENCE_KEY, json_number

COLUMNS = ("task", "example_id", "label")
__all__ = ["COLUMNS", "REFERENCE_KEY", "ReferenceRates", "clean_tasks", "majority_summary", "reference_rates"]


@dataclass(frozen=True, kw_only=True)
class ReferenceRates:
    """Per task (in the order first seen): majority-class and chance accuracy in percent, and sample size."""

    majority: dict[str, float]     # % of the task's sampled examples that carry its most frequent label
    chance: dict[str, float]       # 100 / number of labels of the task
    n_examples: dict[str, int]     # distinct examples of the task in the sample

    @property
    def tasks(self) -> list[str]:
        return list(self.majority)

    def majority_avg(self, tasks: Iterable[str] | None = None) -> float:
        """Mean over ``tasks`` (default: all) of the majority rate; NaN over no task."""
        return _mean(self.majority, tasks)

    def chance_avg(self, tasks: Iterable[str] | None = None) -> float:
        return _mean(self.chance, tasks)

    def to_dict(self) -> dict[str, Any]:
        """The ``reference`` block of ``metrics.json``: numeric leaves only (DVC metrics / MLflow friendly)::

            {"majority": {task: pct, ..., "avg": pct}, "chance": {...}, "n_examples": {task: n}}
        """
        return {
            "majority": {**{t: json_number(v) for t, v in self.majority.items()},
                         AVG: json_number(self.majority_avg())},
            "chance": {**{t: json_number(v) for t, v in self.chance.items()}, AVG: json_number(self.chance_avg())},
            "n_examples": dict(self.n_examples),
        }


def _mean(values: Mapping[str, float], tasks: Iterable[str] | None) -> float:
    keys = list(values) if tasks is None else [t for t in tasks if t in values]
    return float(sum(values[t] for t in keys) / len(keys)) if keys else math.nan


def reference_rates(preds: pd.DataFrame) -> ReferenceRates:
    """Majority-class and chance rates of the sample in ``preds`` (any number of models, scorings, sets).

    Raises ``ValueError`` when a column is missing or one example carries two different labels (two
    tables that are not the same data cannot share a reference).
    """
    missing = [c for c in COLUMNS if c not in preds.columns]
    if missing:
        raise ValueError(f"predictions table lacks columns {missing}; has {list(preds.columns)}")
    ex = preds[list(COLUMNS)].drop_duplicates()
    clash = ex.duplicated(["task", "example_id"], keep=False)
    if clash.any():
        first = ex.loc[clash].iloc[0]
        labels = ex.loc[(ex["task"] == first["task"]) & (ex["example_id"] == first["example_id"]), "label"]
        raise ValueError(f"task {first['task']!r}, example {first['example_id']!r} has several labels "
                         f"{sorted(labels.tolist())}: the predictions do not come from one sample of one data version")
    majority: dict[str, float] = {}
    chance: dict[str, float] = {}
    n: dict[str, int] = {}
    for task, grp in ex.groupby("task", sort=False):
        counts = grp["label"].value_counts()
        n[str(task)] = int(len(grp))
        majority[str(task)] = 100.0 * float(counts.max()) / len(grp)
        chance[str(task)] = 100.0 / get_task(str(task)).num_labels
    return ReferenceRates(majority=majority, chance=chance, n_examples=n)


def clean_tasks(preds: pd.DataFrame, scoring: str | None = None) -> list[str]:
    """The tasks whose clean set was scored (by ``scoring``, when given): those ``clean_acc`` averages over."""
    p = preds[preds["set"] == CLEAN]
    if scoring is not None:
        p = p[p["scoring"] == scoring]
    return list(dict.fromkeys(map(str, p["task"])))


def majority_summary(ref: ReferenceRates, clean_acc: float | None, tasks: Iterable[str] | None) -> dict[str, Any]:
    """A model's ``summary`` additions: ``majority_acc`` (the majority rate averaged over the tasks its
    ``clean_acc`` averages over; all tasks when it has no clean set) and ``clean_vs_majority`` (clean
    accuracy minus that rate, points; null without a clean set). Positive = better than a constant."""
    tasks = list(tasks) if tasks is not None else []
    maj = ref.majority_avg(tasks or None)
    gap = clean_acc - maj if clean_acc is not None and not math.isnan(clean_acc) and tasks else math.nan
    return {"majority_acc": json_number(maj), "clean_vs_majority": json_number(gap)}
