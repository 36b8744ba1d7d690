"""The flow's cache keys, output checks, task runner and deployment file, without running a flow."""

import os
from pathlib import Path

import pytest
import yaml

from coin.config import Settings
from flows.caching import STAGE_SPECS, cache_key, fingerprint, missing_outputs, record_outputs, select_params

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def project(tmp_path: Path) -> Path:
    """A project with pairs and validated outputs on disk (contents are arbitrary bytes)."""
    (tmp_path / "data" / "glue").mkdir(parents=True)
    (tmp_path / "data" / "glue" / "sst2.train.jsonl").write_text('{"x": 1}\n')
    (tmp_path / "outputs" / "pairs").mkdir(parents=True)
    (tmp_path / "outputs" / "pairs" / "pairs.jsonl").write_text('{"pair_id": "a"}\n')
    (tmp_path / "outputs" / "validated").mkdir(parents=True)
    (tmp_path / "outputs" / "validated" / "valid.jsonl").write_text('{"pair_id": "a"}\n')
    return tmp_path


def _settings(**sections) -> Settings:
    return Settings.model_validate(sections)


def test_fingerprint_follows_content_and_names_not_location(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    for d in (a, b):
        (d / "sub").mkdir(parents=True)
        (d / "sub" / "f.txt").write_text("hello")
        (d / "__pycache__").mkdir()
        (d / "__pycache__" / "x.pyc").write_bytes(b"\x00" * 8)
    assert fingerprint([a / "sub"], base=a) == fingerprint([b / "sub"], base=b)  # a copy hashes the same
    (b / "__pycache__" / "x.pyc").write_bytes(b"\x01")  # ignored
    assert fingerprint([a], base=a) == fingerprint([b], base=b)
    (b / "sub" / "f.txt").write_text("hellO")
    assert fingerprint([a], base=a) != fingerprint([b], base=b)
    (b / "sub" / "f.txt").write_text("hello")
    (b / "sub" / "f.txt").rename(b / "sub" / "g.txt")
    assert fingerprint([a], base=a) != fingerprint([b], base=b)
    assert fingerprint([a / "missing"], base=a) != fingerprint([a / "sub"], base=a)


def test_select_params_takes_sections_and_keys_minus_exclusions():
    s = _settings(train={"lr": 0.01, "methods": ["coin", "sft"]})
    got = select_params(s, ["seed", "train"], ["train.methods"])
    assert got["seed"] == 42 and got["train.lr"] == 0.01 and got["train.lora.r"] == 16
    assert "train.methods" not in got and not any(k.startswith(("evaluate.", "pairs.")) for k in got)


def test_key_changes_with_the_stage_params_only(project):
    base = _settings()
    k = cache_key("train", base, project, "coin")
    assert cache_key("train", base, project, "coin") == k  # stable
    assert cache_key("train", base, project, "cit") != k  # per method
    assert cache_key("train", _settings(train={"lr": 0.002}), project, "coin") != k
    assert cache_key("train", _settings(seed=7), project, "coin") != k
    # not read by training: evaluation params, and which *other* methods are configured
    assert cache_key("train", _settings(evaluate={"samples_per_task": 5}), project, "coin") == k
    assert cache_key("train", _settings(train={"methods": ["coin", "cit", "sft"]}), project, "coin") == k

    ev = cache_key("evaluate_unit", base, project, "base")
    assert cache_key("evaluate_unit", _settings(evaluate={"samples_per_task": 5}), project, "base") != ev
    assert cache_key("evaluate_unit", _settings(train={"lr": 0.002}), project, "base") == ev


def test_key_changes_with_input_content_and_data_version(project):
    s = _settings()
    before = {st: cache_key(st, s, project, "coin") for st in ("pairs", "validate", "train")}
    (project / "outputs" / "pairs" / "pairs.jsonl").write_text('{"pair_id": "b"}\n')  # upstream rewrote its output
    after = {st: cache_key(st, s, project, "coin") for st in ("pairs", "validate", "train")}
    assert after["validate"] != before["validate"]
    assert after["pairs"] == before["pairs"] and after["train"] == before["train"]

    (project / "data.dvc").write_text("outs:\n- md5: 0123.dir\n  path: data\n")  # a new data version
    assert cache_key("train", s, project, "coin") != after["train"]


def test_missing_outputs_invalidate_a_cache_hit(project):
    s = _settings()
    pairs_dir = project / "outputs" / "pairs"
    assert missing_outputs("pairs", s, project) == [f"{pairs_dir / 'stats.json'} is missing",
                                                    f"{pairs_dir / 'short_rows.jsonl'} is missing"]
    (pairs_dir / "stats.json").write_text("{}")
    (pairs_dir / "short_rows.jsonl").write_text("")
    assert missing_outputs("pairs", s, project) == ["no record of the outputs a run with these settings wrote"]
    record_outputs("pairs", s, project)  # what the task does when it has written them
    assert missing_outputs("pairs", s, project) == []
    problems = missing_outputs("train", s, project, "cit")
    assert len(problems) == 3 and all("outputs/train/cit" in p for p in problems)
    (project / "outputs" / "evaluate" / "models" / "base").mkdir(parents=True)  # empty dir is not an output
    assert missing_outputs("evaluate_unit", s, project, "base")


def test_a_hit_needs_the_outputs_its_run_wrote(project):
    """Outputs on disk from another run (settings A, then B, then A again: every run writes the same paths), from
    the CLI, or damaged are no cache hit: the task recomputes (it served B's files for A's run)."""
    pairs_dir = project / "outputs" / "pairs"
    (pairs_dir / "stats.json").write_text('{"rows": 8}')
    (pairs_dir / "short_rows.jsonl").write_text("")
    a, b = _settings(pairs={"rows_per_task": 8}), _settings(pairs={"rows_per_task": 10})
    record_outputs("pairs", a, project)
    assert missing_outputs("pairs", a, project) == []
    (pairs_dir / "stats.json").write_text('{"rows": 10}')  # run B rewrote them
    record_outputs("pairs", b, project)
    assert missing_outputs("pairs", b, project) == []
    assert missing_outputs("pairs", a, project) == ["its outputs were rewritten since (another run, the CLI, or an "
                                                    "edit)"]
    (pairs_dir / "stats.json").write_text('{"rows": 1')  # damaged by hand
    assert missing_outputs("pairs", b, project) != []


def test_train_cache_needs_its_mlflow_run(project, tmp_path):
    from coin.data.io import write_json

    s = _settings()
    d = project / "outputs" / "train" / "coin"
    (d / "adapter").mkdir(parents=True)
    (d / "adapter" / "adapter_config.json").write_text("{}")
    (d / "loss.csv").write_text("step,loss\n1,2\n")
    write_json(d / "train.json", {"run_id": "0" * 32})
    problems = missing_outputs("train", s, project, "coin")
    assert problems and "is not in the tracking store" in problems[0]


def test_flow_cache_specs_cover_the_params_dvc_tracks():
    """The Prefect keys and dvc.yaml must agree on what each stage reads (no silent stale cache)."""
    dvc = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    flow_specs = {"pairs": ["pairs"], "validate": ["validate"], "train": ["train"],
                  "evaluate": ["evaluate_unit", "evaluate_report"]}
    for stage, specs in flow_specs.items():
        covered = {p for s in specs for p in STAGE_SPECS[s].params}
        for param in dvc[stage]["params"]:
            assert param in covered or any(param.startswith(c + ".") for c in covered), (stage, param)


def test_eval_task_runner_local_cluster_or_existing_scheduler():
    from prefect_dask import DaskTaskRunner

    from flows.pipeline import eval_task_runner

    local = eval_task_runner(2)
    assert isinstance(local, DaskTaskRunner)
    assert local.cluster_kwargs["n_workers"] == 2 and local.cluster_kwargs["processes"] is True
    assert local.cluster_kwargs["host"] == "127.0.0.1"
    assert eval_task_runner(3, address="tcp://127.0.0.1:8786").address == "tcp://127.0.0.1:8786"
    with pytest.raises(ValueError, match="at least 1 Dask worker"):
        eval_task_runner(0)
    with pytest.raises(ValueError, match="cannot load models concurrently"):
        eval_task_runner(2, processes=False)


def test_default_eval_workers_one_per_two_cores():
    from flows.pipeline import default_eval_workers

    assert [default_eval_workers(c) for c in (1, 2, 3, 4, 16)] == [1, 1, 1, 2, 8]
    assert default_eval_workers() >= 1


def test_local_dask_workers_get_the_flow_environment(monkeypatch):
    """The flow's local workers start without MALLOC_TRIM_THRESHOLD_ (Dask sets it; evaluation ran 1.4x slower
    from mmap churn) and with their torch threads as OpenMP's, MKL's and OpenBLAS's count (Dask sets 1: MKL then
    ran one thread under torch's two, and a study cell's backward differed from a plain process's, RESULTS.md
    §18), even after an earlier nanny leaked its values into this process; the flow puts this process's own
    values back after its cluster."""
    import dask
    import torch
    from distributed import Client, LocalCluster

    import flows.pipeline as fp
    from coin.cpus import THREAD_VARS

    monkeypatch.setattr(fp, "_PROCESS_ENV", dict.fromkeys(fp._PROCESS_ENV))  # a process started without them
    for var in THREAD_VARS:
        monkeypatch.setenv(var, "7")  # what the nanny of an earlier cluster in this process leaves
    monkeypatch.setenv("MALLOC_TRIM_THRESHOLD_", "65536")
    key = "distributed.nanny.pre-spawn-environ"
    before = dict(dask.config.get(key))
    try:
        dask.config.set({key: {**before, "MALLOC_TRIM_THRESHOLD_": 65536}})  # Dask's default (an earlier runner may
        fp.eval_task_runner(2, threads=1)                                     # have changed it in this process)
        assert not any(var in os.environ for var in fp._PROCESS_ENV)  # the leaked values are gone
        with LocalCluster(n_workers=1, threads_per_worker=1, processes=True, host="127.0.0.1",
                          dashboard_address=None) as cluster, Client(cluster) as client:
            env = client.submit(dict, os.environ, pure=False).result()
            torch_threads = client.submit(torch.get_num_threads, pure=False).result()
        assert "MALLOC_TRIM_THRESHOLD_" not in env
        assert {var: env.get(var) for var in THREAD_VARS} == dict.fromkeys(THREAD_VARS, "1")
        assert torch_threads == 1  # torch starts with them: use_torch_threads(1) has nothing to change there
        assert os.environ.get("MKL_NUM_THREADS") == "1"  # the nanny wrote the workers' values into this process
        fp.restore_process_env()
        assert not any(var in os.environ for var in fp._PROCESS_ENV)
    finally:
        dask.config.set({key: before})


def test_registration_markdown_shows_the_decision():
    from flows.pipeline import registration_markdown

    md = registration_markdown({"name": "coin-minilm", "version": 3, "aliases": ["challenger"],
                                "decision": {"promoted": False, "reason": "perturbed 0.61 < 0.62 + margin"}})
    assert "`coin-minilm` version 3" in md and "challenger" in md
    assert "| decision.promoted | False |" in md and "perturbed 0.61" in md


def test_registration_markdown_shows_every_candidate():
    """With two register.methods the artifact showed only the last candidate's version and decision (and the others
    as one Python repr in a cell): a run that promoted coin read 'not promoted' under cit's heading."""
    from flows.pipeline import registration_markdown

    coin = {"method": "coin", "name": "coin-minilm", "version": 4, "aliases": ["champion"],
            "decision": {"promote": True, "reason": "first candidate"}}
    cit = {"method": "cit", "name": "coin-minilm", "version": 5, "aliases": ["challenger"],
           "decision": {"promote": False, "reason": "perturbed 0.61 < 0.62 + margin"}}
    md = registration_markdown({**cit, "candidates": [coin, cit]})
    assert md.index("### coin") < md.index("version 4, aliases: champion") < md.index("### cit") \
        < md.index("version 5, aliases: challenger")
    assert "| decision.promote | True |" in md and "| decision.promote | False |" in md
    assert "candidates" not in md and "{'" not in md
    one = registration_markdown({**coin, "candidates": [coin]})
    assert "###" not in one and "candidates" not in one and "version 4" in one


def test_prefect_yaml_deploys_the_pipeline_on_a_process_pool_with_a_cron_schedule():
    from prefect.client.schemas.schedules import CronSchedule

    doc = yaml.safe_load((ROOT / "prefect.yaml").read_text())
    (dep,) = [d for d in doc["deployments"] if d["name"] == "nightly"]
    module, func = dep["entrypoint"].split(":")
    assert module == "flows/pipeline.py"
    import flows.pipeline

    assert getattr(flows.pipeline, func).name == "coin-pipeline"
    assert dep["work_pool"]["name"] == "coin-local"
    CronSchedule(cron=dep["schedules"][0]["cron"], timezone=dep["schedules"][0]["timezone"])  # valid cron
    steps = [next(iter(step)) for step in doc["pull"]]
    assert steps == ["prefect.deployments.steps.set_working_directory"]


def test_deployments_run_one_at_a_time_and_queue_the_next():
    """Two runs of one deployment share outputs/: the second must wait for the first (it evaluated and registered
    the other run's adapter), queued by Prefect rather than refused by the pipeline's lock."""
    from prefect.client.schemas.objects import ConcurrencyLimitConfig, ConcurrencyLimitStrategy

    doc = yaml.safe_load((ROOT / "prefect.yaml").read_text())
    for dep in doc["deployments"]:
        limit = ConcurrencyLimitConfig.model_validate(dep.get("concurrency_limit") or {"limit": 0})
        assert (limit.limit, limit.collision_strategy) == (1, ConcurrencyLimitStrategy.ENQUEUE), dep["name"]


def test_every_deployment_names_a_flow_that_accepts_its_parameters():
    """Each deployment's entrypoint is a flow function in this repository, its parameters pass the flow's own
    validation, and it uses the project's build and pull steps (working directory pinned at deploy time)."""
    import importlib

    from prefect import Flow

    doc = yaml.safe_load((ROOT / "prefect.yaml").read_text())
    assert {d["name"] for d in doc["deployments"]} >= {"nightly", "study", "champion"}
    for dep in doc["deployments"]:
        path, func = dep["entrypoint"].split(":")
        assert (ROOT / path).is_file(), dep["entrypoint"]
        fl = getattr(importlib.import_module(path.removesuffix(".py").replace("/", ".")), func)
        assert isinstance(fl, Flow), dep["entrypoint"]
        fl.validate_parameters(dep.get("parameters") or {})
        assert dep["work_pool"]["name"] == "coin-local"
        assert not {"build", "pull", "push"} & set(dep), f"{dep['name']}: project-level steps only"


def test_io_tasks_retry_transient_errors_only():
    from prefect.states import Failed

    from coin.config import ConfigError
    from coin.data.io import DataError
    from coin.registry.promotion import PromotionError
    from flows.pipeline import _transient

    for exc in (OSError("connection reset"), TimeoutError("slow remote"), RuntimeError("database is locked")):
        assert _transient(None, None, Failed(data=exc)), exc
    from coin.errors import Busy
    from coin.locks import exclusive

    for exc in (ConfigError("bad key"), DataError("bad row"), PromotionError("champion has no figures"),
                Busy("another `coin evaluate` is writing it"),
                ModuleNotFoundError("No module named 'psycopg2'", name="psycopg2")):
        assert not _transient(None, None, Failed(data=exc)), exc
    # what a held lock raises is that refusal: a flow's evaluate task retried it twice, 5 s apart
    import tempfile
    from pathlib import Path

    from filelock import FileLock

    with tempfile.TemporaryDirectory() as d, FileLock(str(Path(d) / ".lock")):
        try:
            with exclusive(Path(d) / ".lock", "busy"):
                raise AssertionError("the lock was taken twice")
        except Busy as exc:
            assert not _transient(None, None, Failed(data=exc))
