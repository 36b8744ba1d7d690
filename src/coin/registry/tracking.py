"""MLflow tracking set-up: the local store in ``mlruns/``, run provenance (data version, git commit).

The embedded default store is a SQLite database plus an artifact folder inside the project's
``mlruns/`` (MLflow 3 refuses a bare file store). Point ``tracking.uri`` at an MLflow server
(``http://127.0.0.1:5000``) or a PostgreSQL database to share runs; nothing else changes.
"""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Any

import yaml

from coin.config import Settings


def tracking_uri(settings: Settings, root: Path) -> str:
    if settings.tracking.uri:
        return settings.tracking.uri
    store = (root / settings.paths.mlruns_dir).resolve()
    store.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{store / 'mlflow.db'}"


def setup_tracking(settings: Settings, root: Path) -> str:
    """Point MLflow at the configured store and make sure the experiment exists; returns its id."""
    import mlflow

    uri = tracking_uri(settings, root)
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    exp = mlflow.get_experiment_by_name(settings.tracking.experiment)
    if exp is not None:
        exp_id = exp.experiment_id
    else:
        artifacts = None
        if not settings.tracking.uri:  # local default: artifacts beside the db, inside mlruns/
            artifacts = ((root / settings.paths.mlruns_dir).resolve() / "artifacts").as_uri()
        exp_id = mlflow.create_experiment(settings.tracking.experiment, artifact_location=artifacts)
    mlflow.set_experiment(experiment_id=exp_id)
    return exp_id


def data_version(root: Path) -> str:
    """The md5 of the DVC-tracked data directory, from ``data.dvc`` ('unknown' if absent)."""
    f = root / "data.dvc"
    if not f.exists():
        return "unknown"
    doc = yaml.safe_load(f.read_text()) or {}
    outs = doc.get("outs") or [{}]
    return str(outs[0].get("md5", "unknown"))


def git_commit(root: Path) -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, timeout=10)
        sha = out.stdout.strip()
        if out.returncode != 0 or not sha:
            return "unknown"
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return sha + ("-dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def provenance_tags(settings: Settings, root: Path, stage: str) -> dict[str, Any]:
    return {
        "coin.stage": stage,
        "coin.data_version": data_version(root),
        "mlflow.source.git.commit": git_commit(root),
        "coin.backbone": settings.model.backbone,
    }
