"""One CPU budget (coin.cpus) for worker counts and torch threads: the affinity mask, not the machine's
cores; OMP_NUM_THREADS when set; an explicit value first."""

import os

import pytest

from coin import cpus


@pytest.fixture
def machine(monkeypatch):
    """A 16-core machine on which this process may run on 4 cores, OMP_NUM_THREADS unset."""
    monkeypatch.setattr(os, "cpu_count", lambda: 16)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1, 2, 3}, raising=False)
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    return monkeypatch


def test_affinity_not_the_machine(machine):
    assert cpus.cpu_budget() == 4
    assert cpus.threads_per_worker(2) == 2


def test_omp_num_threads_wins_over_affinity(machine):
    machine.setenv("OMP_NUM_THREADS", "1")
    assert cpus.cpu_budget() == 1
    for bad in ("", "0", "-2", "four"):  # ignored, as OpenMP ignores it
        machine.setenv("OMP_NUM_THREADS", bad)
        assert cpus.cpu_budget() == 4


def test_explicit_wins(machine):
    machine.setenv("OMP_NUM_THREADS", "1")
    assert cpus.cpu_budget(8) == 8
    assert cpus.threads_per_worker(3, cpus=8) == 2
    with pytest.raises(ValueError, match="at least 1"):
        cpus.cpu_budget(0)


def test_without_sched_getaffinity_the_cpu_count(machine):
    machine.delattr(os, "sched_getaffinity")
    assert cpus.cpu_budget() == 16
    machine.setattr(os, "cpu_count", lambda: None)
    assert cpus.cpu_budget() == 1


def test_every_worker_count_and_thread_count_uses_it(machine):
    """The evaluation fan-out (pipeline) and the study's placement both follow the budget."""
    from coin.config import Settings
    from coin.study.placement import default_workers, worker_plan
    from flows.pipeline import default_eval_workers

    assert default_eval_workers() == 2
    assert default_workers(gpus=0) == 2
    assert worker_plan(Settings.model_validate({})).torch_threads == 4 // default_workers()
    machine.setenv("OMP_NUM_THREADS", "2")
    assert default_eval_workers() == 1 and worker_plan(Settings.model_validate({}), workers=1).torch_threads == 2


def test_use_torch_threads_leaves_a_process_that_has_them_alone(monkeypatch):
    """torch.set_num_threads also sets MKL's thread count and switches its dynamic threading off, which can move
    a backward pass's last bits (RESULTS.md §18): it is called only when the count has to change."""
    import torch

    calls = []
    monkeypatch.setattr(torch, "set_num_threads", calls.append)
    have = torch.get_num_threads()
    cpus.use_torch_threads(have)
    assert calls == []
    cpus.use_torch_threads(have + 1)
    assert calls == [have + 1]
    with pytest.raises(ValueError, match="at least 1"):
        cpus.use_torch_threads(0)


def test_thread_settings_record_torch_and_the_thread_libraries(monkeypatch):
    import torch

    monkeypatch.setenv("MKL_NUM_THREADS", "3")
    monkeypatch.delenv("OPENBLAS_NUM_THREADS", raising=False)
    got = cpus.thread_settings()
    assert got["torch"] == torch.get_num_threads() and got["MKL_NUM_THREADS"] == "3"
    assert got["OPENBLAS_NUM_THREADS"] is None and set(got) == {"torch", *cpus.THREAD_VARS}
