"""FLAN instruction templates (data/flan/flan_glue_templates.json) and their rendering."""

from __future__ import annotations

import string
from dataclasses import dataclass
from pathlib import Path

from coin.data.io import DataError, read_json
from coin.data.tasks import TaskSpec

FLAN_FILE = Path("flan") / "flan_glue_templates.json"


@dataclass(frozen=True)
class Template:
    task: str
    template_id: int
    input: str           # e.g. "Premise: {premise}\n\nHypothesis: {hypothesis}\n\n...{options_}"
    target: str          # "{answer}" for classification templates
    is_classification: bool

    @property
    def placeholders(self) -> set[str]:
        return {name for _, name, _, _ in string.Formatter().parse(self.input) if name}


@dataclass(frozen=True)
class TaskTemplates:
    task: str
    flan_options: tuple[str, ...]            # FLAN answer words, index = HF label id
    field_map: dict[str, str]                # FLAN placeholder -> HF glue field (rte: premise -> sentence1)
    templates: tuple[Template, ...]

    def classification(self) -> list[Template]:
        return [t for t in self.templates if t.is_classification and t.target == "{answer}"]


def load_templates(data_dir: str | Path, spec: TaskSpec) -> TaskTemplates:
    path = Path(data_dir) / FLAN_FILE
    doc = read_json(path)
    try:
        entry = doc["tasks"][spec.flan_key]
    except (KeyError, TypeError):
        raise DataError(f"{path}: no entry tasks.{spec.flan_key} for task {spec.name}") from None
    templates = []
    for i, t in enumerate(entry.get("templates_v1", [])):
        for key in ("template_id", "input", "target", "is_classification"):
            if key not in t:
                raise DataError(f"{path}: tasks.{spec.flan_key}.templates_v1[{i}] lacks field '{key}'")
        templates.append(Template(spec.name, int(t["template_id"]), t["input"], t["target"], bool(t["is_classification"])))
    if not templates:
        raise DataError(f"{path}: tasks.{spec.flan_key}.templates_v1 is empty")
    options = tuple(entry["label_to_answer"][str(i)] for i in range(spec.num_labels))
    return TaskTemplates(spec.name, options, dict(entry.get("flan_field_to_hf_glue_field", {})), tuple(templates))


def format_options(options: tuple[str, ...] | list[str]) -> str:
    """FLAN's ``format_options``: ``'OPTIONS:\\n- ' + '\\n- '.join(options)``."""
    return "OPTIONS:\n- " + "\n- ".join(options)


def input_text(task: str, text: str) -> str:
    """An input field as FLAN puts it into a prompt: FLAN replaces '""' with "'" in QQP questions."""
    return text.replace('""', "'") if task == "qqp" else text


def render(template: Template, tt: TaskTemplates, row: dict, answer_words: tuple[str, ...]) -> tuple[str, str]:
    """Render ``template`` on a GLUE row: returns ``(prompt, target)``.

    ``answer_words`` (index = label id) fill both ``{options_}`` and ``{answer}``, so the options the
    instruction offers are always the words the target uses.
    """
    values: dict[str, str] = {}
    for ph in template.placeholders | {"answer"}:
        if ph == "options_":
            values[ph] = format_options(answer_words)
        elif ph == "answer":
            values[ph] = answer_words[int(row["label"])]
        else:
            values[ph] = input_text(tt.task, str(row[tt.field_map.get(ph, ph)]))
    return template.input.format(**values), template.target.format(**values)
