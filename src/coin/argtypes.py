"""Argument types for the bench and experiment scripts, standard library only: ``bench/gpu_check.py`` runs on a bare
GPU machine without the orchestration stack (no typer, rich or pydantic), so they do not live in :mod:`coin.cli`."""

from __future__ import annotations

import argparse


def positive_int(text: str) -> int:
    """An argparse ``type`` for a bench or experiment script's counts (``--reps``, ``--steps``, ``--batch-size``,
    ``--threads``...): a count below 1 is refused at the command line, not as a ZeroDivisionError or an empty
    median minutes into the run."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} is below 1: give a count of 1 or more")
    return value
