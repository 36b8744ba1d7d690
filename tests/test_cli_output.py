"""A stage command prints a short summary and where its outputs are (coin.stage_summary), not its whole result;
`--json` prints the whole result. Great Expectations' INFO chatter stays out of a stage's log."""

import json
import os
import subprocess
import sys
from pathlib import Path

from test_references import constant, oracle, result

from coin.config import Settings
from coin.evaluation.report import write_eval_outputs
from coin.stage_summary import MAX_LINES, WIDTH, stage_outputs, summary_lines

ROOT = Path(__file__).resolve().parents[1]


def test_an_evaluation_result_prints_its_headline_not_every_figure(tmp_path):
    paths = write_eval_outputs([result("base", constant), result("coin", oracle)], tmp_path / "outputs" / "evaluate")
    metrics = json.loads(paths["metrics"].read_text())
    res = {"metrics": metrics, "table": paths["table"].read_text(), "paths": {k: str(v) for k, v in paths.items()}}
    settings = Settings.model_validate({"train": {"methods": ["coin", "cit"]}})
    lines = summary_lines("evaluate", res, stage_outputs("evaluate", settings, tmp_path, cwd=tmp_path))
    full = json.dumps({k: v for k, v in res.items() if k != "table"}, indent=2).splitlines()
    assert len(lines) <= MAX_LINES + 12 < len(full)
    assert all(len(line) <= WIDTH for line in lines)
    text = "\n".join(lines)
    assert lines[0] == "evaluate: done"
    assert '"clean_acc": 100.0' in text and "metrics.coin:" in text and "metrics.base:" in text
    assert "acc_mean" not in text and "|" not in text  # no per-set figures, no table
    shown = lines[lines.index("outputs:") + 1:]
    assert shown == ["  outputs/evaluate/models/", "  outputs/evaluate/", "  metrics/summary.json"]  # 9 paths, by dir


def test_outputs_are_shown_from_where_coin_runs(tmp_path):
    """From a subdirectory (`coin pairs -p ../params.yaml`) the outputs were shown relative to the project root,
    paths that are not there from the user's shell; they are relative to the current directory, or absolute."""
    settings = Settings.model_validate({})
    (tmp_path / "src").mkdir()
    files = ["pairs.jsonl", "stats.json", "short_rows.jsonl"]
    assert stage_outputs("pairs", settings, tmp_path, cwd=tmp_path) == [f"outputs/pairs/{f}" for f in files]
    assert stage_outputs("pairs", settings, tmp_path, cwd=tmp_path / "src") == [
        str(tmp_path.resolve() / "outputs" / "pairs" / f) for f in files]
    assert stage_outputs("pairs", settings, tmp_path, cwd=tmp_path / "outputs") == [f"pairs/{f}" for f in files]


def test_a_long_result_is_cut():
    lines = summary_lines("x", {f"k{i}": "v" * 500 for i in range(100)})
    assert len(lines) == MAX_LINES + 2 and "70 more fields" in lines[-1] and "--json" in lines[-1]
    assert all(len(line) <= WIDTH for line in lines)


def _coin(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "DO_NOT_TRACK": "true", "MLFLOW_DISABLE_TELEMETRY": "true"}
    res = subprocess.run([sys.executable, "-m", "coin.cli", *args], cwd=cwd, env=env, capture_output=True, text=True,
                         timeout=600)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    return res


def test_validate_stage_output_is_bounded_and_gx_is_quiet(tmp_path):
    """`coin validate` on tiny settings: its whole console output (stdout and the stage's log on stderr) is a
    few dozen lines. `--json` prints the whole result (checked on pairs: cheaper)."""
    params = tmp_path / "params.yaml"
    params.write_text((ROOT / "params.yaml").read_text())
    instructions = ROOT / "data" / "promptbench" / "coin_perturbed_instructions.json"
    common = ["--params", str(params), "--set", f"paths.data_dir={ROOT / 'data'}",
              "--set", "pairs.rows_per_task=8", "--set", "pairs.tasks=[sst2,rte]", "--set", "pairs.val_fraction=0.25",
              "--set", "validate.min_pass_rate=0.5", "--set", "evaluate.tasks=[sst2,rte]",
              "--set", f"evaluate.instruction_file={instructions}"]
    pairs = _coin(["pairs", *common], tmp_path)
    assert pairs.stdout.startswith("pairs: done") and "outputs:\n  outputs/pairs/pairs.jsonl" in pairs.stdout
    res = _coin(["validate", *common], tmp_path)
    out = res.stdout + res.stderr
    assert "Skipping registering function" not in out
    assert len(out.splitlines()) < 60, out
    assert res.stdout.startswith("validate: done") and "gate_passed: true" in res.stdout
    assert "outputs/validated/valid.jsonl" in res.stdout
    print(out)  # shown with -s: what a user sees
    full = json.loads(_coin(["pairs", "--json", *common], tmp_path).stdout)  # the whole result, as before
    assert full["rows"] > 0 and set(full["per_task"]) == {"sst2", "rte"}


def test_a_cached_registration_says_so_instead_of_repeating_its_decision():
    from coin.registry.register import registration_message
    from flows.pipeline import registration_markdown

    decision = {"promote": True, "reason": "No champion yet: promoted."}
    new = {"name": "coin-minilm", "version": "1", "aliases": ["champion", "challenger"], "created": True,
           "decision": decision}
    again = {**new, "created": False}
    assert registration_message(new) == ("coin-minilm v1: registered, promoted to champion (aliases: champion, "
                                         "challenger): No champion yet: promoted.")
    assert registration_message(again) == ("coin-minilm: already registered as v1; decision unchanged "
                                           "(promoted to champion when registered; aliases: champion, challenger)")
    # a version created by a registration that stopped before deciding (a damaged card): decided now, and said so
    half = {**new, "created": False, "decided_now": True}
    assert "promoted to champion" in registration_message(half) and "unchanged" not in registration_message(half)
    assert "No champion yet" in registration_markdown(half)
    md = registration_markdown(again)
    assert "already registered" in md.lower() and "decision unchanged" in md and "No champion yet" not in md
    assert "No champion yet" in registration_markdown(new)
    result = {**again, "message": registration_message(again), "candidates": [{**again, "message": "m1"}]}
    text = "\n".join(summary_lines("register", result))
    assert "already registered as v1; decision unchanged" in text and "No champion yet" not in text
    assert 'candidates: ["m1"]' in text  # no method in the record: the message alone


def test_a_new_registration_prints_its_message_not_every_decision_field():
    from coin.registry.register import registration_message

    reg = {"name": "m", "version": "2", "aliases": ["challenger"], "created": True,
           "decision": {"promote": False, "reason": "gain 0.4 < 1.0", "champion": {"clean_acc": 70.0}}}
    text = "\n".join(summary_lines("register", {**reg, "message": registration_message(reg)}))
    assert "message: m v2: registered, not promoted (aliases: challenger): gain 0.4 < 1.0" in text
    assert "decision" not in text


def test_the_study_dry_run_never_cuts_a_cell_name(capsys, monkeypatch):
    """Two swept cells whose names differ only at the end were both shown cut with '…', reading alike."""
    from coin.cli import _print_study_plan

    monkeypatch.setenv("COLUMNS", "80")
    names = [f"coin-s0-train.lora.target_modules=__q_proj_v_proj_{m}_proj__" + "x" * 100 for m in ("k", "o")]
    _print_study_plan({"prepare": [], "cells": [{"cell": n, "action": "train", "why": "not computed yet"}
                                                for n in names], "counts": {"train": 2}})
    out = capsys.readouterr().out
    assert "…" not in out
    first_column = "".join(line.split("│")[1].strip() for line in out.splitlines() if line.startswith("│"))
    assert first_column == "".join(names), out  # each name whole, wrapped over lines


def test_a_long_summary_keeps_the_registration_verdict_and_the_run():
    """coin pipeline's summary stopped at `register.name` under "... 9 more fields": the promotion decision, the
    aliases and the MLflow parent run were never shown."""
    from coin.stage_summary import MAX_LINES, summary_lines

    result = {f"field{i}": i for i in range(40)}
    result["register"] = {"name": "coin-minilm", "message": "coin-minilm v3: registered, promoted to champion",
                          "aliases": ["challenger", "champion"]}
    result["mlflow_parent_run_id"] = "0123abcd"
    lines = summary_lines("pipeline", result)
    text = "\n".join(lines)
    assert "register.message: coin-minilm v3: registered, promoted to champion" in text
    assert "register.aliases" in text and "mlflow_parent_run_id: 0123abcd" in text
    assert len(lines) == 1 + MAX_LINES + 1 and "more fields" in lines[-1]


def test_a_long_summary_keeps_each_models_headline_beside_the_registration_that_quotes_it():
    """With three models evaluated the pipeline's summary cut `evaluate.sft` and `register.method`, and kept the
    message quoting sft's "clean accuracy 60.0" right after coin's line (56.7): it read as a contradiction."""
    result = {f"field{i}": i for i in range(40)}
    result["evaluate"] = {m: {"summary": {"clean_acc": acc, "perturbed_acc": acc - 5}, "by_task": {}}
                          for m, acc in (("base", 40.0), ("coin", 56.7), ("sft", 60.0))}
    result["register"] = {"method": "sft", "message": "coin-tiny v2: registered, not promoted: clean accuracy 60.0"}
    text = "\n".join(summary_lines("pipeline", result))
    for m in ("base", "coin", "sft"):
        assert f"evaluate.{m}: {{\"clean_acc\"" in text, text
    assert "register.method: sft" in text and "register.message" in text


def test_a_long_summary_keeps_every_candidates_verdict_under_its_method():
    """With two register.methods the pipeline's summary kept only the last candidate's message (cit's), with no
    method named: coin's own verdict was among the cut fields."""
    from coin.stage_summary import summary_lines

    result = {f"field{i}": i for i in range(40)}
    coin = {"method": "coin", "version": "1", "message": "coin-minilm v1: registered, promoted to champion"}
    cit = {"method": "cit", "version": "2", "message": "coin-minilm v2: registered, not promoted"}
    result["register"] = {"name": "coin-minilm", **cit, "candidates": [coin, cit]}
    text = "\n".join(summary_lines("pipeline", result))
    assert ('register.candidates: ["coin: coin-minilm v1: registered, promoted to champion", '
            '"cit: coin-minilm v2: registered, not promoted"]') in text, text


def test_training_draws_its_bar_on_a_terminal_and_writes_lines_to_a_log(tiny_llama_dir, tmp_path, capfd, caplog,
                                                                          monkeypatch):
    """Piped (CI, a Prefect worker, `2> log`), tqdm's frames were kept: 24 steps made one physical line of 52
    carriage-return frames, with the next log record glued to it. Without a terminal, about ten log lines say how
    far training got; on a terminal the bar is drawn as before."""
    import logging

    from helpers_training import cfg_for, make_rows

    import coin.progress
    from coin.modeling.backbone import load_backbone
    from coin.training.loop import train

    cfg = cfg_for(max_steps=20, batch_size=2, checkpoint_every=0)
    with caplog.at_level(logging.INFO, logger="coin"):
        train(load_backbone(str(tiny_llama_dir), seed=0), make_rows(8), cfg, out_dir=tmp_path / "a", seed=0,
              cutoff_len=64, progress=True)
    err = capfd.readouterr().err
    assert "\r" not in err and "train[coin]:" not in err  # no frames
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("train[coin]: step")]
    assert len(lines) == 10 and lines[-1].startswith("train[coin]: step 20/20, loss ")
    monkeypatch.setattr(coin.progress, "on_terminal", lambda: True)
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="coin"):
        train(load_backbone(str(tiny_llama_dir), seed=0), make_rows(8), cfg, out_dir=tmp_path / "b", seed=0,
              cutoff_len=64, progress=True)
    assert "train[coin]: 100%" in capfd.readouterr().err  # the bar
    assert not [r for r in caplog.records if r.getMessage().startswith("train[coin]: step")]


def test_the_pipeline_names_where_its_outputs_are_and_its_logs_stay_on_coins_lines(tmp_path):
    """`coin pipeline` printed no outputs block (stage_outputs knew no 'pipeline'); MLflow's download bar, Dask's INFO
    chatter and a link to a dashboard that is off (404) filled its log."""
    import logging

    from flows.pipeline import _DeadDashboardLink, eval_task_runner

    shown = stage_outputs("pipeline", Settings.model_validate({}), tmp_path, cwd=tmp_path)
    assert {"outputs/pairs/", "outputs/validated/", "outputs/train/coin/", "outputs/evaluate/",
            "outputs/register/registration.json"} <= set(shown), shown
    assert len(shown) <= 8
    assert os.environ["MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"] == "false"
    import distributed  # noqa: F401 -- its loggers configured from dask's config, which coin set first

    assert logging.getLogger("distributed.scheduler").getEffectiveLevel() == logging.WARNING
    # a Dask config file of the user's that sets logging wins (an environment variable would outrank it)
    (tmp_path / "dask.yaml").write_text("logging:\n  distributed: info\n")
    (tmp_path / "json").mkdir()
    (tmp_path / "json" / "MINE.JSON").write_text('{"logging": {"distributed": "info"}}')
    (tmp_path / "comment.yaml").write_text("# no logging changes here\ntemporary-directory: /tmp\n")
    probe = ("import coin, logging; coin.quiet_dask_logs(); import distributed; "
             "print(logging.getLevelName(logging.getLogger('distributed.scheduler').getEffectiveLevel()))")
    env = {k: v for k, v in os.environ.items() if not k.startswith("DASK_LOGGING")}
    for extra, level in (({"DASK_CONFIG": str(tmp_path / "dask.yaml")}, "INFO"),
                         ({"DASK_CONFIG": str(tmp_path / "json")}, "INFO"),  # any file Dask reads, as Dask reads it
                         ({"DASK_LOGGING": '{"distributed": "info"}'}, "INFO"),
                         ({"DASK_CONFIG": str(tmp_path / "comment.yaml")}, "WARNING"),  # a comment sets nothing
                         ({"DASK_CONFIG": str(tmp_path / "none")}, "WARNING")):
        out = subprocess.run([sys.executable, "-c", probe], env={**env, **extra}, capture_output=True,
                             text=True, check=True).stdout.strip()
        assert out == level, (extra, out)
    record = logging.LogRecord("prefect.task_runner.dask", logging.INFO, "", 0,
                               "The Dask dashboard is available at http://127.0.0.1:1/status", None, None)
    dask_log = logging.getLogger("prefect.task_runner.dask")
    eval_task_runner(1, processes=False)  # the default: dashboard off
    assert not all(f.filter(record) for f in dask_log.filters)
    eval_task_runner(1, processes=False, dashboard=True)
    assert all(f.filter(record) for f in dask_log.filters)
    assert _DeadDashboardLink.off is False
