"""Bootstrap intervals and paired gaps of the headline figures (coin.evaluation.uncertainty)."""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from test_evaluation import HAND

from coin.data.tasks import get_task
from coin.evaluation.instructions import perturbation_level
from coin.evaluation.metrics import compute_metrics
from coin.evaluation.report import write_eval_outputs
from coin.evaluation.result import EvalResult
from coin.evaluation.uncertainty import (
    SCORES,
    all_scores,
    bootstrap_ci,
    example_scores,
    paired_delta,
    robustness_scores,
)


def _table(correct: dict[str, dict[str, np.ndarray]], model: str = "m") -> pd.DataFrame:
    """``correct[task][set]``: bool array (instructions x examples); label 0, pred 0 if correct else 1."""
    rows = []
    for task, sets in correct.items():
        for set_name, grid in sets.items():
            for i, row in enumerate(grid):
                for e, ok in enumerate(row):
                    rows.append({"model": model, "scoring": "loglik", "task": task,
                                 "category": get_task(task).category, "set": set_name,
                                 "level": perturbation_level(set_name), "instruction_id": i, "example_id": f"x{e}",
                                 "label": 0, "pred": 0 if ok else 1, "correct": bool(ok), "label_word": "a",
                                 "pred_word": "a" if ok else "b", "scores": None, "output": None})
    return pd.DataFrame(rows)


def test_example_scores_average_back_to_the_headline_figures() -> None:
    scores = example_scores(HAND, "loglik")
    # sst2 clean: x0 right under both instructions, x1 and x2 under one, x3 under none
    assert scores.loc[("sst2", "x0"), "clean"] == 100.0 and scores.loc[("sst2", "x3"), "clean"] == 0.0
    assert scores.loc[("sst2", "x1"), "clean"] == 50.0
    ov = compute_metrics(HAND).overall.set_index("scoring").loc["loglik"]
    per_task = scores.groupby(level="task").mean().mean()  # each task counts once, like the metrics
    assert per_task["clean"] == pytest.approx(ov.clean_acc)          # 75
    assert per_task["perturbed"] == pytest.approx(ov.perturbed_acc)  # 45


def test_robustness_scores_average_back_to_the_summary_consistency_and_worst_case() -> None:
    scores = robustness_scores(HAND, "loglik")
    # sst2 textfooler (preds per instruction): x0 (0,0,1) and x1 (1,1,0) mixed; rte x4 (1,1,1) agrees, wrong (label 0)
    assert scores.loc[("sst2", "x0"), "consistency"] == 0.0 and scores.loc[("rte", "x4"), "consistency"] == 100.0
    assert scores.loc[("rte", "x4"), "worst_acc"] == 0.0 and scores.loc[("rte", "x0"), "worst_acc"] == 100.0
    ov = compute_metrics(HAND).overall.set_index("scoring").loc["loglik"]
    per_task = scores.groupby(level="task").mean().mean()
    assert per_task["consistency"] == pytest.approx(ov.consistency)
    assert per_task["worst_acc"] == pytest.approx(ov.worst_acc)


def test_robustness_scores_match_the_metrics_over_several_sets_labels_and_unparsed_answers() -> None:
    rng = np.random.default_rng(7)
    rows = []
    for task, n_labels in (("mnli", 3), ("sst2", 2)):
        labels = rng.integers(0, n_labels, size=12)
        for set_name, n_instr in (("clean", 2), ("deepwordbug", 3), ("checklist", 2), ("semantic", 4)):
            for i in range(n_instr):
                preds = np.where(rng.random(12) < 0.6, labels, rng.integers(-1, n_labels, size=12))  # -1: unparsed
                rows += [{"model": "m", "scoring": "generate", "task": task, "category": get_task(task).category,
                          "set": set_name, "level": perturbation_level(set_name), "instruction_id": i,
                          "example_id": f"{task}{e}", "label": int(y), "pred": int(p), "correct": bool(p == y),
                          "label_word": "a", "pred_word": "a", "scores": None, "output": None}
                         for e, (y, p) in enumerate(zip(labels, preds, strict=True))]
    table = pd.DataFrame(rows)
    scores = robustness_scores(table, "generate")
    assert len(scores) == 24 and scores.notna().all().all()
    ov = compute_metrics(table).overall.set_index("scoring").loc["generate"]
    per_task = scores.groupby(level="task").mean().mean()
    assert per_task["consistency"] == pytest.approx(ov.consistency)
    assert per_task["worst_acc"] == pytest.approx(ov.worst_acc)
    assert ov.consistency > ov.worst_acc > 0  # neither figure is trivially 0 or equal here
    # a model that never names a label is not consistent (metrics and the per-example scores agree on it)
    unparsed = table.assign(pred=-1, correct=False)
    assert compute_metrics(unparsed).overall.set_index("scoring").loc["generate"].consistency == 0.0
    assert (robustness_scores(unparsed, "generate")["consistency"] == 0.0).all()
    clean_only = robustness_scores(table[table["set"] == "clean"], "generate")
    assert clean_only.empty and list(clean_only.columns) == ["consistency", "worst_acc"]


def test_interval_width_matches_the_binomial_standard_error() -> None:
    rng = np.random.default_rng(1)
    n = 400
    clean = np.zeros((1, n), bool)
    clean[0, rng.permutation(n)[: n // 2]] = True                    # exactly 50% right
    pert = np.ones((2, n), bool)                                       # always right: no spread at all
    ci = bootstrap_ci(example_scores(_table({"sst2": {"clean": clean, "textfooler": pert}}), "loglik"))
    half = 1.96 * 50.0 / math.sqrt(n)                                  # 4.9 points
    assert ci["clean_ci_low"] < 50.0 < ci["clean_ci_high"]
    assert (ci["clean_ci_high"] - ci["clean_ci_low"]) / 2 == pytest.approx(half, rel=0.15)
    assert ci["perturbed_ci_low"] == ci["perturbed_ci_high"] == 100.0
    assert bootstrap_ci(example_scores(_table({"sst2": {"clean": clean, "textfooler": pert}}), "loglik")) == ci  # seed


def test_no_clean_set_gives_null_interval_not_nan() -> None:
    ci = bootstrap_ci(example_scores(_table({"rte": {"textfooler": np.ones((2, 5), bool)}}), "loglik"))
    assert ci["clean_ci_low"] is None and ci["perturbed_ci_low"] == 100.0
    json.dumps(ci, allow_nan=False)


def test_paired_delta_is_exact_and_cancels_shared_difficulty() -> None:
    rng = np.random.default_rng(2)
    n = 200
    base = rng.random((3, n)) < 0.6
    base[:, :10] = False                                               # 10 examples wrong under every instruction
    better = base.copy()
    better[:, :10] = True                                              # ... that the better model gets right
    a = _table({"sst2": {"clean": better, "checklist": better}})
    b = _table({"sst2": {"clean": base, "checklist": base}})
    d = paired_delta(example_scores(a, "loglik"), example_scores(b, "loglik"))
    assert d["clean_delta"] == pytest.approx(100.0 * 10 / n) and d["perturbed_delta"] == pytest.approx(5.0)
    assert d["n_examples"] == n
    assert 0.0 < d["perturbed_delta_ci_low"] < 5.0 < d["perturbed_delta_ci_high"]  # never below 0: no example got worse
    # unpaired intervals overlap; the paired one excludes 0: the shared difficulty cancels
    ca, cb = bootstrap_ci(example_scores(a, "loglik")), bootstrap_ci(example_scores(b, "loglik"))
    assert ca["clean_ci_low"] < cb["clean_ci_high"]
    same = paired_delta(example_scores(b, "loglik"), example_scores(b, "loglik"))
    assert same["clean_delta"] == same["clean_delta_ci_low"] == same["clean_delta_ci_high"] == 0.0


def test_paired_gap_separates_consistency_from_accuracy() -> None:
    """Two models right on 60% of the examples under every instruction. ``steady`` is right on the same
    examples whatever the wording; ``fickle`` on a different 60% per instruction. Accuracy ties exactly; the
    consistency and worst-case gaps are large, and their paired intervals exclude 0."""
    n, k = 200, 3
    right = np.arange(n) < int(0.6 * n)
    steady = np.tile(right, (k, 1))
    rng = np.random.default_rng(5)
    fickle = np.stack([rng.permutation(right) for _ in range(k)])  # agrees on about 28% of examples by chance
    sets = ("clean", "deepwordbug", "checklist")
    a = all_scores(_table({"sst2": dict.fromkeys(sets, steady)}, "steady"), "loglik")
    b = all_scores(_table({"sst2": dict.fromkeys(sets, fickle)}, "fickle"), "loglik")
    assert list(a.columns) == list(SCORES)
    d = paired_delta(a, b)
    assert d["clean_delta"] == d["perturbed_delta"] == 0.0
    agree = (fickle.all(axis=0) | ~fickle.any(axis=0)).mean() * 100  # fickle's instructions all agree here
    assert d["consistency_delta"] == pytest.approx(100.0 - agree) and d["consistency_delta"] > 50
    assert d["worst_acc_delta"] == pytest.approx(60.0 - fickle.all(axis=0).mean() * 100)
    for c in ("consistency", "worst_acc"):
        assert 0.0 < d[f"{c}_delta_ci_low"] < d[f"{c}_delta"] < d[f"{c}_delta_ci_high"]
    ci = bootstrap_ci(a)
    assert ci["consistency_ci_low"] == ci["consistency_ci_high"] == 100.0  # steady always agrees
    assert ci["worst_acc_ci_low"] < 60.0 < ci["worst_acc_ci_high"]
    # no perturbed set: no robustness figure, null intervals (JSON-ready), the accuracies still bootstrapped
    clean_only = bootstrap_ci(all_scores(_table({"sst2": {"clean": steady}}), "loglik"))
    assert clean_only["consistency_ci_low"] is None and clean_only["worst_acc_ci_high"] is None
    assert clean_only["clean_ci_low"] < 60.0 < clean_only["clean_ci_high"]


def test_a_task_whose_sets_each_have_one_instruction_leaves_the_consistency_intervals_defined() -> None:
    """rte's perturbed set has one instruction, so rte has no consistency figure; the metrics average the
    figure over the tasks that have one (cola alone), and so do the interval and the paired gap: the same
    replicates as cola scored alone (cola, first in the index, draws first), not a null interval beside a
    defined figure."""
    rng = np.random.default_rng(7)
    n = 60

    def tables(model: str, p: float) -> tuple[pd.DataFrame, pd.DataFrame]:
        cola = {"clean": rng.random((2, n)) < p, "textfooler": rng.random((2, n)) < p}
        rte = {"clean": rng.random((2, n)) < p, "textfooler": rng.random((1, n)) < p}
        return _table({"cola": cola, "rte": rte}, model), _table({"cola": cola}, model)

    (a, a_cola), (b, b_cola) = tables("a", 0.8), tables("b", 0.5)
    ci, alone = bootstrap_ci(all_scores(a, "loglik")), bootstrap_ci(all_scores(a_cola, "loglik"))
    summary = compute_metrics(a).overall.iloc[0]
    assert ci["consistency_ci_low"] is not None
    assert (ci["consistency_ci_low"], ci["consistency_ci_high"]) == (alone["consistency_ci_low"],
                                                                      alone["consistency_ci_high"])
    assert ci["consistency_ci_low"] <= summary["consistency"] <= ci["consistency_ci_high"]
    assert ci["clean_ci_low"] < summary["clean_acc"] < ci["clean_ci_high"]  # every other figure over both tasks
    assert ci["clean_ci_low"] != alone["clean_ci_low"]
    d = paired_delta(all_scores(a, "loglik"), all_scores(b, "loglik"))
    d_alone = paired_delta(all_scores(a_cola, "loglik"), all_scores(b_cola, "loglik"))
    assert d["consistency_delta"] == d_alone["consistency_delta"]
    assert d["consistency_delta_ci_low"] is not None
    assert (d["consistency_delta_ci_low"], d["consistency_delta_ci_high"]) == (d_alone["consistency_delta_ci_low"],
                                                                              d_alone["consistency_delta_ci_high"])


def test_paired_delta_needs_a_shared_sample() -> None:
    a = _table({"sst2": {"clean": np.ones((1, 3), bool)}})
    b = a.assign(example_id=a["example_id"] + "-other")
    with pytest.raises(ValueError, match="share no evaluated example"):
        paired_delta(example_scores(a, "loglik"), example_scores(b, "loglik"))


def test_report_and_metrics_carry_intervals_and_the_gap_to_base(tmp_path: Path) -> None:
    rng = np.random.default_rng(3)
    grid = {t: rng.random((2, 30)) < 0.5 for t in ("sst2", "rte")}
    base_tab = _table({t: {"clean": g, "deepwordbug": g} for t, g in grid.items()}, "base")
    good = {t: g | (rng.random(g.shape) < 0.5) for t, g in grid.items()}  # right wherever base was, and more
    coin_tab = _table({t: {"clean": g, "deepwordbug": g} for t, g in good.items()}, "coin")
    mk = lambda label, tab: EvalResult(model_label=label, predictions=tab, tasks=["sst2", "rte"],  # noqa: E731
                                       sets=["clean", "deepwordbug"], scorings=["loglik"])
    base, coin = mk("base", base_tab), mk("coin", coin_tab)
    paths = write_eval_outputs([base, coin], tmp_path)
    metrics = json.loads(paths["metrics"].read_text())
    u = metrics["coin"]["uncertainty"]
    assert "vs_base" not in metrics["base"]["uncertainty"]
    gap = u["vs_base"]
    want = metrics["coin"]["summary"]["perturbed_acc"] - metrics["base"]["summary"]["perturbed_acc"]
    assert gap["perturbed_delta"] == pytest.approx(want, abs=1e-3) and gap["perturbed_delta_ci_low"] > 0
    assert u["clean_ci_low"] <= metrics["coin"]["summary"]["clean_acc"] <= u["clean_ci_high"]
    for fig in ("consistency", "worst_acc"):  # the robustness figures: an interval each, and the paired gap
        own, ref = metrics["coin"]["summary"][fig], metrics["base"]["summary"][fig]
        assert u[f"{fig}_ci_low"] <= own <= u[f"{fig}_ci_high"] and u[f"{fig}_ci_low"] < u[f"{fig}_ci_high"]
        assert gap[f"{fig}_delta"] == pytest.approx(own - ref, abs=1e-3)
    assert gap["worst_acc_delta_ci_low"] >= 0  # coin is right wherever base is: no example's worst case drops
    md = paths["report_md"].read_text()
    assert "## Sampling uncertainty" in md and "Δ perturbed vs base" in md and "Δ worst-case vs base" in md
    row = next(line for line in md.splitlines() if line.startswith("| coin | loglik |") and "[" in line)
    assert f"+{gap['perturbed_delta']:.1f} [+{gap['perturbed_delta_ci_low']:.1f}, " in row
    rob = [line for line in md.splitlines() if line.startswith("| coin | loglik |") and "[" in line][1]
    assert rob.startswith(f"| coin | loglik | {metrics['coin']['summary']['consistency']:.1f} [")
    assert f"{gap['worst_acc_delta']:+.1f} [{gap['worst_acc_delta_ci_low']:+.1f}, " in rob
    table = paths["table"].read_text()  # the compact table: the accuracy intervals, not the robustness ones
    assert "## Sampling uncertainty" in table and "Δ perturbed vs base" in table and "worst-case vs" not in table
    # a base scored on another sample: intervals still, no paired gap, no crash
    other = dataclasses.replace(base, predictions=base_tab.assign(example_id=base_tab["example_id"] + "b"))
    again = json.loads(write_eval_outputs([other, coin], tmp_path / "x")["metrics"].read_text())
    assert "vs_base" not in again["coin"]["uncertainty"] and again["coin"]["uncertainty"]["clean_ci_low"] is not None
