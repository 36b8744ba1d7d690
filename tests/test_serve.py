"""Over HTTP: ``mlflow models serve`` on 127.0.0.1 answers a real request for the champion, and
``tracking.uri`` pointed at a real ``mlflow server`` carries runs, models and the registry."""

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pandas as pd
import pytest
from test_registry import GATE, _adapter

from coin.config import Settings
from coin.data.tasks import TASKS
from coin.registry.promotion import ModelFigures
from coin.registry.register import register_candidate
from coin.registry.tracking import setup_tracking, tracking_uri


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env(**extra: str) -> dict[str, str]:
    """Local-only env for a child MLflow process; the venv's bin on PATH (the scoring server execs
    `uvicorn` by name, as `./run.sh` arranges for users)."""
    return {**os.environ, "MLFLOW_DISABLE_TELEMETRY": "true", "DO_NOT_TRACK": "true", "HF_HUB_OFFLINE": "1",
            "TRANSFORMERS_OFFLINE": "1",
            "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}", **extra}


def _start(args: list[str], env: dict[str, str], log_path: Path) -> subprocess.Popen:
    with log_path.open("w") as log:  # its own process group, so _stop ends the server and its workers
        return subprocess.Popen([sys.executable, "-m", "mlflow", *args], env=env, stdout=log,
                                stderr=subprocess.STDOUT, start_new_session=True)


def _stop(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=20)
    except ProcessLookupError:
        pass
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)


def _wait_ready(url: str, proc: subprocess.Popen, log_path, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"{proc.args[3:5]} exited with {proc.returncode}:\n{log_path.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(url, timeout=2) as r:
                if r.status == 200:
                    return
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            pass
        time.sleep(0.5)
    raise AssertionError(f"{url} not ready after {timeout} s:\n{log_path.read_text()[-3000:]}")


def test_mlflow_models_serve_answers_a_request(tmp_path, tiny_llama_dir):
    import mlflow

    settings = Settings.model_validate({"paths": {"mlruns_dir": str(tmp_path / "mlruns")},
                                        "tracking": {"experiment": "s"}})
    setup_tracking(settings, tmp_path)
    with mlflow.start_run() as run:
        pass
    register_candidate(_adapter(tiny_llama_dir, tmp_path), run.info.run_id, "tiny-serve", ModelFigures(70.0, 55.0),
                       **GATE)

    port = _free_port()
    log_path = tmp_path / "serve.log"
    proc = _start(["models", "serve", "-m", "models:/tiny-serve@champion", "--env-manager", "local",
                   "-h", "127.0.0.1", "-p", str(port)],
                  _env(MLFLOW_TRACKING_URI=tracking_uri(settings, tmp_path)), log_path)
    try:
        t0 = time.monotonic()
        _wait_ready(f"http://127.0.0.1:{port}/ping", proc, log_path, timeout=120)
        ready_s = time.monotonic() - t0
        body = {"dataframe_records": [
            {"instruction": "Is this review 'positive' or 'negative'? ", "input": "what a film", "task": "sst2"},
            {"instruction": "Pick one: ", "input": "x", "options": "yes|no"},
        ], "params": {"return_scores": True}}
        req = urllib.request.Request(f"http://127.0.0.1:{port}/invocations", data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"}, method="POST")
        with urllib.request.urlopen(req, timeout=60) as r:
            out = json.loads(r.read())
        preds = out["predictions"]
        assert preds[0]["answer"] in TASKS["sst2"].label_words
        assert set(json.loads(preds[0]["scores"])) == set(TASKS["sst2"].label_words)
        assert preds[1]["answer"] in {"yes", "no"}
        # a request missing a required column is refused with the schema error, not answered
        bad = urllib.request.Request(f"http://127.0.0.1:{port}/invocations",
                                     data=json.dumps({"dataframe_records": [{"instruction": "x"}]}).encode(),
                                     headers={"Content-Type": "application/json"}, method="POST")
        try:
            urllib.request.urlopen(bad, timeout=60)
            raise AssertionError("a request without the 'input' column was accepted")
        except urllib.error.HTTPError as err:
            assert err.code == 400 and "input" in err.read().decode()
        print(f"serve ready after {ready_s:.1f} s")
    finally:
        _stop(proc)


@pytest.mark.slow  # ~35 s on the loaded 2-core box (server start + a logged model over HTTP)
def test_tracking_server_by_setting_tracking_uri(tmp_path, tiny_llama_dir):
    """``tracking.uri: http://127.0.0.1:<port>`` sends runs, models and the registry to a real ``mlflow server``."""
    import mlflow

    from coin.registry.tracking import method_run, pipeline_run

    port = _free_port()
    log_path = tmp_path / "server.log"
    proc = _start(["server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
                   "--backend-store-uri", f"sqlite:///{tmp_path / 'server.db'}",
                   "--artifacts-destination", str(tmp_path / "mlartifacts")],
                  _env(MLFLOW_SERVER_ENABLE_JOB_EXECUTION="false"),  # no job consumers: 2 processes, not ~10
                  log_path)
    previous = mlflow.get_tracking_uri(), mlflow.get_registry_uri()
    try:
        t0 = time.monotonic()
        _wait_ready(f"http://127.0.0.1:{port}/health", proc, log_path, timeout=120)
        print(f"mlflow server ready after {time.monotonic() - t0:.1f} s")
        uri = f"http://127.0.0.1:{port}"
        settings = Settings.model_validate({"tracking": {"uri": uri, "experiment": "srv"}})
        with pipeline_run(settings, tmp_path) as parent:
            with method_run(settings, tmp_path, "coin") as run:
                mlflow.log_metric("train/loss", 0.5)
        reg = register_candidate(_adapter(tiny_llama_dir, tmp_path), run.info.run_id, "tiny-srv",
                                 ModelFigures(70.0, 55.0), **GATE)
        assert mlflow.get_tracking_uri() == uri and reg.aliases == ["challenger", "champion"]
        assert mlflow.get_run(run.info.run_id).data.tags["mlflow.parentRunId"] == parent.info.run_id
        pred = mlflow.pyfunc.load_model("models:/tiny-srv@champion").predict(
            pd.DataFrame({"instruction": ["Pick: "], "input": ["x"], "options": ["yes|no"]}))
        assert pred["answer"].iloc[0] in {"yes", "no"}
        # everything went through the server: its sqlite db and its artifact root, nothing in tmp_path/mlruns
        assert (tmp_path / "server.db").stat().st_size > 0 and not (tmp_path / "mlruns").exists()
        assert list((tmp_path / "mlartifacts").rglob("adapter_model.safetensors"))
    finally:
        mlflow.set_tracking_uri(previous[0])
        mlflow.set_registry_uri(previous[1])
        _stop(proc)
