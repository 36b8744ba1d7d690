"""Prefect task caching for the pipeline: a stage is skipped when nothing it depends on changed.

A stage task's cache key (:class:`StageCachePolicy`) is a hash of

- the stage and its item (the method of a ``train`` task, the model of an evaluation unit),
- the project root and the params *that stage reads* (``STAGE_SPECS[stage].params`` of
  :mod:`coin.stage_specs`, after ``--set`` overrides), so changing ``evaluate.samples_per_task`` reruns
  evaluation but not training,
- the data version (``data.dvc``'s md5),
- the content hash of the stage's input files (the previous stage's outputs, or ``data/``), so a
  rerun upstream stage that wrote different bytes invalidates everything below it,
- the content hash of the stage's code (the ``coin`` subpackages it runs, plus ``stages.py``),

the last three composed by :func:`coin.stages.stage_reads` (``train.json``'s training key reads the same), plus
Prefect's ``TASK_SOURCE`` (the task wrapper itself). ``dvc.yaml`` declares the same stages from the
same specs (checked by ``tests/test_stage_spec.py``), without the per-method / per-model split the flow adds.

A cache hit is only valid while the stage's outputs are still on disk *and are the ones that run wrote*: every
stage task records the content hash of its outputs under its key when it finishes (:func:`record_outputs`), and
before each task is submitted :func:`missing_outputs` checks both. A task whose outputs are gone, or were since
rewritten (another run with other params wrote the same paths, ``coin <stage>`` from the CLI, a damaged file), runs
with ``refresh_cache=True`` (recompute, then overwrite the cache record); so does one with no record of its
outputs (a cache written before the records were kept). Results are persisted under
``<project>/.prefect/results`` (:func:`result_storage`), one store per project checkout.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from prefect.cache_policies import TASK_SOURCE, CachePolicy
from prefect.utilities.hashing import hash_objects

from coin.config import Settings, load_settings, project_root
from coin.registry.tracking import data_version
from coin.stage_specs import STAGE_SPECS, StageSpec, select_params
from coin.stages import Layout, stage_reads
from coin.study.keys import sha256_files

log = logging.getLogger("coin.flows")

__all__ = ["STAGE_SPECS", "StageSpec", "cache_key", "fingerprint", "missing_outputs", "result_storage",
           "select_params", "stage_cache_policy"]

# --------------------------------------------------------------------------- fingerprints


def fingerprint(paths: Iterable[Path], base: Path | None = None) -> str:
    """sha256 over the content of ``paths`` (files, or directories walked in sorted order): the one
    content hash of the project (:func:`coin.study.keys.sha256_files`), so a copy of the project hashes the same."""
    return sha256_files(paths, base=base)


# --------------------------------------------------------------------------- what each stage reads and writes

# The specs themselves live beside the stage functions, in coin.stage_specs (re-exported here).


def _present(path: Path) -> bool:
    return path.is_file() or (path.is_dir() and any(p.is_file() for p in path.rglob("*")))


def _record_file(root: Path, stage: str, item: str | None) -> Path:
    return result_storage(root).parent / "outputs" / (f"{stage}-{item}.json" if item else f"{stage}.json")


def _outputs_hash(stage: str, settings: Settings, root: Path, item: str | None) -> str:
    return fingerprint(STAGE_SPECS[stage].outputs(Layout(root, settings), item), base=root)


KEEP_RECORDS = 16  # output records kept per stage task: the latest keys (param settings) run


def record_outputs(stage: str, settings: Settings, root: Path, item: str | None = None) -> None:
    """Record, under the stage task's cache key, the content hash of the outputs it just wrote."""
    from coin.data.io import read_json, write_json

    path = _record_file(root, stage, item)
    try:
        records = read_json(path) if path.is_file() else {}
    except Exception:  # noqa: BLE001 -- a damaged record only costs a recompute
        records = {}
    key = cache_key(stage, settings, root, item)
    records.pop(key, None)
    records[key] = _outputs_hash(stage, settings, root, item)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_json(path, dict(list(records.items())[-KEEP_RECORDS:]))


def missing_outputs(stage: str, settings: Settings, root: Path, item: str | None = None) -> list[str]:
    """Why a cached result of ``stage`` could not be trusted now (empty list: a hit may be used): an output is
    missing, the outputs are not the ones the run under this key wrote (or there is no record of them), or the
    spec's own check fails (e.g. the training run gone from the tracking store)."""
    from coin.data.io import read_json

    spec = STAGE_SPECS[stage]
    lay = Layout(root, settings)
    problems = [f"{p} is missing" for p in spec.outputs(lay, item) if not _present(p)]
    if not problems and spec.extra_check is not None:
        extra = spec.extra_check(settings, root, item)
        if extra:
            problems.append(extra)
    if not problems:
        path = _record_file(root, stage, item)
        try:
            recorded = (read_json(path) if path.is_file() else {}).get(cache_key(stage, settings, root, item))
        except Exception:  # noqa: BLE001 -- a damaged record: recompute
            recorded = None
        if recorded is None:
            problems.append("no record of the outputs a run with these settings wrote")
        elif recorded != _outputs_hash(stage, settings, root, item):
            problems.append("its outputs were rewritten since (another run, the CLI, or an edit)")
    return problems


def cache_key(stage: str, settings: Settings, root: Path, item: str | None = None) -> str:
    """The input-based key of one stage task (see the module docstring for what goes in)."""
    return hash_objects(
        {
            "stage": stage,
            "item": item,
            "root": str(root.resolve()),
            "data_version": data_version(root),
            **stage_reads(stage, settings, root, item),  # params, inputs' content, the coin package that runs
        },
        raise_on_failure=True,
    )


@dataclass
class StageCachePolicy(CachePolicy):
    """Prefect cache policy of a stage task ``fn(params_path, overrides, item=None, ...)``.

    Reads only ``params_path``, ``overrides`` and ``item`` from the task's inputs: run-specific
    arguments (the MLflow parent run id, thread counts) never change the key.
    """

    stage: str = ""

    def compute_key(self, task_ctx: Any, inputs: dict[str, Any], flow_parameters: dict[str, Any],
                    **kwargs: Any) -> str | None:
        params_path = Path(inputs["params_path"])
        settings = load_settings(params_path, inputs.get("overrides") or [])
        return cache_key(self.stage, settings, project_root(params_path), inputs.get("item"))


def stage_cache_policy(stage: str) -> CachePolicy:
    """Inputs-based key of ``stage`` + the task wrapper's source (``TASK_SOURCE``)."""
    if stage not in STAGE_SPECS:
        raise KeyError(f"no cache spec for stage {stage!r}; known: {sorted(STAGE_SPECS)}")
    return StageCachePolicy(stage=stage) + TASK_SOURCE


def result_storage(root: Path) -> Path:
    """Where the cached task results and their cache records live: ``<project>/.prefect/results``."""
    return root.resolve() / ".prefect" / "results"
