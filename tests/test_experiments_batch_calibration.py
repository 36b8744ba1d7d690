"""experiments/batch_calibration.py: its user errors, one line each."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pandas as pd

ROOT = Path(__file__).resolve().parents[1]


def _run(*specs: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "experiments" / "batch_calibration.py"), *specs],
                          capture_output=True, text=True, check=False)


def test_a_model_without_its_coin_model_json_or_its_files_is_one_line(tmp_path: Path) -> None:
    pq = tmp_path / "p.parquet"
    pd.DataFrame({"scoring": ["generate"], "set": ["clean"], "task": ["sst2"], "label": [0], "correct": [True],
                  "instruction_id": [0], "raw_scores": [[0.0, 1.0]]}).to_parquet(pq)
    (tmp_path / "m.json").write_text("{}")
    for specs, message in (([f"s0={pq}"], "give NAME=PREDICTIONS.parquet,COIN_MODEL.json"),
                           ([f"s0={pq},{tmp_path / 'nope.json'}"], "nope.json: no such file"),
                           ([f"s0={pq},{tmp_path / 'm.json'}"], "no clean loglik rows")):
        out = _run(*specs)
        assert out.returncode != 0 and "Traceback" not in out.stderr and message in out.stderr, out.stderr
