"""The whole default pipeline (params.yaml as shipped, embedded MiniLM) on a fresh copy, then `coin predict`.

Slow (minutes on 2 CPU cores); CI runs it. Skip locally with `-m "not slow"`.
"""

import json

import pytest
from helpers_project import copy_project, run

pytestmark = pytest.mark.slow


def test_default_pipeline_from_a_fresh_copy_then_predict(tmp_path):
    proj = copy_project(tmp_path / "proj")
    assert not (proj / "data").exists()  # the pipeline's data stage must restore it from dvc-remote/
    run(["coin", "pipeline"], proj, timeout=3000)

    out = proj / "outputs"
    gate = json.loads((out / "validated" / "summary.json").read_text())
    assert gate["rows_valid"] > 0 and (out / "validated" / "rejects.jsonl").exists()
    assert (out / "validated" / "data_docs" / "index.html").exists()
    for method in ("coin",):  # train.methods as shipped
        assert (out / "train" / method / "adapter" / "adapter_model.safetensors").exists()
        history = (out / "train" / method / "loss.csv").read_text().splitlines()
        assert len(history) > 2
    metrics = json.loads((out / "evaluate" / "metrics.json").read_text())
    assert set(metrics) == {"coin", "reference"}  # no base as shipped: the majority-class row is the reference
    for s in ("clean", "deepwordbug", "textfooler", "checklist", "semantic"):
        assert s in metrics["coin"]["loglik"]["tasks"]["sst2"], s
    summary = metrics["coin"]["summary"]
    u = metrics["coin"]["uncertainty"]
    assert u["clean_ci_low"] <= summary["clean_acc"] <= u["clean_ci_high"]
    assert metrics["reference"]["majority"]["avg"] == pytest.approx(summary["majority_acc"])
    # the model learned sst2 (RESULTS.md: 71.5% against a 57% majority on a fresh clone)
    assert (metrics["coin"]["loglik"]["tasks"]["sst2"]["clean"]["acc_mean"]
            > metrics["reference"]["majority"]["sst2"] + 5)
    assert (out / "evaluate" / "report.html").exists()
    reg = json.loads((out / "register" / "registration.json").read_text())
    # first candidate, no champion yet: it becomes champion only if its clean accuracy beats the majority-class
    # rate of its sample (a model at or below it does no better than a constant answer)
    above = summary["clean_acc"] > summary["majority_acc"]
    assert reg["version"] == "1" and reg["decision"]["promote"] is above
    assert set(reg["aliases"]) == ({"champion", "challenger"} if above else {"challenger"})
    if not above:
        assert "majority-class rate" in reg["decision"]["reason"]

    for review, want in [("An utterly charming, warm and beautifully acted film.", "positive"),
                         ("A tedious, clumsy mess with wooden acting and a plot that goes nowhere.", "negative")]:
        answer = run(["coin", "predict", "--instruction", "Is the sentiment of this review positive or negative? ",
                      "--input", review, "--task", "sst2", "--model-uri", "models:/coin-minilm/1"], proj)
        assert answer.stdout.strip().splitlines()[-1] == want, (review, answer.stdout)
