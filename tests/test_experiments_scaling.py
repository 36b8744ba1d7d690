"""experiments/scaling.py on constructed predictions whose row-scaling slope is known."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

ROOT = Path(__file__).resolve().parents[1]


def _model(tmp: Path, name: str, rows: int, n_correct: int) -> str:
    """One model on 50 sst2 examples (majority rate 60%), n_correct of them right under each of 2 instructions."""
    labels = [1] * 30 + [0] * 20
    recs = [
        {"scoring": "loglik", "set": "clean", "task": "sst2", "example_id": f"sst2:{i}", "label": lab,
         "correct": i < n_correct, "instruction_id": k}
        for k in range(2) for i, lab in enumerate(labels)
    ]  # fmt: skip
    pq, meta = tmp / f"{name}.parquet", tmp / f"{name}.json"
    pd.DataFrame(recs).to_parquet(pq)
    meta.write_text(json.dumps({"label_counts": {"sst2": [rows // 2, rows - rows // 2]}}))
    return f"{pq},{meta}"


def _run(tmp: Path, specs: list[str]) -> subprocess.CompletedProcess:
    cmd = [sys.executable, str(ROOT / "experiments" / "scaling.py"), *specs, "--n_boot", "50", "--out", str(tmp / "o")]
    return subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)


def test_fit_recovers_known_slope_and_crossing(tmp_path: Path) -> None:
    # +2, +4, +6 points over the majority at 1,000 / 2,000 / 4,000 rows: +2 per doubling, +10 at 16,000 rows
    specs = [
        f"{b}:s{s}=" + _model(tmp_path, f"{b}{s}", rows, 31 + i)
        for i, (b, rows) in enumerate([("a", 1000), ("b", 2000), ("c", 4000)])
        for s in range(2)
    ]
    out = _run(tmp_path, specs)
    assert out.returncode == 0, out.stderr
    fits = json.loads((tmp_path / "o" / "scaling.json").read_text())["fits"]
    for name in ("all budgets", "a → b", "b → c"):  # a straight line: every fit has its slope
        assert fits[name]["slope_per_doubling"] == pytest.approx(2.0), name
        assert fits[name]["rows_at_target"] == pytest.approx(16000, rel=1e-6), name
        assert fits[name]["slope_95"] == pytest.approx([2.0, 2.0])  # the seeds of a budget agree: no spread
    assert "| b | 2,000 | 2 | 64.0 ± 0.0 |" in (tmp_path / "o" / "table.md").read_text()
    assert (tmp_path / "o" / "scaling.png").stat().st_size > 0


def test_flat_curve_never_reaches_target(tmp_path: Path) -> None:
    specs = [f"{b}:s0=" + _model(tmp_path, b, rows, 31) for b, rows in [("a", 1000), ("b", 4000)]]
    out = _run(tmp_path, specs)
    assert out.returncode == 0, out.stderr
    assert math.isinf(json.loads((tmp_path / "o" / "scaling.json").read_text())["fits"]["a → b"]["rows_at_target"])


def test_refuses_models_scored_on_other_examples(tmp_path: Path) -> None:
    a = _model(tmp_path, "a", 1000, 31)
    b = _model(tmp_path, "b", 2000, 32)
    d = pd.read_parquet(b.split(",")[0])
    d["example_id"] = d.example_id + "x"
    d.to_parquet(b.split(",")[0])
    out = _run(tmp_path, [f"a:s0={a}", f"b:s0={b}"])
    assert out.returncode != 0
    assert "other examples" in out.stderr


def test_segments_show_falling_returns(tmp_path: Path) -> None:
    # +0, +4, +6 points at 1,000 / 2,000 / 4,000 rows: +4 then +2 per doubling; the last segment reaches +10 at
    # 4,000 * 2**2 = 16,000 rows, the fit over all budgets (slope 3) sooner
    specs = [
        f"{b}:s0=" + _model(tmp_path, b, rows, k) for b, rows, k in [("a", 1000, 30), ("b", 2000, 32), ("c", 4000, 33)]
    ]
    out = _run(tmp_path, specs)
    assert out.returncode == 0, out.stderr
    fits = json.loads((tmp_path / "o" / "scaling.json").read_text())["fits"]
    assert fits["a → b"]["slope_per_doubling"] == pytest.approx(4.0)
    assert fits["b → c"]["slope_per_doubling"] == pytest.approx(2.0)
    assert fits["b → c"]["rows_at_target"] == pytest.approx(16000, rel=1e-6)
    assert fits["all budgets"]["slope_per_doubling"] == pytest.approx(3.0)
    assert fits["all budgets"]["rows_at_target"] < 16000
    assert "b onwards" not in fits  # from b onwards is the segment b → c itself
    # given in another order, the budgets are still taken by their rows: the same fits under the same names
    again = _run(tmp_path, [specs[2], specs[0], specs[1]])
    assert again.returncode == 0, again.stderr
    assert json.loads((tmp_path / "o" / "scaling.json").read_text())["fits"].keys() == fits.keys()
    # one model given twice was two seeds of no spread, weighted double in the fits
    twice = _run(tmp_path, [specs[0], specs[0], specs[1]])
    assert twice.returncode != 0 and "a:s0 is given twice" in twice.stderr, twice.stderr


def test_user_errors_are_one_line(tmp_path: Path) -> None:
    """A model given without its coin_model.json, and a --probe of other tasks or made without --samples 1000:
    each refused in one line that names the fix (a TypeError and a KeyError 'sst2' before)."""
    a, b = _model(tmp_path, "a", 1000, 31), _model(tmp_path, "b", 2000, 33)
    out = _run(tmp_path, [f"a:s0={a.split(',')[0]}", f"b:s0={b}"])
    assert out.returncode != 0 and "Traceback" not in out.stderr
    assert "give BUDGET:SEED=PREDICTIONS.parquet,COIN_MODEL.json" in out.stderr
    run = {"rows": 100, "C": 1.0, "acc_sample": 70.0, "acc_full": 70.0, "acc_sample_50": 70.0}
    for tasks, message in (({"rte": {"majority_sample_1000": 50.0, "runs": {"bi, all rows": run}}},
                            "no probe of task(s) ['sst2']"),
                           ({"sst2": {"majority_sample_50": 50.0, "runs": {"bi, all rows": run}}},
                            "--samples 1000")):
        (tmp_path / "probe.json").write_text(json.dumps({"tasks": tasks}))
        out = _run(tmp_path, [f"a:s0={a}", f"b:s0={b}", "--probe", str(tmp_path / "probe.json")])
        assert out.returncode != 0 and "Traceback" not in out.stderr and message in out.stderr, out.stderr
