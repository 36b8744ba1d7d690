"""Read the done cells of several study directories, checked to be comparable (shared by the two scripts below).

``combine_studies.py`` aggregates whole study directories as one study; ``compare_variants.py`` puts one
configuration of a method beside another. Both need the same guarantees before they aggregate with the study's
own code, so they are checked here, once:

- every directory was built from the same validated pairs (sha256 of ``validated/valid.jsonl``), unless the
  pairs are the variant (``compare_variants.py --pairs-may-differ``);
- every cell used is complete;
- every cell was scored on the same evaluation sample (the records' ``eval_seed`` and ``data_version``).
"""

from __future__ import annotations

import hashlib
import sys
from collections.abc import Iterable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT / "src") not in sys.path:
    sys.path.insert(0, str(ROOT / "src"))

from coin.data.io import read_json  # noqa: E402
from coin.evaluation.result import load_result  # noqa: E402
from coin.study.aggregate import CellData, cell_data  # noqa: E402
from coin.study.cell import CELL_RECORD, EVAL_DIR  # noqa: E402


def pairs_sha(study_dirs: Iterable[Path]) -> dict[str, str]:
    """The sha256 of each study directory's validated pairs, by directory."""
    valid = {}
    for d in study_dirs:
        path = Path(d) / "validated" / "valid.jsonl"
        if not path.is_file():
            raise SystemExit(f"{d}: not a study directory (no {path.relative_to(d)}); pass a study's out_dir")
        valid[str(d)] = hashlib.sha256(path.read_bytes()).hexdigest()
    return valid


def same_pairs(study_dirs: Iterable[Path]) -> str:
    """The sha256 of the validated pairs every study directory shares; stops when two differ."""
    valid = pairs_sha(study_dirs)
    if len(set(valid.values())) != 1:
        raise SystemExit(f"the studies were built from different validated pairs: {valid}")
    return next(iter(valid.values()))


def cell_dirs(study_dir: Path) -> list[Path]:
    """The cell directories of a study (its work and lock entries, which start with a dot, left out)."""
    return sorted(p for p in (Path(study_dir) / "cells").iterdir() if p.is_dir() and not p.name.startswith("."))


def load_cell(cell_dir: Path) -> tuple[dict[str, Any], CellData]:
    """``(cell.json record, CellData)`` of a complete cell; stops on an incomplete one."""
    rec = read_json(cell_dir / CELL_RECORD)
    if not rec.get("complete"):
        raise SystemExit(f"{cell_dir}: not complete")
    return rec, cell_data(rec, load_result(cell_dir / EVAL_DIR))


def same_sample(records: list[dict[str, Any]]) -> None:
    """Stop unless every cell record was scored on the same evaluation sample."""
    for field in ("eval_seed", "data_version"):
        values = {r.get(field) for r in records}
        if len(values) != 1:
            raise SystemExit(f"cells differ in {field}: {values}")
