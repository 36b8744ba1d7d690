"""MLflow for a study: one parent run ``study`` per execution, one child run per cell.

Cells never talk to MLflow (they run where only the ML stack is installed): after the cells are done,
the child runs are created from each cell's ``cell.json`` (params method, seed, sweep; metrics: the
cell's figures, accuracy per level, wall times; the record as an artifact). A cell skipped as done
still gets its child run in the new parent, tagged ``coin.study.cached = true``. The parent holds
the settings as params, the aggregated figures and differences as metrics, and the study's outputs
as artifacts. All through :class:`mlflow.MlflowClient` with explicit run ids (no active-run state, so
the Prefect tasks can run anywhere).
"""

from __future__ import annotations

import re
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from coin.config import Settings


def _key(name: str) -> str:
    """An MLflow-legal metric / param name (alphanumerics, _ - . / and space)."""
    return re.sub(r"[^\w\-./ ]", "_", name)


def _metric(x: Any) -> float | None:
    return float(x) if isinstance(x, (int, float)) and not isinstance(x, bool) and x == x else None


@contextmanager
def _ended_if_stopped(client: Any, run_id: str) -> Iterator[None]:
    """A run created by the client is ended KILLED (Ctrl-C, SIGTERM) or FAILED if the work on it stops: before, a
    stop between ``create_run`` and ``set_terminated`` (or before the caller knew the run's id) left it RUNNING for
    ever."""
    try:
        yield
    except BaseException as exc:
        from coin.interrupt import stopped

        try:
            client.set_terminated(run_id, status="KILLED" if stopped(exc) else "FAILED")
        except Exception:  # noqa: BLE001 -- the first error is the one to report
            pass
        raise


def open_study_run(settings: Settings, root: Path, flow_run_id: str | None = None) -> str:
    """Create the parent run ``study`` (provenance tags, all params); returns its id."""
    from mlflow import MlflowClient
    from mlflow.entities import Param

    from coin.registry.tracking import provenance_tags, setup_tracking

    exp_id = setup_tracking(settings, root)
    tags = {**provenance_tags(settings, root, "study"), "prefect.flow_run_id": str(flow_run_id)}
    client = MlflowClient()
    run = client.create_run(exp_id, run_name="study", tags=tags)
    with _ended_if_stopped(client, run.info.run_id):  # the caller ends it once it has the id
        params = [Param(k, str(v)[:6000]) for k, v in settings.to_flat_dict().items()]
        for i in range(0, len(params), 100):
            client.log_batch(run.info.run_id, params=params[i:i + 100])
    return run.info.run_id


def log_cell_runs(settings: Settings, root: Path, parent_run_id: str, records: list[dict[str, Any]]) -> dict[str, str]:
    """One child run per cell record (``run_cell``'s return value); returns ``{cell name: run id}``."""
    from mlflow import MlflowClient

    from coin.registry.tracking import provenance_tags, setup_tracking

    exp_id = setup_tracking(settings, root)
    client = MlflowClient()
    out = {}
    for rec in records:
        cell = rec["cell"]
        tags = {**provenance_tags(settings, root, "study-cell"), "mlflow.parentRunId": parent_run_id,
                "coin.method": cell["method"], "coin.study.cell": cell["name"], "coin.study.key": rec["key"],
                "coin.study.cached": str(bool(rec.get("cached"))).lower(), "coin.study.device": str(rec.get("device"))}
        run = client.create_run(exp_id, run_name=f"cell-{cell['name']}", tags=tags)
        with _ended_if_stopped(client, run.info.run_id):
            _log_cell(client, run.info.run_id, rec)
        client.set_terminated(run.info.run_id, status="FINISHED")
        out[cell["name"]] = run.info.run_id
    return out


def _log_cell(client: Any, run_id: str, rec: dict[str, Any]) -> None:
    """A cell record's params, metrics and cell.json on its run."""
    from mlflow.entities import Metric, Param

    cell = rec["cell"]
    params = {"method": cell["method"], "seed": cell["seed"], "sweep_key": cell["sweep_key"],
              "sweep_value": cell["sweep_value"], "eval_seed": rec.get("eval_seed"), "scoring": rec.get("scoring")}
    values: dict[str, Any] = {**rec["figures"], **{f"level/{k}": v for k, v in rec.get("levels", {}).items()},
                              **{f"wall_s/{k}": v for k, v in rec.get("wall_time_s", {}).items()}}
    if rec.get("train"):
        values["train/steps"] = rec["train"].get("steps")
        values.update({f"train/{k}": v for k, v in rec["train"].get("final", {}).items()})
    ts = int(time.time() * 1000)
    metrics = [Metric(_key(k), m, ts, 0) for k, v in values.items() if (m := _metric(v)) is not None]
    client.log_batch(run_id, metrics=metrics, params=[Param(k, str(v)) for k, v in params.items()])
    record_file = Path(rec["dir"]) / "cell.json"
    if record_file.exists():
        client.log_artifact(run_id, str(record_file), artifact_path="cell")


def study_metrics(study: dict[str, Any]) -> dict[str, float]:
    """The parent run's metrics: per group and method the mean/std over seeds of each figure and the
    interval of each bootstrapped figure; per difference the delta and its interval, for the accuracies and the
    robustness figures (consistency, worst case)."""
    from coin.study.aggregate import BOOTSTRAPPED

    out: dict[str, float] = {}
    for g in study["groups"]:
        prefix = f"{g['sweep']}/" if g.get("sweep") else ""
        for m, b in g["methods"].items():
            for f, block in b["figures"].items():
                for stat in ("mean", "std"):
                    if (v := _metric(block.get(stat))) is not None:
                        out[_key(f"{prefix}{m}/{f}_{stat}")] = v
            for part, iv in b["interval"].items():
                for stat in ("ci_low", "ci_high"):
                    if (v := _metric(iv.get(stat))) is not None:
                        out[_key(f"{prefix}{m}/{part}_{stat}")] = v
        for d in g["differences"]:
            for part in BOOTSTRAPPED:
                for stat in ("delta", "ci_low", "ci_high"):
                    if (v := _metric((d.get(part) or {}).get(stat))) is not None:
                        out[_key(f"{prefix}delta/{d['a']}-{d['b']}/{part}_{stat}")] = v
        if (v := _metric(g["majority_class"].get("avg"))) is not None:
            out[_key(f"{prefix}majority_class")] = v
    return out


def log_study_run(settings: Settings, root: Path, parent_run_id: str, study: dict[str, Any],
                  paths: dict[str, str]) -> None:
    """The aggregated numbers as the parent run's metrics; the study's outputs as its artifacts."""
    from mlflow import MlflowClient
    from mlflow.entities import Metric

    from coin.registry.tracking import setup_tracking

    setup_tracking(settings, root)
    client = MlflowClient()
    ts = int(time.time() * 1000)
    metrics = [Metric(k, v, ts, 0) for k, v in study_metrics(study).items()]
    for i in range(0, len(metrics), 500):
        client.log_batch(parent_run_id, metrics=metrics[i:i + 500])
    for p in paths.values():
        if Path(p).is_file():
            client.log_artifact(parent_run_id, p, artifact_path="study")


def close_study_run(settings: Settings, root: Path, run_id: str, status: str) -> None:
    from mlflow import MlflowClient

    from coin.registry.tracking import setup_tracking

    setup_tracking(settings, root)
    MlflowClient().set_terminated(run_id, status=status)
