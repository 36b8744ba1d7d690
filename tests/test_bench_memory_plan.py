"""bench/bench_memory_plan.py: the probe gets the built model whichever way ``--backbone`` is spelt."""

from __future__ import annotations

import importlib.util
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_a_built_backbone_reaches_the_probe_as_its_path(capsys) -> None:
    # `--backbone=tiny-llama` reached the probe subprocess as the name, not the built model's path: "no such directory"
    spec = importlib.util.spec_from_file_location("bench_memory_plan", ROOT / "bench" / "bench_memory_plan.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    bench.main(["--backbone=tiny-llama", "--set", "train.lora.target_modules=auto", "--set", "train.batch_size=2",
                "--set", "pairs.cutoff_len=32", "--set", "pairs.tasks=[sst2]", "--steps", "1", "--threads", "1"])
    row = capsys.readouterr().out.strip().splitlines()[-1]
    assert row.startswith("| tiny-llama | train.lora.target_modules=auto ") and "pairs.tasks=[sst2]" in row, row
