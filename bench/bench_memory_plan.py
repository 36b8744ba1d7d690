"""The memory plan (``coin train --plan``, :mod:`coin.modeling.memory`) against measured peak memory.

    ./run.sh python bench/bench_memory_plan.py --set train.batch_size=4 --set pairs.cutoff_len=64 --threads 1
    ./run.sh python bench/bench_memory_plan.py --backbone tiny-llama --set train.batch_size=4 --threads 1

Each case runs in a fresh subprocess, as bench_train.py's ``--probe-memory`` does: it loads the backbone as the
train stage does, then runs the project's own ``train()`` for ``--steps`` optimiser steps on real pair rows
(built from data/ with the params' pairs settings) while a thread samples the process's RSS every millisecond
(on CUDA: ``torch.cuda.max_memory_allocated``). Measured:

- weights = RSS after loading the backbone - RSS before (the model object, its weights and the tokenizer);
- step = peak RSS during training - RSS after loading: LoRA parameters, gradients, optimiser state, autocast
  copies, activations, logits and whatever the step allocates on the side (collation, allocator slack).

Against them: the plan's estimate at the measured micro-batch (the one with the most token slots: its rows x row
length, its response positions) and the plan's bound at ``pairs.cutoff_len`` (what ``coin train --plan``
prints and the preflight checks). ``--backbone tiny-llama`` builds a small Llama from a config (hidden 256,
4 layers, the MiniLM tokenizer) in a temporary directory; ``small-llama``: hidden 512, 8 layers;
``medium-llama``: hidden 1024, 12 layers.

``--processes N`` (CPU, gloo) launches the probe under ``torch.distributed.run`` with N processes, with the params'
``train.sharding`` (``--set train.sharding=fsdp`` for FSDP2, else DDP). Each process loads the whole model before
it is wrapped (DDP) or sharded (FSDP), so its peak is taken from after the wrap (``loop._wrap``) to the end of
training; "measured" is that peak minus the RSS before loading, per process (the largest over the ranks).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import torch

import coin  # noqa: F401  (offline environment variables)
from coin.config import load_settings

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_train import _rss_bytes, load_rows  # noqa: E402  (the same RSS sampling and pair rows)

ROOT = Path(__file__).resolve().parents[1]
MIB = 2**20


LLAMAS = {  # --backbone NAME: hidden, intermediate, layers, heads, KV heads
    "tiny-llama": (256, 688, 4, 8, 4),
    "small-llama": (512, 1376, 8, 8, 8),
    "medium-llama": (1024, 2752, 12, 16, 16),
}


def tiny_llama(out: Path, name: str = "tiny-llama") -> Path:
    """A Llama of :data:`LLAMAS` (random weights) with the MiniLM tokenizer, saved to ``out``."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from coin.modeling.backbone import load_tokenizer

    hidden, inter, layers, heads, kv = LLAMAS[name]
    tok = load_tokenizer("minilm")
    config = LlamaConfig(hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
                         num_attention_heads=heads, num_key_value_heads=kv, max_position_embeddings=2048,
                         tie_word_embeddings=False,
                         vocab_size=len(tok), pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id,
                         eos_token_id=tok.eos_token_id)
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(str(out))
    tok.save_pretrained(str(out))
    return out


def probe(settings: Any, steps: int) -> dict[str, Any]:
    """Load, train ``steps`` steps, and report RSS (or CUDA) figures and the largest micro-batch's shape."""
    from coin.modeling.backbone import load_backbone
    from coin.training import collator as collator_module
    from coin.training.loop import train

    rows = load_rows(settings)
    shapes: list[tuple[int, int, int]] = []
    call = collator_module.PairCollator.__call__

    def recording(self: Any, batch: Any) -> Any:
        b = call(self, batch)
        shapes.append((int(b.input_ids.size(0)), int(b.input_ids.size(1)), int(b.resp_rows.numel())))
        return b

    collator_module.PairCollator.__call__ = recording  # type: ignore[method-assign]
    cuda = torch.cuda.is_available() and settings.model.device in ("auto", "cuda")
    before = torch.cuda.memory_allocated() if cuda else _rss_bytes()
    bb = load_backbone(settings.model.backbone, dtype=settings.model.dtype, device=settings.model.device,
                       seed=settings.seed, attention=settings.model.attention, readout=settings.model.readout,
                       quantization=settings.model.quantization, double_quant=settings.model.double_quant)
    with torch.no_grad():  # safetensors weights may stay memory-mapped: touch them so they count as loaded
        for p in bb.model.parameters():
            p.sum()
        del p  # no reference past loading: a sharded run frees the whole tensors (and their file mapping)
    loaded = torch.cuda.memory_allocated() if cuda else _rss_bytes()
    cfg = settings.train.for_method(settings.train.methods[0]).model_copy(
        update={"max_steps": steps, "checkpoint_every": 0, "log_every": 1})
    peak, stop = [loaded], threading.Event()
    distributed = int(os.environ.get("WORLD_SIZE", "1")) > 1
    phase = {"wrapped": False, "at_wrap": 0}
    if distributed:  # the peak from after the model is wrapped/sharded: loading holds the whole model
        from coin.training import loop as loop_module

        wrap = loop_module._wrap

        def wrapped(*a: Any, **kw: Any) -> Any:
            out = wrap(*a, **kw)
            phase["at_wrap"] = peak[0] = _rss_bytes()
            phase["wrapped"] = True
            return out

        loop_module._wrap = wrapped  # type: ignore[assignment]

    def sample() -> None:
        while not stop.is_set():
            if phase["wrapped"] or not distributed:
                peak[0] = max(peak[0], _rss_bytes())
            time.sleep(0.001)

    if cuda:
        torch.cuda.reset_peak_memory_stats()
    else:
        threading.Thread(target=sample, daemon=True).start()
    with tempfile.TemporaryDirectory() as tmp:
        train(bb, rows, cfg, out_dir=Path(tmp), seed=settings.seed, cutoff_len=settings.pairs.cutoff_len,
              progress=False)
    stop.set()
    peak[0] = torch.cuda.max_memory_allocated() if cuda else max(peak[0], _rss_bytes())
    widest = max(shapes, key=lambda s: s[0] * s[1])
    return {"before": before, "loaded": loaded, "peak": peak[0], "rows": widest[0], "row_len": widest[1],
            "positions": widest[2], "batches": len(shapes), "at_wrap": phase["at_wrap"],
            "rank": int(os.environ.get("RANK", "0"))}


def compare(settings: Any, measured: dict[str, Any], nproc: int = 1) -> dict[str, float]:
    from dataclasses import replace

    from coin.modeling.memory import Workload, estimate, plan_training

    plan = plan_training(settings, methods=settings.train.methods[:1], world_size=nproc)
    m = plan.methods[0]
    at_batch = replace(m.workload, sequences=measured["rows"], seq_len=measured["row_len"],
                       logit_sequences=measured["positions"], response_tokens=1)
    assert isinstance(at_batch, Workload)
    est = estimate(plan.shape, at_batch)
    weights_m = measured["loaded"] - measured["before"]
    step_m = measured["peak"] - measured["loaded"]
    if nproc > 1:  # the process's share once wrapped/sharded (weights and LoRA), and what the step adds to it
        weights_m = measured["at_wrap"] - measured["before"]
        step_m = measured["peak"] - measured["at_wrap"]
        est = replace(est, weights=est.weights + est.trainable, trainable=0)
    return {
        "weights_measured": weights_m / MIB, "weights_estimate": est.weights / MIB,
        "step_measured": step_m / MIB, "step_estimate": (est.total - est.weights) / MIB,
        "total_measured": (measured["peak"] - measured["before"]) / MIB, "total_estimate": est.total / MIB,
        "bound_total": m.estimate.total / MIB, "slots": measured["rows"] * measured["row_len"],
        "bound_slots": m.workload.tokens, "activations_estimate": est.activations / MIB,
    }


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    from coin.argtypes import positive_int  # counts below 1 refused at the command line

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--params", default=str(ROOT / "params.yaml"))
    ap.add_argument("--set", dest="overrides", action="append", default=[], help="params override KEY=VALUE")
    ap.add_argument("--backbone", default=None,
                    help="minilm (params' model.backbone) | a local path | " + " | ".join(LLAMAS))
    ap.add_argument("--steps", type=positive_int, default=3, help="optimiser steps measured")
    ap.add_argument("--threads", type=positive_int, default=None, help="torch intra-op threads (default: torch's)")
    ap.add_argument("--processes", type=positive_int, default=1, help="processes (torch.distributed.run, gloo on CPU)")
    ap.add_argument("--probe", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    label = args.backbone or "params' backbone"
    with tempfile.TemporaryDirectory() as tmp:
        if args.backbone in LLAMAS and not args.probe:
            args.backbone = str(tiny_llama(Path(tmp) / args.backbone, args.backbone))
        # the probe's arguments rebuilt from the parsed ones (a built model's path in place of its name, whichever
        # way the flag was spelt: --backbone=tiny-llama reached the probe as the name)
        child = ["--params", args.params, *[x for o in args.overrides for x in ("--set", o)],
                 "--steps", str(args.steps), *(["--threads", str(args.threads)] if args.threads else []),
                 *(["--backbone", args.backbone] if args.backbone else [])]
        settings = load_settings(args.params, [*args.overrides, *([f"model.backbone={args.backbone}"]
                                                                  if args.backbone else [])])
        if args.probe:
            print(json.dumps(probe(settings, args.steps)))
            return
        launch = [sys.executable] if args.processes == 1 else [
            sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(args.processes)]
        out = subprocess.run([*launch, __file__, *child, "--probe"], capture_output=True, text=True, check=False)
        if out.returncode != 0:
            raise RuntimeError(f"memory probe failed:\n{out.stderr[-3000:]}")
        ranks = [json.loads(line) for line in out.stdout.splitlines() if line.startswith("{")]
        measured = max(ranks, key=lambda m: m["peak"] - m["before"])  # the largest process
        r = compare(settings, measured, args.processes)
    err = lambda e, m: f"{100 * (e - m) / m:+.0f}%"  # noqa: E731
    alloc = f"MALLOC_MMAP_THRESHOLD_={os.environ['MALLOC_MMAP_THRESHOLD_']}" if "MALLOC_MMAP_THRESHOLD_" in \
        os.environ else "glibc default"
    total = f"{r['total_measured']:.0f} | {r['total_estimate']:.0f} ({err(r['total_estimate'], r['total_measured'])})"
    step = f"{r['step_measured']:.0f} | {r['step_estimate']:.0f} ({err(r['step_estimate'], r['step_measured'])})"
    if args.processes > 1:
        label += f", {args.processes} processes ({settings.train.sharding}), per process"
    print(f"| {label} | {' '.join(args.overrides) or 'params.yaml'} | {alloc} | {measured['rows']} x "
          f"{measured['row_len']} ({r['slots']} of {r['bound_slots']}) | {total} | {step} | {r['bound_total']:.0f} |")
    print(json.dumps({"measured": measured, "ranks": ranks, **{k: round(v, 1) for k, v in r.items()}}),
          file=sys.stderr)


if __name__ == "__main__":
    from coin.cli import run_script  # a user error in two lines, a bug with its traceback

    raise SystemExit(run_script(main))
