"""The `coin` CLI: one subcommand per stage, config errors stop before any work with exit code 2 (data errors
exit 3; every error class and its code: tests/test_cli_errors.py)."""

from pathlib import Path

from typer.testing import CliRunner

from coin.cli import app
from coin.stages import STAGES

ROOT = Path(__file__).resolve().parents[1]
runner = CliRunner()


def _listed_commands(out: str) -> set[str]:
    """The command names of a help page's "Commands" box (each name appears in free text too: "the validated pairs",
    "params.yaml", so a plain substring test passed with the stage commands hidden)."""
    section = out.split("Commands")[1]
    return {line.strip("│ ").split()[0] for line in section.splitlines() if line.strip("│ ─╭╮╰╯")}


def test_help_lists_every_stage_and_predict():
    out = runner.invoke(app, ["--help"]).output
    listed = _listed_commands(out)
    assert {*STAGES, "pipeline", "predict", "params"} <= listed, (listed, out)


def test_help_texts_keep_their_brackets():
    """Help is plain text: ``KEY=[v1,v2,...]`` and ``[x one swept key]`` are not read as markup tags and dropped."""
    out = " ".join(runner.invoke(app, ["study", "--help"]).output.split())
    assert "KEY=[v1,v2,...]" in out and "[x one swept key]" in out, out


def test_bad_override_stops_a_stage_before_work(tmp_path):
    params = tmp_path / "params.yaml"
    params.write_text((ROOT / "params.yaml").read_text())
    res = runner.invoke(app, ["pairs", "--params", str(params), "--set", "pairs.rows_per_tsk=3"])
    assert res.exit_code == 2
    assert "pairs.rows_per_tsk: unknown key" in res.output and "rows_per_task" in res.output
    assert not (tmp_path / "outputs").exists()


def test_pairs_stage_from_cli(tmp_path):
    params = tmp_path / "params.yaml"
    params.write_text((ROOT / "params.yaml").read_text())
    res = runner.invoke(app, ["pairs", "--params", str(params), "--set", f"paths.data_dir={ROOT / 'data'}",
                              "--set", "pairs.rows_per_task=4", "--set", "pairs.tasks=[wnli]"])
    assert res.exit_code == 0, res.output
    assert (tmp_path / "outputs" / "pairs" / "pairs.jsonl").read_text().count("\n") == 4


def test_missing_input_names_the_file_and_the_fix(tmp_path):
    params = tmp_path / "params.yaml"
    params.write_text((ROOT / "params.yaml").read_text())
    res = runner.invoke(app, ["validate", "--params", str(params)])
    assert res.exit_code == 3  # a data error (ExitCode.DATA)
    assert "pairs.jsonl: file not found. Run `coin pairs` first." in res.output


def test_gate_failure_message_is_printed_verbatim(tmp_path):
    """Pair ids like 'sst2:train:12' must not be mangled by the terminal renderer (emoji codes, markup)."""
    params = tmp_path / "params.yaml"
    params.write_text((ROOT / "params.yaml").read_text())
    common = ["--params", str(params), "--set", f"paths.data_dir={ROOT / 'data'}",
              "--set", "pairs.rows_per_task=3", "--set", "pairs.tasks=[sst2]",
              # the gate's leak checks read the evaluation's instruction file (relative to the project root)
              "--set",
              f"evaluate.instruction_file={ROOT / 'data' / 'promptbench' / 'coin_perturbed_instructions.json'}"]
    assert runner.invoke(app, ["pairs", *common]).exit_code == 0
    res = runner.invoke(app, ["validate", *common, "--set", "pairs.cutoff_len=20"])
    assert res.exit_code == 3  # the gate refused the data (ExitCode.DATA)
    assert "validation gate failed" in res.output and "pair_id 'sst2:train:" in res.output
    assert (tmp_path / "outputs" / "validated" / "rejects.jsonl").exists()


def test_the_study_dry_run_help_names_the_actions_it_prints():
    from typer.testing import CliRunner

    from coin.study import plan

    text = " ".join(CliRunner().invoke(app, ["study", "--help"]).output.split())
    for action in (plan.DONE, plan.EVALUATE, plan.TRAIN, plan.COPY):
        assert action in text, action
    readme = " ".join((Path(__file__).resolve().parents[1] / "README.md").read_text().split())
    assert "(done, evaluate, train + evaluate, copy;" in readme and "evaluate only" not in readme


def test_python_dash_m_coin_runs_the_cli():
    """`python -m coin --help` failed (no coin.__main__) where the console script is not on PATH."""
    import os
    import subprocess
    import sys

    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    res = subprocess.run([sys.executable, "-m", "coin", "--help"], capture_output=True, text=True, env=env,
                         timeout=300)
    assert res.returncode == 0, res.stderr
    assert {"pipeline", "predict"} <= _listed_commands(res.stdout), res.stdout


def test_the_local_prefect_server_gets_time_to_start_on_busy_cores():
    """Prefect gives its local (ephemeral) server 20 s to start; on two busy cores a study ended "Timed out while
    attempting to connect to ephemeral Prefect API server" (exit 5) before any work. A value the user set wins."""
    import os
    import subprocess
    import sys

    code = ("import coin; from prefect.settings import PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS as s; "
            "print(s.value())")
    env = {k: v for k, v in os.environ.items() if k != "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS"}
    env["PYTHONPATH"] = os.pathsep.join(sys.path)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0 and int(out.stdout.split()[-1]) >= 120, out.stderr[-2000:]
    env["PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS"] = "33"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert out.stdout.split()[-1] == "33", out.stderr[-2000:]
