"""The flow's data step on a fresh copy of the repository: pull, then version + push a local change."""

from pathlib import Path

import yaml

from coin.config import Settings
from flows.data_sync import version_data
from helpers_project import copy_project


def _md5(project: Path) -> str:
    return yaml.safe_load((project / "data.dvc").read_text())["outs"][0]["md5"]


def test_version_data_pulls_then_versions_and_pushes_a_change(tmp_path, monkeypatch):
    monkeypatch.setenv("DVC_NO_ANALYTICS", "1")
    project = copy_project(tmp_path)
    remote = project / "dvc-remote"
    settings = Settings.model_validate({})
    v0 = _md5(project)

    first = version_data(settings, project)  # fresh clone: no data/ yet
    assert first == {"data_version": v0, "pulled": True, "versioned": False, "pushed": 0}
    assert (project / "data" / "glue" / "sst2.train.jsonl").exists()

    assert version_data(settings, project) == {"data_version": v0, "pulled": False, "versioned": False, "pushed": 0}

    files_before = {p for p in remote.rglob("*") if p.is_file()}
    (project / "data" / "glue" / "extra.jsonl").write_text('{"sentence": "new row", "label": 1}\n')
    changed = version_data(settings, project)
    v1 = _md5(project)
    assert v1 != v0 and changed["data_version"] == v1
    assert changed["versioned"] and not changed["pulled"] and changed["pushed"] >= 1
    assert {p for p in remote.rglob("*") if p.is_file()} > files_before  # the new version is in the remote

    again = version_data(settings, project)
    assert again == {"data_version": v1, "pulled": False, "versioned": False, "pushed": 0}


def test_version_data_without_push_leaves_the_remote_alone(tmp_path, monkeypatch):
    monkeypatch.setenv("DVC_NO_ANALYTICS", "1")
    project = copy_project(tmp_path)
    settings = Settings.model_validate({})
    version_data(settings, project)
    files_before = {p for p in (project / "dvc-remote").rglob("*") if p.is_file()}
    (project / "data" / "glue" / "extra.jsonl").write_text("{}\n")
    out = version_data(settings, project, push=False)
    assert out["versioned"] and out["pushed"] == 0
    assert {p for p in (project / "dvc-remote").rglob("*") if p.is_file()} == files_before
