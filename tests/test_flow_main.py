"""``python -m flows.<flow>``: a user error ends as ``coin`` ends it (one or two lines and the exit code of its
class), before Prefect starts a run, not as the traceback of a failed flow run."""

from __future__ import annotations

import importlib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FLOWS = {"pipeline": "coin_pipeline", "evaluate": "coin_evaluate", "study": "coin_study"}


@pytest.mark.parametrize("name", sorted(FLOWS))
def test_a_bad_key_exits_2_with_the_message_and_no_flow_run(name, monkeypatch, capsys):
    mod = importlib.import_module(f"flows.{name}")
    monkeypatch.setattr(mod, FLOWS[name], lambda **kw: pytest.fail("the flow started"))
    with pytest.raises(SystemExit) as exit_:
        mod.main(["--params", str(ROOT / "params.yaml"), "--set", "train.lrr=1"])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert "train.lrr: unknown key" in err and "Did you mean 'lr'" in err, err
    assert "Traceback" not in err, err


def test_an_error_inside_the_flow_is_reported_with_its_exit_code(monkeypatch, capsys):
    import flows.pipeline as fp
    from coin.data.io import DataError

    def fail(**kw):
        raise DataError("data/glue/sst2/train.jsonl, line 3: no field 'label'")

    monkeypatch.setattr(fp, "coin_pipeline", fail)
    with pytest.raises(SystemExit) as exit_:
        fp.main(["--params", str(ROOT / "params.yaml")])
    assert exit_.value.code == 3
    err = capsys.readouterr().err
    assert "line 3: no field 'label'" in err and "Traceback" not in err, err
    monkeypatch.setenv("COIN_DEBUG", "1")
    with pytest.raises(SystemExit):
        fp.main(["--params", str(ROOT / "params.yaml")])
    assert "Traceback" in capsys.readouterr().err


@pytest.mark.parametrize("name, args, said", [
    ("pipeline", ["--eval-workers", "0"], "--eval-workers 0: give at least 1"),
    ("evaluate", ["--model", ""], "--model: empty model spec"),
    ("evaluate", ["--model", "a=minilm", "--model", "a=minilm"], "label(s) ['a'] given twice"),
])
def test_a_bad_option_is_refused_before_prefect_starts(name, args, said, monkeypatch, capsys):
    """`python -m flows.pipeline --eval-workers 0` and `python -m flows.evaluate --model ''` started Prefect's server
    and a flow run that then failed (51 s); `coin evaluate` and `flows.study` refuse the same at once."""
    mod = importlib.import_module(f"flows.{name}")
    monkeypatch.setattr(mod, FLOWS[name], lambda **kw: pytest.fail("the flow started"))
    with pytest.raises(SystemExit) as exit_:
        mod.main(["--params", str(ROOT / "params.yaml"), *args])
    assert exit_.value.code == 2
    assert said in " ".join(capsys.readouterr().err.split())


def test_dask_threads_means_one_worker_whatever_the_core_count(monkeypatch, capsys):
    """`--dask-threads` alone ran the default workers (one per 2 cores) as threads, refused inside the flow on a
    4-core machine; it now means one, and more is refused before Prefect starts, naming the options."""
    import flows.pipeline as fp

    got: dict = {}
    monkeypatch.setattr(fp, "coin_pipeline", lambda **kw: got.update(kw))
    monkeypatch.setattr(fp, "default_eval_workers", lambda cpus=None: 4)
    fp.main(["--params", str(ROOT / "params.yaml"), "--dask-threads"])
    assert got["eval_workers"] == 1 and got["dask_processes"] is False
    with pytest.raises(SystemExit) as exit_:
        fp.main(["--params", str(ROOT / "params.yaml"), "--dask-threads", "--eval-workers", "2"])
    assert exit_.value.code == 2 and "drop --eval-workers 2" in capsys.readouterr().err


@pytest.mark.filterwarnings("ignore:Logger .prefect.task_runs. attempted to send logs")
def test_prefect_run_logs_drop_a_user_errors_traceback_and_print_text_literally(monkeypatch):
    """A task that fails with a user error (here a failed gate's DataError) is logged by Prefect's engine with its
    traceback; after quiet_prefect_logs the message stays and the traceback goes (it comes back with COIN_DEBUG,
    and stays for a bug), and the console prints ``sst2:train:164`` as written, not as an emoji."""
    import io
    import logging

    from prefect.logging.handlers import PrefectConsoleHandler

    import flows.pipeline as fp
    from coin.data.io import DataError

    stream = io.StringIO()
    console = PrefectConsoleHandler(stream=stream)
    root = logging.getLogger()
    root.addHandler(console)
    seen: list[logging.LogRecord] = []
    catcher = logging.Handler()
    catcher.emit = seen.append
    runs = logging.getLogger("prefect.task_runs")
    runs.addHandler(catcher)
    try:
        fp.quiet_prefect_logs()
        fp.quiet_prefect_logs()  # idempotent: one filter each
        assert sum(type(f).__name__ == "_UserErrorTracebacks" for f in runs.filters) == 1

        def fail(exc: Exception) -> None:
            try:
                raise exc
            except Exception:
                runs.error("Task run failed with exception: %r", exc, exc_info=True)

        monkeypatch.delenv("COIN_DEBUG", raising=False)
        fail(DataError("validation gate failed: e.g. pair_id 'sst2:train:164:a7:b4'"))
        fail(ZeroDivisionError("division by zero"))  # a bug keeps its traceback
        monkeypatch.setenv("COIN_DEBUG", "1")
        fail(DataError("again"))
        assert [r.exc_info is not None for r in seen] == [False, True, True]
        text = stream.getvalue()
        assert "pair_id 'sst2:train:164:a7:b4'" in text, text
        assert text.count("Traceback") == 2, text
    finally:
        root.removeHandler(console)
        runs.removeHandler(catcher)
        for f in [f for f in runs.filters if type(f).__name__ == "_UserErrorTracebacks"]:
            runs.removeFilter(f)


def test_study_dask_threads_means_one_worker(monkeypatch, capsys):
    """The same for `coin study` and `python -m flows.study`: --dask-threads is one worker thread, and --workers
    above 1 with it is refused before Prefect starts (it failed inside the flow, naming internal parameters)."""
    from typer.testing import CliRunner

    import flows.study as fs
    from coin.cli import app

    got: dict = {}
    monkeypatch.setattr(fs, "coin_study", lambda **kw: got.update(kw))
    monkeypatch.setattr(fs, "preflight_study", lambda settings, root=None: None)
    fs.main(["--params", str(ROOT / "params.yaml"), "--dask-threads"])
    assert got["workers"] == 1 and got["dask_processes"] is False
    with pytest.raises(SystemExit) as exit_:
        fs.main(["--params", str(ROOT / "params.yaml"), "--dask-threads", "--workers", "2"])
    assert exit_.value.code == 2 and "drop --workers 2" in capsys.readouterr().err
    res = CliRunner().invoke(app, ["study", "--params", str(ROOT / "params.yaml"), "--dask-threads", "--workers", "2"])
    assert res.exit_code == 2 and "drop --workers 2" in res.output


@pytest.mark.parametrize("module, flow_name", [("flows.pipeline", "coin_pipeline"), ("flows.study", "coin_study"),
                                               ("flows.evaluate", "coin_evaluate")])
def test_each_deployed_flow_quiets_prefects_logs_itself(module, flow_name, monkeypatch, tmp_path):
    """A process worker calls the flow function directly, never run_main: each flow installs the quiet logs first
    (deployment runs logged two or three tracebacks per user error, and emoji)."""
    import importlib

    mod = importlib.import_module(module)
    calls: list[str] = []
    monkeypatch.setattr(mod, "quiet_prefect_logs", lambda: calls.append("quiet"))
    with pytest.raises(Exception):  # noqa: B017,PT011 -- outside a flow run the body stops at get_run_logger
        getattr(mod, flow_name).fn(params_path=str(tmp_path / "nosuch.yaml"))
    assert calls == ["quiet"]


@pytest.mark.parametrize("address", ["notanaddress", "tcp://127.0.0.1", "127.0.0.1:notaport"])
def test_a_malformed_dask_address_is_refused_naming_the_option(address):
    """DaskTaskRunner took any text and failed at the first submitted task, after the pairs and the gate ran."""
    from coin.config import ConfigError
    from flows.pipeline import eval_task_runner

    with pytest.raises(ConfigError, match=r"--dask-address or study.dask_address\): not a Dask scheduler address"):
        eval_task_runner(1, address, True, None, None)
    assert eval_task_runner(1, "tcp://127.0.0.1:8786", True, None, None) is not None  # not connected here


def test_a_failed_study_cell_is_named_in_the_error_of_its_own_class():
    """The study ended with the first failed cell's message alone, the cell named only in the log above."""
    from coin.data.io import DataError
    from flows.study import _naming_cell

    named = _naming_cell(DataError("training needs at least 64 rows"), "coin-s0-train.batch_size=64")
    assert type(named) is DataError
    assert str(named) == "cell coin-s0-train.batch_size=64: training needs at least 64 rows"

    class Odd(Exception):
        def __init__(self, a: int, b: int) -> None:
            super().__init__(a, b)

    odd = Odd(1, 2)
    assert _naming_cell(odd, "x") is odd  # a type that takes other arguments stays as it is


def test_the_console_says_a_user_error_once_and_the_run_logs_keep_every_record():
    """A failed gate was printed five times on the console (the task's failure, its state, the flow's exception and
    its state, each on one long line), before coin's own `error:` lines."""
    import logging

    from coin.config import ConfigError
    from flows.pipeline import _UserErrorTracebacks

    exc = ConfigError("validation gate failed: pass rate 0.125 (2/16 rows) is below validate.min_pass_rate\nmore")

    def records():
        def rec(name, msg, with_exc):
            r = logging.LogRecord(name, logging.ERROR, __file__, 1, msg, None, (ConfigError, exc, None) if with_exc
                                  else None)
            return r
        return [rec("prefect.task_runs", "Task run failed with exception: %r" % exc, True),
                rec("prefect.task_runs", "Finished in state Failed('Task run encountered an exception ConfigError: "
                    f"{exc}')", False),
                rec("prefect.flow_runs", "Encountered exception during execution: %r" % exc, True),
                rec("prefect.flow_runs", f"Finished in state Failed('Flow run encountered an exception: {exc}')",
                    False),
                rec("prefect.flow_runs", "Finished in state Completed()", False)]

    # as logging runs them: the run logger's filter first (it clears exc_info), then the console handler's
    run_logger, console = _UserErrorTracebacks(), _UserErrorTracebacks(console=True)
    kept = [r for r in records() if run_logger.filter(r) and console.filter(r)]
    assert len(kept) == 2 and kept[0].getMessage().startswith("Task run failed"), kept
    assert kept[1].getMessage() == "Finished in state Completed()" and kept[0].exc_info is None
    assert all(_UserErrorTracebacks().filter(r) for r in records())  # what the API and the UI store: every record
