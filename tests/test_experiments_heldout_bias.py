"""experiments/heldout_bias.py: the bias fit and the re-decision, on constructed scores whose best bias is known."""

from __future__ import annotations

import numpy as np
import pandas as pd

from experiments.heldout_bias import fit_bias, redecide


def test_fit_bias_finds_a_shifted_threshold():
    rng = np.random.default_rng(0)
    d = rng.uniform(-4, 4, size=400)
    labels = (d > 1.5).astype(int)                 # the model's scores are right once shifted by 1.5 nats
    scores = np.stack([np.zeros_like(d), d], axis=1)
    bias = fit_bias(scores, labels)
    assert bias[0] == 0.0
    assert -1.6 <= bias[1] <= -1.4
    assert np.mean((scores + bias).argmax(1) == labels) == 1.0
    assert np.mean(scores.argmax(1) == labels) < 0.85   # unbiased, the same scores are clearly worse


def test_fit_bias_falls_back_to_the_majority_when_scores_carry_nothing():
    rng = np.random.default_rng(1)
    labels = (rng.uniform(size=500) < 0.7).astype(int)  # 70% label 1
    scores = rng.normal(size=(500, 2)) * 0.1            # noise: no information about the label
    bias = fit_bias(scores, labels)
    assert ((scores + bias).argmax(1) == 1).all()
    assert np.mean((scores + bias).argmax(1) == labels) >= np.mean(labels)


def test_fit_bias_keeps_zero_when_already_best_and_handles_three_labels():
    labels = np.array([0, 1, 2] * 20)
    scores = np.eye(3)[labels] * 2.0                    # perfect, with a margin of 2 nats
    assert fit_bias(scores, labels).tolist() == [0.0, 0.0, 0.0]
    skewed = scores.copy()
    skewed[:, 2] -= 3.0                                 # label 2 pushed down: never chosen without a bias
    assert np.mean(skewed.argmax(1) == labels) < 0.7
    bias = fit_bias(skewed, labels)
    assert np.mean((skewed + bias).argmax(1) == labels) == 1.0


def test_redecide_applies_each_models_bias_per_task():
    preds = pd.DataFrame({"model": ["a", "a", "b"], "task": ["t", "t", "t"], "label": [1, 0, 1],
                          "scores": [[0.0, -0.5], [0.0, -2.0], [0.0, -0.5]], "pred": [0, 0, 0],
                          "correct": [False, True, False]})
    out = redecide(preds, {("a", "t"): np.array([0.0, 1.0]), ("b", "t"): np.array([0.0, 0.0])})
    assert out["pred"].tolist() == [1, 0, 0]
    assert out["correct"].tolist() == [True, True, False]
    assert preds["pred"].tolist() == [0, 0, 0]        # the input is left as it was


def _main(monkeypatch, tmp_path, *extra: str, sets: tuple[str, ...] = ("clean",)) -> list[tuple[str, str]]:
    """heldout_bias.main on an evaluation (instruction ``sets``) of models a and b on sst2 and rte (8 examples
    each), with the model, its data and its held-out scores stubbed: every held-out row is label 1 and scores favour
    label 0, so the fitted bias moves every decision to label 1.
    Returns the (adapter, task) pairs whose offsets were fitted."""
    import json
    import sys
    from types import SimpleNamespace

    import experiments.heldout_bias as hb

    rows = [{"model": m, "task": t, "example_id": f"{t}:{i}", "instruction_id": 0, "set": st,
             "scoring": scoring, "label": i % 2, "scores": [0.0, -1.0], "pred": 0, "correct": i % 2 == 0}
            for m in "ab" for t in ("sst2", "rte") for i in range(8) for scoring in ("loglik", "generate")
            for st in sets]
    (tmp_path / "p.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "pairs.jsonl").write_text(json.dumps({"task": "sst2", "example_id": "sst2:x"}) + "\n")
    fitted = []

    def scores(model, tokenizer, settings, task, rows, counts):
        fitted.append((model, task))
        return np.tile([0.0, -1.0], (len(rows), 1))

    monkeypatch.setattr(hb, "load_settings", lambda _: SimpleNamespace(paths=SimpleNamespace(data_dir=tmp_path)))
    monkeypatch.setattr(hb, "heldout_rows", lambda *a: [SimpleNamespace(label=1)] * 4)
    monkeypatch.setattr(hb, "load_trained", lambda d, device: (d.name, None, {}))
    monkeypatch.setattr(hb, "heldout_scores", scores)
    monkeypatch.setattr(sys, "argv", ["heldout_bias.py", "--predictions", str(tmp_path / "p.jsonl"),
                                      "--pairs", str(tmp_path / "pairs.jsonl"), "--adapter", f"a={tmp_path / 'a'}",
                                      "--adapter", f"b={tmp_path / 'b'}", "--n-boot", "20",
                                      "--out", str(tmp_path / "out"), *extra])
    assert hb.main() == 0
    return fitted


def test_a_clean_only_evaluation_reports_its_clean_part(monkeypatch, tmp_path):
    """No perturbed rows (evaluate.instruction_sets: [clean]): the perturbed part is left out, not a failure after
    all the fitting. Re-decided to label 1 everywhere, each model answers half of the examples, as shipped."""
    import json

    _main(monkeypatch, tmp_path)
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert set(summary) == {"held-out bias - shipped, clean", "in-sample bound - shipped, clean"}
    assert summary["held-out bias - shipped, clean"]["difference"] == 0.0
    assert "| held-out bias | perturbed |" not in (tmp_path / "out" / "per-task.md").read_text()


def test_reused_offsets_are_not_refitted(monkeypatch, tmp_path):
    """--offsets with a's sst2 offsets only: a's rte and b's two tasks are fitted, a's sst2 is not; offsets.csv
    holds each (model, task) once, and the perturbed part is reported."""
    (tmp_path / "old").mkdir()
    pd.DataFrame([{"model": "a", "task": "sst2", "heldout_rows": 4, "heldout_acc_shipped": 0.0,
                   "heldout_acc_fitted": 100.0, "offsets": "[1.05]", "in_sample_offsets": "[0.0]"}]).to_csv(
        tmp_path / "old" / "offsets.csv", index=False)
    fitted = _main(monkeypatch, tmp_path, "--offsets", str(tmp_path / "old" / "offsets.csv"),
                   sets=("clean", "deepwordbug"))
    assert fitted == [("a", "rte"), ("b", "sst2"), ("b", "rte")]
    out = pd.read_csv(tmp_path / "out" / "offsets.csv")
    assert sorted(zip(out["model"], out["task"], strict=True)) == [("a", "rte"), ("a", "sst2"), ("b", "rte"),
                                                                    ("b", "sst2")]
    assert "| held-out bias | perturbed |" in (tmp_path / "out" / "per-task.md").read_text()
