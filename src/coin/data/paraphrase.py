"""Paraphrase sources: where the instruction B of an (original A, paraphrase B) pair comes from.

A source is anything with a ``name`` and ``candidates(original, pool, protected)`` returning the
paraphrase instructions it offers for template ``original`` (never ``original`` itself), in a fixed
order. ``pairs.paraphrase_source`` picks them:

- ``flan``  :class:`FlanTemplates` -- the task's other FLAN templates (the CoIN set-up);
- ``rules`` :class:`RuleRewording` -- deterministic rewordings of ``original`` itself (synonym and
  word-order edits), so that a task with a single usable template still gets pairs;
- ``both``  the union, FLAN templates first.

Every paraphrase a source makes is a :class:`~coin.data.templates.Template` whose ``source`` names
the source; the pair row carries it (``paraphrase_source``) and the validation gate checks generated
paraphrases exactly like FLAN ones.

A rewording never touches a ``{placeholder}`` or a *protected* word (the task's answer / label words),
and never introduces one::

    >>> t = Template("sst2", 4, "Is the sentiment of the following sentence positive or negative?"
    ...              "\\n{sentence}\\n{options_}", "{answer}", True)
    >>> for v in RuleRewording().candidates(t, [t], {"positive", "negative"}):
    ...     print(v.key, repr(v.input))
    4r1 '{sentence}\\n\\nIs the sentiment of the preceding statement positive or negative?\\n{options_}'
"""

from __future__ import annotations

import re
import string
from collections.abc import Collection, Sequence
from dataclasses import replace
from typing import Literal, Protocol

from coin.data.templates import OPTIONS_PLACEHOLDER, Template

SourceName = Literal["flan", "rules", "both"]


class ParaphraseSource(Protocol):
    """Offers paraphrase instructions for an original template (deterministic, no randomness)."""

    name: str

    def candidates(self, original: Template, pool: Sequence[Template], protected: Collection[str]) -> list[Template]:
        """Paraphrases of ``original``; ``pool`` = the task's selected templates, ``protected`` = words to keep."""
        ...


class FlanTemplates:
    """The task's other FLAN templates, in pool order."""

    name = "flan"

    def candidates(self, original: Template, pool: Sequence[Template], protected: Collection[str]) -> list[Template]:
        return [t for t in pool if t.template_id != original.template_id]


# --------------------------------------------------------------------------- rule-based rewording

# Phrase and word substitutions that keep an instruction's meaning, applied together in one pass
# (no cascades), whole words only, case of the first letter kept. Longer phrases win over words.
SYNONYMS: dict[str, str] = {
    "based on the paragraph above": "given the paragraph above",
    "based on that paragraph": "given that paragraph",
    "can we conclude": "is it possible to conclude",
    "is it possible to conclude": "can we conclude",
    "is it possible to draw": "can we draw",
    "can we draw": "is it possible to draw",
    "can we infer": "is it possible to infer",
    "have the same meaning": "mean the same thing",
    "mean the same thing": "have the same meaning",
    "mean the same": "have the same meaning",
    "saying the same thing": "expressing the same idea",
    "asking the same thing": "asking for the same thing",
    "conveying the same meaning": "expressing the same meaning",
    "inquiring about the same information": "asking about the same information",
    "please tell me if": "tell me whether",
    "would you say that": "would you agree that",
    "does it follow that": "does it mean that",
    "a good answer": "a suitable answer",
    "a valid answer": "a correct answer",
    "the correct answer": "the right answer",
    "in a satisfactory fashion": "satisfactorily",
    "by the strictest standards": "by the strictest criteria",
    "movie": "film",
    "sentence": "statement",
    "sentences": "statements",
    "phrase": "expression",
    "linguist": "language expert",
    "linguistically": "grammatically",
    "determine": "decide",
    "paragraph": "passage",
    "text": "passage",
    "entailed": "implied",
    "entail": "imply",
    "entails": "implies",
    "perceived": "seen",
    "considered": "deemed",
    "paraphrases": "rewordings",
    "correctly": "properly",
    "an accurate": "a correct",
}

# When the question moves to the other side of the input, words pointing at the input turn round.
DEIXIS: dict[str, str] = {
    "following": "preceding", "preceding": "following", "next": "previous", "previous": "next",
    "above": "below", "below": "above",
}


def _rebuild(parts: list[tuple[str, str | None, str | None, str | None]]) -> str:
    """Inverse of ``string.Formatter().parse``: literal text (braces re-escaped) and fields."""
    out = []
    for lit, name, spec, conv in parts:
        out.append(lit.replace("{", "{{").replace("}", "}}"))
        if name is not None:
            out.append("{" + name + (f"!{conv}" if conv else "") + (f":{spec}" if spec else "") + "}")
    return "".join(out)


def _match_case(src: str, repl: str) -> str:
    return repl[:1].upper() + repl[1:] if src[:1].isupper() else repl


def _word_re(words: Collection[str]) -> re.Pattern[str]:
    alts = sorted(words, key=len, reverse=True)
    return re.compile(r"(?<![\w{])(" + "|".join(re.escape(w) for w in alts) + r")(?![\w}])", re.IGNORECASE)


class RuleRewording:
    """Deterministic rewordings of one instruction template.

    Edits: ``reorder`` moves the question to the other side of the input block (``{options_}`` stays
    last) and turns pointing words round (following <-> preceding, above <-> below); ``synonyms``
    applies every :data:`SYNONYMS` entry found, in one pass. Variants, in this order, each kept if it
    makes at least ``min_edits`` edits (a reorder counts one, each substitution one) and differs from
    the template and from earlier variants:

    1. ``reorder+synonyms``;  2. ``synonyms``;  3. ``reorder``.

    A single edit ("correctly" -> "properly", or only a reorder) is a near-copy, not a paraphrase: the
    gate's ``semantic_similarity`` check measured such variants at MiniLM cosine 0.98-0.99 and rejects
    them, so they are not generated. Only literal text is edited: ``{placeholders}`` are kept verbatim,
    and a substitution that would remove or introduce a protected word (an answer/label word) is skipped.
    """

    name = "rules"

    def __init__(self, synonyms: dict[str, str] | None = None, min_edits: int = 2) -> None:
        self.synonyms = {k.lower(): v for k, v in (synonyms or SYNONYMS).items()}
        self.min_edits = min_edits
        self._syn_re = _word_re(self.synonyms)
        self._deixis_re = _word_re(DEIXIS)

    def candidates(self, original: Template, pool: Sequence[Template], protected: Collection[str]) -> list[Template]:
        prot = {p.lower() for p in protected}
        syn, n_syn = self.substitute(original.input, prot)
        reo = self.reorder(original.input)
        both, n_both = self.substitute(reo, prot) if reo else (None, 0)
        texts: list[str] = []
        for text, edits in ((both, 1 + n_both), (syn, n_syn), (reo, 1)):
            if text and edits >= self.min_edits and text != original.input and text not in texts:
                texts.append(text)
        return [replace(original, input=t, source=self.name, variant=k) for k, t in enumerate(texts, start=1)]

    # ---- edits

    def substitute(self, text: str, protected: Collection[str]) -> tuple[str, int]:
        """``(text with the synonym table applied to its literal parts, number of substitutions)``."""
        prot = {p.lower() for p in protected}
        count = 0

        def one(m: re.Match[str]) -> str:
            nonlocal count
            src = m.group(0)
            repl = self.synonyms[src.lower()]
            changed = set(re.findall(r"[\w']+", src.lower())) ^ set(re.findall(r"[\w']+", repl.lower()))
            if changed & prot or src.lower() in prot or repl.lower() in prot:
                return src
            count += 1
            return _match_case(src, repl)

        parts = list(string.Formatter().parse(text))
        out = _rebuild([(self._syn_re.sub(one, lit), name, spec, conv) for lit, name, spec, conv in parts])
        return out, count

    def reorder(self, text: str) -> str | None:
        """Question before <-> after the input block; None when the template has no such layout.

        Lines are grouped into: *input* lines (holding a placeholder other than ``{options_}``, with a
        label line ending in ':' just before them), *question* lines (no placeholder) and the final
        ``{options_}`` line. Only a template whose question lines form one block entirely before or
        entirely after the input lines is reordered.
        """
        lines = text.split("\n")
        options_tail = ""
        stripped = [ln.strip() for ln in lines]
        if stripped and stripped[-1] == "{" + OPTIONS_PLACEHOLDER + "}":
            while lines and lines[-1].strip() in ("", "{" + OPTIONS_PLACEHOLDER + "}"):
                lines.pop()
            options_tail = "\n{" + OPTIONS_PLACEHOLDER + "}"
        try:
            kinds = ["input" if {n for _, n, _, _ in string.Formatter().parse(ln) if n} - {OPTIONS_PLACEHOLDER}
                     else ("blank" if not ln.strip() else "question") for ln in lines]
        except ValueError:
            return None
        if OPTIONS_PLACEHOLDER in "".join(lines):
            return None  # {options_} inside the body: keep such templates as they are
        for i in range(len(kinds) - 1):  # "Review:" / "Context:" labels belong to the input below them
            if kinds[i] == "question" and lines[i].rstrip().endswith(":") and kinds[i + 1] in ("input", "blank"):
                j = i + 1
                while j < len(kinds) and kinds[j] == "blank":
                    j += 1
                if j < len(kinds) and kinds[j] == "input":
                    kinds[i] = "input"
        content = [(k, ln) for k, ln in zip(kinds, lines, strict=True) if k != "blank"]
        order = "".join("q" if k == "question" else "i" for k, _ in content)
        if not re.fullmatch(r"q+i+|i+q+", order):
            return None
        question = "\n".join(ln for k, ln in content if k == "question").strip()
        body = "\n".join(ln for k, ln in content if k == "input").strip()
        question = self._deixis_re.sub(lambda m: _match_case(m.group(0), DEIXIS[m.group(0).lower()]), question)
        out = f"{body}\n\n{question}" if order.startswith("q") else f"{question}\n\n{body}"
        return out + options_tail


SOURCES: dict[str, tuple[ParaphraseSource, ...]] = {
    "flan": (FlanTemplates(),),
    "rules": (RuleRewording(),),
    "both": (FlanTemplates(), RuleRewording()),
}


def get_sources(name: str) -> tuple[ParaphraseSource, ...]:
    try:
        return SOURCES[name]
    except KeyError:
        raise ValueError(f"pairs.paraphrase_source = {name!r}: use one of {', '.join(SOURCES)}") from None


def paraphrase_candidates(
    original: Template, pool: Sequence[Template], protected: Collection[str], sources: Sequence[ParaphraseSource]
) -> list[Template]:
    """All sources' paraphrases of ``original``, in source order, text duplicates dropped."""
    out: list[Template] = []
    seen = {original.input}
    for src in sources:
        for t in src.candidates(original, pool, protected):
            if t.input not in seen:
                seen.add(t.input)
                out.append(t)
    return out
