"""The Prefect flow on tiny settings under prefect_test_harness, end to end (real MLflow store in tmp)."""

from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]

TINY = {
    "paths": {"data_dir": str(ROOT / "data"), "out_dir": "outputs", "mlruns_dir": "mlruns"},
    "pairs": {"tasks": ["sst2", "rte"], "rows_per_task": 8, "val_fraction": 0.25, "cutoff_len": 200},
    "validate": {"min_pass_rate": 0.5},
    "train": {"max_steps": 2, "batch_size": 4, "log_every": 1},
    "evaluate": {"tasks": ["sst2", "rte"], "instruction_sets": ["clean", "textfooler"], "samples_per_task": 3,
                 "instruction_file": str(ROOT / "data" / "promptbench" / "coin_perturbed_instructions.json"),
                 "include_base": False},
    "register": {"model_name": "coin-tiny"},
}


@pytest.fixture(scope="module")
def prefect_harness():
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield


def _project(tmp_path: Path, settings: dict) -> Path:
    p = tmp_path / "params.yaml"
    p.write_text(yaml.safe_dump(settings))
    return p


def test_flow_runs_every_stage_on_tiny_settings(prefect_harness, tmp_path):
    import mlflow
    from mlflow import MlflowClient

    from flows.pipeline import coin_pipeline

    params = _project(tmp_path, TINY)
    result = coin_pipeline(params_path=str(params), overrides=[])
    out = tmp_path / "outputs"
    assert (out / "pairs" / "pairs.jsonl").exists()
    assert (out / "validated" / "valid.jsonl").exists() and (out / "validated" / "rejects.jsonl").exists()
    assert (out / "train" / "adapter" / "adapter_config.json").exists()
    assert (out / "evaluate" / "metrics.json").exists() and (out / "evaluate" / "table.md").exists()
    assert result["train"]["steps"] == 2
    assert result["register"]["aliases"] == ["champion"]
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'mlruns' / 'mlflow.db'}")
    v = MlflowClient().get_model_version_by_alias("coin-tiny", "champion")
    run = mlflow.get_run(v.run_id)
    assert run.data.tags["coin.data_version"] == "unknown"  # the tmp project has no data.dvc
    assert run.data.tags["coin.method"] == "coin"
    assert "train/loss" in run.data.metrics and any(k.startswith("eval.coin.") for k in run.data.metrics)


def test_flow_rejects_bad_params_before_any_work(prefect_harness, tmp_path):
    from coin.config import ConfigError
    from flows.pipeline import coin_pipeline

    params = _project(tmp_path, {**TINY, "train": {"max_stepz": 2}})
    with pytest.raises(ConfigError, match="train.max_stepz: unknown key"):
        coin_pipeline(params_path=str(params), overrides=[])
    assert not (tmp_path / "outputs").exists()
