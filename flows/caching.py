"""Prefect task caching for the pipeline: a stage is skipped when nothing it depends on changed.

A stage task's cache key (:class:`StageCachePolicy`) is a hash of

- the stage and its item (the method of a ``train`` task, the model of an evaluation unit),
- the project root and the params *that stage reads* (``STAGE_SPECS[stage].params``, after
  ``--set`` overrides), so changing ``evaluate.samples_per_task`` reruns evaluation but not training,
- the data version (``data.dvc``'s md5),
- the content hash of the stage's input files (the previous stage's outputs, or ``data/``), so a
  rerun upstream stage that wrote different bytes invalidates everything below it,
- the content hash of the stage's code (the ``coin`` subpackages it runs, plus ``stages.py``),

plus Prefect's ``TASK_SOURCE`` (the task wrapper itself). This mirrors what ``dvc.yaml`` declares for
the same stages (deps, params), with the per-method / per-model split that the flow adds.

A cache hit is only valid while the stage's outputs are still on disk: :func:`outputs_present` is
checked before each task is submitted and a task whose outputs are gone runs with
``refresh_cache=True`` (recompute, then overwrite the cache record). Results are persisted under
``<project>/.prefect/results`` (:func:`result_storage`), one store per project checkout.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from prefect.cache_policies import TASK_SOURCE, CachePolicy
from prefect.utilities.hashing import hash_objects

import coin
from coin.config import Settings, load_settings
from coin.registry.tracking import data_version
from coin.stages import Layout
from coin.study.keys import sha256_files

log = logging.getLogger("coin.flows")

CODE_ROOT = Path(coin.__file__).resolve().parent  # the coin package that actually runs


# --------------------------------------------------------------------------- fingerprints


def fingerprint(paths: Iterable[Path], base: Path | None = None) -> str:
    """sha256 over the content of ``paths`` (files, or directories walked in sorted order): the one
    content hash of the project (:func:`coin.study.keys.sha256_files`), so a copy of the project hashes the same."""
    return sha256_files(paths, base=base)


def select_params(settings: Settings, keys: Iterable[str], exclude: Iterable[str] = ()) -> dict[str, Any]:
    """The flat params (``train.lr``...) under the given keys or sections, minus ``exclude``.

    >>> sorted(select_params(Settings.model_validate({}), ["seed", "train.lora"], ["train.lora.dropout"]))
    ['seed', 'train.lora.alpha', 'train.lora.modules_to_save', 'train.lora.r', 'train.lora.target_modules']
    """
    keys, exclude = tuple(keys), tuple(exclude)

    def under(k: str, prefixes: tuple[str, ...]) -> bool:
        return any(k == p or k.startswith(p + ".") for p in prefixes)

    return {k: v for k, v in settings.to_flat_dict().items() if under(k, keys) and not under(k, exclude)}


# --------------------------------------------------------------------------- what each stage reads and writes

PathsFn = Callable[[Layout, str | None], list[Path]]


@dataclass(frozen=True)
class StageSpec:
    """What a cached stage task depends on and produces (the flow's analogue of a ``dvc.yaml`` stage)."""

    params: tuple[str, ...]            # params keys/sections the stage reads
    inputs: PathsFn                    # files/dirs whose content the stage reads
    outputs: PathsFn                   # what must still exist for a cache hit to count
    code: tuple[str, ...]              # coin subpackages it runs (stages.py and config.py always count)
    exclude: tuple[str, ...] = ()      # params under ``params`` that do not affect this task
    extra_check: Callable[[Settings, Path, str | None], str | None] | None = field(default=None, compare=False)


def _eval_labels(settings: Settings) -> list[str]:
    return (["base"] if settings.evaluate.include_base else []) + list(settings.train.methods)


def _mlflow_run_gone(settings: Settings, root: Path, method: str | None) -> str | None:
    """A cached training run is useless once its MLflow run is gone (the report logs into it)."""
    from coin.data.io import read_json

    rec_file = Layout(root, settings).method_dir(str(method)) / "train.json"
    run_id = read_json(rec_file).get("run_id")
    if not run_id:
        return f"{rec_file} has no run_id"
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    from coin.registry.tracking import tracking_uri

    try:
        MlflowClient(tracking_uri=tracking_uri(settings, root)).get_run(run_id)
    except MlflowException:
        return f"MLflow run {run_id} of {method!r} is not in the tracking store"
    return None


STAGE_SPECS: dict[str, StageSpec] = {
    "pairs": StageSpec(
        params=("seed", "paths", "pairs"),
        inputs=lambda lay, _: [lay.data_dir],
        outputs=lambda lay, _: [lay.pairs_file, lay.pairs_file.with_name("stats.json")],
        code=("data",),
    ),
    "validate": StageSpec(  # leak checks read the evaluation's instruction file and validation rows
        params=("paths", "validate", "pairs.cutoff_len", "model.backbone", "evaluate.instruction_file",
                "evaluate.tasks"),
        inputs=lambda lay, _: [lay.pairs_file, lay.data_dir, lay.root / lay.settings.evaluate.instruction_file],
        outputs=lambda lay, _: [lay.valid_file, lay.validated_dir / "summary.json"],
        code=("validation", "data", "modeling"),
    ),
    "train": StageSpec(  # item = method
        # evaluate.calibration: recorded in coin_model.json, so the registered model answers as it was evaluated
        params=("seed", "paths", "model", "pairs.cutoff_len", "train", "evaluate.calibration"),
        exclude=("train.methods",),  # adding sft must not retrain coin; the method is the item
        inputs=lambda lay, m: [lay.valid_file],
        outputs=lambda lay, m: [lay.adapter_dir(str(m)), lay.method_dir(str(m)) / "train.json",
                                lay.method_dir(str(m)) / "loss.csv"],
        code=("training", "modeling", "data"),
        extra_check=_mlflow_run_gone,
    ),
    "evaluate_unit": StageSpec(  # item = model label (base, coin, cit, ...)
        params=("seed", "paths", "model", "evaluate"),
        exclude=("evaluate.include_base",),
        inputs=lambda lay, label: [lay.data_dir, lay.root / lay.settings.evaluate.instruction_file]
        + ([] if label == "base" else [lay.adapter_dir(str(label))]),
        outputs=lambda lay, label: [lay.eval_unit_dir(str(label))],
        code=("evaluation", "modeling", "data"),
    ),
    "evaluate_report": StageSpec(
        params=("paths", "evaluate", "train.methods", "tracking"),
        inputs=lambda lay, _: [lay.eval_unit_dir(lbl) for lbl in _eval_labels(lay.settings)] + [lay.train_record],
        outputs=lambda lay, _: [lay.eval_dir / "metrics.json", lay.eval_dir / "table.md"],
        code=("evaluation",),
    ),
}


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
    code = [CODE_ROOT / "stages.py", CODE_ROOT / "config.py", *(CODE_ROOT / c for c in spec.code)]
    return hash_objects(
        {
            "stage": stage,
            "item": item,
            "root": str(root.resolve()),
            "params": select_params(settings, spec.params, spec.exclude),
            "data_version": data_version(root),
            "inputs": fingerprint(spec.inputs(lay, item), base=root),
            "code": fingerprint(code, base=CODE_ROOT),
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
