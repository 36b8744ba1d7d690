"""Registry and consumption costs with the default backbone (embedded MiniLM + LoRA from params.yaml).

    ./run.sh python bench/bench_registry.py [--rows 16] [--repeats 5] [--threads N] [--no-serve]

In a temporary MLflow store (nothing touches the project's mlruns/): log + register + gate one
adapter, load ``models:/<name>@champion`` in-process and in a fresh process, predict (label scoring
over sst2's two label words), and, unless ``--no-serve``, time ``mlflow models serve`` from start to
``/ping`` and per ``/invocations`` request. The adapter is freshly initialised (training does not
change these costs). Prints a Markdown table; medians over ``--repeats``. ``--threads N`` sets torch's
threads here and ``OMP_NUM_THREADS`` for the child processes (on a busy machine 2 threads on 2 cores
can be ~10x slower than 1: OpenMP waits on descheduled threads).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import coin  # noqa: F401  (local-only environment)
from coin.config import load_settings

URI = "models:/bench@champion"
ROW = {"instruction": "Classify the sentiment of this review as 'positive' or 'negative': ",
       "input": "a gorgeous, witty, seductive movie.", "task": "sst2"}


def _dir_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in Path(path).rglob("*") if p.is_file())


def _median(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _serve(uri_env: dict[str, str], rows: int, repeats: int, out: dict[str, str]) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, **uri_env, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    t0 = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", "mlflow", "models", "serve", "-m", URI, "--env-manager", "local",
                             "-h", "127.0.0.1", "-p", str(port)], env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"mlflow models serve exited with {proc.returncode}")
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/ping", timeout=2)
                break
            except OSError:
                time.sleep(0.25)
        out["serve: start to /ping ready"] = f"{time.perf_counter() - t0:.1f} s"

        def call(n: int):
            body = json.dumps({"dataframe_records": [ROW] * n}).encode()
            req = urllib.request.Request(f"http://127.0.0.1:{port}/invocations", data=body,
                                         headers={"Content-Type": "application/json"}, method="POST")
            return lambda: urllib.request.urlopen(req, timeout=120).read()

        call(1)()  # warm-up
        out["serve: 1-row request"] = f"{1000 * _median(call(1), repeats):.0f} ms"
        out[f"serve: {rows}-row request"] = f"{1000 * _median(call(rows), repeats):.0f} ms"
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=30)


def main() -> None:
    from coin.argtypes import positive_int  # counts below 1 refused at the command line

    ap = argparse.ArgumentParser()
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("--rows", type=positive_int, default=16)
    ap.add_argument("--repeats", type=positive_int, default=5)
    ap.add_argument("--threads", type=positive_int, default=None, help="torch threads (default: torch's own choice)")
    ap.add_argument("--no-serve", action="store_true")
    args = ap.parse_args()
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
        os.environ["OMP_NUM_THREADS"] = str(args.threads)
    settings = load_settings(args.params)

    import mlflow
    import pandas as pd

    from coin.modeling.adapter import write_meta
    from coin.modeling.backbone import load_backbone, resolve_backbone
    from coin.modeling.lora import apply_lora
    from coin.registry.promotion import ModelFigures
    from coin.registry.register import register_candidate
    from coin.registry.tracking import setup_tracking, tracking_uri

    out: dict[str, str] = {}
    with tempfile.TemporaryDirectory() as tmp:
        tmp_path = Path(tmp)
        bb = load_backbone(settings.model.backbone, dtype=settings.model.dtype, device="cpu", seed=settings.seed)
        model = apply_lora(bb, settings.train.lora)
        adapter = tmp_path / "adapter"
        model.save_pretrained(str(adapter))
        bb.tokenizer.save_pretrained(str(adapter))
        write_meta(adapter, {"base": bb.reference, "dtype": settings.model.dtype, "seed": settings.seed,
                             "method": "coin", "prompt_format": "train", "append_eos": True})
        store = settings.model_copy(update={
            "paths": settings.paths.model_copy(update={"mlruns_dir": str(tmp_path / "mlruns")}),
            "tracking": settings.tracking.model_copy(update={"uri": None})})
        setup_tracking(store, tmp_path)
        with mlflow.start_run() as run:
            pass
        t0 = time.perf_counter()
        register_candidate(adapter, run.info.run_id, "bench", ModelFigures(70.0, 60.0),
                           min_improvement=settings.register_.min_improvement,
                           max_clean_drop=settings.register_.max_clean_drop)
        out["log + register + gate"] = f"{time.perf_counter() - t0:.1f} s"
        local = Path(mlflow.artifacts.download_artifacts(URI, dst_path=str(tmp_path / "dl")))
        out["logged model size (no base weights)"] = f"{_dir_bytes(local) / 1e6:.2f} MB"
        base_dir = Path(resolve_backbone(bb.reference))
        if base_dir.is_dir():
            out["base model size (not logged)"] = f"{_dir_bytes(base_dir) / 1e6:.1f} MB"

        t0 = time.perf_counter()
        pyfunc = mlflow.pyfunc.load_model(URI)
        out["load_model, warm process"] = f"{time.perf_counter() - t0:.2f} s"
        one, many = pd.DataFrame([ROW]), pd.DataFrame([ROW] * args.rows)
        pyfunc.predict(one)
        out["predict 1 row (in-process)"] = f"{1000 * _median(lambda: pyfunc.predict(one), args.repeats):.0f} ms"
        out[f"predict {args.rows} rows (in-process)"] = \
            f"{1000 * _median(lambda: pyfunc.predict(many), args.repeats):.0f} ms"

        uri_env = {"MLFLOW_TRACKING_URI": tracking_uri(store, tmp_path), "MLFLOW_DISABLE_TELEMETRY": "true",
                   "DO_NOT_TRACK": "true", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
        code = ("import time; t=time.perf_counter(); import mlflow, pandas as pd; "
                f"m=mlflow.pyfunc.load_model({URI!r}); l=time.perf_counter(); "
                f"m.predict(pd.DataFrame([{ROW!r}])); print(l-t, time.perf_counter()-t)")
        t0 = time.perf_counter()
        res = subprocess.run([sys.executable, "-c", code], env={**os.environ, **uri_env}, capture_output=True,
                             text=True, check=True)
        wall = time.perf_counter() - t0
        load_s, first_s = map(float, res.stdout.split()[-2:])
        out["fresh process: import + load_model"] = f"{load_s:.1f} s"
        out["fresh process: + first predict"] = f"{first_s:.1f} s (process wall {wall:.1f} s)"
        if not args.no_serve:
            _serve(uri_env, args.rows, args.repeats, out)

    print(f"backbone `{settings.model.backbone}`, LoRA r={settings.train.lora.r}, torch threads "
          f"{__import__('torch').get_num_threads()}, median of {args.repeats}\n")
    print("| measure | value |\n|---|---:|")
    for k, v in out.items():
        print(f"| {k} | {v} |")


if __name__ == "__main__":
    from coin.cli import run_script  # a user error in two lines, a bug with its traceback

    raise SystemExit(run_script(main))
