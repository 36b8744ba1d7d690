"""The project's typed user errors that leaf modules raise (no imports, so any module can use them)."""

from __future__ import annotations


class ConfigError(ValueError):
    """A bad ``params.yaml``: the message names every bad key and how to fix it."""
