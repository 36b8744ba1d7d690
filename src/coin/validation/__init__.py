"""Paraphrase validation: the gate between pair building and training (DESIGN.md §4).

>>> from coin.validation import run_gate, GateFailed   # doctest: +SKIP
"""

from coin.validation.checks import CHECKS, CheckContext, CheckResult, Finding, register, token_lengths
from coin.validation.gate import CheckStats, GateFailed, GateReport, run_checks, run_gate

__all__ = [
    "CHECKS", "CheckContext", "CheckResult", "CheckStats", "Finding", "GateFailed", "GateReport",
    "register", "run_checks", "run_gate", "token_lengths",
]
