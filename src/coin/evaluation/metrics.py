"""Robustness metrics from a predictions table (COIN-REFERENCE §4, "Metric and aggregation").

Per (task, set): the accuracy of each instruction over the shared sample (in percent), then the mean
and the *population* standard deviation (``np.std``, ddof 0) over the instructions, as the paper's
``postprocessing.py`` does. The ``avg`` row of a set is the unweighted mean over tasks of ``acc_mean``
and of ``acc_std`` (each task counts once, whatever its sample size).
"""

from __future__ import annotations

from typing import Any

import pandas as pd

PREDICTION_COLUMNS = ("task", "set", "instruction_id", "example_id", "label", "pred")
AVG = "avg"


def check_predictions(preds: pd.DataFrame) -> None:
    missing = [c for c in PREDICTION_COLUMNS if c not in preds.columns]
    if missing:
        raise ValueError(f"predictions table lacks columns {missing}; has {list(preds.columns)}")
    dup = preds.duplicated(["task", "set", "instruction_id", "example_id"])
    if dup.any():
        first = preds.loc[dup, ["task", "set", "instruction_id", "example_id"]].iloc[0].to_dict()
        raise ValueError(f"predictions table has {int(dup.sum())} duplicate rows, e.g. {first}")


def instruction_accuracy(preds: pd.DataFrame) -> pd.DataFrame:
    """Columns task, set, instruction_id, acc (percent), n (examples)."""
    check_predictions(preds)
    correct = (preds["pred"] == preds["label"]).astype(float) * 100.0
    grouped = correct.groupby([preds["task"], preds["set"], preds["instruction_id"]], sort=True)
    return grouped.agg(acc="mean", n="size").reset_index()


def task_set_summary(per_instruction: pd.DataFrame) -> pd.DataFrame:
    """Columns task, set, acc_mean, acc_std (ddof 0), n_examples, n_instructions."""
    g = per_instruction.groupby(["task", "set"], sort=True)
    out = g.agg(
        acc_mean=("acc", "mean"),
        acc_std=("acc", lambda a: float(a.std(ddof=0))),
        n_examples=("n", "max"),
        n_instructions=("instruction_id", "nunique"),
    ).reset_index()
    uneven = g["n"].nunique() > 1
    if uneven.any():
        raise ValueError(f"instructions scored on different numbers of examples for {list(uneven[uneven].index)}")
    return out


def set_averages(summary: pd.DataFrame) -> pd.DataFrame:
    """One ``task = 'avg'`` row per set: the mean over tasks of acc_mean and acc_std."""
    g = summary.groupby("set", sort=True)
    out = g.agg(
        acc_mean=("acc_mean", "mean"),
        acc_std=("acc_std", "mean"),
        n_examples=("n_examples", "sum"),
        n_instructions=("n_instructions", "sum"),
    ).reset_index()
    out.insert(0, "task", AVG)
    return out


def compute_metrics(preds: pd.DataFrame) -> tuple[pd.DataFrame, dict[str, Any]]:
    """``(table, nested)``: the tidy table (per-task rows then ``avg`` rows) and its metrics.json form."""
    summary = task_set_summary(instruction_accuracy(preds))
    table = pd.concat([summary, set_averages(summary)], ignore_index=True)
    return table, metrics_dict(table)


def metrics_dict(table: pd.DataFrame) -> dict[str, Any]:
    """``{task: {set: {acc_mean, acc_std, n, n_instructions}}}`` including ``avg`` (``n`` = examples)."""
    nested: dict[str, Any] = {}
    for row in table.itertuples(index=False):
        nested.setdefault(str(row.task), {})[str(row.set)] = {
            "acc_mean": round(float(row.acc_mean), 4),
            "acc_std": round(float(row.acc_std), 4),
            "n": int(row.n_examples),
            "n_instructions": int(row.n_instructions),
        }
    return nested
