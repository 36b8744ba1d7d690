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

plus Prefect's ``TASK_SOURCE`` (the task wrapper itself). ``dvc.yaml`` declares the same stages from the
same specs (checked by ``tests/test_stage_spec.py``), without the per-method / per-model split the flow adds.

A cache hit is only valid while the stage's outputs are still on disk: :func:`outputs_present` is
checked before each task is submitted and a task whose outputs are gone runs with
``refresh_cache=True`` (recompute, then overwrite the cache record). Results are persisted under
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

from coin.config import Settings, load_settings
from coin.registry.tracking import data_version
from coin.stage_specs import ALWAYS_CODE, STAGE_SPECS, StageSpec, select_params, stage_params
from coin.stages import Layout
from coin.study.keys import code_hash, sha256_files

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


def missing_outputs(stage: str, settings: Settings, root: Path, item: str | None = None) -> list[str]:
    """Why a cached result of ``stage`` could not be trusted now (empty list: outputs all there)."""
    spec = STAGE_SPECS[stage]
    lay = Layout(root, settings)
    problems = [f"{p} is missing" for p in spec.outputs(lay, item) if not _present(p)]
    if not problems and spec.extra_check is not None:
        extra = spec.extra_check(settings, root, item)
        if extra:
            problems.append(extra)
    return problems


def cache_key(stage: str, settings: Settings, root: Path, item: str | None = None) -> str:
    """The input-based key of one stage task (see the module docstring for what goes in)."""
    spec = STAGE_SPECS[stage]
    lay = Layout(root, settings)
    return hash_objects(
        {
            "stage": stage,
            "item": item,
            "root": str(root.resolve()),
            "params": stage_params(stage, settings),
            "data_version": data_version(root),
            "inputs": fingerprint(spec.inputs(lay, item), base=root),
            "code": code_hash((*ALWAYS_CODE, *spec.code)),  # the coin package that actually runs
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
        return cache_key(self.stage, settings, params_path.resolve().parent, inputs.get("item"))


def stage_cache_policy(stage: str) -> CachePolicy:
    """Inputs-based key of ``stage`` + the task wrapper's source (``TASK_SOURCE``)."""
    if stage not in STAGE_SPECS:
        raise KeyError(f"no cache spec for stage {stage!r}; known: {sorted(STAGE_SPECS)}")
    return StageCachePolicy(stage=stage) + TASK_SOURCE


def result_storage(root: Path) -> Path:
    """Where the cached task results and their cache records live: ``<project>/.prefect/results``."""
    return root.resolve() / ".prefect" / "results"
