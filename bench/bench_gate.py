"""Validation-gate speed on the default pairs: per-check seconds, embedding cost, total.

    ./run.sh python bench/bench_gate.py                                   # pairs from params.yaml, 3 runs
    ./run.sh python bench/bench_gate.py --runs 5 --out bench/results/gate.md
    ./run.sh python bench/bench_gate.py --set pairs.paraphrase_source=both

Each run builds a fresh :class:`~coin.validation.embeddings.CachedEmbedder` around the *same* loaded
MiniLM (so every run embeds every distinct instruction again: no cross-run cache), and calls
``run_gate`` exactly as ``coin validate`` does (Great Expectations suite + Data Docs included), writing
to a temporary directory. Reported: one-off costs (imports, model load, evaluation sources), then per
run the wall time of each check and of the Data Docs page, the median over runs, and how many distinct
texts were embedded for how many rows.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def main() -> int:
    from coin.argtypes import positive_int  # counts below 1 refused at the command line

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--params", default=str(ROOT / "params.yaml"))
    ap.add_argument("--set", action="append", default=[], help="override, e.g. pairs.rows_per_task=120")
    ap.add_argument("--runs", type=positive_int, default=3)
    ap.add_argument("--out", help="write the markdown result here")
    args = ap.parse_args()

    t0 = time.perf_counter()
    from coin.config import load_settings, project_root
    from coin.data.pairs import build_pairs
    from coin.modeling.backbone import load_tokenizer
    from coin.validation.embeddings import CachedEmbedder, minilm_embedder
    from coin.validation.gate import GateFailed, run_gate
    from coin.validation.leakage import load_eval_sources

    t_import = time.perf_counter() - t0
    settings = load_settings(args.params, args.set)
    root = project_root(args.params)
    data_dir = root / settings.paths.data_dir

    t = time.perf_counter()
    rows = build_pairs(data_dir, settings.pairs, settings.seed)
    t_pairs = time.perf_counter() - t
    t = time.perf_counter()
    sources = load_eval_sources(root / settings.evaluate.instruction_file, data_dir, settings.evaluate.tasks)
    t_sources = time.perf_counter() - t
    tokenizer = load_tokenizer(settings.model.backbone)
    t = time.perf_counter()
    model = minilm_embedder(settings.validate_.embed_batch_size)
    t_model = time.perf_counter() - t

    runs = []
    for _ in range(args.runs):
        emb = CachedEmbedder(model)
        with tempfile.TemporaryDirectory() as out:
            try:
                report = run_gate(rows, cfg=settings.validate_, cutoff_len=settings.pairs.cutoff_len,
                                  tokenizer=tokenizer, out_dir=Path(out), eval_sources=sources, embedder=emb)
            except GateFailed as exc:
                report = exc.report
        runs.append((report, emb))

    names = list(runs[0][0].check_seconds)
    med = {n: statistics.median(r.check_seconds[n] for r, _ in runs) for n in names}
    total = statistics.median(r.seconds for r, _ in runs)
    report, emb = runs[-1]
    lines = [
        f"# Validation gate speed ({len(rows)} rows, {args.runs} runs, median)",
        "",
        f"Command: `{' '.join(['python', 'bench/bench_gate.py', *sys.argv[1:]])}`  ",
        f"Machine: {platform.platform()}, {os.cpu_count()} CPUs, Python {platform.python_version()}; "
        f"load average at the end: {', '.join(f'{x:.1f}' for x in os.getloadavg())}  ",
        f"One-off: imports {t_import:.1f} s, building the pairs {t_pairs:.2f} s, evaluation sources "
        f"{t_sources:.2f} s ({len(sources.instructions)} instructions, {len(sources.examples)} examples), "
        f"MiniLM sentence-transformer load {t_model:.1f} s  ",
        f"Embedded per run: {emb.texts_embedded} distinct texts in {emb.calls} batched calls "
        f"(for {len(rows)} rows = {2 * len(rows)} instructions + {len(sources.instructions)} evaluation "
        "instructions)  ",
        f"Pass rate {report.pass_rate:.3f} ({report.rows_valid}/{report.rows_in})",
        "",
        "| step | seconds (median) | " + " | ".join(f"run {i + 1}" for i in range(len(runs))) + " |",
        "|---|---:|" + "---:|" * len(runs),
    ]
    for n in names:
        lines.append(f"| {n} | {med[n]:.2f} | " + " | ".join(f"{r.check_seconds[n]:.2f}" for r, _ in runs) + " |")
    lines.append(f"| **run_gate total** | **{total:.2f}** | " + " | ".join(f"{r.seconds:.2f}" for r, _ in runs) + " |")
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)  # bench/results/ is git-ignored: not in a clone
        Path(args.out).write_text(text)
    return 0


if __name__ == "__main__":
    from coin.cli import run_script  # a user error in two lines, a bug with its traceback

    raise SystemExit(run_script(main))
