"""GLUE task specifications: input fields, label words, evaluation content rendering.

Label ids follow Hugging Face ``glue`` (data/README.md). The *label words* are the words the
PromptBench/CoIN evaluation instructions ask for (``entailment``/``not_entailment`` ...), the
*FLAN options* are FLAN's own answer words (``yes``/``no`` ...); ``pairs.answers`` picks one.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class TaskSpec:
    name: str
    fields: tuple[str, ...]          # HF glue text fields, in rendering order
    label_words: tuple[str, ...]     # index = HF label id; the evaluation's answer words
    category: str                    # sentiment | grammar | paraphrase | nli
    flan_key: str                    # key in flan/flan_glue_templates.json
    content_prefixes: tuple[str, ...]  # evaluation content: "Premise: ... Hypothesis: ..." ("" = raw)

    @property
    def num_labels(self) -> int:
        return len(self.label_words)

    def row_problem(self, row: dict) -> str | None:
        """What is wrong with a GLUE row's values (an empty input field, a label that is not one of the task's ids),
        or None; train and validation files are read with it, and the reader puts ``<file>:<line>`` in front.
        An empty input is refused in both: in a validation file it is the content-free calibration probe, in a train
        file it would be drawn as other examples' hard negative, and the gate would reject those rows for it."""
        for f in self.fields:
            if not row[f].strip():
                return f"field '{f}' is empty or whitespace only ({row[f]!r}); fix or remove the row"
        if 0 <= row["label"] < self.num_labels:
            return None
        return (f"field 'label' = {row['label']} is not a {self.name} label id (0..{self.num_labels - 1}); "
                "fix the row")

    def render_content(self, row: dict) -> str:
        """The input part of an evaluation prompt, as CoIN's PromptBench builds it."""
        if self.content_prefixes == ("",):
            return str(row[self.fields[0]])
        return " ".join(f"{p} {row[f]}" for p, f in zip(self.content_prefixes, self.fields, strict=True))


TASKS: dict[str, TaskSpec] = {
    t.name: t
    for t in [
        TaskSpec("sst2", ("sentence",), ("negative", "positive"), "sentiment", "sst2", ("",)),
        TaskSpec("cola", ("sentence",), ("unacceptable", "acceptable"), "grammar", "cola", ("",)),
        TaskSpec("mrpc", ("sentence1", "sentence2"), ("not_equivalent", "equivalent"), "paraphrase", "glue_mrpc",
                 ("Sentence 1:", "Sentence 2:")),
        TaskSpec("qqp", ("question1", "question2"), ("not_equivalent", "equivalent"), "paraphrase", "glue_qqp",
                 ("Question 1:", "Question 2:")),
        TaskSpec("qnli", ("question", "sentence"), ("entailment", "not_entailment"), "nli", "qnli",
                 ("Question:", "Context:")),
        TaskSpec("rte", ("sentence1", "sentence2"), ("entailment", "not_entailment"), "nli", "rte",
                 ("Sentence 1:", "Sentence 2:")),
        TaskSpec("wnli", ("sentence1", "sentence2"), ("not_entailment", "entailment"), "nli", "wnli",
                 ("Sentence 1:", "Sentence 2:")),
        TaskSpec("mnli", ("premise", "hypothesis"), ("entailment", "neutral", "contradiction"), "nli", "mnli",
                 ("Premise:", "Hypothesis:")),
    ]
}


def get_task(name: str) -> TaskSpec:
    try:
        return TASKS[name]
    except KeyError:
        raise KeyError(f"unknown task {name!r}; known tasks: {', '.join(TASKS)}") from None


def train_file(data_dir: str | Path, task: str) -> Path:
    return Path(data_dir) / "glue" / f"{task}.train.jsonl"


def validation_files(data_dir: str | Path, task: str) -> tuple[list[Path], str | None]:
    """Validation split files of a task and a caveat to print in reports (None = comparable to the paper).

    Returns ``([], reason)`` when the split is missing offline (qqp).
    """
    data_dir = Path(data_dir)
    real = data_dir / "glue" / f"{task}.validation.jsonl"
    if real.exists():
        return [real], None
    if task == "mnli":
        fb = sorted((data_dir / "glue_fallback").glob("mnli.validation_*.jsonl"))
        if fb:
            return fb, ("fallback sample (TextFooler's PTB-tokenised 2x1000 MNLI dev rows), "
                        "not comparable to the paper")
    read = f"glue/{task}.validation.jsonl" + (" or glue_fallback/mnli.validation_*.jsonl" if task == "mnli" else "")
    return [], (f"no validation split for {task} ({read} is not in the data directory; see data/README.md, "
                "'What is missing')")
