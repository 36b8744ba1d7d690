"""The plan's mechanism check: L_cl (and the cosines) over the last 100 steps of each coin cell, per temperature.

    python results/coin-temperature/lcl.py outputs/study-tau outputs/study-tau-base > results/coin-temperature/lcl.md
"""

from __future__ import annotations

import csv
import statistics
import sys
from pathlib import Path


def last_steps(loss_csv: Path, n: int = 100) -> list[dict[str, float]]:
    with loss_csv.open() as f:
        rows = [{k: float(v) for k, v in r.items() if v not in ("", None)} for r in csv.DictReader(f)]
    return rows[-n:]


def main(study_dirs: list[str]) -> None:
    print("| study | cell | L_cl median (last 100 steps) | L_cl max | positive cosine | hard-negative cosine "
          "| L_gen median |")
    print("|---|---|---:|---:|---:|---:|---:|")
    for d in study_dirs:
        for cell in sorted(Path(d, "cells").glob("coin-s*")):
            rows = last_steps(cell / "loss.csv")
            med = {k: statistics.median(r[k] for r in rows) for k in ("l_cl", "pos_cos", "neg_cos", "l_gen")}
            print(f"| {d} | {cell.name} | {med['l_cl']:.4f} | {max(r['l_cl'] for r in rows):.4f} | "
                  f"{med['pos_cos']:.3f} | {med['neg_cos']:.3f} | {med['l_gen']:.3f} |")


if __name__ == "__main__":
    main(sys.argv[1:])
