"""Pair building: FLAN templates on GLUE train rows -> explicit (original, paraphrase, negative) rows.

Every row carries the twins explicitly (never by row order, unlike the reference code):

- ``original``   = template A on example x, target y
- ``paraphrase`` = instruction B != A on the same x, same target y        (the positive)
                   B is another FLAN template or a rule rewording of A (``pairs.paraphrase_source``,
                   :mod:`coin.data.paraphrase`); the row names it in ``paraphrase_source``
- ``negative``   = template A on another example x' of the task, y' != y   (the hard negative)

Same data + same settings -> byte-identical output (seeded ``random.Random`` per task, sorted keys).
"""

from __future__ import annotations

import logging
import random
import unicodedata
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from coin.config import PairsSettings, TemplateChoice
from coin.data.io import DataError, read_jsonl
from coin.data.paraphrase import get_sources, paraphrase_candidates
from coin.data.tasks import TaskSpec, get_task, train_file
from coin.data.templates import TaskTemplates, Template, load_templates, render

log = logging.getLogger("coin")

# Columns of a pair row (README.md, "The stages", pairs).
PAIR_COLUMNS = (
    "pair_id", "task", "split", "example_id", "label", "inputs", "answer_words",
    "template_a", "template_b", "paraphrase_source", "original_instruction", "paraphrase_instruction",
    "original_prompt", "paraphrase_prompt", "target",
    "negative_example_id", "negative_label", "negative_inputs", "negative_prompt", "negative_target",
)


@dataclass(frozen=True)
class Example:
    example_id: str      # "<task>:train:<i>" -- i = 0-based row of the train file (HF idx is null for some files)
    row: dict[str, Any]

    @property
    def label(self) -> int:
        return int(self.row["label"])


def load_examples(data_dir: str | Path, spec: TaskSpec) -> list[Example]:
    """The task's GLUE train rows; a missing field, a wrong type, a bad JSON line, an empty input field, a label
    that is not a label id of the task or an ``idx`` that repeats stops with ``<file>:<line>: ...`` naming the field."""
    required: dict[str, Any] = {f: str for f in spec.fields}
    required["label"] = int
    rows = read_jsonl(train_file(data_dir, spec.name), required=required, check=spec.row_problem, unique="idx")
    return [Example(f"{spec.name}:train:{i}", row) for i, row in enumerate(rows)]


def input_words(ex: Example, spec: TaskSpec) -> int:
    """Whitespace-separated words over the task's input fields: what ``pairs.min_words`` counts."""
    return sum(len(str(ex.row[f]).split()) for f in spec.fields)


def split_short(pool: list[Example], spec: TaskSpec, min_words: int) -> tuple[list[Example], list[Example]]:
    """``(drawable, short)``: the rows with at least ``min_words`` input words, in file order, and the others."""
    if min_words <= 0:
        return pool, []
    drawable: list[Example] = []
    short: list[Example] = []
    for ex in pool:
        (drawable if input_words(ex, spec) >= min_words else short).append(ex)
    return drawable, short


def short_rows(data_dir: str | Path, cfg: PairsSettings) -> list[dict[str, Any]]:
    """The train rows ``pairs.min_words`` keeps out of the draw, each with its word count and the reason."""
    out: list[dict[str, Any]] = []
    for task in cfg.tasks:
        spec = get_task(task)
        need = cfg.min_words_for(task)
        if need <= 0:
            continue
        for ex in split_short(load_examples(data_dir, spec), spec, need)[1]:
            words = input_words(ex, spec)
            out.append({"task": task, "example_id": ex.example_id, "words": words,
                        "reason": f"{words} input word(s) < pairs.min_words {need} for {task}",
                        "inputs": {f: ex.row[f] for f in spec.fields}, "label": ex.label})
    return out


def templates_for(task: str, choice: TemplateChoice) -> str | list[int]:
    """``pairs.templates`` for one task: the global choice, or the task's entry of a per-task mapping."""
    if isinstance(choice, dict):
        return choice.get(task, "classification")
    return choice


def select_templates(tt: TaskTemplates, choice: str | list[int], *, min_templates: int = 2) -> list[Template]:
    """The classification templates to draw (A, B) from; a template whose text repeats an earlier one
    (FLAN's CoLA templates 0 and 3 are identical) is dropped, as it would make copy 'paraphrases'."""
    usable, first, copies = [], {}, {}  # first: text -> id of the first template with it; copies: id -> that id
    for t in tt.classification():
        if t.input in first:
            copies[t.template_id] = first[t.input]
        else:
            first[t.input] = t.template_id
            usable.append(t)
    # marked a classification template, but its answer is more than the label word: a user's own file (the shipped
    # one has none); FLAN's CoIN pairs train on the label word alone, so it is not drawn, and the user is told
    wordy = {t.template_id: t.target for t in tt.templates if t.is_classification and t.target != "{answer}"}
    if choice == "classification":
        chosen = usable
        if wordy:
            log.warning("pairs: task %s: template(s) %s are marked is_classification, but their target is not "
                        "'{answer}' (%s); they are not drawn. Make the target '{answer}' to use them", tt.task,
                        sorted(wordy), "; ".join(f"{i}: {t!r}" for i, t in sorted(wordy.items())))
    else:
        by_id = {t.template_id: t for t in usable}
        bad = [i for i in choice if i not in by_id]
        if bad:
            why = "; ".join([f"template {i} repeats template {copies[i]}'s text" for i in bad if i in copies]
                            + [f"template {i}'s target {wordy[i]!r} is not '{{answer}}'" for i in bad if i in wordy])
            raise DataError(
                f"pairs.templates: template ids {bad} of task {tt.task} are not usable classification templates "
                f"({why + '; ' if why else ''}usable: {sorted(by_id)}); remove them or use 'classification'"
            )
        chosen = [by_id[i] for i in choice]
    if len(chosen) < min_templates:
        raise DataError(
            f"task {tt.task}: {len(chosen)} usable template(s), {min_templates} needed to build paraphrase pairs; "
            f"select more in pairs.templates or use pairs.paraphrase_source = rules / both"
        )
    return chosen


def answer_words(spec: TaskSpec, tt: TaskTemplates, mode: str) -> tuple[str, ...]:
    return tt.flan_options if mode == "flan" else spec.label_words


def protected_words(spec: TaskSpec, tt: TaskTemplates) -> set[str]:
    """Words a generated paraphrase must neither drop nor add: every verbalisation of the task's labels."""
    return set(spec.label_words) | set(tt.flan_options)


def build_task_pairs(data_dir: str | Path, task: str, cfg: PairsSettings, seed: int) -> Iterator[dict[str, Any]]:
    """The pair rows of one task, in example order (then candidate order for ``strategy: all``).

    Draws, all from one ``random.Random`` seeded by ``(seed, task)``: the examples, the held-out
    ones, then per example the original template A (uniform over templates that have a paraphrase),
    the paraphrase B (uniform over A's candidates, see :mod:`coin.data.paraphrase`) and the negative.
    ``option_order: shuffled`` draws each example's order of the listed options from a second generator, so
    the rows drawn are the same either way; the original, its paraphrase and the negative share that order.
    """
    spec = get_task(task)
    tt = load_templates(data_dir, spec)
    sources = get_sources(cfg.paraphrase_source)
    templates = select_templates(tt, templates_for(task, cfg.templates),
                                 min_templates=2 if cfg.paraphrase_source == "flan" else 1)
    words = answer_words(spec, tt, cfg.answers)
    protected = protected_words(spec, tt)
    candidates = {a.template_id: paraphrase_candidates(a, templates, protected, sources) for a in templates}
    originals = [a for a in templates if candidates[a.template_id]]
    if not originals:
        raise DataError(
            f"task {task}: no template has a paraphrase from pairs.paraphrase_source = {cfg.paraphrase_source!r}; "
            f"select more templates or another source"
        )
    unused = [a.template_id for a in templates if not candidates[a.template_id]]
    if unused:  # never an original A: said, and refused where the user named the ids
        why = (f"template(s) {unused} of task {task} have no paraphrase from pairs.paraphrase_source = "
               f"{cfg.paraphrase_source!r} (no rule rewording applies to them)")
        if not isinstance(templates_for(task, cfg.templates), str):
            raise DataError(f"{why}, so they would never be drawn although pairs.templates lists them; drop them "
                            "from pairs.templates or use paraphrase_source flan or both")
        log.warning("pairs: %s: they are not drawn as originals (stats.json: templates_per_task)", why)
    pool = load_examples(data_dir, spec)
    if not pool:  # a configured task with no rows is an error, never a silently smaller dataset
        raise DataError(f"{train_file(data_dir, task)}: no rows, so task {task} would silently get no training pairs; "
                        f"restore the file (dvc pull data.dvc) or remove {task} from pairs.tasks")
    need = cfg.min_words_for(task)
    pool, short = split_short(pool, spec, need)
    if not pool:
        raise DataError(f"task {task}: none of its {len(short)} train rows has {need} or more input words, so it "
                        f"would get no training pairs; lower pairs.min_words for {task} (0 draws every row)")
    rng = random.Random(f"pairs:{seed}:{task}")
    option_rng = random.Random(f"options:{seed}:{task}")

    n = min(cfg.rows_for(task), len(pool))
    chosen = sorted(rng.sample(range(len(pool)), n))
    n_val = round(n * cfg.val_fraction)
    val_ids = set(rng.sample(chosen, n_val)) if n_val else set()
    by_label: dict[int, list[int]] = {}
    by_input: dict[tuple[str, ...], set[int]] = {}  # GLUE repeats some inputs (cola: 7 sentences under both labels)
    for i, ex in enumerate(pool):
        by_label.setdefault(ex.label, []).append(i)
        by_input.setdefault(_input_key(ex.row, spec.fields), set()).add(i)
    if val_ids:  # an input held out is held out whole: its repeats drawn for training join it (no draw consumed)
        held = {_input_key(pool[i].row, spec.fields) for i in val_ids}
        val_ids |= {i for i in chosen if _input_key(pool[i].row, spec.fields) in held}

    for i in chosen:
        ex = pool[i]
        others = [j for lab, idx in sorted(by_label.items()) if lab != ex.label for j in idx]
        # a negative is another input: the same sentence under the other label would be the same prompt
        twins = by_input[_input_key(ex.row, spec.fields)]
        if not any(j not in twins for j in others):
            why = (f"every train row with pairs.min_words = {need} or more input words has label {ex.label} "
                   f"({len(short)} shorter rows not drawn); lower pairs.min_words for {task}" if short else
                   f"every train row has label {ex.label}" if not any(lab != ex.label for lab in by_label) else
                   f"every train row with another label than {ex.example_id} has its input")
            raise DataError(f"task {task}: {why}; no hard negative is possible")
        if cfg.strategy == "random":
            a = rng.choice(originals)
            combos = [(a, rng.choice(candidates[a.template_id]))]
        else:
            combos = [(a, b) for a in originals for b in candidates[a.template_id]]
        order = tuple(option_rng.sample(range(len(words)), len(words))) if cfg.option_order == "shuffled" else None
        for a, b in combos:
            neg = pool[_draw_other(rng, others, twins)]
            orig_prompt, target = render(a, tt, ex.row, words, order)
            para_prompt, para_target = render(b, tt, ex.row, words, order)
            neg_prompt, neg_target = render(a, tt, neg.row, words, order)
            assert para_target == target
            yield {
                "pair_id": f"{ex.example_id}:a{a.key}:b{b.key}",
                "task": task,
                "split": "val" if i in val_ids else "train",
                "example_id": ex.example_id,
                "label": ex.label,
                "inputs": {f: ex.row[f] for f in spec.fields},
                "answer_words": list(words),
                "template_a": a.template_id,
                "template_b": b.template_id,
                "paraphrase_source": b.source,
                "original_instruction": a.input,
                "paraphrase_instruction": b.input,
                "original_prompt": orig_prompt,
                "paraphrase_prompt": para_prompt,
                "target": target,
                "negative_example_id": neg.example_id,
                "negative_label": neg.label,
                "negative_inputs": {f: neg.row[f] for f in spec.fields},  # the leak check reads them too
                "negative_prompt": neg_prompt,
                "negative_target": neg_target,
            }


def _draw_other(rng: random.Random, others: list[int], twins: set[int]) -> int:
    """One of ``others`` that is not one of ``twins`` (rows with the same input), drawn again when a twin is drawn:
    the draws, and so the pairs, stay those of earlier versions wherever no twin came up."""
    while True:
        j = rng.choice(others)
        if j not in twins:
            return j


def _input_key(row: dict[str, Any], fields: Sequence[str]) -> tuple[str, ...]:
    """What makes two rows the same input: their input fields' text, up to its form (:func:`same_form`)."""
    return tuple(same_form(str(row.get(f))) for f in fields)


def same_form(text: str) -> str:
    """``text`` in NFKC with its whitespace runs made single spaces, ends stripped: two texts equal so differ only in
    form, and a tokenizer reads them alike ("café" composed or not, GLUE's "a charming journey . " and "a
    charming journey ."). Compared raw, such twins were each other's hard negative (the same prompt under the
    other target) and one was trained on while the other was held out. Case and punctuation stay: cola's
    "The man, a ball kicked." and "The man a ball kicked." are rows of their own, with different labels."""
    return " ".join(unicodedata.normalize("NFKC", text).split())


def build_pairs(data_dir: str | Path, cfg: PairsSettings, seed: int) -> list[dict[str, Any]]:
    """All pair rows for ``cfg.tasks``, in task order then example order."""
    rows: list[dict[str, Any]] = []
    for task in tqdm(cfg.tasks, desc="pairs", unit="task", disable=None):
        rows.extend(build_task_pairs(data_dir, task, cfg, seed))
    return rows
