"""experiments/ensemble_predictions.py on constructed label scores whose ensemble answer is known."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pandas as pd
import pytest

ROOT = Path(__file__).resolve().parents[1]


def _module():
    path = ROOT / "experiments" / "ensemble_predictions.py"
    spec = importlib.util.spec_from_file_location("ensemble_predictions", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _frame(model: str, scores: list[list[float]], labels=(0, 1, 1)) -> pd.DataFrame:
    return pd.DataFrame({"model": model, "task": "sst2", "set": "clean", "instruction_id": 0,
                         "example_id": [f"sst2:{i}" for i in range(len(scores))], "label": list(labels),
                         "scores": scores})


def test_the_ensemble_answers_the_label_of_the_highest_mean_score():
    """m0 is right on examples 0 and 2, m1 on example 1 only; where they disagree the more confident one wins in the
    mean, so the ensemble is right on all three: 100 against 66.7 and 33.3 (mean 50.0); majority class 66.7."""
    m0 = _frame("m0", [[2, 0], [1, 0], [0, 3]])   # right, wrong, right
    m1 = _frame("m1", [[0, 1], [0, 3], [1, 0]])   # wrong, right, wrong
    res = _module().ensemble([m0, m1.iloc[::-1]])  # row order does not matter: rows are matched by key
    assert res["ensemble"] == {"sst2": 100.0, "avg": 100.0}
    assert res["models"] == {"m0": {"sst2": 66.67, "avg": 66.67}, "m1": {"sst2": 33.33, "avg": 33.33}}
    assert res["mean_of_models"]["avg"] == 50.0 and res["majority_class"] == {"sst2": 66.67, "avg": 66.67}


def test_models_scored_on_other_rows_are_refused():
    mod = _module()
    m0 = _frame("m0", [[2, 0], [1, 0], [0, 3]])
    with pytest.raises(SystemExit, match="scored other examples"):
        mod.ensemble([m0, _frame("m1", [[0, 1], [0, 3]], labels=(0, 1))])
    with pytest.raises(SystemExit, match="at least two"):
        mod.ensemble([m0])


def test_models_of_one_label_are_each_counted():
    """Two cells labelled coin (the same method of two studies): both are listed, by --cell position, and their
    mean is over both (66.67 and 33.33: 50.0), not over the one that a key by label kept."""
    res = _module().ensemble([_frame("coin", [[2, 0], [1, 0], [0, 3]]), _frame("coin", [[0, 1], [0, 3], [1, 0]])])
    assert res["models"] == {"1:coin": {"sst2": 66.67, "avg": 66.67}, "2:coin": {"sst2": 33.33, "avg": 33.33}}
    assert res["mean_of_models"]["avg"] == 50.0


def test_an_evaluation_of_several_models_is_refused_with_the_directory_to_pass(tmp_path: Path):
    """A `coin evaluate --out` directory (models/<label>/ per model) as --cell: one line naming models/<label>/, no
    traceback; a directory with no evaluation: its missing result.json, no traceback."""
    import subprocess
    import sys

    for label in ("s0", "s1"):
        (tmp_path / "ev" / "models" / label).mkdir(parents=True)
    script = str(ROOT / "experiments" / "ensemble_predictions.py")
    out = subprocess.run([sys.executable, script, "--cell", str(tmp_path / "ev"), "--cell", str(tmp_path / "ev")],
                         capture_output=True, text=True, check=False)
    assert out.returncode != 0 and "Traceback" not in out.stderr
    assert "pass each model's own directory, models/<label>/" in out.stderr
    out = subprocess.run([sys.executable, script, "--cell", str(tmp_path), "--cell", str(tmp_path)],
                         capture_output=True, text=True, check=False)
    assert out.returncode != 0 and "Traceback" not in out.stdout + out.stderr
    assert "result.json: file not found" in out.stdout + out.stderr
