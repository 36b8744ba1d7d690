"""The combined report of one or more evaluated models (base, sft, cit, coin, ... any labels).

:func:`write_eval_outputs` writes, under one directory::

    metrics.json        {model: nested metrics} (numeric leaves only: DVC metrics / MLflow friendly), with an
                        ``uncertainty`` block per model: bootstrap 95% intervals and the paired gap to ``base``;
                        each model's summary adds ``majority_acc`` and ``clean_vs_majority``, and the top-level
                        ``reference`` block holds the sample's majority-class and chance rates per task and
                        averaged (``coin.evaluation.reference``: what a model that reads nothing scores)
    predictions.jsonl   every model's per-example predictions
    report.md           the full report; report.html the same, self-contained (plots as base64 PNG)
    table.md            the compact summary (Prefect artifact)
    accuracy.png        accuracy by instruction set and task (one panel per model and scoring)
    models.png          model-vs-model bars per set, error bars = std over instructions
    pdr.png             performance drop rate by perturbation level
    eval_info.json      per model: tasks, caveats, skipped tasks, timings, settings, notes

The report's content is built once as a list of blocks (:func:`build_report`) and rendered to
Markdown and to HTML, so the two never disagree.
"""

from __future__ import annotations

import base64
import html
import io
import json
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from coin.data.io import write_json, write_jsonl
from coin.data.tasks import get_task
from coin.evaluation.instructions import perturbation_level
from coin.evaluation.metrics import AVG, CLEAN, REFERENCE_KEY
from coin.evaluation.reference import COLUMNS, ReferenceRates, clean_tasks, majority_summary, reference_rates
from coin.evaluation.result import EvalResult
from coin.evaluation.uncertainty import LEVEL, N_BOOT, bootstrap_ci, example_scores, paired_delta

log = logging.getLogger(__name__)

CAVEAT_MARK = "†"
REFERENCE = "base"  # the model every other one is compared with, paired on the same examples, when present
DASH = "–"
# settings that must agree for models to be compared in one report (else the report says so)
COMPARABLE = ("seed", "samples_per_task", "n_examples", "instruction_file", "prompt_format", "length_normalise",
              "max_new_tokens")


# --------------------------------------------------------------------------- blocks


@dataclass
class Heading:
    text: str
    level: int = 2


@dataclass
class Text:
    text: str


@dataclass
class Bullets:
    items: list[str]


@dataclass
class Table:
    header: list[str]
    rows: list[list[str]]
    bold_rows: set[int] = field(default_factory=set)   # row indices rendered bold (averages)
    caption: str = ""
    text_cols: int = 1                                  # leading columns of text (left-aligned); the rest numbers


@dataclass
class Plot:
    name: str          # file stem: accuracy, models, pdr
    png: bytes
    alt: str


Block = Heading | Text | Bullets | Table | Plot


# --------------------------------------------------------------------------- formatting


def _isnum(x: Any) -> bool:
    return x is not None and not (isinstance(x, float) and math.isnan(x))


def f_acc(mean: Any, std: Any = None) -> str:
    if not _isnum(mean):
        return DASH
    return f"{mean:.1f} ± {std:.1f}" if _isnum(std) else f"{mean:.1f}"


def f_pct(x: Any) -> str:
    return f"{x:.1f}" if _isnum(x) else DASH


def f_pdr(x: Any) -> str:
    return f"{x:+.3f}" if _isnum(x) else DASH


def _task_name(r: EvalResult, task: str) -> str:
    return task + (CAVEAT_MARK if task in r.caveats else "")


def _set_name(s: str) -> str:
    lvl = perturbation_level(s)
    return s if lvl == s else f"{s} ({lvl})"


def _cell(r: EvalResult, scoring: str, task: str, set_name: str) -> pd.Series | None:
    c = r.metrics.cells
    hit = c[(c["scoring"] == scoring) & (c["task"] == task) & (c["set"] == set_name)]
    return None if hit.empty else hit.iloc[0]


def _set_avg(r: EvalResult, scoring: str, set_name: str) -> pd.Series | None:
    s = r.metrics.sets
    hit = s[(s["scoring"] == scoring) & (s["set"] == set_name)]
    return None if hit.empty else hit.iloc[0]


def _overall(r: EvalResult, scoring: str) -> pd.Series:
    o = r.metrics.overall
    return o[o["scoring"] == scoring].iloc[0]


def _perturbed(r: EvalResult) -> list[str]:
    return [s for s in r.sets if s != CLEAN]


# --------------------------------------------------------------------------- references


@dataclass(frozen=True)
class References:
    """The majority-class and chance rates (:mod:`coin.evaluation.reference`) of every model's own sample
    (``models``) and of all the evaluated examples together (``all``, the ``reference`` block of
    metrics.json). The two agree whenever the models share one sample, as the protocol makes them."""

    all: ReferenceRates
    models: dict[str, ReferenceRates]

    @property
    def samples_differ(self) -> bool:
        return len({json.dumps(r.to_dict(), sort_keys=True) for r in self.models.values()}) > 1

    def model_summary(self, r: EvalResult, scoring: str, clean_acc: Any) -> dict[str, Any]:
        """``majority_acc`` / ``clean_vs_majority`` of ``r``'s ``scoring`` (its clean tasks, its own sample)."""
        clean = float(clean_acc) if _isnum(clean_acc) else None
        return majority_summary(self.models[r.model_label], clean, clean_tasks(r.predictions, scoring))


def references(results: list[EvalResult]) -> References:
    """Computed once per report from the predictions (task, example_id, label) and read by every table and plot."""
    return References(reference_rates(pd.concat([r.predictions[list(COLUMNS)] for r in results], ignore_index=True)),
                      {r.model_label: reference_rates(r.predictions) for r in results})


def f_gap(x: Any) -> str:
    return f"{x:+.1f}" if _isnum(x) else DASH


# --------------------------------------------------------------------------- content


def _header(results: list[EvalResult], refs: References) -> list[Block]:
    first = results[0]
    sets = list(dict.fromkeys(s for r in results for s in r.sets))
    scorings = list(dict.fromkeys(m for r in results for m in r.scorings))
    tasks = list(dict.fromkeys(t for r in results for t in r.tasks))
    n = first.settings.get("n_examples", {})
    n_instr = sorted({int(x) for r in results for x in r.metrics.cells["n_instructions"]})
    items = [
        "Models: " + ", ".join(f"**{r.model_label}**" for r in results) + ".",
        "Scoring: " + ", ".join(f"`{m}`" + (" (primary: summary and promotion gate)" if i == 0 else "")
                                for i, m in enumerate(scorings)) + ".",
        "Tasks: " + ", ".join(f"{_task_name(first, t)} ({n.get(t, '?')} examples)" for t in tasks)
        + f"; the same seeded sample (seed {first.settings.get('seed')}) for every instruction, set and model.",
        "Instruction sets (" + "/".join(map(str, n_instr)) + " instructions per task): "
        + ", ".join(_set_name(s) for s in sets) + f"; file `{first.settings.get('instruction_file')}`.",
        f"Prompt format: `{first.settings.get('prompt_format')}`"
        + (", label log-probs length-normalised" if first.settings.get("length_normalise") else "") + ".",
    ]
    ref = refs.all
    items.append(
        f"Reference (majority class): always answering each task's most frequent label scores **{ref.majority_avg():.1f}%** "
        f"on this sample (avg over tasks; " + ", ".join(f"{t} {v:.1f}" for t, v in ref.majority.items())
        + f"); chance (100 / number of labels) is {ref.chance_avg():.1f}%. A model at or below the majority rate "
        "does no better than a constant answer" + (" (the models were scored on different samples: these rates are "
                                                    "of all their examples together; each model's own is in its tables)"
                                                    if refs.samples_differ else "") + ".")
    differ = [k for k in COMPARABLE if len({json.dumps(r.settings.get(k), sort_keys=True) for r in results}) > 1]
    if differ:
        items.append("**Warning: the models were evaluated with different settings** (" + ", ".join(differ)
                     + "); their numbers are not directly comparable. Per model: "
                     + "; ".join(f"{r.model_label}: " + ", ".join(f"{k}={r.settings.get(k)}" for k in differ)
                                 for r in results) + ".")
    for r in results:
        for task, why in r.caveats.items():
            line = f"{CAVEAT_MARK} {task}: {why}; it is included in every average."
            if line not in items:
                items.append(line)
        for task, why in r.skipped.items():
            line = f"Skipped {task}: {why}."
            if line not in items:
                items.append(line)
    return [Heading("Robustness evaluation", 1), Bullets(items)]


DEFINITIONS = (
    "Accuracy in % as mean ± population std over the instructions of a set; `avg` = unweighted mean over tasks. "
    "Perturbed = mean over the perturbed sets. PDR = 1 − acc(set)/acc(clean) per task and set (negative: the "
    "perturbed set did better), averaged over tasks. Consistency = % of examples with the same prediction under "
    "every instruction of the set; worst-case = % of examples correct under every instruction. Unparsed = % of "
    "generations that named no label (counted wrong)."
)
MAJORITY_ROW, CHANCE_ROW, REFERENCE_SCORING = "majority class", "chance", "(reference)"
REFERENCES_NOTE = (
    "Majority class = always answering each task's most frequent label of the evaluated sample (the same on every "
    "set: the labels do not change with the instruction); chance = 100 / number of labels; both averaged over tasks. "
    "clean − majority = the model's clean accuracy minus the majority rate of its sample, in points: at or below 0 "
    "it does no better than a constant answer."
)


def _summary(results: list[EvalResult], refs: References) -> list[Block]:
    levels = list(dict.fromkeys(s for r in results for s in _perturbed(r)))
    has_gen = any("generate" in r.scorings for r in results)
    header = ["model", "scoring", "clean", "clean − majority", *[_set_name(s) for s in levels], "perturbed", "PDR",
              "consistency", "worst-case"] + (["unparsed"] if has_gen else [])
    rows = []
    for r in results:
        for m in r.scorings:
            o = _overall(r, m)
            row = [r.model_label, m, f_acc(o["clean_acc"], o["clean_std"]),
                   f_gap(refs.model_summary(r, m, o["clean_acc"])["clean_vs_majority"])]
            for s in levels:
                a = _set_avg(r, m, s)
                row.append(f_acc(a["acc_mean"], a["acc_std"]) if a is not None else DASH)
            row += [f_acc(o["perturbed_acc"], o["perturbed_std"]), f_pdr(o["pdr"]), f_pct(o["consistency"]),
                    f_pct(o["worst_acc"])]
            if has_gen:
                row.append(f_pct(o["unparsed"]) if m == "generate" else DASH)
            rows.append(row)
    for name, rate in ((MAJORITY_ROW, refs.all.majority_avg()), (CHANCE_ROW, refs.all.chance_avg())):
        # a constant (or random) answer scores its rate on every set: no spread, no drop
        rows.append([name, REFERENCE_SCORING, f_pct(rate), DASH, *[f_pct(rate)] * len(levels), f_pct(rate),
                     *[DASH] * (3 + has_gen)])
    return [Heading("Summary"), Table(header, rows, text_cols=2, caption=DEFINITIONS +
                                      " Consistency, worst-case and unparsed here are means over the perturbed sets. "
                                      + REFERENCES_NOTE)]


def uncertainty(results: list[EvalResult]) -> dict[str, dict[str, Any]]:
    """Per model: bootstrap intervals of its primary scoring's clean and perturbed accuracy and, when a
    ``base`` model with the same primary scoring is among ``results``, the paired gap to it (``vs_base``)."""
    ref = next((r for r in results if r.model_label == REFERENCE), None)
    scores = {r.model_label: example_scores(r.predictions, r.primary) for r in results}  # once per model
    out: dict[str, dict[str, Any]] = {}
    for r in results:
        u: dict[str, Any] = {"n_boot": N_BOOT, "level": LEVEL, **bootstrap_ci(scores[r.model_label])}
        if ref is not None and r is not ref and ref.primary == r.primary:
            try:
                u[f"vs_{REFERENCE}"] = paired_delta(scores[r.model_label], scores[REFERENCE])
            except ValueError as exc:  # different samples: no paired gap, the report says so
                log.warning("evaluate report: %s vs %s: %s", r.model_label, REFERENCE, exc)
        out[r.model_label] = u
    return out


def f_ci(point: Any, lo: Any, hi: Any, *, signed: bool = False) -> str:
    if not all(_isnum(x) for x in (point, lo, hi)):
        return DASH
    f = "{:+.1f}" if signed else "{:.1f}"
    return f"{f.format(point)} [{f.format(lo)}, {f.format(hi)}]"


def _uncertainty_table(results: list[EvalResult], unc: dict[str, dict[str, Any]]) -> list[Block]:
    vs = f"vs_{REFERENCE}"
    has_ref = any(vs in u for u in unc.values())
    header = ["model", "scoring", "clean", "perturbed"] + ([f"Δ clean vs {REFERENCE}", f"Δ perturbed vs {REFERENCE}"]
                                                          if has_ref else [])
    rows = []
    for r in results:
        u, o = unc[r.model_label], _overall(r, r.primary)
        row = [r.model_label, r.primary, f_ci(o["clean_acc"], u["clean_ci_low"], u["clean_ci_high"]),
               f_ci(o["perturbed_acc"], u["perturbed_ci_low"], u["perturbed_ci_high"])]
        if has_ref:
            d = u.get(vs)
            row += [f_ci(d[f"{c}_delta"], d[f"{c}_delta_ci_low"], d[f"{c}_delta_ci_high"], signed=True) if d else DASH
                    for c in ("clean", "perturbed")]
        rows.append(row)
    caption = (f"Accuracy in % with its {LEVEL:.0%} bootstrap interval over the evaluated examples ({N_BOOT} "
               "resamples within each task; a drawn example keeps all its instructions and sets). "
               + (f"Δ = model − {REFERENCE} on the same examples, paired; an interval that excludes 0 is a gap "
                  "larger than the example draw explains. " if has_ref else "")
               + "Not covered: the choice of instructions (the ± std above) and the training seed.")
    return [Heading("Sampling uncertainty"), Table(header, rows, text_cols=2, caption=caption)]


def _accuracy_tables(results: list[EvalResult], refs: References, *, primary_only: bool = False) -> list[Block]:
    out: list[Block] = [Heading("Accuracy by task and instruction set"),
                        Text("Columns `majority` and `chance`: the accuracy of always answering the task's most "
                             "frequent label of the evaluated sample, and of a uniform random guess (100 / labels).")]
    for r in results:
        ref = refs.models[r.model_label]
        for m in ([r.primary] if primary_only else r.scorings):
            rows = [[_task_name(r, t)] + [f_acc(c["acc_mean"], c["acc_std"]) if (c := _cell(r, m, t, s)) is not None
                                          else DASH for s in r.sets]
                    + [f_pct(ref.majority.get(t)), f_pct(ref.chance.get(t))] for t in r.tasks]
            rows.append([AVG] + [f_acc(a["acc_mean"], a["acc_std"]) if (a := _set_avg(r, m, s)) is not None else DASH
                                 for s in r.sets] + [f_pct(ref.majority_avg(r.tasks)), f_pct(ref.chance_avg(r.tasks))])
            out += [Heading(f"{r.model_label} · {m}", 3),
                    Table(["task", *r.sets, "majority", "chance"], rows, bold_rows={len(rows) - 1})]
    return out


def _robustness_tables(results: list[EvalResult]) -> list[Block]:
    out: list[Block] = [Heading("Robustness by task: PDR, consistency, worst case")]
    for r in results:
        pert = _perturbed(r)
        for m in r.scorings:
            header = ["task", *[f"PDR {s}" for s in pert], *[f"cons. / worst {s}" for s in r.sets]]
            rows = []
            for t in [*r.tasks, AVG]:
                get = (lambda s: _set_avg(r, m, s)) if t == AVG else (lambda s, t=t: _cell(r, m, t, s))  # noqa: E731
                row = [AVG if t == AVG else _task_name(r, t)]
                row += [f_pdr(c["pdr"]) if (c := get(s)) is not None else DASH for s in pert]
                row += [f"{f_pct(c['consistency'])} / {f_pct(c['worst_acc'])}" if (c := get(s)) is not None else DASH
                        for s in r.sets]
                rows.append(row)
            out += [Heading(f"{r.model_label} · {m}", 3), Table(header, rows, bold_rows={len(rows) - 1})]
    return out


def _category_table(results: list[EvalResult]) -> list[Block]:
    sets = list(dict.fromkeys(s for r in results for s in r.sets))
    rows = []
    for r in results:
        cat = r.metrics.categories
        for m in r.scorings:
            sub = cat[cat["scoring"] == m]
            for c in dict.fromkeys(sub["category"]):
                tasks = [t for t in r.tasks if get_task(t).category == c]
                row = [r.model_label, m, f"{c} ({', '.join(_task_name(r, t) for t in tasks)})"]
                for s in sets:
                    hit = sub[(sub["category"] == c) & (sub["set"] == s)]
                    row.append(f_acc(hit["acc_mean"].iloc[0], hit["acc_std"].iloc[0]) if len(hit) else DASH)
                rows.append(row)
    return [Heading("By task category"), Table(["model", "scoring", "category (tasks)", *sets], rows, text_cols=3,
                                                caption="Accuracy in %, mean over the category's tasks.")]


def _task_modes(r: EvalResult, m: str, task: str) -> dict[str, float]:
    """clean / perturbed (mean over perturbed sets) accuracy and unparsed share (mean over sets) of one task."""
    c = r.metrics.cells
    c = c[(c["scoring"] == m) & (c["task"] == task)]
    clean, pert = c[c["set"] == CLEAN], c[c["set"] != CLEAN]
    return {"clean": float(clean["acc_mean"].mean()) if len(clean) else math.nan,
            "perturbed": float(pert["acc_mean"].mean()) if len(pert) else math.nan,
            "unparsed": float(c["unparsed"].mean()) if len(c) else math.nan}


def _scoring_comparison(results: list[EvalResult]) -> list[Block]:
    multi = [r for r in results if len(r.scorings) > 1]
    if not multi:
        return []
    out: list[Block] = [Heading("Scoring modes side by side"),
                        Text("Agreement = % of (instruction, example) items on which both modes predict the same "
                             "label (pooled over sets; `avg` pools everything); an unparsed generation never agrees.")]
    for r in multi:
        a, b = r.scorings[0], r.scorings[1]
        ag = r.metrics.agreement
        ag = ag[(ag["pair"] == f"{a}~{b}") & (ag["set"] == AVG)].set_index("task")["agreement"]
        gen = "generate" if "generate" in (a, b) else None
        header = ["task", f"clean {a}", f"clean {b}", f"perturbed {a}", f"perturbed {b}", "agreement"] + (
            ["unparsed (generate)"] if gen else [])
        per_task = {t: {m: _task_modes(r, m, t) for m in (a, b)} for t in r.tasks}
        per_task[AVG] = {m: {k: float(pd.Series([per_task[t][m][k] for t in r.tasks]).mean())
                             for k in ("clean", "perturbed", "unparsed")} for m in (a, b)}
        rows = []
        for t, v in per_task.items():
            row = [AVG if t == AVG else _task_name(r, t), f_pct(v[a]["clean"]), f_pct(v[b]["clean"]),
                   f_pct(v[a]["perturbed"]), f_pct(v[b]["perturbed"]), f_pct(ag.get(t))]
            if gen:
                row.append(f_pct(v[gen]["unparsed"]))
            rows.append(row)
        out += [Heading(r.model_label, 3), Table(header, rows, bold_rows={len(rows) - 1})]
    return out


def _run_details(results: list[EvalResult]) -> list[Block]:
    rows, notes = [], []
    for r in results:
        speed = "; ".join(f"{m}: {t.get('items', 0)} items in {t.get('seconds', 0):.1f} s "
                          f"({t.get('items_per_s', 0):.1f}/s)" for m, t in r.timing.items())
        rows.append([r.model_label, speed or DASH, f"{r.wall_time_s:.1f}"])
        notes += [n for n in r.notes if n not in notes]
    table = Table(["model", "throughput per scoring mode", "wall time (s)"], rows, text_cols=2)
    return [Heading("Run details"), table] + ([Bullets(notes)] if notes else [])


def build_report(results: list[EvalResult], plots: dict[str, Plot] | None = None,
                 unc: dict[str, dict[str, Any]] | None = None, refs: References | None = None) -> list[Block]:
    """The full report as blocks; ``plots`` (name -> Plot) are placed next to the tables they illustrate;
    ``unc``: :func:`uncertainty` of ``results``, ``refs``: :func:`references` (each computed when not given)."""
    plots = plots or {}
    unc = uncertainty(results) if unc is None else unc
    refs = references(results) if refs is None else refs
    blocks: list[Block] = [*_header(results, refs), *_summary(results, refs), *_uncertainty_table(results, unc)]
    blocks += [plots[k] for k in ("models", "pdr") if k in plots]
    blocks += _accuracy_tables(results, refs)
    if "accuracy" in plots:
        blocks.append(plots["accuracy"])
    blocks += [*_robustness_tables(results), *_category_table(results), *_scoring_comparison(results),
               *_run_details(results)]
    return blocks


def build_table(results: list[EvalResult], unc: dict[str, dict[str, Any]] | None = None,
                refs: References | None = None) -> list[Block]:
    """The compact summary: header, summary and uncertainty tables, the primary scoring's accuracy table per model."""
    unc = uncertainty(results) if unc is None else unc
    refs = references(results) if refs is None else refs
    return [*_header(results, refs), *_summary(results, refs), *_uncertainty_table(results, unc),
            *_accuracy_tables(results, refs, primary_only=True)]


# --------------------------------------------------------------------------- rendering


def _md_escape(text: str) -> str:
    return text.replace("|", "\\|")


def to_markdown(blocks: list[Block]) -> str:
    lines: list[str] = []
    for b in blocks:
        if isinstance(b, Heading):
            lines += ["#" * b.level + " " + b.text, ""]
        elif isinstance(b, Text):
            lines += [b.text, ""]
        elif isinstance(b, Bullets):
            lines += [f"- {item}" for item in b.items] + [""]
        elif isinstance(b, Table):
            lines.append("| " + " | ".join(map(_md_escape, b.header)) + " |")
            lines.append("|" + "|".join(["---"] * b.text_cols + ["---:"] * (len(b.header) - b.text_cols)) + "|")
            for i, row in enumerate(b.rows):
                cells = [f"**{c}**" if i in b.bold_rows and c != DASH else c for c in map(_md_escape, row)]
                lines.append("| " + " | ".join(cells) + " |")
            lines += [""] + ([b.caption, ""] if b.caption else [])
        elif isinstance(b, Plot):
            lines += [f"![{b.alt}]({b.name}.png)", ""]
    return "\n".join(lines)


def _inline_html(text: str) -> str:
    """Escape, then the two Markdown inline forms the report uses: **bold** and `code`."""
    out, parts = [], html.escape(text).split("`")
    for i, part in enumerate(parts):
        if i % 2:
            out.append(f"<code>{part}</code>")
        else:
            bits = part.split("**")
            out.append("".join(f"<b>{x}</b>" if j % 2 else x for j, x in enumerate(bits)))
    return "".join(out)


_CSS = """
body{font-family:system-ui,-apple-system,'Segoe UI',Roboto,sans-serif;margin:24px auto;max-width:1320px;color:#1b1f23;
padding:0 16px;line-height:1.45}
h1{font-size:26px;margin:0 0 8px}h2{font-size:20px;margin:28px 0 8px;border-bottom:1px solid #d0d7de;padding-bottom:4px}
h3{font-size:16px;margin:18px 0 6px}
table{border-collapse:collapse;margin:6px 0 4px;font-size:13px}
th,td{border:1px solid #d0d7de;padding:3px 8px}th{background:#f3f4f6;text-align:center}
td{text-align:right;white-space:nowrap}td.t{text-align:left}
tr.avg td{font-weight:600;background:#f8fafc}
p.caption{font-size:12px;color:#57606a;margin:2px 0 12px;max-width:1100px}
figure{margin:10px 0 16px}figure img{max-width:100%;border:1px solid #eaeef2}
figcaption{font-size:12px;color:#57606a}code{background:#f3f4f6;padding:0 3px;border-radius:3px}
ul{margin:4px 0 10px}
"""


def to_html(blocks: list[Block], title: str = "Robustness evaluation") -> str:
    body: list[str] = []
    for b in blocks:
        if isinstance(b, Heading):
            body.append(f"<h{b.level}>{_inline_html(b.text)}</h{b.level}>")
        elif isinstance(b, Text):
            body.append(f"<p>{_inline_html(b.text)}</p>")
        elif isinstance(b, Bullets):
            body.append("<ul>" + "".join(f"<li>{_inline_html(i)}</li>" for i in b.items) + "</ul>")
        elif isinstance(b, Table):
            head = "".join(f"<th>{_inline_html(h)}</th>" for h in b.header)
            rows = "".join(
                ("<tr class=\"avg\">" if i in b.bold_rows else "<tr>")
                + "".join(("<td class=\"t\">" if k < b.text_cols else "<td>") + f"{_inline_html(c)}</td>"
                          for k, c in enumerate(row)) + "</tr>" for i, row in enumerate(b.rows))
            body.append(f"<table><thead><tr>{head}</tr></thead><tbody>{rows}</tbody></table>")
            if b.caption:
                body.append(f"<p class=\"caption\">{_inline_html(b.caption)}</p>")
        elif isinstance(b, Plot):
            data = base64.b64encode(b.png).decode("ascii")
            body.append(f"<figure><img alt=\"{html.escape(b.alt)}\" src=\"data:image/png;base64,{data}\">"
                        f"<figcaption>{html.escape(b.alt)}</figcaption></figure>")
    return (f"<!doctype html>\n<html lang=\"en\"><head><meta charset=\"utf-8\"><title>{html.escape(title)}</title>"
            f"<style>{_CSS}</style></head>\n<body>\n" + "\n".join(body) + "\n</body></html>\n")


# --------------------------------------------------------------------------- plots


def _figure(n_panels: int, width: float, height: float = 3.3):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height * n_panels), layout="constrained")
    FigureCanvasAgg(fig)
    return fig, fig.subplots(n_panels, 1, squeeze=False)[:, 0]


def _png(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    return buf.getvalue()


def _bars(ax, groups: list[str], series: list[tuple[str, list[float], list[float]]], *, ylabel: str,
          ylim: tuple[float, float] | None = (0, 100), ref: tuple[str, list[float]] | None = None) -> None:
    """Grouped bars: ``series`` = (label, heights, errors) with one value per group (NaN = no bar);
    ``ref`` = (label, one level per group): a dashed line across each group's bars (e.g. the majority rate)."""
    width = 0.8 / max(len(series), 1)
    if ref is not None:
        name, levels = ref
        for g, y in enumerate(levels):
            if _isnum(y):
                ax.hlines(y, g - 0.45, g + 0.45, colors="black", linestyles="--", linewidth=1.1, zorder=3,
                          label=name if g == next(i for i, v in enumerate(levels) if _isnum(v)) else None)
    for k, (label, ys, errs) in enumerate(series):
        keep = [g for g in range(len(groups)) if _isnum(ys[g])]  # undefined values get no bar (not a 0 bar)
        xs = [g + (k - (len(series) - 1) / 2) * width for g in keep]
        ax.bar(xs, [ys[g] for g in keep], width, yerr=[errs[g] if _isnum(errs[g]) else 0 for g in keep],
               capsize=2, label=label)
    ax.set_xticks(range(len(groups)), groups, fontsize="small")
    if ylim:
        ax.set_ylim(*ylim)
    ax.set_ylabel(ylabel)
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize="x-small", ncols=min(len(series), 6), loc="upper left")


def plot_accuracy(results: list[EvalResult], refs: References | None = None) -> Plot:
    """One panel per (model, scoring): groups = tasks + avg, one bar per set, error bar = std over instructions;
    a dashed line over each group at the majority-class rate of the model's sample."""
    refs = references(results) if refs is None else refs
    panels = [(r, m) for r in results for m in r.scorings]
    fig, axes = _figure(len(panels), max(7.0, 1.25 * max(len(r.tasks) + 1 for r in results)))
    for ax, (r, m) in zip(axes, panels):
        groups = [*r.tasks, AVG]
        series = []
        for s in r.sets:
            cells = [_cell(r, m, t, s) if t != AVG else _set_avg(r, m, s) for t in groups]
            series.append((_set_name(s), [c["acc_mean"] if c is not None else math.nan for c in cells],
                           [c["acc_std"] if c is not None else math.nan for c in cells]))
        ref = refs.models[r.model_label]
        majority = [ref.majority.get(t, math.nan) if t != AVG else ref.majority_avg(r.tasks) for t in groups]
        _bars(ax, [_task_name(r, g) if g != AVG else AVG for g in groups], series, ylabel="accuracy (%)",
              ref=("majority class", majority))
        ax.set_title(f"{r.model_label} · {m}: accuracy by task and instruction set", fontsize="medium")
    return Plot("accuracy", _png(fig), "Accuracy by task and instruction set (mean ± std over instructions; dashed: "
                                       "majority-class rate of the evaluated sample)")


def plot_models(results: list[EvalResult], refs: References | None = None) -> Plot:
    """One panel per scoring: groups = sets + perturbed mean, one bar per model, error bar = mean std; a dashed
    line at the sample's majority-class rate (mean over tasks: the same on every set)."""
    refs = references(results) if refs is None else refs
    majority = refs.all.majority_avg()
    scorings = list(dict.fromkeys(m for r in results for m in r.scorings))
    sets = list(dict.fromkeys(s for r in results for s in r.sets))
    fig, axes = _figure(len(scorings), max(7.0, 1.4 * (len(sets) + 1) * max(1, len(results)) / 2))
    for ax, m in zip(axes, scorings):
        series = []
        for r in results:
            if m not in r.scorings:
                continue
            ys, es = [], []
            for s in sets:
                a = _set_avg(r, m, s)
                ys.append(a["acc_mean"] if a is not None else math.nan)
                es.append(a["acc_std"] if a is not None else math.nan)
            o = _overall(r, m)
            series.append((r.model_label, ys + [o["perturbed_acc"]], es + [o["perturbed_std"]]))
        _bars(ax, [_set_name(s).replace(" (", "\n(") for s in sets] + ["perturbed\n(mean)"], series,
              ylabel="accuracy (%)", ref=("majority class", [majority] * (len(sets) + 1)))
        ax.set_title(f"{m}: models compared (mean over tasks; error bars: mean std over instructions)",
                     fontsize="medium")
    return Plot("models", _png(fig), "Models compared per instruction set (dashed: majority-class rate)")


def plot_pdr(results: list[EvalResult]) -> Plot | None:
    """One panel per scoring: groups = perturbation levels, one bar per model. None without clean + perturbed."""
    scorings = list(dict.fromkeys(m for r in results for m in r.scorings))
    pert = list(dict.fromkeys(s for r in results for s in _perturbed(r)))
    if not pert or not any(CLEAN in r.sets for r in results):
        return None
    fig, axes = _figure(len(scorings), max(7.0, 1.3 * len(pert) * max(1, len(results)) / 2), height=2.8)
    for ax, m in zip(axes, scorings):
        series = []
        for r in results:
            if m not in r.scorings:
                continue
            vals = [a["pdr"] if (a := _set_avg(r, m, s)) is not None else math.nan for s in pert]
            series.append((r.model_label, vals, [math.nan] * len(vals)))
        _bars(ax, [perturbation_level(s) + f"\n({s})" for s in pert], series, ylabel="PDR", ylim=None)
        ax.axhline(0, color="black", linewidth=0.8)
        undefined = "" if any(_isnum(v) for _, vals, _ in series for v in vals) else " — undefined: clean accuracy 0"
        ax.set_title(f"{m}: performance drop rate vs clean by perturbation level (lower is more robust){undefined}",
                     fontsize="medium")
    return Plot("pdr", _png(fig), "Performance drop rate by perturbation level (1 − acc/acc_clean, mean over tasks)")


# --------------------------------------------------------------------------- outputs


def write_eval_outputs(results: list[EvalResult], out_dir: str | Path) -> dict[str, Path]:
    """Write the combined outputs for ``results`` (any number of models) under ``out_dir``; returns their paths."""
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
        nested["summary"] = {**summary, **refs.model_summary(r, r.primary, summary["clean_acc"])}
        doc[r.model_label] = {**nested, "uncertainty": unc[r.model_label]}
    doc[REFERENCE_KEY] = refs.all.to_dict()
    write_json(paths["metrics"], doc)
    frame = pd.concat([r.predictions for r in results], ignore_index=True)
    write_jsonl(paths["predictions"], json.loads(frame.to_json(orient="records", force_ascii=False)))
    blocks = build_report(results, plots, unc, refs)
    paths["report_md"].write_text(to_markdown(blocks), encoding="utf-8")
    paths["report_html"].write_text(to_html(blocks), encoding="utf-8")
    paths["table"].write_text(to_markdown(build_table(results, unc, refs)), encoding="utf-8")
    for name, plot in plots.items():
        paths[f"plot_{name}"] = out / f"{name}.png"
        paths[f"plot_{name}"].write_bytes(plot.png)
    write_json(paths["info"], {r.model_label: r.info() for r in results})
    return paths
