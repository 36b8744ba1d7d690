"""experiments/swap_prior.py: a prediction re-decided with another adapter's label prior."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "experiments"))

from swap_prior import swap  # noqa: E402


def test_swap_moves_the_decision_by_the_difference_of_the_priors():
    own = {"t": np.log(np.array([0.5, 0.5]))}
    other = {"t": np.log(np.array([0.8, 0.2]))}
    row = {"task": "t", "label": 0, "scores": [-0.3, 0.0], "pred": 1, "correct": False}
    out = swap(row, own, other)                  # 0.3 nats for label 1 < log(0.8/0.2) = 1.39 for label 0
    assert out["pred"] == 0 and out["correct"] is True
    assert math.isclose(out["scores"][0] - out["scores"][1], -0.3 + math.log(4), abs_tol=1e-4)
    assert swap({**row, "task": "u"}, own, other) == {**row, "task": "u"}   # no prior for the task: unchanged
    assert row["pred"] == 1                                                  # the input row is not modified


def test_cli_rewrites_only_the_named_models(tmp_path):
    for name, counts in (("own", [5, 5]), ("other", [8, 2])):
        (tmp_path / name).mkdir()
        (tmp_path / name / "coin_model.json").write_text(json.dumps({"label_counts": {"t": counts}}))
    rows = [{"model": "m", "scoring": "loglik", "task": "t", "label": 0, "scores": [-0.3, 0.0], "pred": 1,
             "correct": False},
            {"model": "n", "scoring": "loglik", "task": "t", "label": 0, "scores": [-0.3, 0.0], "pred": 1,
             "correct": False}]
    (tmp_path / "p.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = subprocess.run([sys.executable, str(ROOT / "experiments" / "swap_prior.py"), "--predictions",
                          str(tmp_path / "p.jsonl"), "--model", f"m={tmp_path / 'own'}:{tmp_path / 'other'}",
                          "--out", str(tmp_path / "o.jsonl")], capture_output=True, text=True, check=False)
    assert out.returncode == 0, out.stderr
    got = [json.loads(x) for x in (tmp_path / "o.jsonl").read_text().splitlines()]
    assert [(r["model"], r["pred"], r["correct"]) for r in got] == [("m", 0, True)]


def test_cli_refuses_what_it_cannot_swap(tmp_path):
    """A label not in the file (it wrote an empty file and exited 0), a missing --predictions, a directory that is
    no adapter: each one line that names the fix, no traceback, nothing written."""
    (tmp_path / "ad").mkdir()
    (tmp_path / "ad" / "coin_model.json").write_text(json.dumps({"label_counts": {"t": [5, 5]}}))
    row = {"model": "m", "scoring": "loglik", "task": "t", "label": 0, "scores": [-0.3, 0.0], "pred": 1,
           "correct": False}
    (tmp_path / "p.jsonl").write_text(json.dumps(row) + "\n")

    def run(predictions: str, model: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, str(ROOT / "experiments" / "swap_prior.py"), "--predictions",
                               str(tmp_path / predictions), "--model", model, "--out", str(tmp_path / "o.jsonl")],
                              capture_output=True, text=True, check=False)

    ad = tmp_path / "ad"
    for predictions, model, message in (("p.jsonl", f"x={ad}:{ad}", "no loglik predictions of model(s) ['x']; it "
                                         "holds ['m']"),
                                        ("nope.jsonl", f"m={ad}:{ad}", "no such file"),
                                        ("p.jsonl", f"m={ad}:{tmp_path}", "not a trained adapter")):
        out = run(predictions, model)
        assert out.returncode != 0 and message in out.stderr and "Traceback" not in out.stderr, out.stderr
    assert not (tmp_path / "o.jsonl").exists()


def test_cli_refuses_a_model_the_evaluation_did_not_calibrate_with_that_prior(tmp_path):
    """Predictions of an evaluation under calibration 'none' hold no prior: swapping one out re-decided them wrongly.
    The eval_info.json beside the predictions says how each model was decided."""
    (tmp_path / "ad").mkdir()
    (tmp_path / "ad" / "coin_model.json").write_text(json.dumps({"label_counts": {"t": [5, 5], "u": [3, 7]}}))
    row = {"model": "m", "scoring": "loglik", "task": "t", "label": 0, "scores": [-0.3, 0.0], "pred": 1,
           "correct": False}
    ev = tmp_path / "ev"
    ev.mkdir()
    (ev / "predictions.jsonl").write_text(json.dumps(row) + "\n")
    cmd = [sys.executable, str(ROOT / "experiments" / "swap_prior.py"), "--predictions", str(ev / "predictions.jsonl"),
           "--model", f"m={tmp_path / 'ad'}:{tmp_path / 'ad'}", "--out", str(tmp_path / "o.jsonl")]
    for settings, message in (({"calibration": "none", "label_counts": {}}, "records evaluate.calibration = 'none'"),
                              ({"calibration": "content_free", "label_counts": {"t": [9, 1]}},
                               "used the label counts {'t': [9, 1]}"),
                              ({"calibration": "content_free", "label_counts": {"t": [5, 5]}}, None)):
        # (the adapter's own counts, of t only: the evaluation records the tasks it scored)
        (ev / "eval_info.json").write_text(json.dumps({"m": {"settings": settings}}))
        out = subprocess.run(cmd, capture_output=True, text=True, check=False)
        if message is None:
            assert out.returncode == 0, out.stderr
        else:
            assert out.returncode != 0 and message in out.stderr and "Traceback" not in out.stderr, out.stderr
