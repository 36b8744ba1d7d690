"""FLAN instruction templates (data/flan/flan_glue_templates.json) and their rendering.

The loader checks the file before any pair is built: every problem stops ``coin pairs`` with a
:class:`~coin.data.io.DataError` naming the file, the JSON path of the field at fault and the fix::

    data/flan/flan_glue_templates.json: tasks.sst2.templates_v1[3].input: should be a string, got int 7
"""

from __future__ import annotations

import string
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from coin.data.io import DataError, read_json
from coin.data.tasks import TaskSpec

FLAN_FILE = Path("flan") / "flan_glue_templates.json"
OPTIONS_PLACEHOLDER, ANSWER_PLACEHOLDER = "options_", "answer"


@dataclass(frozen=True)
class Template:
    task: str
    template_id: int
    input: str           # e.g. "Premise: {premise}\n\nHypothesis: {hypothesis}\n\n...{options_}"
    target: str          # "{answer}" for classification templates
    is_classification: bool
    source: str = "flan"  # where the instruction comes from: "flan" (the file) or a paraphrase source ("rules")
    variant: int = 0      # 0 for a FLAN template; k >= 1 for the k-th generated rewording of template_id

    @property
    def placeholders(self) -> set[str]:
        return placeholders(self.input)

    @property
    def key(self) -> str:
        """``"5"`` for FLAN template 5, ``"5r2"`` for the second rule rewording of it (used in pair ids)."""
        return str(self.template_id) if self.source == "flan" else f"{self.template_id}r{self.variant}"


def placeholders(text: str) -> set[str]:
    """The ``{name}`` fields of a template (raises ``ValueError`` on unbalanced braces)."""
    return {name for _, name, _, _ in string.Formatter().parse(text) if name}


def _field_problem(text: str) -> str | None:
    """What in a (brace-balanced) template its rendering cannot fill: a positional field (``{}``, ``{0}``: filled by
    name only), a conversion (``{sentence!r}``) or a format spec (``{sentence:d}``). Each passed `coin data` and
    then stopped `coin pairs` with Python's bare IndexError or ValueError, naming no file or template."""
    for _, name, spec, conversion in string.Formatter().parse(text):
        if name is None:
            continue
        field = "{" + name + (f"!{conversion}" if conversion else "") + (f":{spec}" if spec else "") + "}"
        if name == "" or name.isdigit():
            return f"'{field}' is not a named placeholder (fields are filled by name, e.g. {{sentence}})"
        if conversion or spec:
            return f"'{field}': a placeholder takes no conversion or format spec; write {{{name}}}"
    return None


@dataclass(frozen=True)
class TaskTemplates:
    task: str
    flan_options: tuple[str, ...]            # FLAN answer words, index = HF label id
    field_map: dict[str, str]                # FLAN placeholder -> HF glue field (rte: premise -> sentence1)
    templates: tuple[Template, ...]

    def classification(self) -> list[Template]:
        return [t for t in self.templates if t.is_classification and t.target == "{answer}"]


def _typed(value: Any, typ: type | tuple[type, ...], path: Path, where: str) -> Any:
    ok = isinstance(value, typ) and not (typ is int and isinstance(value, bool))
    if not ok:
        want = typ.__name__ if isinstance(typ, type) else " or ".join(t.__name__ for t in typ)
        raise DataError(f"{path}: {where}: should be {_article(want)}, got {type(value).__name__} {value!r:.60}; "
                        "fix the file")
    return value


def _article(word: str) -> str:
    return {"dict": "a JSON object", "list": "a JSON list", "str": "a string", "int": "an integer",
            "bool": "true/false"}.get(word, word)


def _template(raw: Any, path: Path, where: str, task: str, allowed: set[str]) -> Template:
    _typed(raw, dict, path, where)
    for key in ("template_id", "input", "target", "is_classification"):
        if key not in raw:
            raise DataError(f"{path}: {where}: missing field '{key}' (has: {', '.join(raw) or 'nothing'}); "
                            "fix the file")
    tid = _typed(raw["template_id"], int, path, f"{where}.template_id")
    text = _typed(raw["input"], str, path, f"{where}.input")
    target = _typed(raw["target"], str, path, f"{where}.target")
    is_cls = _typed(raw["is_classification"], bool, path, f"{where}.is_classification")
    for field, value in (("input", text), ("target", target)):
        try:
            names = placeholders(value)
        except ValueError as exc:
            raise DataError(
                f"{path}: {where}.{field}: not a valid template ({exc}); escape literal braces as '{{{{' and '}}}}'"
            ) from None
        bad = _field_problem(value)
        if bad:
            raise DataError(f"{path}: {where}.{field}: {bad}; escape literal braces as '{{{{' and '}}}}'")
        unknown = sorted(names - allowed)
        if unknown:
            raise DataError(
                f"{path}: {where}.{field}: unknown placeholder(s) {', '.join('{' + u + '}' for u in unknown)} for task "
                f"{task} (known: {', '.join(sorted(allowed))}); fix the template or flan_field_to_hf_glue_field"
            )
    if not text.strip():
        raise DataError(f"{path}: {where}.input: is empty; remove the template or give it text")
    return Template(task, tid, text, target, is_cls)


def load_templates(data_dir: str | Path, spec: TaskSpec) -> TaskTemplates:
    """The FLAN templates of one task, every field type- and placeholder-checked."""
    path = Path(data_dir) / FLAN_FILE
    doc = read_json(path, missing_hint="Run `dvc pull` (or `coin data`) to restore the data")
    _typed(doc, dict, path, "top level")
    tasks = _typed(doc.get("tasks"), dict, path, "field 'tasks'")
    base = f"tasks.{spec.flan_key}"
    if spec.flan_key not in tasks:
        raise DataError(f"{path}: no entry {base} for task {spec.name} (entries: {', '.join(tasks)}); "
                        "add it or drop the task")
    entry = _typed(tasks[spec.flan_key], dict, path, base)

    field_map = _typed(entry.get("flan_field_to_hf_glue_field", {}), dict, path, f"{base}.flan_field_to_hf_glue_field")
    for k, v in field_map.items():
        _typed(v, str, path, f"{base}.flan_field_to_hf_glue_field.{k}")
        if v not in spec.fields:
            raise DataError(
                f"{path}: {base}.flan_field_to_hf_glue_field.{k}: '{v}' is not a {spec.name} field "
                f"({', '.join(spec.fields)}); fix the mapping"
            )
    allowed = set(spec.fields) | set(field_map) | {OPTIONS_PLACEHOLDER, ANSWER_PLACEHOLDER}

    answers = _typed(entry.get("label_to_answer"), dict, path, f"{base}.label_to_answer")
    options = []
    for i in range(spec.num_labels):
        if str(i) not in answers:
            raise DataError(f"{path}: {base}.label_to_answer: missing label '{i}' "
                            f"({spec.name} has {spec.num_labels} labels)")
        word = _typed(answers[str(i)], str, path, f"{base}.label_to_answer.{i}")
        if not word.strip():
            raise DataError(f"{path}: {base}.label_to_answer.{i}: is empty; give the answer word of label {i}")
        options.append(word)

    raw_templates = _typed(entry.get("templates_v1", []), list, path, f"{base}.templates_v1")
    templates = [
        _template(t, path, f"{base}.templates_v1[{i}]", spec.name, allowed) for i, t in enumerate(raw_templates)
    ]
    if not templates:
        raise DataError(f"{path}: {base}.templates_v1 is empty; the task needs templates to build pairs from")
    ids = [t.template_id for t in templates]
    dup = sorted({i for i in ids if ids.count(i) > 1})
    if dup:
        raise DataError(f"{path}: {base}.templates_v1: template_id {dup} used more than once; ids must be unique")
    return TaskTemplates(spec.name, tuple(options), dict(field_map), tuple(templates))


def format_options(options: tuple[str, ...] | list[str]) -> str:
    """FLAN's ``format_options``: ``'OPTIONS:\\n- ' + '\\n- '.join(options)``."""
    return "OPTIONS:\n- " + "\n- ".join(options)


def input_text(task: str, text: str) -> str:
    """An input field as FLAN puts it into a prompt: FLAN replaces '""' with "'" in QQP questions."""
    return text.replace('""', "'") if task == "qqp" else text


def render(
    template: Template,
    tt: TaskTemplates,
    row: dict,
    answer_words: tuple[str, ...],
    option_order: tuple[int, ...] | None = None,
) -> tuple[str, str]:
    """Render ``template`` on a GLUE row: returns ``(prompt, target)``.

    ``answer_words`` (index = label id) fill both ``{options_}`` and ``{answer}``, so the options the
    instruction offers are always the words the target uses. ``option_order`` (a permutation of the label
    ids) lists the options in that order instead of FLAN's label order; the target is unchanged.
    """
    values: dict[str, str] = {}
    for ph in template.placeholders | {ANSWER_PLACEHOLDER}:
        if ph == OPTIONS_PLACEHOLDER:
            order = option_order if option_order is not None else range(len(answer_words))
            values[ph] = format_options([answer_words[i] for i in order])
        elif ph == ANSWER_PLACEHOLDER:
            values[ph] = answer_words[int(row["label"])]
        else:
            values[ph] = input_text(tt.task, str(row[tt.field_map.get(ph, ph)]))
    return template.input.format(**values), template.target.format(**values)
