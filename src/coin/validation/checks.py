"""The gate's check registry and the row-level (semantic) checks.

A check is a named function ``(rows, ctx) -> list[CheckResult]``: one result per input row, in row
order. Every check runs on every row, so a row can fail several checks; a result carries one
:class:`Finding` per problem, with a stable ``code`` (counted in ``summary.json``) and a message that
names the field and what is wrong::

    >>> ctx = CheckContext(max_length_chars=4000, cutoff_len=256, tokenizer=None)
    >>> row = {"original_instruction": "Is it good?", "paraphrase_instruction": "is it GOOD",
    ...        "original_prompt": "Is it good? x", "paraphrase_prompt": "Is it good? y"}
    >>> [r.reason for r in CHECKS["paraphrase_differs"]([row], ctx)]
    ["paraphrase_instruction equals original_instruction up to case, whitespace and punctuation ('is it GOOD' vs 'Is it good?')"]

Checks run in registration order: ``schema`` (Great Expectations, :mod:`coin.validation.schema`,
imported lazily because ``great_expectations`` takes ~4 s to import) first, then the row checks.
"""

from __future__ import annotations

import re
import string
import unicodedata
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from coin.data.prompts import PromptFormat, format_prompt

Row = Mapping[str, Any]


@dataclass(frozen=True)
class Finding:
    code: str      # stable kind of problem, e.g. "same_target"; summary.json counts rows per check.code
    message: str   # names the field and what is wrong, e.g. "negative_target 'yes' equals target 'yes'"


@dataclass(frozen=True)
class CheckResult:
    findings: tuple[Finding, ...] = ()

    @property
    def passed(self) -> bool:
        return not self.findings

    @property
    def reason(self) -> str:
        return "; ".join(f.message for f in self.findings)


@dataclass
class CheckContext:
    max_length_chars: int               # validate.max_length_chars: prompt length bound (schema)
    cutoff_len: int                     # pairs.cutoff_len: max tokens of prompt + response
    tokenizer: Any                      # the backbone tokenizer (token_length)
    docs_dir: Path | None = None        # where the schema check builds its Data Docs site (None = no docs)
    prompt_format: PromptFormat = "train"
    append_eos: bool = True             # count the EOS training appends (the longer, safe case)
    artifacts: dict[str, Any] = field(default_factory=dict)  # what checks hand back (e.g. data_docs index path)


Check = Callable[[Sequence[Row], CheckContext], list[CheckResult]]
CHECKS: dict[str, Check] = {}


def register(name: str) -> Callable[[Check], Check]:
    def deco(fn: Check) -> Check:
        if name in CHECKS:
            raise ValueError(f"check {name!r} is registered twice")
        CHECKS[name] = fn
        return fn

    return deco


# --------------------------------------------------------------------------- helpers

PROMPTS = ("original_prompt", "paraphrase_prompt", "negative_prompt")
TEXT_FIELDS = (
    "original_instruction", "paraphrase_instruction", *PROMPTS, "target", "negative_target",
)


def _short(value: Any, n: int = 60) -> str:
    """``repr`` of a value, text cut to ``n`` characters: ``'Does the follo...'``."""
    text = value if isinstance(value, str) else repr(value)
    return repr(text if len(text) <= n else text[:n] + "...")


def _unusable(row: Row, needs: Mapping[str, type]) -> list[Finding]:
    """Findings for required fields that are missing or of the wrong type (the check cannot run)."""
    out = []
    for name, typ in needs.items():
        value = row.get(name)
        if not isinstance(value, typ) or isinstance(value, bool) and typ is int:
            got = "missing" if value is None else f"a {type(value).__name__}"
            out.append(Finding("unusable", f"cannot check: field '{name}' is {got}, expected {typ.__name__}"))
    return out


RowCheck = Callable[[Row], list[Finding]]


def row_check(name: str, needs: Mapping[str, type]) -> Callable[[RowCheck], RowCheck]:
    """Register a per-row function; rows whose ``needs`` fields are unusable fail with code 'unusable'."""

    def deco(fn: RowCheck) -> RowCheck:
        def run(rows: Sequence[Row], ctx: CheckContext) -> list[CheckResult]:
            return [CheckResult(tuple(_unusable(r, needs) or fn(r))) for r in rows]

        register(name)(run)
        return fn

    return deco


def squash(text: str) -> str:
    """Casefolded NFKC text without whitespace and punctuation: equal squash = 'differs only in form'.

    >>> squash("Is it  GOOD?") == squash("is it good")
    True
    """
    text = unicodedata.normalize("NFKC", text).casefold()
    return "".join(c for c in text if not (c.isspace() or unicodedata.category(c).startswith("P")))


def rendered_forms(task: Any, text: str) -> set[str]:
    """The forms an input text can take in a prompt: as given, or as :func:`coin.data.templates.render`
    puts it (:func:`coin.data.templates.input_text`)."""
    from coin.data.templates import input_text

    return {text, input_text(str(task), text)}


def iter_strings(value: Any, path: str) -> Iterator[tuple[str, str]]:
    """Every string in a row value, with a dotted path (``inputs.sentence``, ``answer_words[1]``)."""
    if isinstance(value, str):
        yield path, value
    elif isinstance(value, Mapping):
        for k, v in value.items():
            yield from iter_strings(k, f"{path} key")
            yield from iter_strings(v, f"{path}.{k}")
    elif isinstance(value, (list, tuple)):
        for i, v in enumerate(value):
            yield from iter_strings(v, f"{path}[{i}]")


_SURROGATES = re.compile("[\ud800-\udfff]")


def replace_surrogates(text: str) -> str:
    """Lone surrogates as U+FFFD (same length): GX and the Rust tokenizers refuse them outright.
    Only rows that text_valid rejects contain them."""
    return _SURROGATES.sub("\ufffd", text)


_BAD_CHARS = re.compile("[\ufffd\ud800-\udfff]")


def bad_char(text: str) -> tuple[int, str] | None:
    """``(index, kind)`` of the first U+FFFD or lone surrogate: text that was not valid UTF-8.

    >>> bad_char("caf\ufffd")
    (3, 'U+FFFD (replacement character)')
    """
    m = _BAD_CHARS.search(text)
    if m is None:
        return None
    c = m.group()
    return m.start(), "U+FFFD (replacement character)" if c == "\ufffd" else f"lone surrogate U+{ord(c):04X}"


# --------------------------------------------------------------------------- checks


@register("schema")
def schema(rows: Sequence[Row], ctx: CheckContext) -> list[CheckResult]:
    from coin.validation.schema import schema_check

    return schema_check(rows, ctx)


@row_check("text_valid", needs={})
def text_valid(row: Row) -> list[Finding]:
    out = []
    for name in TEXT_FIELDS:
        value = row.get(name)
        if value is None:
            out.append(Finding("missing_text", f"field '{name}' is missing"))
        elif isinstance(value, str) and not value.strip():
            out.append(Finding("empty_text", f"field '{name}' is empty or whitespace only ({value!r})"))
    inputs = row.get("inputs")
    if isinstance(inputs, Mapping):
        for k, v in inputs.items():
            if isinstance(v, str) and not v.strip():
                out.append(Finding("empty_text", f"field 'inputs.{k}' is empty or whitespace only ({v!r})"))
    for key, value in row.items():
        for path, text in iter_strings(value, str(key)):
            hit = bad_char(text)
            if hit:
                i, kind = hit
                out.append(Finding("not_utf8", f"field '{path}' has {kind} at char {i}: the text was not valid UTF-8"))
    return out


@row_check("paraphrase_differs", needs={k: str for k in (
    "original_instruction", "paraphrase_instruction", "original_prompt", "paraphrase_prompt")})
def paraphrase_differs(row: Row) -> list[Finding]:
    out = []
    for kind in ("instruction", "prompt"):
        a, b = row[f"original_{kind}"], row[f"paraphrase_{kind}"]
        if a == b:
            out.append(Finding(
                f"copy_{kind}",
                f"paraphrase_{kind} is a verbatim copy of original_{kind}"
                f" (template_a {row.get('template_a')!r}, template_b {row.get('template_b')!r})",
            ))
        elif squash(a) == squash(b):
            out.append(Finding(
                f"form_only_{kind}",
                f"paraphrase_{kind} equals original_{kind} up to case, whitespace and punctuation "
                f"({_short(b, 30)} vs {_short(a, 30)})",
            ))
    return out


def _answer_finding(row: Row, t_field: str, l_field: str) -> list[Finding]:
    words, target, label = row["answer_words"], row[t_field], row.get(l_field)
    if target not in words:
        return [Finding(f"{t_field}_not_in_answers", f"{t_field} {target!r} is not in answer_words {words}")]
    if isinstance(label, int) and not isinstance(label, bool):
        if not 0 <= label < len(words):
            return [Finding(f"{l_field}_out_of_range", f"{l_field} {label} is not an index of answer_words {words}")]
        if words[label] != target:
            return [Finding(
                f"{t_field}_label_mismatch",
                f"{t_field} {target!r} is not the word of {l_field} {label} ({words[label]!r})",
            )]
    return []


@row_check("target_in_answer_set", needs={"answer_words": list, "target": str, "negative_target": str})
def target_in_answer_set(row: Row) -> list[Finding]:
    if not row["answer_words"]:
        return [Finding("no_answers", "field 'answer_words' is empty")]
    return _answer_finding(row, "target", "label") + _answer_finding(row, "negative_target", "negative_label")


@row_check("inputs_present", needs={"inputs": dict, "original_prompt": str, "paraphrase_prompt": str})
def inputs_present(row: Row) -> list[Finding]:
    if not row["inputs"]:
        return [Finding("no_inputs", "field 'inputs' is empty: no input text to check")]
    out = []
    for name, text in row["inputs"].items():
        if not isinstance(text, str):
            out.append(Finding("input_not_text", f"inputs.{name} is a {type(text).__name__}, expected str"))
            continue
        forms = rendered_forms(row.get("task"), text)
        for prompt in ("original_prompt", "paraphrase_prompt"):
            if not any(f in row[prompt] for f in forms):
                out.append(Finding(f"input_missing_{prompt}", f"inputs.{name} ({_short(text)}) does not appear in {prompt}"))
    return out


def _literal_chunks(template: str) -> list[str]:
    """The fixed text of a template around its {placeholders} (stripped, non-empty)."""
    return [lit.strip() for lit, _, _, _ in string.Formatter().parse(template) if lit.strip()]


@row_check("negative_valid", needs={k: str for k in (
    "negative_prompt", "original_prompt", "original_instruction", "example_id", "negative_example_id",
    "target", "negative_target")})
def negative_valid(row: Row) -> list[Finding]:
    out = []
    if row["negative_prompt"] == row["original_prompt"]:
        out.append(Finding("same_prompt", "negative_prompt equals original_prompt"))
    if row["negative_example_id"] == row["example_id"]:
        out.append(Finding("same_example", f"negative_example_id equals example_id ({row['example_id']!r})"))
    if row["negative_target"] == row["target"]:
        out.append(Finding("same_target", f"negative_target equals target ({row['target']!r})"))
    try:
        chunks = _literal_chunks(row["original_instruction"])
    except ValueError:  # unbalanced braces: not a template, nothing to compare
        chunks = []
    missing = [c for c in chunks if c not in row["negative_prompt"]]
    if missing:
        out.append(Finding(
            "other_instruction",
            f"negative_prompt does not use original_instruction (its text {_short(missing[0], 40)} is absent)",
        ))
    return out


# --------------------------------------------------------------------------- token length (batched)


def _lengths(tokenizer: Any, texts: list[str]) -> dict[str, int]:
    """Token count of each distinct text, tokenised in one batch call (no special tokens)."""
    uniq = sorted(set(texts))
    ids = tokenizer(uniq, add_special_tokens=False)["input_ids"] if uniq else []
    return {t: len(i) for t, i in zip(uniq, ids)}


def token_lengths(
    tokenizer: Any, prompts: Sequence[str], responses: Sequence[str], *, fmt: PromptFormat = "train",
    append_eos: bool = True,
) -> list[int]:
    """``len(encode(tokenizer, p, r, fmt=fmt, append_eos=append_eos).input_ids)`` for each pair, batched."""
    p_len = _lengths(tokenizer, [format_prompt(p, fmt) for p in prompts])
    r_len = _lengths(tokenizer, [r for r in responses if r])
    extra = (tokenizer.bos_token_id is not None) + (append_eos and tokenizer.eos_token_id is not None)
    return [p_len[format_prompt(p, fmt)] + (r_len[r] if r else 0) + extra for p, r in zip(prompts, responses)]


# which response goes with which prompt: the negative is scored against its own target
_SEQUENCES = (("original_prompt", "target"), ("paraphrase_prompt", "target"), ("negative_prompt", "negative_target"))
_TOKEN_NEEDS = {k: str for k in ("original_prompt", "paraphrase_prompt", "negative_prompt", "target", "negative_target")}


@register("token_length")
def token_length(rows: Sequence[Row], ctx: CheckContext) -> list[CheckResult]:
    findings: list[list[Finding]] = [_unusable(r, _TOKEN_NEEDS) for r in rows]
    usable = [i for i, f in enumerate(findings) if not f]
    for prompt_f, target_f in _SEQUENCES:
        prompts = [replace_surrogates(rows[i][prompt_f]) for i in usable]
        lengths = token_lengths(
            ctx.tokenizer, prompts, [replace_surrogates(rows[i][target_f]) for i in usable],
            fmt=ctx.prompt_format, append_eos=ctx.append_eos,
        )
        for i, n in zip(usable, lengths):
            if n > ctx.cutoff_len:
                findings[i].append(Finding(
                    f"{prompt_f}_too_long",
                    f"{prompt_f} + {target_f} is {n} tokens, over pairs.cutoff_len = {ctx.cutoff_len}",
                ))
    return [CheckResult(tuple(f)) for f in findings]
