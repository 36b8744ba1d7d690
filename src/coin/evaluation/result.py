"""One model's evaluation result, and its lossless round trip on disk.

:func:`save_result` writes a directory that :func:`load_result` reads back into an equal
:class:`EvalResult`, so every model can be evaluated in its own process (a Prefect/Dask task) and
the combined report built later::

    <dir>/predictions.parquet   one row per (scoring, task, set, instruction, example)
    <dir>/result.json           everything else (label, tasks, sets, caveats, timings, settings, notes, sources)

Metrics are never stored here: they are recomputed from the predictions on load (one source of truth).
"""

from __future__ import annotations

import math
import uuid
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import pandas as pd

from coin.data.io import DataError, naming, read_json, write_json
from coin.evaluation.metrics import Metrics, Sources, compute_metrics, metrics_dict

RESULT_FILE = "result.json"
PREDICTIONS_FILE = "predictions.parquet"
FORMAT_VERSION = 1

# Column order and dtypes of the predictions table (the runner builds it, load_result restores it).
PREDICTION_DTYPES: dict[str, str] = {
    "model": "string", "scoring": "string", "task": "string", "category": "string", "set": "string", "level": "string",
    "instruction_id": "int64", "example_id": "string", "label": "int64", "pred": "int64", "correct": "bool",
    "label_word": "string", "pred_word": "string", "scores": "object", "raw_scores": "object", "output": "string",
}
# raw_scores: the uncalibrated loglik scores where evaluate.calibration moved the decision (scores), else None


def normalise_predictions(frame: pd.DataFrame) -> pd.DataFrame:
    """Fixed column order and dtypes; ``scores`` as Python lists of floats (or None)."""
    if "raw_scores" not in frame.columns:  # results saved before calibration existed
        frame = frame.assign(raw_scores=None)
    missing = [c for c in PREDICTION_DTYPES if c not in frame.columns]
    if missing:
        raise ValueError(f"predictions table lacks columns {missing}")
    out = frame[list(PREDICTION_DTYPES)].copy()
    for col, dtype in PREDICTION_DTYPES.items():
        if dtype == "object":
            out[col] = [None if v is None or (isinstance(v, float) and math.isnan(v)) else [float(x) for x in v]
                        for v in out[col]]
        else:
            out[col] = out[col].astype(dtype)
    return out.reset_index(drop=True)


@dataclass
class EvalResult:
    """Predictions and context of one model; :attr:`metrics` is derived from the predictions."""

    model_label: str
    predictions: pd.DataFrame = field(compare=False)  # see PREDICTION_DTYPES (compared apart: a DataFrame)
    tasks: list[str]                          # evaluated tasks, in the configured order
    sets: list[str]                           # instruction sets, in the configured order
    scorings: list[str]                       # scoring modes, the first is the primary one
    caveats: dict[str, str] = field(default_factory=dict)   # task -> why its numbers are not comparable
    skipped: dict[str, str] = field(default_factory=dict)   # task -> why it was not evaluated
    wall_time_s: float = 0.0
    timing: dict[str, dict[str, Any]] = field(default_factory=dict)  # scoring -> seconds, items, items_per_s...
    settings: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)          # how the numbers were computed (paths, fallbacks)
    # set -> task -> clean source index (or None) per instruction, from the instruction file's optional `sources`
    # field; the per-pair PDR needs it ({} for files without pairing and for results saved before it existed)
    sources: Sources = field(default_factory=dict)
    metrics: Metrics = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        self.predictions = normalise_predictions(self.predictions)
        if not self.scorings:
            raise ValueError(f"{self.model_label}: no scoring mode")
        self.metrics = compute_metrics(self.predictions, self.sources)

    @property
    def primary(self) -> str:
        return self.scorings[0]

    @property
    def examples_per_s(self) -> float:
        """Scored (instruction, example) items per second, all scoring modes together."""
        return len(self.predictions) / self.wall_time_s if self.wall_time_s > 0 else 0.0

    def metrics_nested(self) -> dict[str, Any]:
        return metrics_dict(self.metrics, self.primary)

    def info(self) -> dict[str, Any]:
        """Everything but the predictions, JSON-ready (the content of ``result.json``)."""
        d = {f.name: getattr(self, f.name) for f in fields(self) if f.name not in ("predictions", "metrics")}
        return {"format": FORMAT_VERSION, **d, "examples_per_s": round(self.examples_per_s, 2),
                "n_predictions": len(self.predictions)}  # exact floats elsewhere: the round trip is lossless


def save_result(result: EvalResult, directory: str | Path) -> Path:
    """Write ``result`` under ``directory`` (created; previous files replaced). Returns the directory."""
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    tmp = d / f".{PREDICTIONS_FILE}.{uuid.uuid4().hex[:8]}.tmp"  # its own name: concurrent writers do not collide
    try:
        with naming(d / PREDICTIONS_FILE):  # a full disk: that file named
            result.predictions.to_parquet(tmp, index=False)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    tmp.replace(d / PREDICTIONS_FILE)
    write_json(d / RESULT_FILE, result.info())  # written last: its presence marks a complete result
    return d


def load_result(directory: str | Path) -> EvalResult:
    """Read back what :func:`save_result` wrote; a missing or foreign directory is a clear DataError."""
    d = Path(directory)
    meta = read_json(d / RESULT_FILE, missing_hint="Evaluate the model first (coin evaluate).")
    if not isinstance(meta, dict) or meta.get("format") != FORMAT_VERSION:
        raise DataError(f"{d / RESULT_FILE}: not an evaluation result of format {FORMAT_VERSION} "
                        f"(format: {meta.get('format') if isinstance(meta, dict) else type(meta).__name__}); "
                        "re-run the evaluation")
    if not (d / PREDICTIONS_FILE).exists():
        raise DataError(f"{d / PREDICTIONS_FILE}: missing next to {RESULT_FILE}; re-run the evaluation")
    init = {f.name for f in fields(EvalResult) if f.init and f.name != "predictions"}
    missing = [k for k in ("model_label", "tasks", "sets", "scorings") if k not in meta]
    if missing:
        raise DataError(f"{d / RESULT_FILE}: missing field(s) {missing}")
    try:
        preds = pd.read_parquet(d / PREDICTIONS_FILE)
    except (OSError, ValueError) as exc:  # pyarrow's ArrowInvalid is a ValueError, ArrowIOError an OSError
        raise DataError(f"{d / PREDICTIONS_FILE}: damaged Parquet file ({' '.join(str(exc).split())[:200]}); "
                        "re-run the evaluation that wrote it") from None
    return EvalResult(predictions=preds, **{k: v for k, v in meta.items() if k in init})



def same_protocol(a: str, b: str) -> bool:
    """Whether two :func:`evaluation_protocol` lines name one protocol: equal once the instruction sets are read as a
    set (lines recorded before they were sorted list them in the configured order), and each part of
    :data:`_LATER_PARTS` (the evaluated data's fingerprint, generate's token budget, bf16) compared where both
    lines record it (lines recorded before it have none)."""
    parts_a, parts_b = a.split("; "), b.split("; ")

    def has(parts: list[str], prefix: str) -> bool:
        return any(p.startswith(prefix) for p in parts)

    skip = tuple(x for x in _LATER_PARTS if not (has(parts_a, x) and has(parts_b, x)))

    def key(parts: list[str]) -> list[str]:
        return [",".join(sorted(p[5:].split(","))) if p.startswith("sets ") else p for p in parts
                if not p.startswith(skip)]

    return key(parts_a) == key(parts_b)


# parts of a protocol line added after versions were first tagged with it: compared only where both lines have one
_LATER_PARTS = ("data ", "max new tokens ", "bf16 ")


def evaluation_protocol(info: dict[str, Any]) -> str:
    """What must match for two models' headline figures to be comparable, as one readable line.

    ``info`` is a model's entry of ``eval_info.json`` (:meth:`EvalResult.info`): primary scoring, seed,
    examples per task, instruction sets and the instruction file's content hash, prompt format,
    length normalisation, the evaluated examples' content (:func:`coin.evaluation.runner.sample_fingerprint`),
    generate's token budget (``evaluate.max_new_tokens``, where generate is the primary scoring) and bf16 autocast.
    The registry records it on every version; the promotion gate refuses to
    compare figures measured under different protocols.
    """
    st = info.get("settings", {})
    n = st.get("n_examples", {})
    scorings = info.get("scorings") or ["?"]
    calibration = st.get("calibration", "none")
    return "; ".join([
        f"scoring {scorings[0]}" + (" (length-normalised)" if st.get("length_normalise") else "")
        + (f" (calibration {calibration})" if calibration != "none" else ""),
        f"seed {st.get('seed')}",
        "examples " + ",".join(f"{t}:{n[t]}" for t in sorted(n)),
        "sets " + ",".join(sorted(info.get("sets", []))),  # the same sets in another order: the same protocol
        f"instructions {st.get('instruction_sha256', st.get('instruction_file'))}",
        f"format {st.get('prompt_format')}",
        *([f"data {st['sample_sha256']}"] if st.get("sample_sha256") else []),  # same ids, other rows: not the same
        # generate's answers are cut at the token budget ('not_entailment' needs 5 MiniLM tokens); bf16 autocast
        # rounds every score, which flips near ties (evaluate.autocast; the evaluation cache keys on it too)
        *([f"max new tokens {st['max_new_tokens']}"] if scorings[0] == "generate" and "max_new_tokens" in st else []),
        *([f"bf16 {'on' if st['bf16_autocast'] else 'off'}"] if "bf16_autocast" in st else []),
    ])
