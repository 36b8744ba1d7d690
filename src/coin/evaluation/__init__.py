"""Robustness evaluation (CoIN's PromptBench protocol, docs/protocol.md): the public contract.

- :func:`evaluate_model` scores one model and returns an :class:`EvalResult`;
- :func:`evaluate_models` evaluates any models given as specs (registry URI, adapter dir, base model) on any
  instruction file, with a result cache and one MLflow run per evaluation (``coin evaluate --model``);
- :func:`save_result` / :func:`load_result` round-trip one model's result on disk (per-process units);
- :func:`write_eval_outputs` writes the combined report (metrics.json, report.md/html, plots, predictions);
- :func:`robustness_summary` gives the promotion gate's ``clean_acc`` and ``perturbed_acc``;
- :func:`reference_rates` gives the evaluated sample's majority-class and chance rates.

Imports are lazy: ``from coin.evaluation import robustness_summary`` does not load torch.
"""

from __future__ import annotations

import importlib
from typing import Any

_HOME = {
    "evaluate_model": "coin.evaluation.runner",
    "evaluate_models": "coin.evaluation.anymodel",
    "EvaluationRun": "coin.evaluation.anymodel",
    "EvalResult": "coin.evaluation.result",
    "save_result": "coin.evaluation.result",
    "load_result": "coin.evaluation.result",
    "write_eval_outputs": "coin.evaluation.report",
    "robustness_summary": "coin.evaluation.metrics",
    "reference_rates": "coin.evaluation.reference",
}

__all__ = sorted(_HOME)


def __getattr__(name: str) -> Any:
    if name in _HOME:
        return getattr(importlib.import_module(_HOME[name]), name)
    raise AttributeError(f"module 'coin.evaluation' has no attribute {name!r}")
