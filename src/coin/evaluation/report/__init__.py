"""The combined report of one or more evaluated models (base, sft, cit, coin, ... any labels).

:func:`write_eval_outputs` writes, under one directory::

    metrics.json        {model: nested metrics} (numeric leaves only: DVC metrics / MLflow friendly), with a
                        ``card`` block per model (its robustness card's headline figures) and an
                        ``uncertainty`` block per model: bootstrap 95% intervals and the paired gap to ``base``;
                        each model's summary adds ``majority_acc`` and ``clean_vs_majority``, and the top-level
                        ``reference`` block holds the sample's majority-class and chance rates per task and
                        averaged (``coin.evaluation.reference``: what a model that reads nothing scores)
    predictions.jsonl   every model's per-example predictions
    report.md           the full report; report.html the same, self-contained (plots as base64 PNG)
    table.md            the compact summary (Prefect artifact)
    accuracy.png        accuracy by instruction set and task (one panel per model and scoring)
    models.png          model-vs-model bars per set, error bars = std over instructions
    pdr.png             performance drop rate by perturbation level (a note where no set is perturbed)
    eval_info.json      per model: tasks, caveats, skipped tasks, timings, settings, notes
    cards/<model>/      the model's robustness card (``coin.evaluation.card``): card.json and a self-contained
                        card.html; its headline and definitions are also a section of the report

and, when asked, the headline figures (:func:`headline_summary`) to a summary file: the pipeline's
``metrics/summary.json``, DVC's metrics file.

The report's content is built once as a list of blocks (:func:`build_report`) and rendered to
Markdown and to HTML, so the two never disagree. One module per concern, each importing only those
before it (``blocks`` <- ``content`` <- ``plots``; ``blocks`` <- ``render_md`` / ``render_html``; all <- this
writer, which computes the references and intervals once and writes the files):

- :mod:`.blocks`: the block types (heading, text, bullets, table, plot);
- :mod:`.content`: the numbers, rows and reference rows of each table, :func:`build_report` / :func:`build_table`;
- :mod:`.render_md` / :mod:`.render_html`: Markdown, and one self-contained HTML page with its CSS;
- :mod:`.plots`: the matplotlib figures.
- :mod:`.card`: the robustness card's own page (card.html), its report section and ``coin card``'s tables
  (imports ``blocks`` and ``render_html``; ``content`` imports it).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pandas as pd

from coin.data.io import write_json, write_jsonl
from coin.evaluation.card import CARD_HTML, CARD_JSON, CARDS_DIR, build_card, card_dir
from coin.evaluation.metrics import AVG, REFERENCE_KEY
from coin.evaluation.report.blocks import DASH, Block, Bullets, Heading, Plot, Table, Text
from coin.evaluation.report.card import card_html
from coin.evaluation.report.content import (
    CAVEAT_MARK,
    CHANCE_ROW,
    COMPARABLE,
    DEFINITIONS,
    MAJORITY_ROW,
    REFERENCE,
    REFERENCE_SCORING,
    REFERENCES_NOTE,
    References,
    build_report,
    build_table,
    f_acc,
    f_ci,
    f_gap,
    f_pct,
    f_pdr,
    references,
    uncertainty,
)
from coin.evaluation.report.plots import no_pdr_plot, plot_accuracy, plot_models, plot_pdr
from coin.evaluation.report.render_html import to_html
from coin.evaluation.report.render_md import to_markdown
from coin.evaluation.result import EvalResult

__all__ = ["CAVEAT_MARK", "CHANCE_ROW", "COMPARABLE", "DASH", "DEFINITIONS", "HEADLINE", "MAJORITY_ROW", "REFERENCE",
           "REFERENCE_SCORING", "REFERENCES_NOTE", "Block", "Bullets", "Heading", "Plot", "References", "Table", "Text",
           "build_report", "build_table", "f_acc", "f_ci", "f_gap", "f_pct", "f_pdr", "headline_summary",
           "plot_accuracy", "plot_models", "plot_pdr", "references", "to_html", "to_markdown", "uncertainty",
           "write_eval_outputs"]


HEADLINE = ("clean_acc", "perturbed_acc", "consistency", "worst_acc")


def headline_summary(doc: dict[str, Any], primary: dict[str, str]) -> dict[str, Any]:
    """The few figures worth a column in ``dvc exp show`` / ``dvc metrics diff``, from ``metrics.json``'s ``doc``.

    Per model (``primary``: its primary scoring): :data:`HEADLINE` and ``levels`` (mean accuracy per
    perturbation level, clean excepted); ``reference``: the sample's majority-class and chance rates
    (averaged over tasks), what a model that reads nothing scores.
    """
    out: dict[str, Any] = {}
    for label, scoring in primary.items():
        block = doc[label]
        levels = (block.get(scoring) or {}).get("levels") or {}
        out[label] = {**{k: block["summary"].get(k) for k in HEADLINE},
                      "levels": {lvl: v.get("acc_mean") for lvl, v in levels.items() if lvl != "clean"}}
    ref = doc.get(REFERENCE_KEY) or {}
    out[REFERENCE_KEY] = {f"{k}_acc": (ref.get(k) or {}).get(AVG) for k in ("majority", "chance")}
    return out


def write_eval_outputs(results: list[EvalResult], out_dir: str | Path,
                       summary_file: str | Path | None = None) -> dict[str, Path]:
    """Write the combined outputs for ``results`` (any number of models) under ``out_dir``; returns their paths.

    ``summary_file``: also write :func:`headline_summary` there (the pipeline's ``metrics/summary.json``)."""
    if not results:
        raise ValueError("no evaluation results to write")
    labels = [r.model_label for r in results]
    if len(set(labels)) != len(labels):
        raise ValueError(f"model labels must be unique, got {labels}")
    if REFERENCE_KEY in labels:
        raise ValueError(f"model label {REFERENCE_KEY!r} is reserved: metrics.json's {REFERENCE_KEY!r} block holds "
                         "the majority-class and chance rates; label the model otherwise")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    refs = references(results)
    plots = {p.name: p for p in (plot_accuracy(results, refs), plot_models(results, refs), plot_pdr(results))
             if p is not None}
    paths: dict[str, Path] = {
        "metrics": out / "metrics.json",
        "predictions": out / "predictions.jsonl",
        "report_md": out / "report.md",
        "report_html": out / "report.html",
        "table": out / "table.md",
        "info": out / "eval_info.json",
    }
    unc = uncertainty(results)
    doc: dict[str, Any] = {}
    for r in results:
        nested = r.metrics_nested()
        summary = nested["summary"]
        # from the unrounded clean accuracy: the difference of two rounded figures was off in its last digit
        clean = float(r.metrics.overall.set_index("scoring").loc[r.primary, "clean_acc"])
        nested["summary"] = {**summary, **refs.model_summary(r, r.primary, clean)}
        doc[r.model_label] = {**nested, "uncertainty": unc[r.model_label]}
    cards = {r.model_label: build_card(r.predictions, r.model_label, r.primary) for r in results}
    for label, card in cards.items():  # a new key: the card's headline figures (DVC metrics, MLflow)
        doc[label]["card"] = dict(card["headline"])
    doc[REFERENCE_KEY] = refs.all.to_dict()
    # eval_info.json marks a whole evaluation: gone while the files are rewritten, written last. An evaluation
    # interrupted in between left the new metrics.json beside the last one's predictions, cards and protocol,
    # and `coin register` combined them into one registered version
    paths["info"].unlink(missing_ok=True)
    write_json(paths["metrics"], doc)
    if summary_file is not None:
        paths["summary"] = Path(summary_file)
        write_json(paths["summary"], headline_summary(doc, {r.model_label: r.primary for r in results}))
    frame = pd.concat([r.predictions for r in results], ignore_index=True)
    write_jsonl(paths["predictions"], json.loads(frame.to_json(orient="records", force_ascii=False)))
    paths["cards"] = out / CARDS_DIR
    keep = {card_dir(out, label) for label in cards}
    for old in sorted(paths["cards"].glob(f"*/{CARD_JSON}")):  # a model no longer evaluated: its card goes too
        if old.parent not in keep:
            shutil.rmtree(old.parent)
    for label, card in cards.items():
        d = card_dir(out, label)
        d.mkdir(parents=True, exist_ok=True)
        write_json(d / CARD_JSON, card)
        (d / CARD_HTML).write_text(card_html(card), encoding="utf-8")
    blocks = build_report(results, plots, unc, refs, cards=cards)
    paths["report_md"].write_text(to_markdown(blocks), encoding="utf-8")
    paths["report_html"].write_text(to_html(blocks), encoding="utf-8")
    paths["table"].write_text(to_markdown(build_table(results, unc, refs)), encoding="utf-8")
    for name, plot in {**plots, **({} if "pdr" in plots else {"pdr": no_pdr_plot()})}.items():
        paths[f"plot_{name}"] = out / f"{name}.png"
        paths[f"plot_{name}"].write_bytes(plot.png)
    write_json(paths["info"], {r.model_label: r.info() for r in results})
    return paths
