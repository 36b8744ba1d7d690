"""Pair building: FLAN templates on GLUE train rows -> explicit (original, paraphrase, negative) rows.

Every row carries the twins explicitly (never by row order, unlike the reference code):

- ``original``   = template A on example x, target y
- ``paraphrase`` = template B != A on the same x, same target y           (the positive)
- ``negative``   = template A on another example x' of the task, y' != y   (the hard negative)

Same data + same settings -> byte-identical output (seeded ``random.Random`` per task, sorted keys).
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from coin.config import PairsSettings
from coin.data.io import DataError, read_jsonl
from coin.data.tasks import TaskSpec, get_task, train_file
from coin.data.templates import Template, TaskTemplates, load_templates, render

# Columns of a pair row, in the order documented in README.md ("Pair schema").
PAIR_COLUMNS = (
    "pair_id", "task", "split", "example_id", "label", "inputs", "answer_words",
    "template_a", "template_b", "original_instruction", "paraphrase_instruction",
    "original_prompt", "paraphrase_prompt", "target",
    "negative_example_id", "negative_label", "negative_prompt", "negative_target",
)


@dataclass(frozen=True)
class Example:
    example_id: str      # "<task>:train:<line>" -- the line number is stable, HF idx is null for some files
    row: dict[str, Any]

    @property
    def label(self) -> int:
        return int(self.row["label"])


def load_examples(data_dir: str | Path, spec: TaskSpec) -> list[Example]:
    required: dict[str, Any] = {f: str for f in spec.fields}
    required["label"] = int
    rows = read_jsonl(train_file(data_dir, spec.name), required=required)
    out = []
    for i, row in enumerate(rows):
        if not 0 <= row["label"] < spec.num_labels:
            raise DataError(
                f"{train_file(data_dir, spec.name)}: row {i + 1}: field 'label' = {row['label']} is not a "
                f"{spec.name} label id (0..{spec.num_labels - 1})"
            )
        out.append(Example(f"{spec.name}:train:{i}", row))
    return out


def select_templates(tt: TaskTemplates, choice: str | list[int]) -> list[Template]:
    """The classification templates to draw (A, B) from; a template whose text repeats an earlier one
    (FLAN's CoLA templates 0 and 3 are identical) is dropped, as it would make copy 'paraphrases'."""
    usable, seen = [], set()
    for t in tt.classification():
        if t.input not in seen:
            seen.add(t.input)
            usable.append(t)
    if choice == "classification":
        chosen = usable
    else:
        by_id = {t.template_id: t for t in usable}
        bad = [i for i in choice if i not in by_id]
        if bad:
            raise DataError(
                f"pairs.templates: template ids {bad} of task {tt.task} are not classification templates "
                f"(usable: {sorted(by_id)}); remove them or use 'classification'"
            )
        chosen = [by_id[i] for i in choice]
    if len(chosen) < 2:
        raise DataError(f"task {tt.task}: fewer than 2 usable templates, cannot build paraphrase pairs")
    return chosen


def answer_words(spec: TaskSpec, tt: TaskTemplates, mode: str) -> tuple[str, ...]:
    return tt.flan_options if mode == "flan" else spec.label_words


def build_task_pairs(data_dir: str | Path, task: str, cfg: PairsSettings, seed: int) -> Iterator[dict[str, Any]]:
    spec = get_task(task)
    tt = load_templates(data_dir, spec)
    templates = select_templates(tt, cfg.templates)
    words = answer_words(spec, tt, cfg.answers)
    pool = load_examples(data_dir, spec)
    rng = random.Random(f"pairs:{seed}:{task}")

    n = min(cfg.rows_per_task, len(pool))
    chosen = sorted(rng.sample(range(len(pool)), n))
    n_val = round(n * cfg.val_fraction)
    val_ids = set(rng.sample(chosen, n_val)) if n_val else set()
    by_label: dict[int, list[int]] = {}
    for i, ex in enumerate(pool):
        by_label.setdefault(ex.label, []).append(i)

    for i in chosen:
        ex = pool[i]
        others = [j for lab, idx in sorted(by_label.items()) if lab != ex.label for j in idx]
        if not others:
            raise DataError(f"task {task}: every train row has label {ex.label}; no hard negative is possible")
        if cfg.strategy == "random":
            a, b = rng.sample(templates, 2)
            combos = [(a, b)]
        else:
            combos = [(a, b) for a in templates for b in templates if a.template_id != b.template_id]
        for a, b in combos:
            neg = pool[rng.choice(others)]
            orig_prompt, target = render(a, tt, ex.row, words)
            para_prompt, para_target = render(b, tt, ex.row, words)
            neg_prompt, neg_target = render(a, tt, neg.row, words)
            assert para_target == target
            yield {
                "pair_id": f"{ex.example_id}:a{a.template_id}:b{b.template_id}",
                "task": task,
                "split": "val" if i in val_ids else "train",
                "example_id": ex.example_id,
                "label": ex.label,
                "inputs": {f: ex.row[f] for f in spec.fields},
                "answer_words": list(words),
                "template_a": a.template_id,
                "template_b": b.template_id,
                "original_instruction": a.input,
                "paraphrase_instruction": b.input,
                "original_prompt": orig_prompt,
                "paraphrase_prompt": para_prompt,
                "target": target,
                "negative_example_id": neg.example_id,
                "negative_label": neg.label,
                "negative_prompt": neg_prompt,
                "negative_target": neg_target,
            }


def build_pairs(data_dir: str | Path, cfg: PairsSettings, seed: int) -> list[dict[str, Any]]:
    """All pair rows for ``cfg.tasks``, in task order then example order."""
    rows: list[dict[str, Any]] = []
    for task in cfg.tasks:
        rows.extend(build_task_pairs(data_dir, task, cfg, seed))
    return rows
