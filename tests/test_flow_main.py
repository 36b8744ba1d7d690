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
