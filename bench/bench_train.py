"""Training-step benchmark: our fused CoIN step vs a reference-style step, vs SFT/CIT, FLOP/s, memory.

    ./run.sh python bench/bench_train.py                      # default backbone (minilm), params.yaml
    ./run.sh python bench/bench_train.py --reps 8 --out bench/results/train.md
    ./run.sh python bench/bench_train.py --backbone tinyllama-config   # ~1.1B Llama from a config (GPU)

One run, one machine, one backbone, the *same* collated batches (real pair rows built from data/ with
params.yaml's pairs settings) for every variant. Every variant owns a fresh copy of the backbone with
the same seeded LoRA init and its own AdamW; a timed step is forward + backward + clipping + AdamW,
collation excluded (measured once, separately). Repetitions are interleaved (rep i of every variant on
batch i, then rep i+1, ...) so machine noise hits all variants alike; comparisons are the median over
reps of the per-batch time ratio (same batch, same moment), step times are medians.

Variants:

- ``coin``            ours, the default training step: one fused forward over originals | paraphrases |
                      hard negatives, packed into shared rows (``train.packing``), LM head only at
                      response positions.
- ``coin_padded``     the same without packing: one right-padded row per sequence.
- ``reference``       reference-style (luka-group/CoIN ``ContrastiveLlama.forward``): one separate
                      forward pass per block, padded, full-vocabulary logits at every position, the HF
                      loss on them; same sequences as ``coin`` (the negatives get their own pass).
- ``coin_noneg`` / ``reference_noneg``: the same two without hard negatives: the reference's own
                      layout (originals | paraphrases), in-batch negatives only.
- ``cit``             ours, generation loss only, on the same originals + paraphrases as
                      ``coin_noneg``: ``coin_noneg`` vs ``cit`` is the cost of the contrastive term on the
                      same sequences. (``sft`` trains on the originals only, half the sequences; it is
                      listed for reference, but it is not "the same sequences".)
- ``sft``             ours, originals only.
- ``coin_fp32``       ``coin`` with ``train.autocast: off``: against ``coin`` (``auto``: bf16 where it is native,
                      e.g. a CPU with AVX512-BF16) it is the gain of bf16 autocast.
- ``coin_dropout``    ``coin`` with dropout as the checkpoint and the reference have it (``train.backbone_dropout:
                      null``: MiniLM's 0.1 hidden + attention dropout; ``train.lora.dropout: 0.05``): against
                      ``coin`` (params.yaml) it is the cost of dropout's random masks on this device.
- ``coin_bf16_attention``: ``coin`` with its attention in autocast's bf16 (the modules flagged
                      ``coin_autocast_attention``), as before the fp32 attention of CPU training
                      (:data:`coin.modeling.backbone.AUTOCAST_ATTENTION_ATTR`): the cost of the CPU's bf16
                      flash-attention backward. On a GPU or with autocast off the two are the same.
- ``consistency`` / ``coin_consistency``: the output-consistency objective alone and added to coin
                      (``train.consistency`` as in params.yaml), on the same sequences as ``coin``; with
                      ``_noneg``, on the same originals + paraphrases as ``cit`` (the pull term only).
                      ``consistency_noneg`` vs ``cit`` is the consistency term's own cost on the same sequences.
- ``coin_bucketed``   ``coin`` on length-bucketed batches (``train.bucket_by_length``): other batch
                      compositions of the same rows, so compare its tokens/s and padding, not pairs/s.

FLOPs are counted with ``torch.utils.flop_counter.FlopCounterMode`` on every distinct batch of each
variant during the (untimed) warm-up pass (forward + backward of matmuls and attention; CPU flash
attention is registered below because torch does not count it); achieved FLOP/s = counted FLOPs of the
timed steps / their total time. The dense matmul rate is measured in the same run (square fp32 matmuls on CPU,
bf16 on CUDA; best of several), and "MFU" = achieved FLOP/s / that rate. Peak memory: on CUDA
``torch.cuda.max_memory_allocated`` per variant; on CPU a fresh subprocess per variant samples its RSS
every millisecond during 2 steps (peak minus the RSS before the first step = activations + gradients
+ optimizer state; "peak RSS" = the process total).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch.utils import flop_counter as fc

import coin  # noqa: F401  (offline environment variables)
from coin.modeling.backbone import (
    AUTOCAST_ATTENTION_ATTR,
    Backbone,
    FusedLM,
    install_training_attention,
    load_backbone,
    load_tokenizer,
    pick_device,
    set_backbone_dropout,
)
from coin.modeling.lora import apply_lora
from coin.training.batching import BatchStream
from coin.training.collator import GEN_GROUPS, Batch, PairCollator
from coin.training.distributed import SINGLE
from coin.training.loop import accumulate_gradients, autocast_context
from coin.training.loss import contrastive_weight, info_nce

if TYPE_CHECKING:  # imported where used: bench/gpu_check.py imports this module without pydantic
    from coin.config import Settings, TrainSettings

ROOT = Path(__file__).resolve().parents[1]
VARIANTS = ("coin", "coin_padded", "reference", "coin_noneg", "reference_noneg", "cit", "sft", "coin_bucketed",
            "coin_fp32", "coin_dropout", "coin_bf16_attention", "consistency", "consistency_noneg", "coin_consistency",
            "coin_consistency_noneg")
DROPOUT_ON = 0.05  # coin_dropout's LoRA dropout: the reference's (its backbone dropout: the checkpoint's, MiniLM 0.1)
# the methods a variant name can start with (the rest of the name: _noneg, _padded, ...); longest first
_VARIANT_METHODS = ("coin_consistency", "consistency", "cit", "sft")


# --------------------------------------------------------------------------- FLOP counting


def _register_cpu_attention_flops() -> None:
    """torch's FlopCounterMode has formulas for the CUDA SDPA kernels but not the CPU flash kernel."""
    aten = torch.ops.aten

    @fc.register_flop_formula(aten._scaled_dot_product_flash_attention_for_cpu, get_raw=True)
    def _fwd(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, *args: Any, **kwargs: Any) -> int:
        return fc.sdpa_flop_count(query.shape, key.shape, value.shape)

    @fc.register_flop_formula(aten._scaled_dot_product_flash_attention_for_cpu_backward, get_raw=True)
    def _bwd(grad_out: torch.Tensor, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
             *args: Any, **kwargs: Any) -> int:
        return fc.sdpa_backward_flop_count(grad_out.shape, query.shape, key.shape, value.shape)


with contextlib.suppress(Exception):  # already registered (re-import) or op absent: counts stay conservative
    _register_cpu_attention_flops()


def matmul_rate(device: torch.device, n: int = 2048, reps: int = 5, dtype: torch.dtype | None = None) -> float:
    """Best dense matmul FLOP/s of this device over ``reps`` in ``dtype`` (default fp32 on CPU, bf16 on CUDA)."""
    dtype = dtype or (torch.bfloat16 if device.type == "cuda" else torch.float32)
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    best = 0.0
    for _ in range(reps + 1):
        _sync(device)
        t = time.perf_counter()
        (a @ b).sum().item()
        _sync(device)
        best = max(best, 2 * n**3 / (time.perf_counter() - t))
    return best


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# --------------------------------------------------------------------------- the steps


def reference_loss(model: torch.nn.Module, batch: Batch, cfg: TrainSettings) -> torch.Tensor:
    """Reference-style CoIN loss: one forward per block (originals, paraphrases[, negatives]), each with
    full-vocabulary logits at every position and the HF causal-LM loss on them; pooled last token;
    the same InfoNCE and adaptive weight as ours (so only the execution strategy differs)."""
    pooled, gen = {}, []
    for g in batch.groups:
        blk = batch.block(g)
        out = model(input_ids=batch.input_ids[blk], attention_mask=batch.attention_mask[blk],
                    labels=batch.labels[blk] if g in GEN_GROUPS else None, output_hidden_states=True,
                    use_cache=False)
        hidden = out.hidden_states[-1]                                                  # (B, T, H)
        pooled[g] = hidden[torch.arange(hidden.size(0), device=hidden.device), batch.last_index[blk]]  # (B, H)
        if g in GEN_GROUPS:
            gen.append(out.loss)
    l_gen = sum(gen)
    l_cl, _, _ = info_nce(pooled["original"], pooled["paraphrase"], pooled.get("negative"), cfg.temperature)
    term, _ = contrastive_weight(l_gen, l_cl, cfg.cl_weighting, cfg.cl_lambda, cfg.cl_weight)
    return l_gen + term


@dataclass
class Variant:
    name: str
    cfg: TrainSettings
    batches: list[Batch]
    model: torch.nn.Module
    opt: torch.optim.Optimizer
    params: list[torch.nn.Parameter]

    def step(self, i: int, device: torch.device) -> None:
        batch = self.batches[i % len(self.batches)]
        if self.name.startswith("reference"):
            with autocast_context(device, self.cfg.autocast):
                loss = reference_loss(self.model, batch, self.cfg)
            loss.backward()
        else:
            accumulate_gradients(FusedLM(self.model), [batch], self.cfg, SINGLE, device)
        torch.nn.utils.clip_grad_norm_(self.params, self.cfg.max_grad_norm)
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)


def variant_cfg(name: str, base: TrainSettings) -> TrainSettings:
    method = next((m for m in _VARIANT_METHODS if name in (m, f"{m}_noneg")), "coin")
    return base.model_copy(update={
        "methods": [method], "hard_negatives": "noneg" not in name, "bucket_by_length": name == "coin_bucketed",
        "packing": not (name.startswith("reference") or name == "coin_padded"),
        "autocast": "off" if name == "coin_fp32" else base.autocast,
        **({"backbone_dropout": None, "lora": base.lora.model_copy(update={"dropout": DROPOUT_ON})}
           if name == "coin_dropout" else {}),
    })


# TinyLlama-1.1B's shape (hidden 2048, 22 layers, GQA 32/4 heads, vocabulary 32000): ~1.1B parameters
TINYLLAMA_1B: dict[str, Any] = dict(
    vocab_size=32000, hidden_size=2048, intermediate_size=5632, num_hidden_layers=22, num_attention_heads=32,
    num_key_value_heads=4, max_position_embeddings=2048, tie_word_embeddings=False,
)


def build_backbone(spec: str, seed: int, layers: int | None) -> Backbone:
    """``minilm``, a path, or ``tinyllama-config``: a TinyLlama-1.1B-shaped Llama from a config (random
    weights, the MiniLM tokenizer, vocabulary 32000), bf16 on a GPU."""
    if spec != "tinyllama-config":
        return load_backbone(spec, seed=seed)
    from transformers import LlamaConfig, LlamaForCausalLM

    install_training_attention()  # as load_backbone does
    tok = load_tokenizer("minilm")
    device = pick_device("auto")
    config = LlamaConfig(
        **{**TINYLLAMA_1B, "num_hidden_layers": layers or TINYLLAMA_1B["num_hidden_layers"]},
        pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
    )
    torch.manual_seed(seed)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    model = LlamaForCausalLM(config).to(device=device, dtype=dtype)
    return Backbone(model, tok, "tinyllama-config")


def make_variant(name: str, args: argparse.Namespace, settings: Settings, rows: list[dict[str, Any]]) -> Variant:
    cfg = variant_cfg(name, settings.train.model_copy(update={"batch_size": args.batch_size}))
    bb = build_backbone(args.backbone, settings.seed, args.layers)
    set_backbone_dropout(bb.model, cfg.backbone_dropout)  # as coin train does
    torch.manual_seed(settings.seed)
    model = apply_lora(bb, cfg.lora)
    if name == "coin_bf16_attention":
        for module in model.modules():
            setattr(module, AUTOCAST_ATTENTION_ATTR, True)
    if cfg.gradient_checkpointing:
        model.get_base_model().gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    device = next(model.parameters()).device
    stream = BatchStream(rows, args.batch_size, settings.seed, bucket_by_length=cfg.bucket_by_length)
    collate = PairCollator.from_settings(bb.tokenizer, cfg, settings.pairs.cutoff_len)
    batches = [collate(next(stream)).to(device) for _ in range(args.n_batches)]
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    return Variant(name, cfg, batches, model, opt, params)


def count_flops(v: Variant, i: int, device: torch.device) -> int:
    """FLOPs of one (untimed) step of ``v`` on batch ``i``."""
    with fc.FlopCounterMode(display=False) as counter:
        v.step(i, device)
    return int(counter.get_total_flops())


# --------------------------------------------------------------------------- memory


def _rss_bytes() -> int:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def probe_memory(
    name: str, args: argparse.Namespace, settings: Settings, rows: list[dict[str, Any]]
) -> dict[str, float]:
    """Peak memory of 2 steps of one variant (run in its own process on CPU)."""
    v = make_variant(name, args, settings, rows)
    device = next(v.model.parameters()).device
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        for i in range(2):
            v.step(i, device)
        torch.cuda.synchronize(device)
        peak = torch.cuda.max_memory_allocated(device)
        return {"step_mb": (peak - base) / 2**20, "peak_mb": peak / 2**20}
    base, peak, stop = _rss_bytes(), [0], threading.Event()

    def sample() -> None:
        while not stop.is_set():
            peak[0] = max(peak[0], _rss_bytes())
            time.sleep(0.001)

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    for i in range(2):
        v.step(i, device)
    stop.set()
    thread.join()
    peak[0] = max(peak[0], _rss_bytes())
    return {"step_mb": (peak[0] - base) / 2**20, "peak_mb": peak[0] / 2**20}


def memory_by_subprocess(name: str, argv: list[str]) -> dict[str, float]:
    out = subprocess.run([sys.executable, __file__, *argv, "--probe-memory", name], capture_output=True, text=True,
                         check=False)
    if out.returncode != 0:
        raise RuntimeError(f"memory probe {name} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


# --------------------------------------------------------------------------- main


def load_rows(settings: Settings) -> list[dict[str, Any]]:
    from coin.data.pairs import build_pairs

    rows = build_pairs(ROOT / settings.paths.data_dir, settings.pairs, settings.seed)
    return [r for r in rows if r.get("split") == "train"]


def _overrides(args: argparse.Namespace) -> list[str]:
    """``--set`` as given; for ``tinyllama-config`` LoRA targets ``auto`` unless set (params.yaml names MiniLM's
    modules, which a Llama does not have)."""
    given = list(args.overrides)
    if args.backbone == "tinyllama-config" and not any(o.split("=", 1)[0].strip() == "train.lora.target_modules"
                                                       for o in given):
        given.append("train.lora.target_modules=auto")
    return given


def run(args: argparse.Namespace, argv: list[str]) -> str:
    from coin.config import load_settings

    settings = load_settings(args.params, _overrides(args))
    rows = load_rows(settings)
    device = pick_device("auto")
    print(f"[bench] {len(rows)} train pair rows; building {len(args.variants)} variants on {device}", file=sys.stderr)
    variants = [make_variant(n, args, settings, rows) for n in args.variants]

    tok = load_tokenizer("minilm" if args.backbone == "tinyllama-config" else args.backbone)
    collate = PairCollator.from_settings(tok, variants[0].cfg, settings.pairs.cutoff_len)
    stream = BatchStream(rows, args.batch_size, settings.seed)
    chunks = [next(stream) for _ in range(10)]
    t = time.perf_counter()
    for c in chunks:
        collate(c)
    collate_ms = 1000 * (time.perf_counter() - t) / len(chunks)

    # the peak in each dtype the variants' matmuls run in (a bf16-autocast step against an fp32 peak read >100%)
    dtypes = {"bf16" if _bf16_step(v, device) else "fp32" for v in variants}
    rate_before = {d: matmul_rate(device, dtype=_DTYPES[d]) for d in sorted(dtypes)}
    # warm-up = one untimed pass over every distinct batch, counting its FLOPs
    flops = {v.name: [count_flops(v, i, device) for i in range(args.n_batches)] for v in variants}
    times: dict[str, list[float]] = {v.name: [] for v in variants}
    for rep in range(args.reps):
        for v in variants:
            _sync(device)
            t = time.perf_counter()
            v.step(rep, device)
            _sync(device)
            times[v.name].append(time.perf_counter() - t)
        print(f"[bench] rep {rep + 1}/{args.reps} done", file=sys.stderr)
    peak_rate = {d: max(r, matmul_rate(device, dtype=_DTYPES[d])) for d, r in rate_before.items()}

    memory = {}
    for v in variants:
        if device.type == "cuda":
            memory[v.name] = probe_memory(v.name, args, settings, rows)
        else:
            memory[v.name] = memory_by_subprocess(v.name, argv)
    return report(args, settings, variants, times, flops, peak_rate, memory, collate_ms, device, len(rows))


_DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}


def _bf16_step(v: Variant, device: torch.device) -> bool:
    """Whether the variant's matmuls run in bf16: on CUDA (bf16 weights), or under bf16 autocast."""
    from coin.modeling.backbone import uses_bf16

    return device.type == "cuda" or uses_bf16(device, v.cfg.autocast)


def report(args: argparse.Namespace, settings: Settings, variants: list[Variant], times: dict[str, list[float]],
           flops: dict[str, list[int]], peak_rate: dict[str, float], memory: dict[str, dict[str, float]],
           collate_ms: float, device: torch.device, n_rows: int) -> str:
    rows_md = []
    stats: dict[str, dict[str, float]] = {}
    for v in variants:
        ts = times[v.name]
        med = statistics.median(ts)
        timed = [v.batches[i % len(v.batches)] for i in range(len(ts))]
        tokens = statistics.mean(b.n_tokens for b in timed)
        slots = statistics.mean(b.attention_mask.numel() for b in timed)
        flop_total = sum(flops[v.name][i % len(v.batches)] for i in range(len(ts)))
        stats[v.name] = s = {
            "ms": 1000 * med, "pairs_s": args.batch_size / med, "tokens_s": tokens / med,
            "gflop": flop_total / len(ts) / 1e9, "flop_s": flop_total / sum(ts),
        }
        rows_md.append(
            f"| `{v.name}` | {v.batches[0].n_sequences} | {tokens:.0f} | {slots:.0f} | {s['ms']:.0f} | "
            f"{s['pairs_s']:.2f} | {s['tokens_s']:.0f} | {s['gflop']:.1f} | {s['flop_s'] / 1e9:.1f} | "
            f"{100 * s['flop_s'] / peak_rate['bf16' if _bf16_step(v, device) else 'fp32']:.1f}% "
            f"({'bf16' if _bf16_step(v, device) else 'fp32'}) | {memory[v.name]['step_mb']:.0f} | "
            f"{memory[v.name]['peak_mb']:.0f} |"
        )

    def speedup(fast: str, slow: str) -> str:
        """Median over reps of t_slow / t_fast on the same batch, with the range."""
        if fast not in times or slow not in times:
            return "n/a"
        r = sorted(b / a for a, b in zip(times[fast], times[slow], strict=True))
        return f"**{statistics.median(r):.2f}x** ({r[0]:.2f}-{r[-1]:.2f})"

    def overhead(a: str, b: str) -> str:
        if a not in times or b not in times:
            return "n/a"
        r = sorted(x / y - 1 for x, y in zip(times[a], times[b], strict=True))
        return f"**{100 * statistics.median(r):+.1f}%** ({100 * r[0]:+.0f}% to {100 * r[-1]:+.0f}%)"

    def get(name: str, key: str, src: dict[str, dict[str, float]]) -> float:
        return src.get(name, {}).get(key, math.nan)

    load = os.getloadavg() if hasattr(os, "getloadavg") else (math.nan,) * 3
    coin_peak = next((peak_rate["bf16" if _bf16_step(v, device) else "fp32"] for v in variants if v.name == "coin"),
                     math.nan)
    lines = [
        f"Backbone `{args.backbone}`, batch {args.batch_size} pairs, cutoff {settings.pairs.cutoff_len}, LoRA "
        f"r={settings.train.lora.r}, device {device} ({platform.processor() or platform.machine()}, torch threads "
        f"{torch.get_num_threads()}), torch {torch.__version__}; {args.reps} interleaved timed steps per variant "
        f"over {args.n_batches} distinct batches (after one untimed pass over them); {n_rows} train pair rows; "
        f"load average at the end {load[0]:.1f} / {load[1]:.1f} / {load[2]:.1f}.",
        "",
        "| variant | seqs/step | real tokens/step | token slots/step | median ms/step | pairs/s | tokens/s | "
        "GFLOP/step | GFLOP/s | of matmul peak | step memory MB | peak memory MB |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
        *rows_md,
        "",
        "Measured dense matmul peak, 2048x2048, best of 12: "
        + ", ".join(f"{r / 1e9:.1f} GFLOP/s in {d}" for d, r in sorted(peak_rate.items()))
        + "; each variant is compared with the peak of the dtype its matmuls run in (bf16 under autocast)."
        f" Collation: {collate_ms:.1f} ms per batch (not in the step times). Token slots = "
        f"positions through the model incl. padding. Ratios: median over the timed steps of the per-batch ratio "
        f"(range in brackets).",
        "",
        "| comparison | value | target |",
        "|---|---:|---|",
        f"| (a) pairs/s `coin` vs `reference` (same sequences incl. hard negatives) | {speedup('coin', 'reference')} "
        f"| >= 2x |",
        f"| (a) pairs/s `coin_noneg` vs `reference_noneg` (the reference's own layout) | "
        f"{speedup('coin_noneg', 'reference_noneg')} | >= 2x |",
        f"| (a') pairs/s `coin_padded` vs `reference` (fusion + logits at response positions only, no packing) | "
        f"{speedup('coin_padded', 'reference')} | |",
        f"| packing: `coin` vs `coin_padded` | {speedup('coin', 'coin_padded')} | |",
        f"| (b) contrastive overhead, same sequences: step time `coin_noneg` vs `cit` | "
        f"{overhead('coin_noneg', 'cit')} "
        f"| <= 10% |",
        f"| (b') `coin` (adds B hard-negative sequences) vs `cit` | {overhead('coin', 'cit')} "
        f"| (not the same sequences) |",
        f"| `coin` vs `sft` (three times the sequences) | {overhead('coin', 'sft')} | |",
        f"| (c) `coin` achieved FLOP/s / measured matmul peak of its dtype | "
        f"{figure(100 * get('coin', 'flop_s', stats) / coin_peak, '.1f', '%')} | |",
        "| (d) step memory `coin` / `coin_padded` / `reference` | "
        + " / ".join(figure(get(v, "step_mb", memory), ".0f") for v in ("coin", "coin_padded", "reference"))
        + " MB | |",
        f"| length bucketing: tokens/s `coin_bucketed` / `coin` (other batches) | "
        f"{figure(get('coin_bucketed', 'tokens_s', stats) / get('coin', 'tokens_s', stats), '.2f', 'x')} | |",
        f"| dropout off (params.yaml) vs on (checkpoint + reference rates): `coin` vs `coin_dropout` | "
        f"{speedup('coin', 'coin_dropout')} | |",
        f"| fp32 attention in CPU training vs autocast's bf16: `coin` vs `coin_bf16_attention` | "
        f"{speedup('coin', 'coin_bf16_attention')} | |",
        f"| (e) consistency term, same sequences: step time `consistency_noneg` vs `cit` | "
        f"{overhead('consistency_noneg', 'cit')} | small (reuses the logits) |",
        f"| (e) `coin_consistency_noneg` vs `cit` (InfoNCE + consistency, same sequences) | "
        f"{overhead('coin_consistency_noneg', 'cit')} | |",
        f"| (e) `consistency` vs `coin` (same sequences incl. hard negatives; the negatives' logits, no InfoNCE) | "
        f"{overhead('consistency', 'coin')} | |",
        f"| (e) `coin_consistency` vs `coin` (same sequences: the cost of adding L_oc to coin) | "
        f"{overhead('coin_consistency', 'coin')} | |",
        f"| (e) `consistency` / `coin_consistency` vs `cit` (adds B hard-negative sequences) | "
        f"{overhead('consistency', 'cit')} / {overhead('coin_consistency', 'cit')} | (not the same sequences) |",
    ]
    return "\n".join(lines)


def figure(value: float, spec: str, unit: str = "") -> str:
    """``value`` formatted, or ``n/a`` where it is not finite (a variant not among --variants), as the other rows."""
    return f"{value:{spec}}{unit}" if math.isfinite(value) else "n/a"


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    from coin.argtypes import positive_int  # counts below 1 refused at the command line

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--params", default=str(ROOT / "params.yaml"))
    ap.add_argument("--set", dest="overrides", action="append", default=[], help="params override KEY=VALUE")
    ap.add_argument("--backbone", default="minilm", help="minilm | a local model path | tinyllama-config")
    ap.add_argument("--layers", type=positive_int, default=None,
                    help="tinyllama-config only: fewer layers (smoke runs)")
    ap.add_argument("--batch-size", type=positive_int, default=8, help="pairs per step")
    ap.add_argument("--reps", type=positive_int, default=12, help="timed steps per variant (cycling over the batches)")
    ap.add_argument("--n-batches", type=positive_int, default=6,
                    help="distinct batches (one untimed pass over them first)")
    ap.add_argument("--threads", type=positive_int, default=None, help="torch intra-op threads (default: torch's)")
    ap.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS)
    ap.add_argument("--out", default=None, help="also write the table (with the command) to this Markdown file")
    ap.add_argument("--probe-memory", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.probe_memory:
        from coin.config import load_settings

        settings = load_settings(args.params, _overrides(args))
        print(json.dumps(probe_memory(args.probe_memory, args, settings, load_rows(settings))))
        return
    run_argv = [a for a in argv if a]  # forwarded to the memory probes
    table = run(args, _strip_out(run_argv))
    print(table)
    if args.out:
        cmd = "./run.sh python bench/bench_train.py " + " ".join(argv)
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(f"# Training-step benchmark\n\nCommand: `{cmd.strip()}`\n\n{table}\n")


def _strip_out(argv: list[str]) -> list[str]:
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
            continue
        if a == "--out":
            skip = True
            continue
        if a.startswith("--out="):
            continue
        out.append(a)
    return out


if __name__ == "__main__":
    from coin.cli import run_script  # a user error in two lines, a bug with its traceback

    raise SystemExit(run_script(main))
