"""The gate's result: per-check figures, the report, and the names of the files the gate writes.

A leaf of :mod:`coin.validation` (as :mod:`coin.evaluation.result` is for the evaluation): the gate
(:mod:`coin.validation.gate`) builds a :class:`GateReport`, the page renderer
(:mod:`coin.validation.report_html`) reads one, and neither is imported from here.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from coin.validation.text import apart, shorten

VALID_FILE, REJECTS_FILE, SUMMARY_FILE, DOCS_DIR = "valid.jsonl", "rejects.jsonl", "summary.json", "data_docs"
REPORT_FILE = "report.html"
OTHER_TASK = "(no known task)"  # per_task's bucket for rows whose task field is missing or unknown (schema rejects)


def emptied_tasks(per_task: dict[str, Any]) -> list[str]:
    """Tasks that had training rows (split other than val) and kept none: training would lack them. One rule for
    the gate's verdict (:attr:`GateReport.emptied_tasks`) and for training's read of a written ``summary.json``
    (:func:`read_training_rows`), whose ``per_task`` may be hand-edited, so entries that are not mappings are
    skipped."""
    return [t for t, c in per_task.items()
            if t != OTHER_TASK and isinstance(c, dict) and c.get("train_in") and not c.get("train_valid")]


def read_training_rows(valid_file: Path, missing_hint: str, rerun: str = "coin validate",
                       cutoff_len: int | None = None, columns: dict[str, str] | None = None) -> list[dict[str, Any]]:
    """The rows of a gate's ``valid.jsonl`` that training reads, refused where the gate that wrote them failed.

    The gate writes its valid rows before it raises, for inspection; run stage by stage (``coin validate`` then
    ``coin train``, or ``coin study cell``), training read them anyway and left out a task whose every row was
    rejected without a word. The verdict is the ``summary.json`` beside the file (a file given by hand, with no
    summary beside it, is taken as it is). ``rerun``: the command that rebuilds the file (``coin study`` for a
    study's pairs). ``cutoff_len``: the ``pairs.cutoff_len`` training cuts at; rows the gate judged at a larger one
    are refused (a row that fits there may not fit here, and failed mid-training, at a step set by the data order).
    ``columns``: ``{column: method}`` (:func:`coin.training.collator.columns_read`), each a non-empty string in every
    training row; a null prompt failed mid-run as a bug, a null target trained on an empty answer."""
    from coin.data.io import DataError, read_json, read_jsonl

    valid_file = Path(valid_file)
    summary_file = valid_file.parent / SUMMARY_FILE
    rows = read_jsonl(valid_file, missing_hint=missing_hint)
    summary = read_json(summary_file) if valid_file.name == VALID_FILE and summary_file.is_file() else None
    judged = summary.get("valid_sha256") if isinstance(summary, dict) else None
    if isinstance(judged, str) and judged != hashlib.sha256(valid_file.read_bytes()).hexdigest():
        # the gate writes valid.jsonl, then its pages, then summary.json: a run stopped in between (killed, crashed)
        # left new rows beside the last run's verdict, which training took as theirs
        raise DataError(f"{valid_file}: not the rows {summary_file} judged (their sha256 differs): a `{rerun}` stopped "
                        f"part-way, or the file was edited. Rerun `{rerun}`")
    if isinstance(summary, dict) and summary.get("gate_passed") is False and summary.get("rows_in") == 0:
        raise DataError(f"{valid_file}: the validation gate had no rows to validate (the pairs stage produced "
                        f"nothing; {summary_file}). Build the pairs first (`coin pairs`; check pairs.tasks and "
                        f"pairs.rows_per_task), then rerun `{rerun}`")
    if isinstance(summary, dict) and summary.get("gate_passed") is False:
        per_task = summary.get("per_task") if isinstance(summary.get("per_task"), dict) else {}
        emptied = emptied_tasks(per_task)
        why = (f"{summary.get('rows_valid')}/{summary.get('rows_in')} rows valid, pass rate "
               f"{summary.get('pass_rate')} against validate.min_pass_rate = {summary.get('min_pass_rate')}")
        if emptied:
            why += f"; every training row of {', '.join(emptied)} was rejected"
        raise DataError(f"{valid_file}: the validation gate failed on these rows ({why}; {summary_file}). Training "
                        f"on them would go ahead without what was rejected. See {valid_file.parent / REJECTS_FILE} "
                        "for each rejected row and its reasons, fix the data or the validate.* thresholds, and rerun "
                        f"`{rerun}`")
    stats = summary.get("stats") if isinstance(summary, dict) else None
    judged_at = (stats.get("settings") or {}).get("pairs.cutoff_len") if isinstance(stats, dict) else None
    if cutoff_len is not None and isinstance(judged_at, int) and cutoff_len < judged_at:
        raise DataError(f"{valid_file}: the validation gate judged these rows at pairs.cutoff_len = {judged_at}, and "
                        f"training cuts at {cutoff_len}: a row that fits there may not fit here. Rerun `{rerun}` with "
                        f"pairs.cutoff_len = {cutoff_len} (it rejects the rows that do not fit, with the reason), or "
                        f"train at {judged_at}")
    if not any(r.get("split") == "train" for r in rows):
        raise DataError(f"{valid_file}: no rows with split 'train' to train on; check pairs.val_fraction")
    for n, row in enumerate(rows, 1):
        for column, method in (columns or {}).items() if row.get("split") == "train" else ():
            value = row.get(column)
            if not (isinstance(value, str) and value.strip()):
                what = "missing" if column not in row else f"{value!r}, not a non-empty text"
                raise DataError(f"{valid_file}: row {n} (pair_id {row.get('pair_id')!r}): column {column!r} is "
                                f"{what}, and method {method} trains on it. Rerun `{rerun}`, or fix the row")
    return rows


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
    per_task: dict[str, dict[str, Any]] = field(default_factory=dict)  # task -> rows_in, valid, rejected, pass_rate,
    # and train_in / train_valid: the rows meant for training (split other than val: what training reads)
    valid_sha256: str | None = None  # of the valid.jsonl this verdict is about (read_training_rows checks it)

    @property
    def passed(self) -> bool:
        """Pass rate at or above the threshold, and no task left without a valid row (a task that loses every
        row would be missing from training while the overall rate still passes)."""
        return self.rows_valid > 0 and self.pass_rate >= self.min_pass_rate and not self.emptied_tasks

    @property
    def emptied_tasks(self) -> list[str]:
        """Tasks that had training rows and kept none (:func:`emptied_tasks`): training would lack them."""
        return emptied_tasks(self.per_task)

    @property
    def thinned_tasks(self) -> list[str]:
        """Tasks not emptied whose pass rate is below ``min_pass_rate`` (warned about; the gate is overall)."""
        return [t for t, c in self.per_task.items()
                if t != OTHER_TASK and t not in self.emptied_tasks and c["pass_rate"] < self.min_pass_rate]

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
            "per_task": self.per_task,
            "stats": self.stats,
            "outputs": {"valid": VALID_FILE, "rejects": REJECTS_FILE, "report": REPORT_FILE,
                        "data_docs": f"{DOCS_DIR}/index.html"},
            "valid_sha256": self.valid_sha256,
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
            f"(pass rate {apart(self.pass_rate, self.min_pass_rate)}, threshold {self.min_pass_rate}), "
            f"{self.seconds:.1f} s"
            + (f"; **{self.emptied_note}**" if self.emptied_note else ""),
            "",
            "| check | pass rate | failures | example pair_id |",
            "|---|---:|---:|---|",
        ]
        for name, s in self.checks.items():
            # the user's text: a bare | splits the cell, a line break the row
            pid = " ".join((s.example_pair_id or "").replace("|", "\\|").splitlines())
            lines.append(f"| {name} | {s.pass_rate:.3f} | {s.failures} | {pid} |")
        if self.per_task:
            lines += ["", "| task | rows in | valid | rejected | pass rate |", "|---|---:|---:|---:|---:|"]
            lines += [f"| {t} | {c['rows_in']} | {c['valid']} | {c['rejected']} | "
                      f"{apart(c['pass_rate'], self.min_pass_rate)}"
                      + (" (below the threshold)" if t in self.thinned_tasks else "")
                      + (" (**no training row left**)" if t in self.emptied_tasks else "") + " |"
                      for t, c in self.per_task.items()]
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
        elif self.pass_rate >= self.min_pass_rate and not self.emptied_tasks:
            # min_pass_rate 0 and no row kept, yet no task emptied (every row a val row, or of no known task): the
            # headline below named an empty list of tasks
            head = f"validation gate failed: no row passed every check ({self.rows_in} rows in, all rejected)."
        elif self.pass_rate >= self.min_pass_rate:
            head = (f"validation gate failed: every training row of {', '.join(self.emptied_tasks)} was rejected, so "
                    f"training would lack that task (overall pass rate {apart(self.pass_rate, self.min_pass_rate)}).")
        else:
            head = (
                f"validation gate failed: pass rate {apart(self.pass_rate, self.min_pass_rate)} ({self.rows_valid}/"
                f"{self.rows_in} rows) "
                f"is below validate.min_pass_rate = {self.min_pass_rate}."
            )
            if self.emptied_tasks:
                head += f" And every training row of {', '.join(self.emptied_tasks)} was rejected."
        failing = sorted((s.failures, name) for name, s in self.checks.items() if s.failures)
        lines = [head, "Top failing checks:"] if failing else [head]
        for n, name in reversed(failing[-top:]):
            s = self.checks[name]
            reason = shorten(s.example_reason or "", 200, str(self.rejects_path))
            lines.append(f"  - {name}: {n} rows (e.g. pair_id {s.example_pair_id!r}: {reason})")
        lines.append(f"Every rejected row and its reasons: {self.rejects_path} (report: {self.out_dir / REPORT_FILE}, "
                     f"summary: {self.summary_path}"
                     + (f", Data Docs: {self.data_docs_index})" if self.data_docs_index else ")"))
        if not self.rows_in:  # nothing to validate: no threshold helps
            lines.append("Build the pairs first (`coin pairs`) and check pairs.tasks, pairs.rows_per_task and the "
                         "data they read; lowering validate.min_pass_rate does not help, an empty set fails the gate "
                         "at any threshold.")
        elif not self.rows_valid:
            lines.append("Every row was rejected: fix the data or the settings (e.g. pairs.cutoff_len); lowering "
                         "validate.min_pass_rate does not help, a gate that keeps no row fails at any threshold.")
        elif self.emptied_tasks:  # a task emptied (with or without a low pass rate): the threshold is no fix
            lines.append(f"Fix the data or the settings that reject {', '.join(self.emptied_tasks)}'s rows (e.g. "
                         "pairs.cutoff_len), or drop the task (from pairs.tasks, or its rows from a pairs file of "
                         "your own); lowering validate.min_pass_rate "
                         "does not help, a task with no training row fails the gate at any threshold.")
        else:
            lines.append("Fix the data or the settings (e.g. pairs.cutoff_len), or lower validate.min_pass_rate.")
        return "\n".join(lines)

    @property
    def emptied_note(self) -> str:
        """The verdict's reason when there was nothing to validate or a task lost every training row (empty
        otherwise): what the markdown summary and the report page add to a failed verdict's figures."""
        if not self.rows_in:
            return "no rows to validate (the pairs stage produced nothing)"
        if not self.emptied_tasks:
            return "" if self.rows_valid else "no row passed every check"
        return f"every training row of {', '.join(self.emptied_tasks)} was rejected, so training would lack it"
