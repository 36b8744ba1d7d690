"""Pair rows, settings and small checks shared by the training tests and their subprocess workers."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from coin.config import TrainSettings

WORDS = ["good", "bad", "fine", "awful", "great", "poor", "nice", "grim"]


def make_rows(n: int, split: str = "train", *, varied_targets: bool = False) -> list[dict[str, Any]]:
    """``n`` explicit (original, paraphrase, negative) pair rows of slightly different lengths.

    ``varied_targets``: every third row answers with a long target, so micro-batches differ in their
    number of response tokens (what token normalisation across accumulation is about).
    """
    def target(i: int, positive: bool) -> str:
        if varied_targets and i % 3 == 0:
            return "positive without any doubt at all" if positive else "negative without any doubt at all"
        return "positive" if positive else "negative"

    return [
        {
            "pair_id": f"sst2:{split}:{i}:a0:b1",
            "task": "sst2",
            "split": split,
            "original_prompt": f"Is this review positive?\nThe film was {WORDS[i % 8]} {i}." + " really" * (i % 4),
            "paraphrase_prompt": f"Review: the film was {WORDS[i % 8]} {i}.\nDoes the reviewer like it?",
            "target": target(i, i % 2 == 0),
            "negative_prompt": f"Is this review positive?\nA {WORDS[(i + 1) % 8]} story {i + 100}.",
            "negative_target": target(i, i % 2 == 1),
        }
        for i in range(n)
    ]


def cfg_for(method: str = "coin", **kw: Any) -> TrainSettings:
    # fp32 (autocast off): the exactness tests compare with fp32 references; bf16 has its own test
    base: dict[str, Any] = {"methods": [method], "batch_size": 2, "lora": {"r": 4, "alpha": 8, "dropout": 0.0},
                            "autocast": "off"}
    base.update(kw)
    return TrainSettings.model_validate(base)


def trainable_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def grads(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.requires_grad and p.grad is not None}


def perturb_lora_b(model: torch.nn.Module, seed: int = 7) -> None:
    """LoRA B starts at zero, which makes every LoRA A gradient zero; give B small seeded values."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(0.05 * torch.randn(p.shape, generator=gen))


def adapter_tensors(adapter_dir: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(Path(adapter_dir) / "adapter_model.safetensors"))


def assert_grads_close(actual: dict[str, torch.Tensor], expected: dict[str, torch.Tensor], rel: float = 1e-5) -> None:
    """Every gradient equal up to float32 summation order: ``|a - e| <= rel * max|e|`` per tensor (+ rtol 1e-4)."""
    assert actual.keys() == expected.keys()
    for name, e in expected.items():
        torch.testing.assert_close(actual[name], e, rtol=1e-4, atol=rel * float(e.abs().max()) + 1e-12, msg=name)
