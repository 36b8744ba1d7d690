"""bench/bench_train.py's report: a comparison whose variants were not run says n/a, as the others do."""

from __future__ import annotations

from types import SimpleNamespace

import torch

from bench.bench_train import report


def test_comparisons_of_variants_not_run_say_n_a():
    """--variants coin,reference: no coin_padded nor coin_bucketed, so their memory and bucketing figures are n/a
    (they printed nan and nanx)."""
    batch = SimpleNamespace(n_tokens=10, attention_mask=torch.ones(2, 8), n_sequences=2)
    variants = [SimpleNamespace(name=n, batches=[batch], cfg=SimpleNamespace(autocast="off")) for n in
                ("coin", "reference")]
    args = SimpleNamespace(backbone="tiny", batch_size=2, reps=2, n_batches=1)
    settings = SimpleNamespace(pairs=SimpleNamespace(cutoff_len=64), train=SimpleNamespace(lora=SimpleNamespace(r=4)))
    out = report(args, settings, variants, {"coin": [0.1, 0.1], "reference": [0.2, 0.2]},
                 {"coin": [10**9], "reference": [10**9]}, {"fp32": 1e10, "bf16": 2e10},
                 {n: {"step_mb": 5.0, "peak_mb": 6.0} for n in ("coin", "reference")}, 1.0, torch.device("cpu"), 4)
    assert "nan" not in out
    assert "| (d) step memory `coin` / `coin_padded` / `reference` | 5 / n/a / 5 MB | |" in out
    assert "| length bucketing: tokens/s `coin_bucketed` / `coin` (other batches) | n/a | |" in out
