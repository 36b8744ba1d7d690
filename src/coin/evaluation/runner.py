"""Run the robustness evaluation of one model and write its report (DESIGN §2).

``evaluate_model`` scores every (set, instruction, example) of every task with the label-word
log-likelihood and returns an :class:`EvalResult`; ``write_eval_outputs`` writes the metrics, the
per-example predictions, a Markdown table and a bar chart for one or more results (base, cit, coin...).
Tasks without offline validation data (qqp) are skipped with their reason, never a crash.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd
from torch import nn

from coin.config import EvaluateSettings
from coin.data.io import write_json, write_jsonl
from coin.data.tasks import get_task
from coin.evaluation.instructions import load_instruction_sets, perturbation_level
from coin.evaluation.metrics import AVG, compute_metrics
from coin.evaluation.sampling import SplitUnavailable, sample_examples
from coin.evaluation.scoring import loglik_scores

log = logging.getLogger(__name__)

CAVEAT_MARK = "†"


@dataclass
class EvalResult:
    model_label: str
    predictions: pd.DataFrame          # one row per (task, set, instruction_id, example_id)
    metrics: pd.DataFrame              # task, set, acc_mean, acc_std, n_examples, n_instructions (+ avg rows)
    metrics_nested: dict[str, Any]     # {task: {set: {acc_mean, acc_std, n, n_instructions}}}, incl. 'avg'
    tasks: list[str]                   # evaluated tasks, in the configured order
    sets: list[str]                    # instruction sets, in the configured order
    caveats: dict[str, str] = field(default_factory=dict)   # task -> why its numbers are not comparable
    skipped: dict[str, str] = field(default_factory=dict)   # task -> why it was not evaluated
    wall_time_s: float = 0.0
    examples_per_s: float = 0.0        # scored (instruction, example) items per second
    settings: dict[str, Any] = field(default_factory=dict)

    def info(self) -> dict[str, Any]:
        return {
            "tasks": self.tasks, "sets": self.sets, "caveats": self.caveats, "skipped": self.skipped,
            "wall_time_s": round(self.wall_time_s, 3), "examples_per_s": round(self.examples_per_s, 2),
            "n_predictions": len(self.predictions), "settings": self.settings,
        }


# --------------------------------------------------------------------------- evaluation


def evaluate_model(
    model: nn.Module, tokenizer, cfg: EvaluateSettings, *, data_dir: str | Path, seed: int, model_label: str
) -> EvalResult:
    """Score ``model`` (any causal LM, possibly peft-wrapped, already on its device) on ``cfg``."""
    start = time.perf_counter()
    instructions = load_instruction_sets(cfg.instruction_file, cfg.instruction_sets, list(cfg.tasks))
    frames: list[pd.DataFrame] = []
    caveats: dict[str, str] = {}
    skipped: dict[str, str] = {}
    for task in cfg.tasks:
        try:
            rows, caveat = sample_examples(data_dir, task, cfg.samples_per_task, seed)
        except SplitUnavailable as exc:
            log.warning("skipping %s: %s", task, exc.reason)
            skipped[task] = exc.reason
            continue
        if caveat:
            caveats[task] = caveat
        per_set = {s: instructions[s][task] for s in cfg.instruction_sets}
        frames.append(_evaluate_task(model, tokenizer, task, rows, per_set, cfg))
    if not frames:
        raise ValueError(f"no task could be evaluated ({model_label}): " + "; ".join(f"{t}: {r}" for t, r in skipped.items()))
    preds = pd.concat(frames, ignore_index=True)
    preds.insert(0, "model", model_label)
    table, nested = compute_metrics(preds)
    wall = time.perf_counter() - start
    return EvalResult(
        model_label=model_label, predictions=preds, metrics=table, metrics_nested=nested,
        tasks=[t for t in cfg.tasks if t not in skipped], sets=list(cfg.instruction_sets),
        caveats=caveats, skipped=skipped, wall_time_s=wall, examples_per_s=len(preds) / wall if wall > 0 else 0.0,
        settings={"scoring": list(cfg.scoring), "prompt_format": cfg.prompt_format, "seed": seed,
                  "samples_per_task": cfg.samples_per_task, "instruction_file": str(cfg.instruction_file)},
    )


def _evaluate_task(
    model: nn.Module, tokenizer, task: str, rows: list[dict[str, Any]], per_set: dict[str, list[str]],
    cfg: EvaluateSettings,
) -> pd.DataFrame:
    """All sets x instructions x examples of one task in one batched scoring call."""
    spec = get_task(task)
    items = [(s, i, instr, row) for s, instrs in per_set.items() for i, instr in enumerate(instrs) for row in rows]
    prompts = [instr + spec.render_content(row) for _, _, instr, row in items]
    scores = loglik_scores(model, tokenizer, prompts, list(spec.label_words), fmt=cfg.prompt_format,
                           batch_size=cfg.batch_size, desc=f"{task} ({len(prompts)} prompts)")
    pred = scores.argmax(dim=1).tolist()
    return pd.DataFrame({
        "task": task,
        "set": [s for s, _, _, _ in items],
        "level": [perturbation_level(s) for s, _, _, _ in items],
        "instruction_id": [i for _, i, _, _ in items],
        "example_id": [row["example_id"] for _, _, _, row in items],
        "label": [int(row["label"]) for _, _, _, row in items],
        "pred": pred,
        "label_word": [spec.label_words[row["label"]] for _, _, _, row in items],
        "pred_word": [spec.label_words[p] for p in pred],
        "scores": [[round(v, 5) for v in r] for r in scores.tolist()],
    })


# --------------------------------------------------------------------------- outputs


def write_eval_outputs(results: list[EvalResult], out_dir: str | Path) -> dict[str, Path]:
    """Write metrics.json, predictions.jsonl, table.md, accuracy.png (and eval_info.json) under ``out_dir``."""
    if not results:
        raise ValueError("no evaluation results to write")
    labels = [r.model_label for r in results]
    if len(set(labels)) != len(labels):
        raise ValueError(f"model labels must be unique, got {labels}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {
        "metrics": out / "metrics.json",
        "predictions": out / "predictions.jsonl",
        "table": out / "table.md",
        "plot": out / "accuracy.png",
        "info": out / "eval_info.json",
    }
    write_json(paths["metrics"], {r.model_label: r.metrics_nested for r in results})
    write_jsonl(paths["predictions"], _prediction_records(results))
    paths["table"].write_text(render_table_md(results), encoding="utf-8")
    plot_accuracy(results, paths["plot"])
    write_json(paths["info"], {r.model_label: r.info() for r in results})
    return paths


def _prediction_records(results: list[EvalResult]) -> list[dict[str, Any]]:
    frame = pd.concat([r.predictions for r in results], ignore_index=True)
    return json.loads(frame.to_json(orient="records", force_ascii=False))  # native JSON types throughout


def _cell(table: pd.DataFrame, task: str, set_name: str) -> str:
    hit = table[(table["task"] == task) & (table["set"] == set_name)]
    if hit.empty:
        return "–"
    row = hit.iloc[0]
    return f"{row.acc_mean:.1f} ± {row.acc_std:.1f}"


def _model_block(r: EvalResult) -> list[str]:
    lines = [f"### {r.model_label}", "", "| task | " + " | ".join(r.sets) + " |",
             "|---|" + "---:|" * len(r.sets)]
    for task in r.tasks:
        name = task + (CAVEAT_MARK if task in r.caveats else "")
        lines.append(f"| {name} | " + " | ".join(_cell(r.metrics, task, s) for s in r.sets) + " |")
    lines.append(f"| **{AVG}** | " + " | ".join(f"**{_cell(r.metrics, AVG, s)}**" for s in r.sets) + " |")
    lines.append("")
    n = r.predictions.groupby("task")["example_id"].nunique()
    lines.append("Accuracy in % (mean ± population std over instructions); examples per task: "
                 + ", ".join(f"{t} {n[t]}" for t in r.tasks)
                 + f"; {r.wall_time_s:.1f} s, {r.examples_per_s:.1f} examples/s.")
    for task, why in r.caveats.items():
        lines.append(f"{CAVEAT_MARK} {task}: {why}.")
    for task, why in r.skipped.items():
        lines.append(f"Skipped {task}: {why}.")
    return lines + [""]


def render_table_md(results: list[EvalResult]) -> str:
    """Markdown: one block per model, rows = tasks (+ avg), columns = instruction sets, cells mean ± std."""
    levels = sorted({(s, perturbation_level(s)) for r in results for s in r.sets}, key=lambda x: x[0])
    head = ["# Robustness evaluation", "",
            "Sets and perturbation levels: " + ", ".join(f"{s} ({lvl})" for s, lvl in levels) + ".",
            "`avg` = unweighted mean over the evaluated tasks of acc_mean and acc_std.", ""]
    body = [line for r in results for line in _model_block(r)]
    return "\n".join(head + body)


def plot_accuracy(results: list[EvalResult], path: str | Path) -> Path:
    """Grouped bars: one panel per model, groups = tasks + avg, one bar per set, std error bars."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(max(6.0, 1.2 * max(len(r.tasks) + 1 for r in results)), 3.2 * len(results)),
                 layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(len(results), 1, squeeze=False)[:, 0]
    for ax, r in zip(axes, results):
        _bar_panel(ax, r)
    fig.savefig(path, dpi=120)
    return Path(path)


def _bar_panel(ax, r: EvalResult) -> None:
    groups = r.tasks + [AVG]
    width = 0.8 / len(r.sets)
    for k, s in enumerate(r.sets):
        sub = r.metrics[r.metrics["set"] == s].set_index("task").reindex(groups)
        xs = [g + (k - (len(r.sets) - 1) / 2) * width for g in range(len(groups))]
        ax.bar(xs, sub["acc_mean"].fillna(0), width, yerr=sub["acc_std"].fillna(0), capsize=2,
               label=f"{s} ({perturbation_level(s)})")
    ax.set_xticks(range(len(groups)),
                  [g + (CAVEAT_MARK if g in r.caveats else "") for g in groups])
    ax.set_ylim(0, 100)
    ax.set_ylabel("accuracy (%)")
    ax.set_title(r.model_label)
    ax.legend(fontsize="small", ncols=min(len(r.sets), 5), loc="upper left")
