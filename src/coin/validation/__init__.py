"""Paraphrase validation: the gate between pair building and training (docs/design.md#validation-gate).

>>> from coin.validation import run_gate, GateFailed   # doctest: +SKIP
"""

from coin.validation.checks import token_lengths
from coin.validation.embeddings import CachedEmbedder, instruction_text, minilm_embedder
from coin.validation.gate import GateFailed, run_checks, run_gate
from coin.validation.leakage import EvalSources, load_eval_sources
from coin.validation.result import CheckStats, GateReport
from coin.validation.types import CHECKS, CheckContext, CheckResult, Finding, register

__all__ = [
    "CHECKS", "CachedEmbedder", "CheckContext", "CheckResult", "CheckStats", "EvalSources", "Finding", "GateFailed",
    "GateReport", "instruction_text", "load_eval_sources", "minilm_embedder", "register", "run_checks", "run_gate",
    "token_lengths",
]
