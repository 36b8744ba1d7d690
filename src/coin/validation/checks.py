"""The row-level (semantic) checks, registered in the gate's check registry (:mod:`coin.validation.types`).

A check is a named function ``(rows, ctx) -> list[CheckResult]``: one result per input row, in row
order. Every check runs on every row, so a row can fail several checks; a result carries one
:class:`Finding` per problem, with a stable ``code`` (counted in ``summary.json``) and a message that
names the field and what is wrong::

    >>> ctx = CheckContext(max_length_chars=4000, cutoff_len=256, tokenizer=None)
    >>> row = {"original_instruction": "Is it good?", "paraphrase_instruction": "is it GOOD",
    ...        "original_prompt": "Is it good? x", "paraphrase_prompt": "Is it good? y"}
    >>> [r.reason for r in CHECKS["paraphrase_differs"]([row], ctx)]  # doctest: +NORMALIZE_WHITESPACE
    ["paraphrase_instruction equals original_instruction up to case, whitespace and punctuation
      ('is it GOOD' vs 'Is it good?')"]

Checks run in registration order: ``schema`` (Great Expectations, :mod:`coin.validation.schema`,
imported lazily because ``great_expectations`` takes ~4 s to import) first, then:

====================  ==========================================================================
text_valid            required text present, not empty, valid UTF-8 (no U+FFFD / lone surrogates)
paraphrase_differs    paraphrase instruction and prompt differ from the original beyond case/space/punct.,
                      and the paraphrase instruction has words of its own
semantic_similarity   MiniLM cosine of the two instructions within [validate.min_similarity, max_similarity]
target_in_answer_set  target / negative_target are the answer words of label / negative_label
inputs_present        every input text appears in both prompts
option_words          option / label words the original instruction names survive in the paraphrase
negative_valid        negative: the original's instruction, another example and input, another target
instruction_leakage   no evaluation instruction in, or near-duplicate of, a training instruction
example_leakage       no evaluation example in a row's inputs, its negative's, or its instructions
token_length          prompt + response tokens within pairs.cutoff_len
====================  ==========================================================================

``semantic_similarity`` and ``instruction_leakage`` need ``CheckContext.embedder`` (sentence
embeddings, :mod:`coin.validation.embeddings`); the leak checks need ``CheckContext.eval_sources``
(:mod:`coin.validation.leakage`). Without them they raise instead of passing silently.
"""

from __future__ import annotations

import itertools
import re
import string
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import numpy as np

from coin.data.pairs import same_form
from coin.data.prompts import PromptFormat, format_prompt, response_lengths
from coin.validation.embeddings import instruction_text
from coin.validation.leakage import ExampleIndex, InstructionHit, example_leaks, max_text_ratio, normalise, text_ratios
from coin.validation.text import apart, replace_surrogates, squash
from coin.validation.types import CHECKS, CheckContext, CheckResult, Finding, Row, register  # noqa: F401 (CHECKS: doctest)

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
    for field in ("inputs", "negative_inputs"):
        inputs = row.get(field)
        if isinstance(inputs, Mapping):
            for k, v in inputs.items():
                if isinstance(v, str) and not v.strip():
                    out.append(Finding("empty_text", f"field '{field}.{k}' is empty or whitespace only ({v!r})"))
    for key, value in row.items():
        for path, text in iter_strings(value, str(key)):
            hit = bad_char(text)
            if hit:
                i, kind = hit
                out.append(Finding("not_utf8", f"field '{path}' has {kind} at char {i}: a character was lost when "
                                                   "the text was decoded (here or upstream)"))
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
    if not re.search(r"\w", instruction_text(row["paraphrase_instruction"], fields=False)):
        # "{sentence}\n{options_}": the similarity check reads its placeholders' names as words ("sentence"), and
        # passed it as a paraphrase of an instruction that speaks of sentences
        out.append(Finding("no_instruction", f"paraphrase_instruction has no words beside its placeholders "
                                             f"({_short(row['paraphrase_instruction'], 30)}): it instructs nothing"))
    return out


def _instr_needs(row: Row) -> list[Finding]:
    return _unusable(row, {"original_instruction": str, "paraphrase_instruction": str})


def _describe(values: list[float]) -> dict[str, Any]:
    if not values:
        return {"n": 0}
    a = np.asarray(values, dtype=np.float64)
    q = np.percentile(a, [0, 5, 50, 95, 100])
    return {"n": len(values),
            **{k: round(float(v), 4) for k, v in zip(("min", "p05", "median", "p95", "max"), q, strict=True)}}


@register("semantic_similarity")
def semantic_similarity(rows: Sequence[Row], ctx: CheckContext) -> list[CheckResult]:
    """MiniLM cosine of the two instructions (:func:`~coin.validation.embeddings.instruction_text`, no
    input text, no options) within ``[validate.min_similarity, validate.max_similarity]``."""
    emb = ctx.need_embedder("semantic_similarity")
    lo, hi = ctx.cfg.min_similarity, ctx.cfg.max_similarity
    findings = [_instr_needs(r) for r in rows]
    usable = [i for i, f in enumerate(findings) if not f]
    a = [instruction_text(replace_surrogates(rows[i]["original_instruction"])) for i in usable]
    b = [instruction_text(replace_surrogates(rows[i]["paraphrase_instruction"])) for i in usable]
    cos = emb.cosine(a, b)
    per_row: list[float | None] = [None] * len(rows)
    for i, c in zip(usable, cos.tolist(), strict=True):
        per_row[i] = c
        if c < lo:
            findings[i].append(Finding(
                "meaning_drift",
                f"MiniLM cosine of original_instruction and paraphrase_instruction is {apart(c, lo)}, below "
                f"validate.min_similarity = {lo} (the paraphrase may not mean the same)",
            ))
        elif c > hi:
            findings[i].append(Finding(
                "near_copy",
                f"MiniLM cosine of original_instruction and paraphrase_instruction is {apart(c, hi)}, above "
                f"validate.max_similarity = {hi} (a near-copy, not a paraphrase)",
            ))
    ctx.artifacts["similarity"] = per_row
    values = [c for c in per_row if c is not None]
    ctx.stats["semantic_similarity"] = {
        **_describe(values), "min_similarity": lo, "max_similarity": hi,
        "below_min": sum(c < lo for c in values), "above_max": sum(c > hi for c in values),
    }
    return [CheckResult(tuple(f)) for f in findings]


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
    return (_task_answers(row) or _answer_finding(row, "target", "label")
            + _answer_finding(row, "negative_target", "negative_label"))


def _task_answers(row: Row) -> list[Finding]:
    """The answer words fit the row's task: one per label (training counts each task's labels by its own number:
    an mnli row relabelled rte crashed it after the last step), and the task's label words in label order when it
    uses them (reordered, every label would name the other word). FLAN's option words cannot be checked here."""
    from coin.data.tasks import TASKS

    task, words = row.get("task"), list(row["answer_words"])
    if not all(isinstance(w, str) for w in words):  # a number or null among them: compared with text below
        return [Finding("answer_not_text", f"answer_words {words!r} holds a word that is not text")]
    spec = TASKS.get(task) if isinstance(task, str) else None
    if spec is None:
        return []  # an unknown task (or one that is not text) is the schema's finding
    labels = list(spec.label_words)
    if len(words) != len(labels):
        return [Finding("answers_not_of_task", f"answer_words {words} has {len(words)} words, but task "
                                               f"{row['task']!r} has {len(labels)} labels ({labels})")]
    if sorted(words) == sorted(labels) and words != labels:
        return [Finding("answers_out_of_order", f"answer_words {words} are {row['task']}'s label words in another "
                                                f"order; word i must name label i: {labels}")]
    return []


@row_check("inputs_present", needs={"inputs": dict, "original_prompt": str, "paraphrase_prompt": str})
def inputs_present(row: Row) -> list[Finding]:
    if not row["inputs"]:
        return [Finding("no_inputs", "field 'inputs' is empty: no input text to check")]
    out = []
    for name, text in row["inputs"].items():
        if not isinstance(text, str):
            out.append(Finding("input_not_text", f"inputs.{name} is a {type(text).__name__}, expected str"))
            continue
        for prompt in ("original_prompt", "paraphrase_prompt"):
            if not _appears(row, prompt, text):
                out.append(Finding(f"input_missing_{prompt}",
                                   f"inputs.{name} ({_short(text)}) does not appear in {prompt}"))
    # the hard negative's inputs are in its prompt (the leak check reads negative_inputs; training reads the prompt)
    neg_inputs, neg_prompt = row.get("negative_inputs"), row.get("negative_prompt")
    if isinstance(neg_inputs, Mapping) and isinstance(neg_prompt, str):
        for name, text in neg_inputs.items():
            if isinstance(text, str) and text.strip() and not _appears(row, "negative_prompt", text):
                out.append(Finding("input_missing_negative_prompt",
                                   f"negative_inputs.{name} ({_short(text)}) does not appear in negative_prompt"))
    # each prompt is built from its own instruction (the similarity and leak checks read the instructions; training
    # reads the prompts): the instruction's fixed text must be in it
    for prompt, instruction in (("original_prompt", "original_instruction"),
                                ("paraphrase_prompt", "paraphrase_instruction")):
        if isinstance(row.get(instruction), str):
            out += _uses_instruction(row, prompt, instruction)
    return out


_OPTIONS_BLOCK = re.compile(r"OPTIONS:[ \t]*\n((?:[ \t]*- [^\n]*(?:\n|$))+)")


def option_block(text: str) -> list[str]:
    """The options of FLAN ``OPTIONS:`` blocks in ``text``, in order.

    >>> option_block("Is it good?\\nOPTIONS:\\n- yes\\n- no")
    ['yes', 'no']
    """
    return [ln.strip()[2:].strip() for m in _OPTIONS_BLOCK.finditer(text) for ln in m.group(1).splitlines()
            if ln.strip()]


def _has_word(text: str, word: str) -> bool:
    return re.search(r"(?<![\w])" + re.escape(word) + r"(?![\w])", text, re.IGNORECASE) is not None


def instruction_view(prompt: str, inputs: Mapping[str, Any], task: Any) -> str:
    """A prompt without its input texts: the instruction as rendered (options included)."""
    for text in sorted((t for t in inputs.values() if isinstance(t, str) and t), key=len, reverse=True):
        for form in rendered_forms(task, text):
            prompt = prompt.replace(form, " \n ")
    return prompt


def named_options(view: str, vocabulary: Sequence[str]) -> list[str]:
    """Options and label words an instruction names: its ``OPTIONS:`` block, and any vocabulary word
    (the row's answer words, the task's label words) it mentions as a whole word."""
    named = list(dict.fromkeys(option_block(view)))
    named += [w for w in vocabulary if w not in named and _has_word(view, w)]
    return named


def _label_vocabulary(row: Row) -> list[str]:
    from coin.data.tasks import TASKS

    vocab = [w for w in row["answer_words"] if isinstance(w, str) and w.strip()]
    spec = TASKS.get(row.get("task")) if isinstance(row.get("task"), str) else None
    if spec is not None:
        vocab += [w for w in spec.label_words if w not in vocab]
    return vocab


@row_check("option_words",
           needs={"original_prompt": str, "paraphrase_prompt": str, "inputs": dict, "answer_words": list})
def option_words(row: Row) -> list[Finding]:
    """Every option / label word the original instruction names is named by the paraphrase too, and the
    paraphrase offers no option the original does not."""
    vocab = _label_vocabulary(row)
    orig = instruction_view(row["original_prompt"], row["inputs"], row.get("task"))
    para = instruction_view(row["paraphrase_prompt"], row["inputs"], row.get("task"))
    named = named_options(orig, vocab)
    out = []
    missing = [w for w in named if not _has_word(para, w)]
    if missing:
        out.append(Finding(
            "option_word_missing",
            f"option/label word(s) {', '.join(_short(w, 40) for w in missing)} named in original_prompt's instruction "
            f"are missing from paraphrase_prompt's instruction",
        ))
    added = [w for w in option_block(para) if w not in named and not _has_word(orig, w)]
    if added:
        out.append(Finding(
            "option_word_added",
            f"paraphrase_prompt offers option(s) {', '.join(_short(w, 40) for w in added)} "
            "that original_prompt does not",
        ))
    return out


def _uses_instruction(row: Row, prompt: str, instruction: str, inputs: str = "inputs") -> list[Finding]:
    """Is ``row[prompt]`` ``row[instruction]`` (a template) filled with ``row[inputs]`` and the row's options?

    An ``other_instruction`` finding when the instruction's fixed text is not all in the prompt (the prompt was not
    built from it); a ``not_rendered`` finding when it is, but the prompt has text the filled template does not
    (before, after or inside an input: training would read it, the checks would not)."""
    try:
        parsed = list(string.Formatter().parse(row[instruction]))
    except ValueError:  # unbalanced braces: not a template, nothing to compare
        return []
    missing = [c for c in (lit.strip() for lit, _, _, _ in parsed) if c and c not in row[prompt]]
    if missing:
        return [Finding("other_instruction",
                        f"{prompt} does not use {instruction} (its text {_short(missing[0], 40)} is absent)")]
    pieces = _template_pieces(row, parsed, inputs)
    if pieces is None or _fills(row[prompt], 0, pieces) or _input_absent(row, prompt, inputs):
        return []  # (an input missing from the prompt is inputs_present's finding: not reported twice)
    return [Finding("not_rendered", f"{prompt} is not {instruction} filled with the row's {inputs} and options: "
                                    "it has text the instruction does not (before, after or inside an input)")]


def _template_pieces(row: Row, parsed: list[tuple[str, Any, Any, Any]], inputs: str) -> list[tuple[str, ...]] | None:
    """The template as alternating fixed texts ``(literal,)`` and fields ``(form, form, ...)``, each field's forms the
    texts :func:`coin.data.templates.render` can put there: one of the row's input texts (in a rendered form), or for
    ``{options_}`` an ``OPTIONS:`` block of the row's answer words in any order. None when that cannot be said (a
    format spec, a field with no text to fill it)."""
    from coin.data.templates import OPTIONS_PLACEHOLDER, format_options

    texts = row.get(inputs)
    texts = {k: v for k, v in texts.items() if isinstance(v, str)} if isinstance(texts, Mapping) else {}
    answer_words = row.get("answer_words")  # a number or a bool there is the schema check's finding, not a crash
    words = [w for w in answer_words if isinstance(w, str)] if isinstance(answer_words, list) else []
    pieces: list[tuple[str, ...]] = []
    for literal, field, spec, conversion in parsed:
        pieces.append((literal,))
        if field is None:
            continue
        if spec or conversion:
            return None
        if field == OPTIONS_PLACEHOLDER:
            if not words or len(words) > 6:
                return None
            forms = {format_options(p) for p in itertools.permutations(words)}
        else:
            sources = [texts[field]] if field in texts else list(texts.values())
            forms = {f for t in sources for f in rendered_forms(row.get("task"), t)}
        if not forms:
            return None
        pieces.append(tuple(forms))
    return pieces


def _appears(row: Row, prompt: str, text: str) -> bool:
    """Is input ``text`` in ``row[prompt]``, in one of the forms a prompt can hold it?"""
    return any(f in row[prompt] for f in rendered_forms(row.get("task"), text))


def _input_absent(row: Row, prompt: str, inputs: str) -> bool:
    texts = row.get(inputs)
    return isinstance(texts, Mapping) and any(isinstance(t, str) and not _appears(row, prompt, t)
                                              for t in texts.values())


def _fills(text: str, pos: int, pieces: list[tuple[str, ...]]) -> bool:
    """Does ``text[pos:]`` read as ``pieces`` exactly (each piece one of its alternatives, in order)?"""
    if not pieces:
        return pos == len(text)
    return any(text.startswith(alt, pos) and _fills(text, pos + len(alt), pieces[1:]) for alt in pieces[0])


@row_check("negative_valid", needs={k: str for k in (
    "negative_prompt", "original_prompt", "original_instruction", "example_id", "negative_example_id",
    "target", "negative_target")})
def negative_valid(row: Row) -> list[Finding]:
    out = []
    if same_form(row["negative_prompt"]) == same_form(row["original_prompt"]):  # Unicode form, spaces aside
        out.append(Finding("same_prompt", "negative_prompt equals original_prompt"
                           + ("" if row["negative_prompt"] == row["original_prompt"] else
                              " up to Unicode form and whitespace (the model reads the two alike)")))
    mine, theirs = row.get("inputs"), row.get("negative_inputs")
    if isinstance(mine, Mapping) and isinstance(theirs, Mapping) and mine and mine.keys() == theirs.keys() and all(
            isinstance(mine[k], str) and isinstance(theirs[k], str) and same_form(mine[k]) == same_form(theirs[k])
            for k in mine):  # another prompt (options in another order) around the same input: not another example
        out.append(Finding("same_input", "negative_inputs equal inputs (up to Unicode form and whitespace): the "
                                         "hard negative must be another input"))
    if row["negative_example_id"] == row["example_id"]:
        out.append(Finding("same_example", f"negative_example_id equals example_id ({row['example_id']!r})"))
    if row["negative_target"] == row["target"]:
        out.append(Finding("same_target", f"negative_target equals target ({row['target']!r})"))
    return out + _uses_instruction(row, "negative_prompt", "original_instruction", "negative_inputs")


# --------------------------------------------------------------------------- leakage

_PROMPT_FIELDS = ("original_prompt", "paraphrase_prompt", "negative_prompt")
_LEAK_NEEDS = {k: str for k in ("original_instruction", "paraphrase_instruction", *_PROMPT_FIELDS)}


def _eval_ref(hit: InstructionHit) -> str:
    return f"evaluation instruction {hit.instruction.ref} ({_short(hit.instruction.text, 50)})"


@register("instruction_leakage")
def instruction_leakage(rows: Sequence[Row], ctx: CheckContext) -> list[CheckResult]:
    """No evaluation instruction inside a prompt (normalised text) and no training instruction that is a
    near-duplicate of one (normalised-text ratio >= ``validate.leak_max_text_ratio`` or MiniLM cosine
    >= ``validate.leak_max_similarity``); instructions compared without their placeholders."""
    src = ctx.need_eval_sources("instruction_leakage")
    emb = ctx.need_embedder("instruction_leakage")
    cfg = ctx.cfg
    findings = [_unusable(r, _LEAK_NEEDS) for r in rows]
    usable = [i for i, f in enumerate(findings) if not f]
    evals = src.instructions
    eval_texts = [e.text for e in evals]
    eval_norm = [normalise(t) for t in eval_texts]

    # near-duplicates, computed once per distinct training instruction
    train = sorted({instruction_text(replace_surrogates(rows[i][f]), fields=False)
                    for i in usable for f in ("original_instruction", "paraphrase_instruction")})
    col = {t: j for j, t in enumerate(train)}
    near: dict[int, list[InstructionHit]] = {}
    for (e, j), r in text_ratios(eval_texts, train, cfg.leak_max_text_ratio).items():
        near.setdefault(j, []).append(InstructionHit(evals[e], f"normalised-text ratio {r:.3f} >= "
                                                     f"validate.leak_max_text_ratio = {cfg.leak_max_text_ratio}"))
    sims = emb.cosine_matrix(eval_texts, train)
    for e, j in zip(*np.nonzero(sims >= cfg.leak_max_similarity), strict=True):
        near.setdefault(int(j), []).append(InstructionHit(evals[int(e)], f"MiniLM cosine {sims[e, j]:.3f} >= "
                                                          f"validate.leak_max_similarity = {cfg.leak_max_similarity}"))

    for i in usable:
        row = rows[i]
        for f in ("original_instruction", "paraphrase_instruction"):
            hits = near.get(col[instruction_text(replace_surrogates(row[f]), fields=False)], [])
            if hits:
                more = f" (and {len(hits) - 1} more)" if len(hits) > 1 else ""
                findings[i].append(Finding("near_duplicate", f"{f} is a near-duplicate of {_eval_ref(hits[0])}: "
                                                             f"{hits[0].how}{more}"))
        for f in _PROMPT_FIELDS:
            text = normalise(row[f])
            inside = [e for e, n in zip(evals, eval_norm, strict=True) if len(n) >= cfg.leak_min_chars and n in text]
            if inside:
                more = f" (and {len(inside) - 1} more)" if len(inside) > 1 else ""
                findings[i].append(Finding(
                    "contained",
                    f"{f} contains evaluation instruction {inside[0].ref} ({_short(inside[0].text, 50)}){more}"))
    ctx.stats["instruction_leakage"] = {
        "eval_instructions": len(evals), "training_instructions": len(train),
        "max_cosine": round(float(sims.max()), 4) if sims.size else None,
        "max_text_ratio": round(max_text_ratio(eval_texts, train), 4) if train else None,
        "leak_max_similarity": cfg.leak_max_similarity, "leak_max_text_ratio": cfg.leak_max_text_ratio,
    }
    return [CheckResult(tuple(f)) for f in findings]


@register("example_leakage")
def example_leakage(rows: Sequence[Row], ctx: CheckContext) -> list[CheckResult]:
    """No evaluation example (every field of a validation row of an evaluation task) in a row's inputs, nor in
    its hard negative's (``negative_inputs``: coin contrasts against the negative's prompt, and coin_neg trains on
    its answer), nor in the words of either instruction (an example written into an instruction as a worked case
    is in every prompt built from it). Each example is matched within one of these, never half in each."""
    src = ctx.need_eval_sources("example_leakage")
    sources = {"inputs": dict, "negative_inputs": dict, "original_instruction": str, "paraphrase_instruction": str}
    findings = [_unusable(r, sources) for r in rows]
    usable = [(i, c) for i, f in enumerate(findings) if not f for c in sources]  # one index row per (row, column)

    def texts(value: Any) -> list[str]:
        if isinstance(value, str):  # an instruction: its words, placeholders dropped
            return [instruction_text(replace_surrogates(value), fields=False)]
        return [replace_surrogates(v) for v in value.values() if isinstance(v, str)]

    index = ExampleIndex([texts(rows[i][c]) for i, c in usable], ctx.cfg.leak_min_chars)
    leaks, partial = example_leaks(index, src.examples)
    leaking: set[int] = set()
    for k, exs in leaks.items():
        i, column = usable[k]
        ex = exs[0]
        fields = ", ".join(f"{f} {_short(t, 40)}" for f, t in ex.texts)
        more = f" (and {len(exs) - 1} more)" if len(exs) > 1 else ""
        whose = {"inputs": "inputs contain", "negative_inputs": "the hard negative's inputs (negative_inputs) "
                 "contain"}.get(column, f"{column} contains")
        findings[i].append(Finding(
            "eval_example", f"{whose} evaluation example {ex.example_id} of {ex.task} ({fields}){more}"))
        leaking.add(i)
    ctx.stats["example_leakage"] = {
        "eval_examples": len(src.examples), "eval_tasks": src.example_tasks, "rows_leaking": len(leaking),
        "rows_leaking_by_negative": len({usable[k][0] for k in leaks if usable[k][1] == "negative_inputs"}),
        "partial_example_matches": partial, "leak_min_chars": ctx.cfg.leak_min_chars, "notes": src.notes,
    }
    return [CheckResult(tuple(f)) for f in findings]


# --------------------------------------------------------------------------- token length (batched)


def _lengths(tokenizer: Any, texts: list[str]) -> dict[str, int]:
    """Token count of each distinct text, tokenised in one batch call (no special tokens)."""
    uniq = sorted(set(texts))
    ids = tokenizer(uniq, add_special_tokens=False)["input_ids"] if uniq else []
    return {t: len(i) for t, i in zip(uniq, ids, strict=True)}


def token_lengths(
    tokenizer: Any, prompts: Sequence[str], responses: Sequence[str], *, fmt: PromptFormat = "train",
    append_eos: bool = True,
) -> list[int]:
    """``len(encode(tokenizer, p, r, fmt=fmt, append_eos=append_eos).input_ids)`` for each pair, batched."""
    p_len = _lengths(tokenizer, [format_prompt(p, fmt) for p in prompts])
    r_len = response_lengths(tokenizer, list(responses), fmt)  # as encode tokenises them, after the marker
    extra = (tokenizer.bos_token_id is not None) + (append_eos and tokenizer.eos_token_id is not None)
    return [p_len[format_prompt(p, fmt)] + (r_len[r] if r else 0) + extra
            for p, r in zip(prompts, responses, strict=True)]


# which response goes with which prompt: the negative is scored against its own target
_SEQUENCES = (("original_prompt", "target"), ("paraphrase_prompt", "target"), ("negative_prompt", "negative_target"))
_TOKEN_NEEDS = {k: str for k in ("original_prompt", "paraphrase_prompt", "negative_prompt", "target",
                                  "negative_target")}


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
        for i, n in zip(usable, lengths, strict=True):
            if n > ctx.cutoff_len:
                findings[i].append(Finding(
                    f"{prompt_f}_too_long",
                    f"{prompt_f} + {target_f} is {n} tokens, over pairs.cutoff_len = {ctx.cutoff_len}",
                ))
    return [CheckResult(tuple(f)) for f in findings]
