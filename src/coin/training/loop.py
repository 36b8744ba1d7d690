"""The training loop: LoRA on a backbone, AdamW, linear warm-up/decay, clipping, accumulation.

One optimiser step = ``grad_accum`` micro-batches of ``batch_size`` pairs; each micro-batch is one
fused forward pass (:func:`coin.training.loss.coin_step_loss`). Pair rows of ``split == 'train'``
are shuffled with a seeded ``random.Random`` per epoch and cycled when ``max_steps`` needs more.
The adapter (safetensors) and the tokenizer are written to ``out_dir / 'adapter'``.
"""

from __future__ import annotations

import contextlib
import math
import random
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from coin.config import TrainSettings
from coin.modeling.backbone import Backbone
from coin.modeling.lora import apply_lora
from coin.training.collator import PairCollator
from coin.training.loss import coin_step_loss

MetricsCallback = Callable[[int, dict[str, float]], None]
_MEAN_KEYS = ("loss", "l_gen", "l_cl", "w", "pos_cos", "neg_cos")


@dataclass
class TrainResult:
    adapter_dir: Path                    # out_dir / "adapter": adapter_config.json, adapter_model.safetensors, tokenizer
    steps: int                           # optimiser steps taken
    metrics: dict[str, float]            # metrics of the last step
    history: list[dict[str, float]] = field(default_factory=list)  # one dict per step, with "step"
    wall_time_s: float = 0.0             # training time (excluding saving)
    tokens_per_s: float = 0.0            # real (non-pad) tokens forwarded per second


def train_rows_of(rows: list[dict[str, Any]], batch_size: int) -> list[dict[str, Any]]:
    """The ``split == 'train'`` rows; at least one full contrastive batch of distinct pairs."""
    train_rows = [r for r in rows if r.get("split") == "train"]
    if len(train_rows) < batch_size:
        raise ValueError(
            f"training needs at least train.batch_size = {batch_size} pair rows with split 'train', "
            f"got {len(train_rows)} (of {len(rows)} rows); add data or lower train.batch_size"
        )
    return train_rows


def iterate_batches(rows: list[dict[str, Any]], batch_size: int, seed: int) -> Iterator[list[dict[str, Any]]]:
    """Endless seeded batches: a fresh shuffle per epoch, the incomplete tail dropped (so no pair
    appears twice in one batch, which would make it its own in-batch negative)."""
    rng = random.Random(f"train-batches:{seed}")
    order = list(range(len(rows)))
    while True:
        rng.shuffle(order)
        for start in range(0, len(order) - batch_size + 1, batch_size):
            yield [rows[i] for i in order[start : start + batch_size]]


def _autocast(device: torch.device) -> contextlib.AbstractContextManager[Any]:
    if device.type == "cuda" and torch.cuda.is_bf16_supported():
        return torch.autocast(device_type="cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def _micro_step(
    model: nn.Module, chunk: list[dict[str, Any]], collate: PairCollator, cfg: TrainSettings, step: int
) -> dict[str, float]:
    """Forward + backward of one micro-batch (loss scaled by 1/grad_accum); its metrics."""
    device = next(model.parameters()).device
    batch = collate(chunk).to(device)
    with _autocast(device):
        loss, metrics = coin_step_loss(model, batch, cfg)
    if not math.isfinite(metrics["loss"]):
        raise RuntimeError(
            f"step {step}: loss is {metrics['loss']} (l_gen={metrics['l_gen']}, l_cl={metrics['l_cl']}); "
            f"pair_ids of the batch: {batch.pair_ids}. Lower train.lr or inspect these rows."
        )
    (loss / cfg.grad_accum).backward()
    return metrics


def _merge(parts: list[dict[str, float]]) -> dict[str, float]:
    """Mean of the loss metrics over micro-batches; token counts summed."""
    out = {k: sum(p[k] for p in parts) / len(parts) for k in _MEAN_KEYS}
    out["n_tokens"] = sum(p["n_tokens"] for p in parts)
    out["n_resp_tokens"] = sum(p["n_resp_tokens"] for p in parts)
    return out


def train(
    backbone: Backbone,
    rows: list[dict[str, Any]],
    cfg: TrainSettings,
    *,
    out_dir: Path,
    seed: int,
    cutoff_len: int,
    on_metrics: MetricsCallback | None = None,
    progress: bool = True,
) -> TrainResult:
    """Train a LoRA adapter on ``backbone`` (wrapped in place) and save it to ``out_dir / 'adapter'``."""
    from transformers import get_linear_schedule_with_warmup

    train_rows = train_rows_of(rows, cfg.batch_size)
    torch.manual_seed(seed)  # LoRA A init and dropout
    model = apply_lora(backbone, cfg.lora)
    collate = PairCollator.from_settings(backbone.tokenizer, cfg, cutoff_len)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    sched = get_linear_schedule_with_warmup(opt, round(cfg.warmup_ratio * cfg.max_steps), cfg.max_steps)
    batches = iterate_batches(train_rows, cfg.batch_size, seed)

    model.train()
    history: list[dict[str, float]] = []
    tokens, t0 = 0.0, time.perf_counter()
    bar = tqdm(total=cfg.max_steps, desc=f"train[{cfg.method}]", unit="step", disable=not progress)
    for step in range(1, cfg.max_steps + 1):
        t_step = time.perf_counter()
        metrics = _merge([_micro_step(model, next(batches), collate, cfg, step) for _ in range(cfg.grad_accum)])
        grad_norm = torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
        metrics["lr"] = float(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        tokens += metrics["n_tokens"]
        elapsed = time.perf_counter() - t0
        metrics.update(
            grad_norm=float(grad_norm), step_s=time.perf_counter() - t_step, tokens_per_s=tokens / max(elapsed, 1e-9)
        )
        history.append({"step": float(step), **metrics})
        bar.update(1)
        bar.set_postfix(loss=f"{metrics['loss']:.4f}", tok_s=f"{metrics['tokens_per_s']:.0f}")
        if on_metrics is not None and (step % cfg.log_every == 0 or step == cfg.max_steps):
            on_metrics(step, dict(metrics))
    bar.close()
    wall = time.perf_counter() - t0

    model.eval()
    adapter_dir = Path(out_dir) / "adapter"
    model.save_pretrained(str(adapter_dir), safe_serialization=True)
    backbone.tokenizer.save_pretrained(str(adapter_dir))
    return TrainResult(adapter_dir, cfg.max_steps, history[-1], history, wall, tokens / max(wall, 1e-9))
