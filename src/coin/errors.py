"""The project's typed user errors that leaf modules raise (no imports, so any module can use them)."""

from __future__ import annotations


class ConfigError(ValueError):
    """A bad ``params.yaml``: the message names every bad key and how to fix it."""


class Busy(RuntimeError):
    """Another process holds the lock of what this one would write (a pipeline, a training, a study, an
    evaluation's folder): it holds it for its whole run, so retrying a few seconds later only fails again."""
