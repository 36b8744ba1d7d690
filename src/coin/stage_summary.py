"""What ``coin <stage>`` (and ``dvc repro``, which runs it) prints: a short summary and where the outputs are.

A stage's result can be large (the evaluation's holds every figure of ``metrics.json``: ~1,200 lines of JSON
for a tiny run). The details belong in the stage's files and in MLflow; the console gets one line per
top-level field, nested fields flattened to dotted keys and each line cut at :data:`WIDTH` characters, at
most :data:`MAX_LINES` lines, then the stage's outputs, one per line (from :mod:`coin.stage_specs`). An evaluation's
figures are reduced to the headline per model (as ``metrics/summary.json``). ``coin <stage> --json``
prints the whole result instead.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

WIDTH = 160           # characters per line
MAX_LINES = 30        # summary lines before "... N more"
DEPTH = 1             # nested dicts flattened this deep (section.key); deeper values shown as compact JSON
HEADLINE = ("clean_acc", "perturbed_acc", "consistency", "worst_acc", "majority_acc")
LONG_TEXT = ("markdown", "table")  # rendered reports: in the stage's files


def _is_eval_metrics(value: Any) -> bool:
    """``metrics.json``'s document: ``{model: {"summary": {...}, ...}, "reference": {...}}``."""
    return isinstance(value, dict) and any(isinstance(v, dict) and isinstance(v.get("summary"), dict)
                                           for v in value.values())


def _headline(doc: dict[str, Any]) -> dict[str, Any]:
    return {label: {k: m["summary"].get(k) for k in HEADLINE if k in m["summary"]}
            for label, m in doc.items() if isinstance(m, dict) and isinstance(m.get("summary"), dict)}


def _short(value: Any) -> str:
    text = value if isinstance(value, str) else json.dumps(value, default=str, ensure_ascii=False)
    return " ".join(text.split())


def _flatten(d: dict[str, Any], prefix: str = "", depth: int = 0) -> list[tuple[str, Any]]:
    out: list[tuple[str, Any]] = []
    for key, value in d.items():
        if key in LONG_TEXT:
            continue
        if _is_eval_metrics(value):  # one line per model
            out += [(f"{prefix}{key}.{label}", fig) for label, fig in _headline(value).items()]
            continue
        if key == "paths" and isinstance(value, dict):  # the outputs line says where they are
            continue
        if key == "decision" and "message" in d:  # a registration: its message holds the verdict and the reason
            continue
        if isinstance(value, list) and value and all(isinstance(v, dict) and "message" in v for v in value):
            # registrations: their one-line messages, each under its method when there is one
            value = [f"{v['method']}: {v['message']}" if v.get("method") else v["message"] for v in value]
        if isinstance(value, dict) and value and depth < DEPTH:
            out += _flatten(value, f"{prefix}{key}.", depth + 1)
        else:
            out.append((f"{prefix}{key}", value))
    return out


# last dotted part of a field never cut from a summary (candidates: every registered method's verdict)
PRIORITY = ("message", "method", "aliases", "candidates", "mlflow_parent_run_id")


def _priority(key: str, value: Any = None) -> bool:
    """A verdict, where to look, or a model's headline figures (a registration message quotes them: cut, the
    message read against another model's line)."""
    headline = isinstance(value, dict) and bool(value) and set(value) <= set(HEADLINE)
    return headline or key.rsplit(".", 1)[-1] in PRIORITY


def summary_lines(stage: str, result: dict[str, Any], outputs: list[str] | None = None) -> list[str]:
    """The lines ``coin <stage>`` prints for ``result``: ``<stage>: done``, the fields, ``outputs:`` one per line."""
    lines = [f"{stage}: done"]
    fields = _flatten(result)
    # the verdicts and where to look are shown whatever the cut: a pipeline's registration message (its promotion
    # decision), aliases and MLflow run came after the cut
    room = max(MAX_LINES - sum(_priority(k, v) for k, v in fields), 0)  # lines left for the other fields
    shown = []
    for key, value in fields:
        if _priority(key, value) or room > 0:
            room -= not _priority(key, value)
            shown.append((key, value))
    for key, value in shown:
        line = f"  {key}: {_short(value)}"
        lines.append(line if len(line) <= WIDTH else line[: WIDTH - 3] + "...")
    if len(fields) > len(shown):
        lines.append(f"  ... {len(fields) - len(shown)} more fields (coin {stage} --json prints everything)")
    if outputs:
        lines += ["outputs:", *(f"  {o}" for o in outputs)]
    return lines


def stage_outputs(stage: str, settings: Any, root: Path, cwd: Path | None = None) -> list[str]:
    """Where ``stage`` writes (its specs' outputs, relative to ``cwd``, the current directory, when under it and
    absolute otherwise: a run from a subdirectory printed root-relative paths that were not there; per method /
    evaluated model collapsed to their common directory when there are many)."""
    from coin.layout import Layout
    from coin.stage_specs import DVC_STAGES, STAGE_SPECS, _items

    lay = Layout(root, settings)
    here = (cwd or Path.cwd()).resolve()
    paths: list[str] = []
    # the pipeline: every stage's (collapsed to directories below)
    names = [n for ns in DVC_STAGES.values() for n in ns] if stage == "pipeline" else DVC_STAGES.get(stage, ())
    for name in names:
        spec = STAGE_SPECS[name]
        for item in _items(name, settings):
            for p in spec.outputs(lay, item):
                full = Path(p).resolve()
                rel = str(full.relative_to(here)) if full.is_relative_to(here) else str(full)
                if rel not in paths:
                    paths.append(rel)
    if len(paths) > 8:  # e.g. every file of every method: their directories (a lone file stays itself)
        by_dir: dict[str, list[str]] = {}
        for rel in paths:
            by_dir.setdefault(str(Path(rel).parent), []).append(rel)
        paths = [files[0] if len(files) == 1 else f"{d}/" for d, files in by_dir.items()]
    return paths
