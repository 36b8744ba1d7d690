"""The evaluation sample: one seeded subset per task, shared by every instruction and every set.

The reference draws a new subset per perturbation set from a global RNG (docs/protocol.md#sampling),
which mixes sampling noise into the robustness comparison. Here the indices depend only on
``(seed, task, number of available rows)``: the same examples for every instruction, every set, and
every model, whichever other tasks are evaluated alongside.
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

from coin.data.io import DataError, read_jsonl
from coin.data.tasks import get_task, validation_files


class SplitUnavailable(DataError):
    """The task has no validation split in the offline data (qqp); ``reason`` says why."""

    def __init__(self, task: str, reason: str) -> None:
        super().__init__(f"{task}: {reason}")
        self.task = task
        self.reason = reason


def load_validation_rows(data_dir: str | Path, task: str) -> tuple[list[dict[str, Any]], str | None]:
    """All validation rows of ``task`` (every file, in order) with an ``example_id``, plus the caveat.

    ``example_id`` is ``"<file stem>:<row number>"``, stable across runs and unique across files
    (mnli's matched and mismatched fallbacks both have ``idx = null``).
    Raises :class:`SplitUnavailable` when the split is missing.
    """
    spec = get_task(task)
    paths, caveat = validation_files(data_dir, task)
    if not paths:
        raise SplitUnavailable(task, caveat or "no validation split")
    required: dict[str, type | tuple[type, ...]] = {f: str for f in spec.fields}
    required["label"] = int
    rows: list[dict[str, Any]] = []
    for path in paths:  # an empty input is refused: it is the content-free calibration probe (a tie scores label 0)
        for i, row in enumerate(read_jsonl(path, required=required, check=spec.row_problem, unique="idx")):
            rows.append({**row, "example_id": f"{path.stem}:{i}"})
    if not rows:  # an evaluation average over the other tasks would pass for the configured one
        files = ", ".join(str(p) for p in paths)
        raise DataError(f"{files}: no rows, so task {task} would silently drop out of every average; restore the "
                        f"file (dvc pull data.dvc) or remove {task} from evaluate.tasks")
    return rows, caveat


def sample_indices(n_available: int, n: int, seed: int, task: str) -> list[int]:
    """Sorted indices of ``min(n, n_available)`` rows, fixed by ``(seed, task, n_available)``."""
    k = min(n, n_available)
    rng = random.Random(f"{seed}/{task}")  # str seeds hash with sha512: stable across runs and platforms
    return sorted(rng.sample(range(n_available), k))


def sample_examples(data_dir: str | Path, task: str, n: int, seed: int) -> tuple[list[dict[str, Any]], str | None]:
    """``(rows, caveat)``: the seeded evaluation sample of ``task`` (``caveat`` is None for real GLUE dev)."""
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    rows, caveat = load_validation_rows(data_dir, task)
    return [rows[i] for i in sample_indices(len(rows), n, seed, task)], caveat
