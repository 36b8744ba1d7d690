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

import json
import logging
import time
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from coin.config import ValidateSettings
from coin.data.io import write_json, write_jsonl
from coin.validation.checks import CHECKS, CheckContext, CheckResult, Row
from coin.validation.embeddings import CachedEmbedder, Embedder, minilm_embedder
from coin.validation.leakage import EvalSources
from coin.validation.report_html import REPORT_FILE
from coin.validation.report_html import render as render_report_html

log = logging.getLogger(__name__)

VALID_FILE, REJECTS_FILE, SUMMARY_FILE, DOCS_DIR = "valid.jsonl", "rejects.jsonl", "summary.json", "data_docs"


class GateFailed(RuntimeError):
    """The pass rate is below ``validate.min_pass_rate``; all outputs were written first."""

    def __init__(self, report: GateReport) -> None:
        super().__init__(report.failure_message())
        self.report = report


@dataclass(frozen=True)
class CheckStats:
    failures: int                   # rows this check rejected
    pass_rate: float                # share of rows passing this check
    example_pair_id: str | None     # the first failing row's pair_id (None if no failure or no usable id)
    example_reason: str | None


@dataclass
class GateReport:
    rows_in: int
    rows_valid: int
    rows_rejected: int
    pass_rate: float
    min_pass_rate: float
    checks: dict[str, CheckStats]                # in run order
    rejects_per_reason: dict[str, int]           # "check.code" -> rows, most frequent first
    out_dir: Path
    data_docs_index: Path | None
    seconds: float                               # wall time of run_gate (outputs included)
    check_seconds: dict[str, float] = field(default_factory=dict)
    stats: dict[str, dict[str, Any]] = field(default_factory=dict)  # per-check figures (similarity distribution, ...)

    @property
    def passed(self) -> bool:
        return self.rows_in > 0 and self.pass_rate >= self.min_pass_rate

    @property
    def valid_path(self) -> Path:
        return self.out_dir / VALID_FILE

    @property
    def rejects_path(self) -> Path:
        return self.out_dir / REJECTS_FILE

    @property
    def summary_path(self) -> Path:
        return self.out_dir / SUMMARY_FILE

    def to_summary(self) -> dict[str, Any]:
        """The content of ``summary.json`` (no timings: same rows -> same bytes)."""
        return {
            "rows_in": self.rows_in,
            "rows_valid": self.rows_valid,
            "rows_rejected": self.rows_rejected,
            "pass_rate": round(self.pass_rate, 6),
            "min_pass_rate": self.min_pass_rate,
            "gate_passed": self.passed,
            "checks": {
                name: {"failures": s.failures, "pass_rate": round(s.pass_rate, 6), "example_pair_id": s.example_pair_id}
                for name, s in self.checks.items()
            },
            "rejects_per_reason": self.rejects_per_reason,
            "stats": self.stats,
            "outputs": {"valid": VALID_FILE, "rejects": REJECTS_FILE, "report": REPORT_FILE,
                        "data_docs": f"{DOCS_DIR}/index.html"},
        }

    def to_metrics(self) -> dict[str, float]:
        """Flat numbers for MLflow: ``validate.pass_rate``, ``validate.<check>.pass_rate``, ..."""
        out = {"validate.pass_rate": self.pass_rate, "validate.rows_in": float(self.rows_in),
               "validate.rows_valid": float(self.rows_valid), "validate.rows_rejected": float(self.rows_rejected)}
        for name, s in self.checks.items():
            out[f"validate.{name}.pass_rate"] = s.pass_rate
            out[f"validate.{name}.failures"] = float(s.failures)
        return out

    def to_markdown(self) -> str:
        verdict = "passed" if self.passed else "FAILED"
        lines = [
            f"**Validation gate {verdict}**: {self.rows_valid}/{self.rows_in} rows valid "
            f"(pass rate {self.pass_rate:.3f}, threshold {self.min_pass_rate:.3f}), {self.seconds:.1f} s",
            "",
            "| check | pass rate | failures | example pair_id |",
            "|---|---:|---:|---|",
        ]
        for name, s in self.checks.items():
            lines.append(f"| {name} | {s.pass_rate:.3f} | {s.failures} | {s.example_pair_id or ''} |")
        if self.rejects_per_reason:
            lines += ["", "| reason | rows |", "|---|---:|"]
            lines += [f"| {code} | {n} |" for code, n in self.rejects_per_reason.items()]
        sim = self.stats.get("semantic_similarity", {})
        if sim.get("n"):
            lines += ["", f"Instruction similarity (MiniLM cosine, {sim['n']} rows): min {sim['min']:.3f}, "
                      f"median {sim['median']:.3f}, max {sim['max']:.3f}; bounds [{sim['min_similarity']}, "
                      f"{sim['max_similarity']}]: {sim['below_min']} below, {sim['above_max']} above."]
        for note in self.stats.get("example_leakage", {}).get("notes", []):
            lines.append(f"Note: {note}")
        return "\n".join(lines)

    def failure_message(self, top: int = 3) -> str:
        if self.rows_in == 0:
            head = "validation gate failed: no rows to validate (the pairs stage produced nothing)."
        else:
            head = (
                f"validation gate failed: pass rate {self.pass_rate:.3f} ({self.rows_valid}/{self.rows_in} rows) "
                f"is below validate.min_pass_rate = {self.min_pass_rate}."
            )
        failing = sorted((s.failures, name) for name, s in self.checks.items() if s.failures)
        lines = [head, "Top failing checks:"] if failing else [head]
        for n, name in reversed(failing[-top:]):
            s = self.checks[name]
            reason = (s.example_reason or "")[:200]
            lines.append(f"  - {name}: {n} rows (e.g. pair_id {s.example_pair_id!r}: {reason})")
        lines.append(f"Every rejected row and its reasons: {self.rejects_path} (report: {self.out_dir / REPORT_FILE}, "
                     f"summary: {self.summary_path}"
                     + (f", Data Docs: {self.data_docs_index})" if self.data_docs_index else ")"))
        lines.append("Fix the data or the settings (e.g. pairs.cutoff_len), or lower validate.min_pass_rate.")
        return "\n".join(lines)


# --------------------------------------------------------------------------- running the checks


def run_checks(rows: Sequence[Row], ctx: CheckContext, names: Sequence[str] | None = None) -> tuple[dict[str, list[CheckResult]], dict[str, float]]:
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
    pid = row.get("pair_id")
    return pid if isinstance(pid, str) else f"<row {i}: pair_id {pid!r}>"


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


def _escape_surrogates(value: Any) -> Any:
    """Lone surrogates cannot be written as UTF-8: show them as the text ``\\udXXX`` (rejects only)."""
    if isinstance(value, str):
        return "".join(f"\\u{ord(c):04x}" if "\ud800" <= c <= "\udfff" else c for c in value)
    if isinstance(value, Mapping):
        return {_escape_surrogates(k): _escape_surrogates(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_escape_surrogates(v) for v in value]
    return value


def _writable(row: dict[str, Any]) -> dict[str, Any]:
    try:
        json.dumps(row, ensure_ascii=False).encode("utf-8")
        return row
    except UnicodeEncodeError:
        return _escape_surrogates(row)


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

    valid: list[dict[str, Any]] = []
    rejects: list[dict[str, Any]] = []
    reasons: Counter[str] = Counter()
    for i, row in enumerate(rows):
        failed = [(name, res[i]) for name, res in results.items() if not res[i].passed]
        if not failed:
            valid.append(row)
            continue
        rejects.append(_writable(_reject(row, failed)))
        reasons.update({f"{name}.{f.code}" for name, r in failed for f in r.findings})

    write_jsonl(out_dir / VALID_FILE, valid)
    write_jsonl(out_dir / REJECTS_FILE, rejects)
    from coin.validation.schema import document_checks

    t_docs = time.perf_counter()
    document_checks(ctx, rows, results)
    check_seconds["data_docs"] = time.perf_counter() - t_docs
    report = GateReport(
        rows_in=len(rows), rows_valid=len(valid), rows_rejected=len(rejects),
        pass_rate=len(valid) / len(rows) if rows else 0.0, min_pass_rate=cfg.min_pass_rate,
        checks={name: _check_stats(rows, res) for name, res in results.items()},
        rejects_per_reason=dict(sorted(reasons.items(), key=lambda kv: (-kv[1], kv[0]))),
        out_dir=out_dir, data_docs_index=ctx.artifacts.get("data_docs_index"), seconds=0.0,
        check_seconds=check_seconds, stats=ctx.stats,
    )
    write_json(out_dir / SUMMARY_FILE, report.to_summary())
    (out_dir / REPORT_FILE).write_text(render_report_html(report, out_dir), encoding="utf-8")
    report.seconds = time.perf_counter() - t0
    log.info("validation gate: %d/%d rows valid (pass rate %.3f) in %.1f s", len(valid), len(rows), report.pass_rate, report.seconds)
    if not report.passed:
        raise GateFailed(report)
    return report
