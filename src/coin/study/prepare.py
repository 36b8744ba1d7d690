"""The study's training pairs: built and validated once, shared by every cell.

Pairs and the validation gate do not depend on the training seed, so a study runs the pipeline's own
``pairs`` and ``validate`` stage functions once, into ``<study.out_dir>/pairs/`` and
``<study.out_dir>/validated/`` (apart from the pipeline's ``outputs/``, which a study with other
overrides must not overwrite). A study that sweeps ``pairs.seed`` (the draw of training rows) runs them once per
draw, into ``<study.out_dir>/draws/pairs.seed=<v>/``. ``prepare.json`` records what they were computed from
(:func:`coin.study.keys.prep_key_parts`) and the sha256 of ``valid.jsonl``; a rerun with the same key
and the same file skips both. The gate's MLflow run nests under the study run when one is given. First, as the
pipeline's ``data`` stage does, ``data/`` is pulled from the DVC remote when it is missing or out of date, so
``coin study`` runs on a fresh clone.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

from coin.config import Settings
from coin.data.io import DataError, read_json, write_json
from coin.study.grid import format_value, prep_points, sweeps_draws
from coin.study.keys import key_of, prep_key_parts, sha256_files
from coin.validation.result import SUMMARY_FILE

log = logging.getLogger("coin.study")

PREP_RECORD = "prepare.json"


def prepare_pairs(settings: Settings, root: Path, *, parent_run_id: str | None = None,
                  force: bool = False) -> dict[str, Any]:
    """Pairs + validation gate for the study (skipped when ``prepare.json`` matches); returns the record.

    A study that sweeps ``pairs.seed`` prepares each draw in its own directory; the record then lists them under
    ``draws`` (``valid_file``: every draw's, ``cached``: True when none was rebuilt).
    Raises the gate's ``GateFailed`` (outputs written) when too few pairs pass, as the pipeline does.
    """
    from coin import stages

    root = Path(root)
    stages.stage_data(settings, root)  # a fresh clone holds data/ only in the DVC remote; the key hashes data/
    points = prep_points(settings)
    recs = [_prepare_one(s, root, parent_run_id, force) for _, s in points]
    if not sweeps_draws(settings):
        return recs[0]
    return {"valid_file": ", ".join(r["valid_file"] for r in recs), "cached": all(r["cached"] for r in recs),
            "markdown": "\n\n".join(r.get("markdown", "") for r in recs if r.get("markdown")),
            "draws": {format_value(v): {k: x for k, x in r.items() if k != "markdown"}
                      for (v, _), r in zip(points, recs, strict=True)}}


def prepared(s: Settings, root: Path, key: str | None = None) -> dict[str, Any] | None:
    """The record of pairs + gate already built under ``s.paths.out_dir`` from the same inputs (same key, and
    ``valid.jsonl`` as recorded), or None when they must be built. ``key``: :func:`prep_key_parts`' key, when the
    caller has it (it hashes the whole data directory)."""
    from coin.layout import Layout

    record_file = Path(root) / s.paths.out_dir / PREP_RECORD
    valid = Layout(Path(root), s).valid_file
    if not (record_file.exists() and valid.exists()):
        return None
    try:
        rec = read_json(record_file)
    except DataError:
        return None
    key = key or key_of(prep_key_parts(s, Path(root)))
    if not (rec.get("key") == key and rec.get("valid_sha256") == sha256_files([valid])):
        return None
    try:  # a gate that failed since (the record is that of an earlier pass) rewrote its verdict beside the rows
        verdict = read_json(valid.parent / SUMMARY_FILE)
    except DataError:
        return None
    return rec if isinstance(verdict, dict) and verdict.get("gate_passed") is True else None


def _prepare_one(s: Settings, root: Path, parent_run_id: str | None, force: bool) -> dict[str, Any]:
    """One set of pairs + gate, written under ``s.paths.out_dir`` (see :func:`coin.study.grid.prep_points`)."""
    from coin import stages
    from coin.layout import Layout
    from coin.registry.tracking import PARENT_RUN_ENV

    record_file = root / s.paths.out_dir / PREP_RECORD
    valid = Layout(root, s).valid_file
    parts = prep_key_parts(s, root)
    key = key_of(parts)
    shown = valid.relative_to(root) if valid.is_relative_to(root) else valid
    if not force and (rec := prepared(s, root, key)) is not None:
        log.info("study: pairs and validation unchanged (%s); reusing them", valid)
        return {**rec, "valid_file": str(shown), "cached": True}  # where they are now (the study may have moved)
    record_file.unlink(missing_ok=True)  # built anew: a gate that fails below must leave no record of a pass
    previous = os.environ.get(PARENT_RUN_ENV)
    if parent_run_id:  # the validate stage nests its MLflow run under the study run
        os.environ[PARENT_RUN_ENV] = parent_run_id
    try:
        pairs = stages.stage_pairs(s, root)
        gate = stages.stage_validate(s, root)
    finally:
        if previous is None:
            os.environ.pop(PARENT_RUN_ENV, None)
        else:
            os.environ[PARENT_RUN_ENV] = previous
    rec = {"key": key, "key_parts": parts, "valid_file": str(shown), "valid_sha256": sha256_files([valid]),
           "pairs": pairs, "validate": {k: v for k, v in gate.items() if k != "markdown"}}
    write_json(record_file, rec)
    return {**rec, "cached": False, "markdown": gate.get("markdown", "")}
