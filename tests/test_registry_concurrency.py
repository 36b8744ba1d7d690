"""Registration under concurrency: ``coin register`` processes racing on one SQLite store create one version
per training run and one decision per version, and decide one after the other (one "No champion yet").
Real processes, a real MLflow store in tmp_path, the real adapter logging (as tests/test_registry.py does
for one process)."""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

from test_registry import _adapter

from coin.config import Settings
from coin.registry.register import log_candidate, registration_lock_path
from coin.registry.tracking import setup_tracking

NAME = "race"

# One `coin register` of one run: the same function the register stage calls, in its own process. It waits
# for the go file so the processes start their check-and-create together.
CHILD = r"""
import json, sys, time
from pathlib import Path

from coin.config import Settings
from coin.registry.promotion import ModelFigures
from coin.registry.register import register_candidate
from coin.registry.tracking import setup_tracking

root, adapter, run_id, go, clean, perturbed = sys.argv[1:7]
settings = Settings.model_validate({"paths": {"mlruns_dir": str(Path(root) / "mlruns")},
                                    "tracking": {"experiment": "t"}})
setup_tracking(settings, Path(root))
while not Path(go).exists():
    time.sleep(0.005)
reg = register_candidate(Path(adapter), run_id, "race", ModelFigures(float(clean), float(perturbed)),
                         min_improvement=1.0, max_clean_drop=2.0)
print("RESULT " + json.dumps(reg.to_dict()))
"""


def _settings(root: Path) -> Settings:
    return Settings.model_validate({"paths": {"mlruns_dir": str(root / "mlruns")}, "tracking": {"experiment": "t"}})


def _run(root: Path) -> str:
    import mlflow

    with mlflow.start_run() as run:
        mlflow.log_param("x", 1)
    return run.info.run_id


def test_concurrent_registrations_create_one_version_per_run_and_decide_in_turn(tmp_path, tiny_llama_dir):
    """Two processes register run A, a third registers run B (more robust), all at once."""
    from mlflow import MlflowClient

    setup_tracking(_settings(tmp_path), tmp_path)
    run_a, run_b = _run(tmp_path), _run(tmp_path)
    adapter = _adapter(tiny_llama_dir, tmp_path)
    go = tmp_path / "go"
    script = tmp_path / "register_child.py"
    script.write_text(CHILD)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    jobs = [(run_a, 70.0, 55.0), (run_a, 70.0, 55.0), (run_b, 75.0, 60.0)]
    procs = [subprocess.Popen([sys.executable, str(script), str(tmp_path), str(adapter), run, str(go), str(c), str(p)],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=tmp_path)
             for run, c, p in jobs]
    time.sleep(1.0)
    go.touch()
    results = []
    for proc in procs:
        out, err = proc.communicate(timeout=600)
        assert proc.returncode == 0, err[-3000:]
        results.append(json.loads(next(line for line in out.splitlines() if line.startswith("RESULT "))[7:]))

    client = MlflowClient()
    versions = client.search_model_versions(f"name = '{NAME}'")
    by_run: dict[str, list[str]] = {}
    for v in versions:
        by_run.setdefault(v.run_id, []).append(str(v.version))
    # one version per training run, whoever got there first
    assert sorted(map(len, by_run.values())) == [1, 1], by_run
    a1, a2, b = results
    assert a1["version"] == a2["version"] == by_run[run_a][0] and b["version"] == by_run[run_b][0]
    assert sorted([a1["created"], a2["created"]]) == [False, True]
    assert a1["decision"] == a2["decision"]  # one decision for the version, returned to both
    # the decisions were taken one after the other: exactly one found no champion yet
    no_champion = [r for r in (a1, b) if r["decision"]["reason"].startswith("No champion")]
    assert len(no_champion) == 1, [r["decision"]["reason"] for r in (a1, b)]
    champion = str(client.get_model_version_by_alias(NAME, "champion").version)
    assert champion == b["version"]  # B is more robust than A whichever went first
    # the registration lock lives beside the SQLite store
    assert registration_lock_path() == tmp_path / "mlruns" / "mlflow.db.coin-register.lock"


def test_a_duplicate_created_in_a_race_is_deleted_after_the_fact(tmp_path, tiny_llama_dir, monkeypatch):
    """Without the lock (processes on other machines), the check after creating removes a duplicate: the
    other process's version is seen only after this one logged its own."""
    from mlflow import MlflowClient

    import coin.registry.register as register

    setup_tracking(_settings(tmp_path), tmp_path)
    run = _run(tmp_path)
    adapter = _adapter(tiny_llama_dir, tmp_path)
    first = log_candidate(adapter, run, NAME)
    assert first.created and first.version == "1"

    real = register.existing_version
    calls = {"n": 0}

    def late(client, name, run_id):  # the first look happens before the other process's version is visible
        calls["n"] += 1
        return None if calls["n"] == 1 else real(client, name, run_id)

    monkeypatch.setattr(register, "existing_version", late)
    again = log_candidate(adapter, run, NAME)
    assert calls["n"] == 2
    assert not again.created and again.version == "1"
    versions = MlflowClient().search_model_versions(f"name = '{NAME}'")
    assert [str(v.version) for v in versions] == ["1"]


def test_registration_lock_is_reentrant_and_names_no_credentials(tmp_path):
    from coin.registry.register import registration_lock

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    with registration_lock(uri) as outer:
        with registration_lock(uri) as inner:  # the same thread may nest (register_candidate -> log_candidate)
            assert outer == inner == tmp_path / "mlflow.db.coin-register.lock"
    remote = registration_lock_path("http://alice:hunter2@mlflow.example.org:5000")
    assert "hunter2" not in str(remote) and remote.name.startswith("coin-register-")
