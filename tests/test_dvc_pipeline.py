"""`dvc repro` on a copy of the repository (tiny params): all stages, then a no-op, then a partial rerun."""

from pathlib import Path

import pytest
import yaml

from helpers_project import copy_project, run

TINY = {
    "pairs": {"tasks": ["sst2", "rte"], "rows_per_task": 8, "val_fraction": 0.25},
    "validate": {"min_pass_rate": 0.5},
    "train": {"max_steps": 2, "batch_size": 4, "log_every": 1},
    "evaluate": {"tasks": ["sst2", "rte"], "instruction_sets": ["clean"], "samples_per_task": 3,
                 "include_base": False},
}


@pytest.fixture(scope="module")
def project(tmp_path_factory) -> Path:
    dest = copy_project(tmp_path_factory.mktemp("proj"))
    params = yaml.safe_load((dest / "params.yaml").read_text())
    for section, values in TINY.items():
        params[section].update(values)
    (dest / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    run(["git", "-c", "user.email=t@t", "-c", "user.name=t", "commit", "-qam", "tiny params"], dest)
    return dest


def test_fresh_copy_pulls_data_offline_from_the_in_repo_remote(project):
    assert not (project / "data").exists()
    run(["dvc", "pull", "-q", "data.dvc"], project)
    assert (project / "data" / "glue" / "sst2.train.jsonl").exists()
    status = run(["dvc", "status", "data.dvc"], project).stdout
    assert "up to date" in status


def test_repro_runs_all_stages_then_nothing_then_only_downstream(project):
    first = run(["dvc", "repro"], project).stdout
    for stage in ("pairs", "validate", "train", "evaluate", "register"):
        assert f"Running stage '{stage}'" in first, first
    assert (project / "outputs" / "evaluate" / "metrics.json").exists()
    assert (project / "outputs" / "register" / "registration.json").exists()

    second = run(["dvc", "repro"], project).stdout
    assert "Data and pipelines are up to date" in second, second
    assert "Running stage" not in second

    params = yaml.safe_load((project / "params.yaml").read_text())
    params["evaluate"]["samples_per_task"] = 4
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    third = run(["dvc", "repro"], project).stdout
    assert "Running stage 'evaluate'" in third and "Running stage 'register'" in third
    for skipped in ("pairs", "validate", "train"):
        assert f"Running stage '{skipped}'" not in third, third
    metrics = run(["dvc", "metrics", "show", "--json"], project).stdout
    assert "acc_mean" in metrics
