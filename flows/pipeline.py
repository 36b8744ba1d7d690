"""The CoIN pipeline as a Prefect flow: each stage of ``coin.stages`` runs as a task.

    python -m flows.pipeline                 # or: coin pipeline
    python -m flows.pipeline --set train.max_steps=10

Nothing here computes anything: the tasks call the same stage functions as ``coin <stage>`` and
``dvc repro``. Validation and evaluation summaries are published as Prefect Markdown artifacts.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import coin  # noqa: F401  (local-only environment before Prefect is imported)
from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact

from coin.config import load_settings
from coin.stages import STAGES


def _stage_task(name: str, retries: int = 0):
    @task(name=name, retries=retries, retry_delay_seconds=2)
    def run(params_path: str, overrides: list[str]) -> dict[str, Any]:
        settings = load_settings(params_path, overrides)
        return STAGES[name](settings, Path(params_path).resolve().parent)

    return run


data_task = _stage_task("data", retries=2)  # I/O against the DVC remote
pairs_task = _stage_task("pairs")
validate_task = _stage_task("validate")
train_task = _stage_task("train")
evaluate_task = _stage_task("evaluate")
register_task = _stage_task("register", retries=2)  # I/O against the MLflow store


@flow(name="coin-pipeline", log_prints=True)
def coin_pipeline(params_path: str = "params.yaml", overrides: list[str] | None = None) -> dict[str, Any]:
    """data -> pairs -> validate -> train -> evaluate -> register."""
    logger = get_run_logger()
    overrides = list(overrides or [])
    load_settings(params_path, overrides)  # bad params fail here, before any work
    data = data_task(params_path, overrides)
    logger.info("data version %s (pulled: %s)", data["data_version"], data["pulled"])
    pairs = pairs_task(params_path, overrides)
    logger.info("pairs: %s", pairs["per_task"])
    gate = validate_task(params_path, overrides)
    create_markdown_artifact(gate["markdown"], key="validation-summary", description="paraphrase-validation gate")
    trained = train_task(params_path, overrides)
    logger.info("trained %s for %d steps in %.1f s", trained["method"], trained["steps"], trained["wall_time_s"])
    evaluated = evaluate_task(params_path, overrides)
    create_markdown_artifact(evaluated["table"], key="robustness-table", description="accuracy mean ± std over instructions")
    registered = register_task(params_path, overrides)
    logger.info("registered %s version %s (%s)", registered["name"], registered["version"], registered["aliases"])
    return {"data": data, "pairs": pairs, "validate": {k: v for k, v in gate.items() if k != "markdown"},
            "train": trained, "evaluate": evaluated["metrics"], "table": evaluated["table"], "register": registered}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("--set", dest="overrides", action="append", default=[], help="section.key=value")
    args = ap.parse_args()
    coin_pipeline(params_path=args.params, overrides=args.overrides)


if __name__ == "__main__":
    main()
