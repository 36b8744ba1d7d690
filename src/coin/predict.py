"""Answering an instruction + input with a trained model: the logic behind `coin predict` and the pyfunc."""

from __future__ import annotations

import json
from typing import Any

import pandas as pd
import torch

from coin.data.prompts import format_prompt
from coin.data.tasks import TASKS


def join_instruction(instruction: str, text: str) -> str:
    """Instruction then input, as the evaluation builds prompts (a space added if the instruction has none)."""
    if not text:
        return instruction
    sep = "" if (not instruction or instruction[-1].isspace()) else " "
    return f"{instruction}{sep}{text}"


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


@torch.inference_mode()
def _generate(model, tokenizer, prompt: str, fmt: str, max_new_tokens: int) -> str:
    text = format_prompt(prompt, fmt)
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    if tokenizer.bos_token_id is not None:
        ids = [tokenizer.bos_token_id] + ids
    device = next(model.parameters()).device
    x = torch.tensor([ids], device=device)
    out = model.generate(input_ids=x, attention_mask=torch.ones_like(x), max_new_tokens=max_new_tokens,
                         do_sample=False, pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
    return tokenizer.decode(out[0, x.shape[1]:], skip_special_tokens=True).strip()


def answer_rows(model, tokenizer, meta: dict[str, Any], df: pd.DataFrame, *, max_new_tokens: int = 7) -> pd.DataFrame:
    """One answer per row of ``df`` (columns: instruction, input[, task][, options])."""
    from coin.evaluation.scoring import loglik_scores

    missing = [c for c in ("instruction", "input") if c not in df.columns]
    if missing:
        raise ValueError(f"predict input lacks column(s) {missing}; expected instruction, input[, task][, options]")
    fmt = meta.get("prompt_format", "train")
    answers, scores = [], []
    for _, row in df.iterrows():
        prompt = join_instruction(str(row["instruction"]), str(row["input"]))
        options = _options_for(row)
        if options:
            s = loglik_scores(model, tokenizer, [prompt], options, fmt=fmt, batch_size=len(options))[0]
            answers.append(options[int(s.argmax())])
            scores.append(json.dumps({o: round(float(v), 4) for o, v in zip(options, s)}))
        else:
            answers.append(_generate(model, tokenizer, prompt, fmt, max_new_tokens))
            scores.append("")
    return pd.DataFrame({"answer": answers, "scores": scores})
