"""scaled_dot_product_attention on a CPU: bf16 against fp32, forward and forward + backward, per kernel.

    ./run.sh python bench/bench_attention_dtype.py [--rows 24] [--heads 12] [--length 136] [--head-dim 32]
                                                   [--threads 2] [--reps 10]

Why training on a CPU under bf16 autocast runs its attention in fp32 (``coin.modeling.backbone``, the training
attention): autocast sends SDPA to bf16, and the CPU flash-attention kernel's backward pass is the slow one in bf16.
The default shapes are one MiniLM layer on a packed default micro-batch (16 pairs = 48 sequences packed into about
24 rows of the longest sequence, 12 heads of 32). Each (dtype, kernel, mask) cell runs forward alone and forward +
backward on the same random q/k/v; the mask is a block-diagonal boolean one, as packing builds (True = attend), or
none. Prints a Markdown table of milliseconds per call (medians over ``--reps``).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel


def block_mask(rows: int, length: int) -> torch.Tensor:
    """``(rows, 1, L, L)`` bool: two sequences per row, each causal within itself."""
    half = length // 2
    seg = (torch.arange(length) >= half).long()
    same = seg.unsqueeze(0) == seg.unsqueeze(1)
    allowed = same & torch.ones(length, length, dtype=torch.bool).tril()
    return allowed.expand(rows, 1, length, length).contiguous()


def time_cell(args: argparse.Namespace, dtype: torch.dtype, backend: SDPBackend, masked: bool) -> tuple[float, float]:
    gen = torch.Generator().manual_seed(0)
    shape = (args.rows, args.heads, args.length, args.head_dim)
    q, k, v = (torch.randn(shape, generator=gen).to(dtype).requires_grad_() for _ in range(3))
    mask = block_mask(args.rows, args.length) if masked else None
    fwd, both = [], []
    with sdpa_kernel([backend]):
        for _ in range(2):  # warm-up
            F.scaled_dot_product_attention(q, k, v, attn_mask=mask).sum().backward()
        for _ in range(args.reps):
            t = time.perf_counter()
            with torch.no_grad():
                F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
            fwd.append(time.perf_counter() - t)
            t = time.perf_counter()
            F.scaled_dot_product_attention(q, k, v, attn_mask=mask).sum().backward()
            both.append(time.perf_counter() - t)
    return 1000 * statistics.median(fwd), 1000 * statistics.median(both)


def main() -> None:
    from coin.argtypes import positive_int  # counts below 1 refused at the command line

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rows", type=positive_int, default=24)
    ap.add_argument("--heads", type=positive_int, default=12)
    ap.add_argument("--length", type=positive_int, default=136)
    ap.add_argument("--head-dim", type=positive_int, default=32)
    ap.add_argument("--threads", type=positive_int, default=2)
    ap.add_argument("--reps", type=positive_int, default=10)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    print(f"q/k/v ({args.rows}, {args.heads}, {args.length}, {args.head_dim}), torch {torch.__version__}, "
          f"{args.threads} threads, medians of {args.reps}\n")
    print("| dtype | kernel | mask | forward ms | forward + backward ms |")
    print("|---|---|---|---:|---:|")
    for dtype in (torch.bfloat16, torch.float32):
        for backend in (SDPBackend.FLASH_ATTENTION, SDPBackend.MATH):
            for masked in (True, False):
                f, fb = time_cell(args, dtype, backend, masked)
                print(f"| {str(dtype).removeprefix('torch.')} | {backend.name.lower()} | "
                      f"{'block-diagonal bool' if masked else 'none'} | {f:.1f} | {fb:.1f} |")


if __name__ == "__main__":
    from coin.cli import run_script  # a user error in two lines, a bug with its traceback

    raise SystemExit(run_script(main))
