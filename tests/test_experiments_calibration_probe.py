"""experiments/calibration_probe.py: the rows it re-decides, and its user errors (before any model is loaded)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _rows() -> list[dict]:
    """Two models of one evaluation, each scored both ways (generate rows have no label scores), clean and
    perturbed."""
    return [{"model": m, "task": "sst2", "set": st, "scoring": sc, "instruction_id": 0, "example_id": f"sst2:{i}",
             "label": 1, "scores": [0.0, 1.0] if sc == "loglik" else None}
            for m in ("coin", "cit") for st in ("clean", "textfooler") for sc in ("loglik", "generate")
            for i in range(3)]


def test_only_the_methods_clean_loglik_rows_are_probed():
    from experiments.calibration_probe import probe_rows

    rows = probe_rows(_rows(), "coin")
    assert len(rows) == 3
    assert {(r["model"], r["set"], r["scoring"]) for r in rows} == {("coin", "clean", "loglik")}
    with pytest.raises(SystemExit, match=r"no predictions of model 'cot'; it holds \['cit', 'coin'\]"):
        probe_rows(_rows(), "cot")
    with pytest.raises(SystemExit, match="no clean loglik rows"):
        probe_rows([r for r in _rows() if r["scoring"] == "generate"], "coin")


def test_user_errors_are_one_line(tmp_path: Path):
    script = str(ROOT / "experiments" / "calibration_probe.py")
    out = subprocess.run([sys.executable, script, str(tmp_path), "coin"], capture_output=True, text=True,
                         check=False)
    assert out.returncode != 0 and "Traceback" not in out.stdout + out.stderr
    assert "predictions.jsonl" in out.stdout + out.stderr
    (tmp_path / "evaluate").mkdir()
    (tmp_path / "evaluate" / "predictions.jsonl").write_text("".join(json.dumps(r) + "\n" for r in _rows()))
    out = subprocess.run([sys.executable, script, str(tmp_path), "cot"], capture_output=True, text=True,
                         check=False)
    assert out.returncode != 0 and "no predictions of model 'cot'" in out.stderr
