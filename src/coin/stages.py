"""The pipeline's stages: one plain function each, the single home of their logic.

The CLI (``coin <stage>``), the DVC stages (``dvc.yaml`` runs the CLI) and the Prefect flow
(``flows/pipeline.py`` wraps these functions in tasks) all call exactly these functions::

    data -> pairs -> validate -> train -> evaluate -> register

Each takes the parsed :class:`~coin.config.Settings` and the project root, reads its inputs from the
previous stage's output directory and writes its own (``outputs/<stage>/`` by default).
"""

from __future__ import annotations

import csv
import logging
import math
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from coin.config import Settings
from coin.data.io import DataError, read_json, read_jsonl, write_json, write_jsonl

log = logging.getLogger("coin")


@dataclass(frozen=True)
class Layout:
    """Where every stage reads and writes, relative to the project root."""

    root: Path
    settings: Settings

    def _out(self, *parts: str) -> Path:
        return self.root / self.settings.paths.out_dir / Path(*parts)

    @property
    def data_dir(self) -> Path:
        return self.root / self.settings.paths.data_dir

    @property
    def pairs_file(self) -> Path:
        return self._out("pairs", "pairs.jsonl")

    @property
    def validated_dir(self) -> Path:
        return self._out("validated")

    @property
    def valid_file(self) -> Path:
        return self.validated_dir / "valid.jsonl"

    @property
    def train_dir(self) -> Path:
        return self._out("train")

    @property
    def adapter_dir(self) -> Path:
        return self.train_dir / "adapter"

    @property
    def train_record(self) -> Path:
        return self.train_dir / "train.json"

    @property
    def eval_dir(self) -> Path:
        return self._out("evaluate")

    @property
    def register_record(self) -> Path:
        return self._out("register", "registration.json")


# --------------------------------------------------------------------------- data


def stage_data(settings: Settings, root: Path) -> dict[str, Any]:
    """Make sure the DVC-tracked data is in the workspace (``dvc pull`` from the configured remote if not).

    Returns ``{"data_version": md5, "pulled": bool}``. Offline by construction: the default remote is
    ``dvc-remote/`` inside the repository.
    """
    from coin.registry.tracking import data_version

    lay = Layout(root, settings)
    pulled = False
    if not (root / "data.dvc").exists():
        if not lay.data_dir.exists():
            raise DataError(f"{lay.data_dir}: missing and no data.dvc to restore it from")
        return {"data_version": "untracked", "pulled": False}
    from dvc.repo import Repo

    with Repo(str(root)) as repo:
        status = repo.status(targets=[str(root / "data.dvc")])
        if status:
            log.info("data not in sync with data.dvc (%s); pulling from the DVC remote", status)
            repo.pull(targets=[str(root / "data.dvc")])
            pulled = True
    return {"data_version": data_version(root), "pulled": pulled}


# --------------------------------------------------------------------------- pairs


def stage_pairs(settings: Settings, root: Path) -> dict[str, Any]:
    """Render FLAN templates on GLUE train rows into explicit (original, paraphrase, negative) rows."""
    from coin.data.pairs import build_pairs

    lay = Layout(root, settings)
    rows = build_pairs(lay.data_dir, settings.pairs, settings.seed)
    n = write_jsonl(lay.pairs_file, rows)
    per_task = Counter(r["task"] for r in rows)
    per_split = Counter(r["split"] for r in rows)
    stats = {"rows": n, "per_task": dict(sorted(per_task.items())), "per_split": dict(sorted(per_split.items()))}
    write_json(lay.pairs_file.with_name("stats.json"), stats)
    log.info("pairs: %d rows -> %s", n, lay.pairs_file)
    return stats


# --------------------------------------------------------------------------- validate


def stage_validate(settings: Settings, root: Path) -> dict[str, Any]:
    """The paraphrase-validation gate: validated rows, rejects with reasons, Data Docs, summary in MLflow.

    Raises ``GateFailed`` (after writing every output) when the pass rate is below the threshold.
    """
    import mlflow

    from coin.modeling.backbone import load_tokenizer
    from coin.registry.tracking import provenance_tags, setup_tracking
    from coin.validation.gate import GateFailed, run_gate

    lay = Layout(root, settings)
    rows = read_jsonl(lay.pairs_file, missing_hint="Run `coin pairs` first.")
    tokenizer = load_tokenizer(settings.model.backbone)
    setup_tracking(settings, root)
    with mlflow.start_run(run_name="validate", tags=provenance_tags(settings, root, "validate")):
        mlflow.log_params({k: v for k, v in settings.to_flat_dict().items() if k.startswith(("pairs.", "validate."))})
        try:
            report = run_gate(rows, cfg=settings.validate_, cutoff_len=settings.pairs.cutoff_len,
                              tokenizer=tokenizer, out_dir=lay.validated_dir)
        except GateFailed as exc:  # outputs are written; record this run's figures before failing
            _log_gate(exc.report, lay)
            raise
        _log_gate(report, lay)
    return {**report.to_summary(), "markdown": report.to_markdown()}


def _log_gate(report: Any, lay: Layout) -> None:
    import mlflow

    mlflow.log_metrics(report.to_metrics())
    for name in ("summary.json", "rejects.jsonl"):
        if (lay.validated_dir / name).exists():
            mlflow.log_artifact(str(lay.validated_dir / name), artifact_path="validate")


def _numeric_leaves(d: dict[str, Any], prefix: str) -> dict[str, float]:
    out: dict[str, float] = {}
    for k, v in d.items():
        key = f"{prefix}.{k}"
        if isinstance(v, dict):
            out.update(_numeric_leaves(v, key))
        elif isinstance(v, (int, float)) and not isinstance(v, bool):
            out[_mlflow_key(key)] = float(v)
    return out


def _mlflow_key(key: str) -> str:
    return "".join(c if (c.isalnum() or c in "._-/ ") else "_" for c in key)


# --------------------------------------------------------------------------- train


def stage_train(settings: Settings, root: Path) -> dict[str, Any]:
    """Contrastive fine-tuning (LoRA) on the validated pairs; step metrics go to a new MLflow run."""
    import mlflow

    from coin.modeling.adapter import write_meta
    from coin.modeling.backbone import load_backbone
    from coin.registry.tracking import provenance_tags, setup_tracking
    from coin.training.loop import train

    lay = Layout(root, settings)
    rows = read_jsonl(lay.valid_file, missing_hint="Run `coin validate` first.")
    if not any(r.get("split") == "train" for r in rows):
        raise DataError(f"{lay.valid_file}: no rows with split 'train' to train on; check pairs.val_fraction")
    cfg = settings.train
    backbone = load_backbone(settings.model.backbone, dtype=settings.model.dtype, device=settings.model.device,
                             seed=settings.seed)
    setup_tracking(settings, root)
    history: list[dict[str, Any]] = []

    def on_metrics(step: int, metrics: dict[str, float]) -> None:
        history.append({"step": step, **metrics})
        finite = {f"train/{k}": float(v) for k, v in metrics.items() if math.isfinite(float(v))}
        mlflow.log_metrics(finite, step=step)  # sft has no contrastive term: its l_cl/cosines are NaN

    with mlflow.start_run(run_name=f"train-{cfg.method}", tags=provenance_tags(settings, root, "train")) as run:
        mlflow.set_tag("coin.method", cfg.method)
        mlflow.log_params(settings.to_flat_dict())
        result = train(backbone, rows, cfg, out_dir=lay.train_dir, seed=settings.seed,
                       cutoff_len=settings.pairs.cutoff_len, on_metrics=on_metrics)
        write_meta(lay.adapter_dir, {
            "base": backbone.reference, "dtype": settings.model.dtype, "seed": settings.seed,
            "method": cfg.method, "prompt_format": "train", "append_eos": cfg.append_eos,
        })
        _write_history_csv(lay.train_dir / "loss.csv", history)
        mlflow.log_metrics({"train/wall_s": result.wall_time_s, "train/steps": float(result.steps)})
        record = {
            "run_id": run.info.run_id, "method": cfg.method, "steps": result.steps,
            "wall_time_s": round(result.wall_time_s, 2), "adapter_dir": str(lay.adapter_dir.relative_to(root)),
            "final": {k: round(float(v), 6) for k, v in (history[-1] if history else {}).items()},
        }
        write_json(lay.train_record, record)
    return record


def _write_history_csv(path: Path, history: list[dict[str, Any]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    keys = sorted({k for h in history for k in h}, key=lambda k: (k != "step", k))
    with path.open("w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=keys)
        w.writeheader()
        for h in history:
            w.writerow({k: h.get(k, "") for k in keys})


# --------------------------------------------------------------------------- evaluate


def stage_evaluate(settings: Settings, root: Path) -> dict[str, Any]:
    """Robustness evaluation of the base model (optional) and the trained adapter; metrics to MLflow."""
    import mlflow

    from coin.evaluation.runner import evaluate_model, write_eval_outputs
    from coin.modeling.backbone import load_backbone
    from coin.modeling.lora import load_adapter
    from coin.registry.tracking import setup_tracking

    lay = Layout(root, settings)
    record = read_json(lay.train_record, missing_hint="Run `coin train` first.")
    backbone = load_backbone(settings.model.backbone, dtype=settings.model.dtype, device=settings.model.device,
                             seed=settings.seed)
    # a relative instruction file is relative to the project root, like every other path in params.yaml
    cfg = settings.evaluate.model_copy(update={"instruction_file": str(root / settings.evaluate.instruction_file)})
    results = []
    t0 = time.perf_counter()
    if cfg.include_base:
        backbone.model.eval()
        results.append(evaluate_model(backbone.model, backbone.tokenizer, cfg,
                                      data_dir=lay.data_dir, seed=settings.seed, model_label="base"))
    trained = load_adapter(backbone, root / record["adapter_dir"])  # LoRA injected into the same base
    trained.eval()
    results.append(evaluate_model(trained, backbone.tokenizer, cfg,
                                  data_dir=lay.data_dir, seed=settings.seed, model_label=record["method"]))
    paths = write_eval_outputs(results, lay.eval_dir)
    metrics = read_json(lay.eval_dir / "metrics.json")
    setup_tracking(settings, root)
    with mlflow.start_run(run_id=record["run_id"]):
        mlflow.log_metrics(_numeric_leaves(metrics, "eval"))
        mlflow.log_metric("eval/wall_s", time.perf_counter() - t0)
        for p in paths.values():
            if Path(p).is_file():
                mlflow.log_artifact(str(p), artifact_path="evaluate")
    table = (lay.eval_dir / "table.md").read_text()
    return {"metrics": metrics, "table": table, "paths": {k: str(v) for k, v in paths.items()}}


# --------------------------------------------------------------------------- register


def stage_register(settings: Settings, root: Path) -> dict[str, Any]:
    """Log the trained adapter as a pyfunc in its training run and register it (alias champion if none)."""
    from coin.registry.register import log_and_register
    from coin.registry.tracking import setup_tracking

    lay = Layout(root, settings)
    record = read_json(lay.train_record, missing_hint="Run `coin train` first.")
    setup_tracking(settings, root)
    reg = log_and_register(root / record["adapter_dir"], record["run_id"], settings.register_.model_name)
    out = reg.to_dict()
    write_json(lay.register_record, out)
    return out


STAGES = {
    "data": stage_data,
    "pairs": stage_pairs,
    "validate": stage_validate,
    "train": stage_train,
    "evaluate": stage_evaluate,
    "register": stage_register,
}
