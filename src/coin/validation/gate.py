"""The paraphrase-validation gate: every check on every row, then valid / rejected rows and a report.

``run_gate`` is the one entry point (the Prefect task, the DVC stage and the CLI call it). It writes,
under ``out_dir``::

    valid.jsonl      rows that passed every check, unchanged
    rejects.jsonl    every other row + failed_checks [names] + reasons ["check: what is wrong", ...]
    summary.json     counts, pass rate, per-check pass rates / failures, rejects per reason code, and
                     per-check figures (similarity distribution, what the leak checks compared against)
    report.html      all of that as one static page (opens offline, links the Data Docs pages)
    data_docs/       the Great Expectations Data Docs site (index.html): the schema suite, and one
                     page with every gate check (reasons of failing rows as unexpected values)

and only then raises :class:`GateFailed` if the pass rate is below ``validate.min_pass_rate``:
nothing is silently dropped, and a failed gate still leaves everything needed to see why.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import time
from collections import Counter
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import coin.validation.checks  # noqa: F401  (importing it registers the checks in CHECKS)
from coin.config import ALL_TASKS, ValidateSettings
from coin.data.io import write_json, write_jsonl
from coin.validation.embeddings import CachedEmbedder, Embedder, minilm_embedder
from coin.validation.leakage import EvalSources
from coin.validation.report_html import render as render_report_html
from coin.validation.result import (
    DOCS_DIR,
    OTHER_TASK,
    REJECTS_FILE,
    REPORT_FILE,
    SUMMARY_FILE,
    VALID_FILE,
    CheckStats,
    GateReport,
)
from coin.validation.text import apart
from coin.validation.types import CHECKS, CheckContext, CheckResult, Row

log = logging.getLogger(__name__)

class GateFailed(RuntimeError):
    """The pass rate is below ``validate.min_pass_rate``; all outputs were written first."""

    def __init__(self, report: GateReport) -> None:
        super().__init__(report.failure_message())
        self.report = report


# --------------------------------------------------------------------------- running the checks


def run_checks(rows: Sequence[Row], ctx: CheckContext,
               names: Sequence[str] | None = None) -> tuple[dict[str, list[CheckResult]], dict[str, float]]:
    """``{check: [result per row]}`` for the registered checks (all of them by default), and their seconds."""
    results: dict[str, list[CheckResult]] = {}
    seconds: dict[str, float] = {}
    for name in names or list(CHECKS):
        if name not in CHECKS:
            raise KeyError(f"unknown check {name!r}; registered: {', '.join(CHECKS)}")
        t0 = time.perf_counter()
        out = CHECKS[name](rows, ctx)
        seconds[name] = time.perf_counter() - t0
        if len(out) != len(rows):
            raise RuntimeError(f"check {name!r} returned {len(out)} results for {len(rows)} rows")
        results[name] = out
    return results, seconds


def _pair_id(row: Row, i: int) -> str:
    pid = row.get("pair_id")  # shown in summary.json and the reports: a lone surrogate could not be written
    return _strict_json(pid) if isinstance(pid, str) else f"<row {i}: pair_id {_strict_json(repr(pid))}>"


def _check_stats(rows: Sequence[Row], results: list[CheckResult]) -> CheckStats:
    failing = [i for i, r in enumerate(results) if not r.passed]
    first = failing[0] if failing else None
    return CheckStats(
        failures=len(failing),
        pass_rate=1 - len(failing) / len(rows) if rows else 0.0,
        example_pair_id=_pair_id(rows[first], first) if first is not None else None,
        example_reason=results[first].reason if first is not None else None,
    )


def _reject(row: Row, failed: list[tuple[str, CheckResult]]) -> dict[str, Any]:
    return {
        **row,
        "failed_checks": [name for name, _ in failed],
        "reasons": [f"{name}: {f.message}" for name, r in failed for f in r.findings],
    }


def _strict_json(value: Any) -> Any:
    """What strict JSON readers (jq, JavaScript, most JSON libraries) can read back, for rejects only: a lone
    surrogate (not writable as UTF-8) becomes the text ``\\udXXX``, a non-finite number (``NaN``, which Python writes
    bare) the string ``"NaN"`` / ``"Infinity"`` / ``"-Infinity"``. The reason names the original value."""
    if isinstance(value, str):
        return "".join(f"\\u{ord(c):04x}" if "\ud800" <= c <= "\udfff" else c for c in value)
    if isinstance(value, float) and not math.isfinite(value):
        return "NaN" if math.isnan(value) else ("Infinity" if value > 0 else "-Infinity")
    if isinstance(value, Mapping):
        return {_strict_json(k): _strict_json(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_strict_json(v) for v in value]
    return value


def _writable(row: dict[str, Any]) -> dict[str, Any]:
    try:
        json.dumps(row, ensure_ascii=False, allow_nan=False).encode("utf-8")
        return row
    except (UnicodeEncodeError, ValueError):
        return _strict_json(row)


# --------------------------------------------------------------------------- the entry point


def run_gate(
    rows: list[dict[str, Any]],
    *,
    cfg: ValidateSettings,
    cutoff_len: int,
    tokenizer: Any,
    out_dir: Path,
    eval_sources: EvalSources,
    embedder: CachedEmbedder | Embedder | None = None,
) -> GateReport:
    """Validate pair rows; write valid/rejects/summary/Data Docs; raise :class:`GateFailed` below the threshold.

    ``eval_sources`` is what the evaluation uses (:func:`coin.validation.leakage.load_eval_sources`);
    ``embedder`` defaults to the packaged MiniLM (:func:`coin.validation.embeddings.minilm_embedder`).
    """
    t0 = time.perf_counter()
    out_dir = Path(out_dir)
    if embedder is None:
        embedder = minilm_embedder(cfg.embed_batch_size)
    if not isinstance(embedder, CachedEmbedder):
        embedder = CachedEmbedder(embedder)
    ctx = CheckContext(cfg.max_length_chars, cutoff_len, tokenizer, docs_dir=out_dir / DOCS_DIR, cfg=cfg,
                       embedder=embedder, eval_sources=eval_sources)
    results, check_seconds = run_checks(rows, ctx)
    ctx.stats["eval_sources"] = eval_sources.summary()
    # every threshold the checks applied, named as in params.yaml: a passing run's pages said none of the lengths
    ctx.stats["settings"] = {**{f"validate.{k}": v for k, v in cfg.model_dump(mode="json").items()},
                             "pairs.cutoff_len": cutoff_len}

    valid: list[dict[str, Any]] = []
    rejects: list[dict[str, Any]] = []
    reasons: Counter[str] = Counter()
    per_task: dict[str, Counter[str]] = {}
    for i, row in enumerate(rows):
        failed = [(name, res[i]) for name, res in results.items() if not res[i].passed]
        task = row.get("task")
        counts = per_task.setdefault(task if isinstance(task, str) and task in ALL_TASKS else OTHER_TASK, Counter())
        # meant for training unless it says val: a row whose split is wrong ("Train", missing) is rejected, and its
        # task must not count as one that never had a training row
        train = row.get("split") != "val"
        counts["rows_in"] += 1
        counts["train_in"] += train
        if not failed:
            counts["valid"] += 1
            counts["train_valid"] += train
            valid.append(row)
            continue
        rejects.append(_writable(_reject(row, failed)))
        reasons.update({f"{name}.{f.code}" for name, r in failed for f in r.findings})

    write_jsonl(out_dir / VALID_FILE, valid)
    write_jsonl(out_dir / REJECTS_FILE, rejects)
    valid_sha256 = hashlib.sha256((out_dir / VALID_FILE).read_bytes()).hexdigest()  # the verdict names its rows
    from coin.validation.schema import document_checks

    report = GateReport(
        rows_in=len(rows), rows_valid=len(valid), rows_rejected=len(rejects),
        pass_rate=len(valid) / len(rows) if rows else 0.0, min_pass_rate=cfg.min_pass_rate,
        checks={name: _check_stats(rows, res) for name, res in results.items()},
        rejects_per_reason=dict(sorted(reasons.items(), key=lambda kv: (-kv[1], kv[0]))),
        out_dir=out_dir, data_docs_index=ctx.artifacts.get("data_docs_index"), seconds=0.0,
        check_seconds=check_seconds, stats=ctx.stats,
        per_task={t: {"rows_in": c["rows_in"], "valid": c["valid"], "rejected": c["rows_in"] - c["valid"],
                      "pass_rate": round(c["valid"] / c["rows_in"], 6), "train_in": c["train_in"],
                      "train_valid": c["train_valid"]} for t, c in per_task.items()},
        valid_sha256=valid_sha256,
    )
    t_docs = time.perf_counter()
    document_checks(ctx, rows, results, report)  # the checks' page, with the gate's own verdict on it
    check_seconds["data_docs"] = time.perf_counter() - t_docs
    for t in report.thinned_tasks:
        c = report.per_task[t]
        log.warning("validation gate: %s kept %d of %d rows (pass rate %s, below validate.min_pass_rate = %s); "
                    "its reasons are in %s", t, c["valid"], c["rows_in"], apart(c["pass_rate"], cfg.min_pass_rate),
                    cfg.min_pass_rate,
                    out_dir / REJECTS_FILE)
    write_json(out_dir / SUMMARY_FILE, report.to_summary())
    (out_dir / REPORT_FILE).write_text(render_report_html(report, out_dir), encoding="utf-8")
    report.seconds = time.perf_counter() - t0
    log.info("validation gate: %d/%d rows valid (pass rate %.3f) in %.1f s", len(valid), len(rows), report.pass_rate,
             report.seconds)
    if not report.passed:
        raise GateFailed(report)
    return report
