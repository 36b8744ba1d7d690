"""DVC's metrics are the evaluation's headline figures (metrics/summary.json, git-tracked), not the full
metrics.json under the git-ignored outputs/: `dvc exp show` has each experiment's numbers and `dvc metrics
diff` compares two.

The DVC test runs a stub stage in place of the real evaluation (seconds instead of minutes): it writes
metrics/summary.json through the report's own writer, from fake predictions whose accuracy follows
``train.lr``, and declares it exactly as the project's dvc.yaml does (the entry is copied from it).
``tests/test_dvc_pipeline.py`` checks the same on the real pipeline."""

import json
from pathlib import Path

import pytest
import yaml
from helpers_project import run
from test_references import constant, oracle, result

from coin.config import Settings
from coin.evaluation.metrics import REFERENCE_KEY
from coin.evaluation.report import HEADLINE, write_eval_outputs
from coin.layout import Layout

ROOT = Path(__file__).resolve().parents[1]
GIT = ["git", "-c", "user.email=t@t", "-c", "user.name=t"]


def _leaves(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        out.update(_leaves(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v})
    return out


def test_summary_holds_the_headline_figures_of_metrics_json(tmp_path):
    summary_file = Layout(tmp_path, Settings.model_validate({})).metrics_summary
    paths = write_eval_outputs([result("base", constant), result("coin", oracle)], tmp_path / "eval",
                               summary_file=summary_file)
    assert paths["summary"] == summary_file == tmp_path / "metrics" / "summary.json"
    full, summary = json.loads(paths["metrics"].read_text()), json.loads(summary_file.read_text())
    assert list(summary) == ["base", "coin", REFERENCE_KEY]
    for model in ("base", "coin"):
        assert {k: summary[model][k] for k in HEADLINE} == {k: full[model]["summary"][k] for k in HEADLINE}
        levels = full[model]["loglik"]["levels"]
        assert summary[model]["levels"] == {lvl: v["acc_mean"] for lvl, v in levels.items() if lvl != "clean"}
    assert summary["coin"]["levels"] == {"word": 100.0}
    assert summary[REFERENCE_KEY] == {"majority_acc": full[REFERENCE_KEY]["majority"]["avg"],
                                      "chance_acc": full[REFERENCE_KEY]["chance"]["avg"]}
    flat = _leaves(summary)
    assert len(flat) < 20 < len(_leaves(full))  # a few columns, not hundreds
    assert all(isinstance(v, (int, float)) for v in flat.values())


STUB = '''
import sys, yaml
from pathlib import Path
sys.path[:0] = [{tests!r}]
from test_references import constant, oracle, result
from coin.evaluation.report import write_eval_outputs
lr = yaml.safe_load(open("params.yaml"))["train"]["lr"]
def learner(task, label, e):  # lr 0.001 answers like the constant model, a larger lr like the oracle
    return oracle(task, label, e) if lr > 0.001 else constant(task, label, e)
write_eval_outputs([result("coin", learner)], "outputs/evaluate", summary_file="metrics/summary.json")
'''


@pytest.fixture
def repo(tmp_path) -> Path:
    """A git + DVC repository with one stage, ``evaluate``: the stub, declared with dvc.yaml's metrics entry."""
    metrics = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]["evaluate"]["metrics"]
    assert [next(iter(m)) for m in metrics] == ["metrics/summary.json"]
    (tmp_path / "stub.py").write_text(STUB.format(tests=str(ROOT / "tests")))
    (tmp_path / "params.yaml").write_text("train:\n  lr: 0.001\n")
    (tmp_path / ".gitignore").write_text("/outputs\n")
    stage = {"cmd": "python stub.py", "deps": ["stub.py"], "params": ["train.lr"], "metrics": metrics,
             "outs": [{"outputs/evaluate/metrics.json": {"cache": False}}]}
    (tmp_path / "dvc.yaml").write_text(yaml.safe_dump({"stages": {"evaluate": stage}}))
    run(["git", "init", "-q"], tmp_path)
    run(["dvc", "init", "-q"], tmp_path)
    run(["dvc", "repro", "-q"], tmp_path)
    run([*GIT, "add", "-A"], tmp_path)
    run([*GIT, "commit", "-qm", "baseline"], tmp_path)
    return tmp_path


def test_exp_show_and_metrics_diff_read_the_headline_figures(repo):
    shown = json.loads(run(["dvc", "metrics", "show", "--json"], repo).stdout)
    assert "metrics/summary.json" in json.dumps(shown)

    run(["dvc", "exp", "run", "-S", "train.lr=0.002", "-n", "lr2"], repo)
    exps = json.loads(run(["dvc", "exp", "show", "--json"], repo).stdout)
    by_name = {}
    for baseline in exps:
        for exp in [baseline, *(e for r in baseline.get("experiments") or [] for e in r.get("revs") or [])]:
            by_name[exp.get("name") or exp["rev"]] = exp
    assert "lr2" in by_name, list(by_name)
    for name, want in (("lr2", 100.0), ("workspace", 100.0)):
        data = by_name[name]["data"]
        assert not by_name[name].get("error"), by_name[name]
        got = data["metrics"]["metrics/summary.json"]["data"]
        assert got["coin"]["clean_acc"] == want and got["coin"]["levels"]["word"] == want, got
        assert got[REFERENCE_KEY]["majority_acc"] > 50
    head = [e for e in by_name.values() if e.get("rev") not in ("workspace",) and e.get("name") != "lr2"]
    assert any(e["data"]["metrics"]["metrics/summary.json"]["data"]["coin"]["clean_acc"] < 100 for e in head)

    # the workspace now holds lr2's results: diff against the committed baseline
    diff = json.loads(run(["dvc", "metrics", "diff", "--json"], repo).stdout)
    clean = diff["metrics/summary.json"]["coin.clean_acc"]
    assert clean["new"] == 100.0 and clean["old"] < 100 and clean["diff"] > 0
    text = run(["dvc", "metrics", "diff"], repo).stdout
    assert "coin.clean_acc" in text and max(len(line) for line in text.splitlines()) < 120
