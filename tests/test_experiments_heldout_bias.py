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
