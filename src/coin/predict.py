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
    by_options: dict[tuple[str, ...], list[int]] = {}
    free: list[int] = []
    for i, row in enumerate(rows):
        options = _options_for(row)
        if options:
            by_options.setdefault(tuple(options), []).append(i)
        else:
            free.append(i)
    if free:  # the evaluation's greedy decoder: it honours the model's attention (causal or prefix LM)
        gen = generate_answers(model, tokenizer, [prompts[i] for i in free], fmt=fmt, max_new_tokens=max_new_tokens,
                               batch_size=batch_size, desc="predict")
        for i, text in zip(free, gen.texts):
            answers[i] = text.strip()
    for options, idx in by_options.items():
        s = score_label_words(model, tokenizer, [prompts[i] for i in idx], list(options), fmt=fmt,
                              batch_size=batch_size, groups=[_text(rows[i]["instruction"]) for i in idx],
                              desc="predict").scores
        for j, i in enumerate(idx):
            answers[i] = options[int(s[j].argmax())]
            scores[i] = json.dumps({o: round(float(v), 4) for o, v in zip(options, s[j])})
    return pd.DataFrame({"answer": answers, "scores": scores})
