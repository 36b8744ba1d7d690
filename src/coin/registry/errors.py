"""Errors of the model registry a user can cause; a leaf module, so the CLI and the evaluation both import it."""

from __future__ import annotations


class ModelUnavailable(RuntimeError):
    """A model a command needs cannot be found or loaded (registry URI, alias, run, HF name): exit code 4."""
