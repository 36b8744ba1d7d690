"""Two coin commands started at once on a fresh project both open the MLflow store: its first opening creates the
tables, which must happen once (coin.registry.tracking._store_init_lock)."""

from __future__ import annotations

import multiprocessing as mp
from pathlib import Path


def _setup(root: str, barrier, queue) -> None:
    import torch

    torch.set_num_threads(1)
    from coin.config import Settings
    from coin.registry.tracking import setup_tracking

    barrier.wait()  # both processes past their imports: the first accesses overlap
    try:
        queue.put(("ok", setup_tracking(Settings.model_validate({}), Path(root))))
    except Exception as exc:  # noqa: BLE001 -- reported to the test
        queue.put(("err", repr(exc)))


def test_two_processes_create_a_fresh_store_at_once(tmp_path):
    """Without the lock one of the two failed in each of 4 tries ("duplicate column name: step", "Online migration
    expected to match one row"), and in 1 of 4 the store was left half-built for every later command."""
    ctx = mp.get_context("spawn")
    for i in range(2):
        root = tmp_path / f"p{i}"
        root.mkdir()
        barrier, queue = ctx.Barrier(2), ctx.Queue()
        procs = [ctx.Process(target=_setup, args=(str(root), barrier, queue)) for _ in range(2)]
        for p in procs:
            p.start()
        got = [queue.get(timeout=300) for _ in procs]
        for p in procs:
            p.join(60)
        assert [k for k, _ in got] == ["ok", "ok"], got
        assert got[0][1] == got[1][1]  # one experiment, the same id
