"""Compare variants of one method across study directories, with the study's own aggregation.

    ./run.sh python experiments/compare_variants.py \
        "coin (prompt, mean)=outputs/study-pool:coin" "coin=outputs/study:coin" "cit=outputs/study:cit" \
        --out results/study-pool

Each argument is ``LABEL=STUDY_DIR:METHOD``: the done cells of METHOD in STUDY_DIR (every seed), shown as LABEL.
``coin study`` keys its cells by method, so two configurations of one method (here coin with another
``train.pool_span``) live in two study directories and cannot be one study; this script puts them side by side.
It checks that every directory was built from the same validated pairs and evaluation sample (the studies'
``valid.jsonl``; the cells' ``eval_seed`` and ``data_version``), then calls the study's aggregation
(:func:`coin.study.aggregate.aggregate_group`: mean ± std over seeds, and each difference first − other with
the hierarchical bootstrap over seeds and examples). Differences: the first variant against each other one,
then each pair among the others. Writes ``comparison.json`` and ``table.md`` under ``--out`` and prints the table.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import itertools
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from coin.data.io import read_json, write_json  # noqa: E402
from coin.evaluation.result import load_result  # noqa: E402
from coin.study.aggregate import aggregate_group, cell_data  # noqa: E402
from coin.study.cell import CELL_RECORD, EVAL_DIR  # noqa: E402


def parse_variant(text: str) -> tuple[str, Path, str]:
    label, sep, rest = text.partition("=")
    study, sep2, method = rest.rpartition(":")
    if not (sep and sep2 and label and study and method):
        raise SystemExit(f"{text!r}: write LABEL=STUDY_DIR:METHOD, e.g. 'coin=outputs/study:coin'")
    return label, Path(study), method


def _fmt(x: float | None, sign: bool = False) -> str:
    return "n/a" if x is None else (f"{x:+.1f}" if sign else f"{x:.1f}")


def table(agg: dict, labels: list[str]) -> str:
    maj = agg["majority_class"]["avg"]
    lines = ["| variant | seeds | clean | perturbed | perturbed 95% interval | std over instructions |",
             "|---|---:|---:|---:|---:|---:|"]
    for lab in labels:
        m = agg["methods"][lab]
        f, ci = m["figures"], m["interval"]["perturbed"]
        lines.append(f"| {lab} | {m['n_seeds']} | {_fmt(f['clean_acc']['mean'])} ± {_fmt(f['clean_acc']['std'])} | "
                     f"{_fmt(f['perturbed_acc']['mean'])} ± {_fmt(f['perturbed_acc']['std'])} | "
                     f"[{_fmt(ci['ci_low'])}, {_fmt(ci['ci_high'])}] | "
                     f"{_fmt(f['perturbed_std']['mean'])} ± {_fmt(f['perturbed_std']['std'])} |")
    lines += [f"| *majority class* | | *{maj:.1f}* | *{maj:.1f}* | | |", "",
              "| difference | Δ clean [95% CI] | seeds agreeing | Δ perturbed [95% CI] | seeds agreeing |",
              "|---|---:|---:|---:|---:|"]
    for d in agg["differences"]:
        cells = []
        for part in ("clean", "perturbed"):
            x = d[part]
            star = " *" if x["excludes_zero"] else ""
            cells += [f"{_fmt(x['delta'], True)} [{_fmt(x['ci_low'], True)}, {_fmt(x['ci_high'], True)}]{star}",
                      f"{x['seeds_same_sign']}/{x['seeds_paired']}"]
        lines.append(f"| {d['label']} | " + " | ".join(cells) + " |")
    lines.append("")
    lines.append("(* = the interval excludes 0)")
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("variants", nargs="+", help="LABEL=STUDY_DIR:METHOD (the first is compared with each other)")
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--n-boot", type=int, default=2000)
    args = ap.parse_args()

    variants = [parse_variant(v) for v in args.variants]
    labels = [v[0] for v in variants]
    if len(set(labels)) != len(labels):
        raise SystemExit(f"two variants share a label: {labels}")
    valid = {str(d): hashlib.sha256((d / "validated" / "valid.jsonl").read_bytes()).hexdigest()
             for _, d, _ in variants}
    if len(set(valid.values())) != 1:
        raise SystemExit(f"the studies were built from different validated pairs: {valid}")
    records, data = [], []
    for label, study, method in variants:
        dirs = sorted(p for p in (study / "cells").glob(f"{method}-s*") if p.is_dir())
        found = []
        for cell_dir in dirs:
            rec = read_json(cell_dir / CELL_RECORD)
            if rec["cell"]["method"] != method or rec["cell"].get("sweep_key"):
                continue
            if not rec.get("complete"):
                raise SystemExit(f"{cell_dir}: not complete")
            found.append(rec["cell"]["seed"])
            records.append(rec)
            data.append(dataclasses.replace(cell_data(rec, load_result(cell_dir / EVAL_DIR)), method=label))
        if not found:
            raise SystemExit(f"{study / 'cells'}: no done cell of method {method!r}")
        print(f"{label}: {study}/cells/{method}-s{{{','.join(map(str, sorted(found)))}}}")
    for field in ("eval_seed", "data_version"):
        values = {r.get(field) for r in records}
        if len(values) != 1:
            raise SystemExit(f"cells differ in {field}: {values}")
    pairs = [(labels[0], b) for b in labels[1:]] + list(itertools.combinations(labels[1:], 2))
    agg = aggregate_group(data, labels, n_boot=args.n_boot, pairs=pairs)
    md = table(agg, labels)
    args.out.mkdir(parents=True, exist_ok=True)
    write_json(args.out / "comparison.json", {"variants": args.variants, "valid_sha256": next(iter(valid.values())),
                                              "eval_seed": records[0].get("eval_seed"), **agg})
    (args.out / "table.md").write_text(md + "\n")
    print(md)
    print(json.dumps({"n_examples": agg["n_examples"], "tasks": agg["tasks"]}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
