"""The check registry and the types every check speaks: rows, findings, results, the context.

A leaf of :mod:`coin.validation`: it imports no other module of the package at run time (the two
names it refers to in annotations, :class:`~coin.validation.embeddings.CachedEmbedder` and
:class:`~coin.validation.leakage.EvalSources`, are imported for type checkers only, and neither module
imports this one), so the checks (:mod:`coin.validation.checks`), the schema check
(:mod:`coin.validation.schema`) and the gate (:mod:`coin.validation.gate`) all build on it without
importing each other back. The checks themselves register in :mod:`coin.validation.checks`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from coin.config import ValidateSettings
from coin.data.prompts import PromptFormat

if TYPE_CHECKING:
    from coin.validation.embeddings import CachedEmbedder
    from coin.validation.leakage import EvalSources

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
    cfg: ValidateSettings = field(default_factory=ValidateSettings)  # similarity and leak bounds
    embedder: CachedEmbedder | None = None    # sentence embeddings (semantic_similarity, instruction_leakage)
    eval_sources: EvalSources | None = None   # what the evaluation uses (instruction_leakage, example_leakage)
    artifacts: dict[str, Any] = field(default_factory=dict)  # what checks hand back (e.g. data_docs index path)
    stats: dict[str, dict[str, Any]] = field(default_factory=dict)  # per-check figures for summary.json

    def need_embedder(self, check: str) -> CachedEmbedder:
        if self.embedder is None:
            raise RuntimeError(f"check {check!r} needs sentence embeddings: pass CheckContext(embedder=...)")
        return self.embedder

    def need_eval_sources(self, check: str) -> EvalSources:
        if self.eval_sources is None:
            raise RuntimeError(
                f"check {check!r} needs what the evaluation uses: "
                "pass CheckContext(eval_sources=load_eval_sources(...))"
            )
        return self.eval_sources


Check = Callable[[Sequence[Row], CheckContext], list[CheckResult]]
CHECKS: dict[str, Check] = {}


def register(name: str) -> Callable[[Check], Check]:
    def deco(fn: Check) -> Check:
        if name in CHECKS:
            raise ValueError(f"check {name!r} is registered twice")
        CHECKS[name] = fn
        return fn

    return deco
