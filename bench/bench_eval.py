"""Evaluation scoring speed: loglik vs batched generate vs the reference's decoding loop, in ONE run.

    ./run.sh python bench/bench_eval.py                          # MiniLM base, sst2 + rte, clean set
    ./run.sh python bench/bench_eval.py --examples 16 --out bench/results/eval.md
    ./run.sh python bench/bench_eval.py --protocol               # + the full evaluate protocol of params.yaml

Every mode scores the *same* prompts (the clean instructions x the seeded sample of each task) on the
same model, one after the other, each after a short warm-up:

- ``loglik``                 label-word log-likelihood, one forward per prompt, label continuations on its
                             KV cache, each instruction's token prefix run once (the evaluation default);
- ``loglik, no prefix``      the same without instruction-prefix sharing (``evaluate.prefix_cache: false``);
- ``loglik, per label``      one right-padded sequence per (prompt, label word), no cache (the fallback);
- ``generate (batched)``     greedy, 7 new tokens, left padding, KV cache (``model.generate``);
- ``reference loop``         the reference's decoding: batch size 1, greedy, 7 new tokens, no KV cache,
                             LM head over every position (docs/protocol.md#scoring, docs/design.md#reference-defects).

The two generate rows decode the backbone loaded as a plain decoder (``attention='causal', readout='last'``), the
only model the reference's loop can decode, so their agreement compares one model two ways; the loglik rows use
the backbone as the evaluation loads it (an encoder such as MiniLM: prefix LM, mean readout).

It prints prompts/s, the speed-up over the reference loop, and how the modes agree: loglik vs parsed
generation (same label), batched vs reference generation (identical text) and each mode's accuracy.
``--protocol`` also times ``evaluate_model`` on the whole ``evaluate:`` section of params.yaml (base model).
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from pathlib import Path

import torch

import coin  # noqa: F401  (offline environment before torch/transformers)
from coin.config import load_settings
from coin.data.tasks import get_task
from coin.evaluation.generation import generate_answers, generate_reference_style, label_choices, parse_answer
from coin.evaluation.instructions import load_instruction_sets
from coin.evaluation.sampling import sample_examples
from coin.evaluation.scoring import score_label_words
from coin.modeling.backbone import autocast_context, load_backbone
from coin.predict import join_instruction

ROOT = Path(__file__).resolve().parents[1]


def _prompts(args, instruction_file: Path) -> list[tuple[str, int, str, str]]:
    """(task, label, instruction key, prompt) for the clean instructions x the seeded sample of each task."""
    out = []
    sets = load_instruction_sets(instruction_file, [args.set], args.tasks)[args.set]
    for task in args.tasks:
        spec = get_task(task)
        rows, _ = sample_examples(ROOT / "data", task, args.examples, args.seed)
        for i, instr in enumerate(sets[task]):
            out += [(task, int(r["label"]), f"{task}/{i}", join_instruction(instr, spec.render_content(r)))
                    for r in rows]
    return out


def _timed(fn, warm, autocast: str):
    """Warm up, then time ``fn`` under ``evaluate.autocast`` (as ``coin evaluate`` runs: bf16 where it is native)."""
    with autocast_context(torch.device("cpu"), autocast, "evaluate.autocast"):
        warm()
        t0 = time.perf_counter()
        result = fn()
        return result, time.perf_counter() - t0


def main() -> None:
    from coin.argtypes import positive_int  # counts below 1 refused at the command line

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--backbone", default="minilm")
    ap.add_argument("--tasks", nargs="+", default=["sst2", "rte"])
    ap.add_argument("--set", default="clean", help="instruction set whose instructions are used")
    ap.add_argument("--examples", type=int, default=8, help="examples per task (x 6 instructions)")
    ap.add_argument("--batch-size", type=positive_int, default=32)
    ap.add_argument("--max-new-tokens", type=positive_int, default=7)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0 = leave torch's default)")
    ap.add_argument("--seed", type=int, default=42)
    ap.add_argument("--protocol", action="store_true", help="also time the full evaluate protocol of params.yaml")
    ap.add_argument("--params", default=str(ROOT / "params.yaml"))
    ap.add_argument("--out", help="also write the Markdown result to this file")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    settings = load_settings(args.params)
    instruction_file = ROOT / settings.evaluate.instruction_file
    bb = load_backbone(args.backbone, device="cpu", seed=args.seed)
    model, tok = bb.model.eval(), bb.tokenizer
    # the generate rows: the backbone as a plain decoder (causal, last-token readout), the only model the
    # reference's loop can decode; the default loads an encoder such as MiniLM as a prefix LM with the mean readout
    dec = load_backbone(args.backbone, device="cpu", seed=args.seed, attention="causal", readout="last").model.eval()
    items = _prompts(args, instruction_file)
    by_task: dict[str, list[int]] = {}
    for k, (task, *_rest) in enumerate(items):
        by_task.setdefault(task, []).append(k)
    labels = [y for _, y, _, _ in items]
    warm_n = 4

    def per_task(fn):
        """Run ``fn(task, prompts, indices)`` per task; results scattered back into input order."""
        out: list = [None] * len(items)
        extra = []
        for task, idx in by_task.items():
            res, info = fn(task, [items[k][3] for k in idx], idx)
            extra.append(info)
            for k, v in zip(idx, res, strict=True):
                out[k] = v
        return out, extra

    def loglik(**kw):
        def run(task, prompts, idx):
            o = score_label_words(model, tok, prompts, list(get_task(task).label_words), batch_size=args.batch_size,
                                  groups=[items[k][2] for k in idx] if kw.get("prefix") else None,
                                  use_cache=kw.get("cache", True), desc=f"loglik {task}")
            return o.scores.argmax(1).tolist(), (o.path, *o.notes)
        return lambda: per_task(run)

    def gen(reference: bool):
        def run(task, prompts, idx):
            f = generate_reference_style if reference else generate_answers
            kw = {} if reference else {"batch_size": args.batch_size}
            g = f(dec, tok, prompts, max_new_tokens=args.max_new_tokens, **kw)
            return g.texts, g.new_tokens
        return lambda: per_task(run)

    warm_prompts = [p for *_, p in items[:warm_n]]
    warm_ll = lambda: score_label_words(model, tok, warm_prompts, ["positive", "negative"], batch_size=warm_n)  # noqa: E731
    warm_gen = lambda: generate_answers(dec, tok, warm_prompts, max_new_tokens=2, batch_size=warm_n)  # noqa: E731
    warm_ref = lambda: generate_reference_style(dec, tok, warm_prompts[:1], max_new_tokens=2)  # noqa: E731

    modes = {
        "loglik (kv cache + shared instruction prefix where the model allows; default)": (loglik(prefix=True), warm_ll),
        "loglik (kv cache, no prefix sharing)": (loglik(), warm_ll),
        "loglik (one sequence per label, no cache)": (loglik(cache=False), warm_ll),
        f"generate (batched, left padding, KV cache, {args.max_new_tokens} tokens; causal)": (gen(False), warm_gen),
        f"reference loop (batch 1, no KV cache, {args.max_new_tokens} tokens; causal)": (gen(True), warm_ref),
    }
    load_before = os.getloadavg()[0]
    results, paths = {}, {}
    for name, (fn, warm) in modes.items():
        (out, info), secs = _timed(fn, warm, settings.evaluate.autocast)
        results[name] = (out, secs)
        if name.startswith("loglik"):  # the scorer's path, and why prefix sharing was not applied where it was not
            paths[name] = sorted({"; ".join(dict.fromkeys(i)) for i in info})
        print(f"{name}: {secs:.1f} s", file=sys.stderr)

    names = list(modes)
    ref_secs = results[names[-1]][1]
    n = len(items)
    choices = {t: label_choices(get_task(t).label_words, instruction_file, t) for t in by_task}
    parsed = {nm: [parse_answer(txt, choices[items[k][0]]) for k, txt in enumerate(results[nm][0])] for nm in names[3:]}
    preds = {**{nm: results[nm][0] for nm in names[:3]}, **parsed}
    acc = {nm: 100 * sum(p == y for p, y in zip(preds[nm], labels, strict=True)) / n for nm in names}

    def agree(a, b):
        return 100 * sum(x == y for x, y in zip(a, b, strict=True)) / n

    lines = [
        "# Evaluation scoring benchmark",
        "",
        f"Command: `python bench/bench_eval.py {' '.join(sys.argv[1:])}`".rstrip(),
        "",
        f"Model `{args.backbone}` on CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
        f"torch {torch.__version__}, {torch.get_num_threads()} threads); {n} prompts = tasks "
        f"{', '.join(args.tasks)} x the 6 `{args.set}` instructions x {args.examples} seeded examples; "
        f"batch size {args.batch_size}; `evaluate.autocast: {settings.evaluate.autocast}` as `coin evaluate` runs. "
        "Every mode scores the same prompts, one after the other, after a warm-up. "
        f"1-min load average {load_before:.1f} before, {os.getloadavg()[0]:.1f} after (other processes share the "
        "CPU when it is well above 0).",
        "",
        "| mode | s | prompts/s | speed-up vs reference loop | accuracy (%) |",
        "|---|---:|---:|---:|---:|",
    ]
    for nm in names:
        secs = results[nm][1]
        lines.append(f"| {nm} | {secs:.1f} | {n / secs:.2f} | {ref_secs / secs:.1f}x | {acc[nm]:.1f} |")
    unparsed = {nm: 100 * sum(p < 0 for p in parsed[nm]) / n for nm in parsed}
    lines += ["", "Scoring path of each loglik row (the scorer's own record):", ""]
    lines += [f"- {nm}: {' | '.join(p)}" for nm, p in paths.items()]
    lines += [
        "",
        "Agreement between modes (same prompts):",
        "",
        f"- loglik (default) vs loglik per label: {agree(preds[names[0]], preds[names[2]]):.1f}% same label "
        "(the paths differ only by float rounding);",
        f"- loglik (default) vs loglik without prefix sharing: {agree(preds[names[0]], preds[names[1]]):.1f}% "
        "same label;",
        f"- batched generate vs reference loop: {agree(results[names[3]][0], results[names[4]][0]):.1f}% identical "
        "output text;",
        f"- loglik vs parsed generation: {agree(preds[names[0]], preds[names[3]]):.1f}% same label "
        f"(generations naming no label: {unparsed[names[3]]:.1f}%, counted wrong).",
    ]
    if args.protocol:
        lines += ["", *_protocol(settings, bb)]
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(text, encoding="utf-8")


def _protocol(settings, bb) -> list[str]:
    """Wall time of evaluate_model on params.yaml's evaluate section, for the base backbone."""
    from coin.evaluation.runner import evaluate_model

    cfg = settings.evaluate.model_copy(update={"instruction_file": str(ROOT / settings.evaluate.instruction_file)})
    res = evaluate_model(bb.model, bb.tokenizer, cfg, data_dir=ROOT / settings.paths.data_dir, seed=settings.seed,
                         model_label="base")
    ov = res.metrics.overall.set_index("scoring")
    lines = [f"Full protocol (params.yaml `evaluate:`; {len(res.tasks)} tasks x {len(res.sets)} sets x 6 "
             f"instructions x up to {cfg.samples_per_task} examples, scoring {', '.join(cfg.scoring)}; skipped: "
             f"{', '.join(res.skipped) or 'none'}): **{res.wall_time_s:.1f} s** for the base model, "
             f"{len(res.predictions)} scored items.", ""]
    for m, t in res.timing.items():
        lines.append(f"- {m}: {t['items']} items in {t['seconds']:.1f} s ({t['items_per_s']:.1f}/s); clean "
                     f"{ov.loc[m, 'clean_acc']:.1f}%, perturbed {ov.loc[m, 'perturbed_acc']:.1f}%")
    return lines


if __name__ == "__main__":
    from coin.cli import run_script  # a user error in two lines, a bug with its traceback

    raise SystemExit(run_script(main))
