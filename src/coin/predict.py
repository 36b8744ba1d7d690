"""Answering an instruction + input with a trained model: the logic behind `coin predict` and the pyfunc."""

from __future__ import annotations

import json
from typing import Any

import pandas as pd

from coin.data.tasks import TASKS


def join_instruction(instruction: str, text: str) -> str:
    """Instruction then input, as the evaluation builds prompts (a space added if the instruction has none)."""
    if not text:
        return instruction
    sep = "" if (not instruction or instruction[-1].isspace()) else " "
    return f"{instruction}{sep}{text}"


def _text(value: Any) -> str:
    """A cell as text: missing (None/NaN, e.g. an absent optional value in a JSON request) is ""."""
    return "" if value is None or (isinstance(value, float) and value != value) else str(value)


def _options_for(row: pd.Series) -> list[str] | None:
    opts = row.get("options") if "options" in row else None
    if isinstance(opts, str) and opts.strip():
        opts = json.loads(opts) if opts.strip().startswith("[") else [o.strip() for o in opts.split("|")]
    if opts is not None and not isinstance(opts, float) and len(opts) > 0:
        return [str(o) for o in opts]
    task = row.get("task") if "task" in row else None
    if isinstance(task, str) and task:
        if task not in TASKS:
            raise ValueError(f"task {task!r} is not a known GLUE task ({', '.join(TASKS)}); omit it or pass options")
        return list(TASKS[task].label_words)
    return None


def _calibrate(model, tokenizer, meta: dict[str, Any], instructions: list[str], options: tuple[str, ...],
               task: str | None, scores, fmt: str, batch_size: int):
    """Content-free calibration of ``scores`` (``coin.evaluation.scoring.calibrated``): the options' scores after
    each instruction with an empty input are subtracted, and the task's training label prior added when the
    options are the task's label words (else no prior)."""
    from coin.evaluation.scoring import calibrated, label_log_prior, score_label_words

    distinct = list(dict.fromkeys(instructions))
    cf = score_label_words(model, tokenizer, [join_instruction(t, "") for t in distinct], list(options), fmt=fmt,
                           batch_size=batch_size, desc="predict (content-free)").scores
    per_row = cf[[distinct.index(t) for t in instructions]]
    counts = (meta.get("label_counts") or {}).get(task) if task else None
    prior = None
    if counts and tuple(TASKS[task].label_words) == tuple(options):
        prior = label_log_prior(counts)
    return calibrated(scores, per_row, prior)


def answer_rows(model, tokenizer, meta: dict[str, Any], df: pd.DataFrame, *, max_new_tokens: int = 7,
                batch_size: int = 32) -> pd.DataFrame:
    """One answer per row of ``df`` (columns: instruction, input[, task][, options]), in row order.

    Rows with a task or options are scored in batches of ``batch_size`` prompts per distinct option
    list (the evaluation's label log-likelihood scoring, rows sharing an instruction share its prefix);
    the others are decoded greedily in batches. Returns columns ``answer`` and ``scores`` (JSON
    ``{option: log-likelihood}`` for scored rows, "" for generated ones).
    """
    from coin.evaluation.generation import generate_answers
    from coin.evaluation.scoring import score_label_words

    missing = [c for c in ("instruction", "input") if c not in df.columns]
    if missing:
        raise ValueError(f"predict input lacks column(s) {missing}; expected instruction, input[, task][, options]")
    fmt = meta.get("prompt_format", "train")
    rows = [row for _, row in df.iterrows()]
    prompts = [join_instruction(_text(r["instruction"]), _text(r["input"])) for r in rows]
    answers, scores = [""] * len(rows), [""] * len(rows)
    by_options: dict[tuple[tuple[str, ...], str | None], list[int]] = {}
    free: list[int] = []
    for i, row in enumerate(rows):
        options = _options_for(row)
        if options:
            task = _text(row["task"]) if "task" in row and _text(row["task"]) in TASKS else None
            by_options.setdefault((tuple(options), task), []).append(i)
        else:
            free.append(i)
    if free:  # the evaluation's greedy decoder: it honours the model's attention (causal or prefix LM)
        gen = generate_answers(model, tokenizer, [prompts[i] for i in free], fmt=fmt, max_new_tokens=max_new_tokens,
                               batch_size=batch_size, desc="predict")
        for i, text in zip(free, gen.texts):
            answers[i] = text.strip()
    calibrate = meta.get("calibration", "none") == "content_free"
    for (options, task), idx in by_options.items():
        s = score_label_words(model, tokenizer, [prompts[i] for i in idx], list(options), fmt=fmt,
                              batch_size=batch_size, groups=[_text(rows[i]["instruction"]) for i in idx],
                              desc="predict").scores
        if calibrate:  # as the evaluation decided (evaluate.calibration when the model was trained)
            s = _calibrate(model, tokenizer, meta, [_text(rows[i]["instruction"]) for i in idx], options, task, s,
                           fmt, batch_size)
        for j, i in enumerate(idx):
            answers[i] = options[int(s[j].argmax())]
            scores[i] = json.dumps({o: round(float(v), 4) for o, v in zip(options, s[j])})
    return pd.DataFrame({"answer": answers, "scores": scores})
