"""Paired differences in std over instructions (``perturbed_std``) between the methods of a study, per (draw, seed)
cell, from its ``study.json``. The study's bootstrap puts intervals on accuracy, consistency and worst case, not on
this figure, so it is given here as mean ± std over the paired cells and the count of cells with the mean's sign.

    python results/study-draws-robust/std_differences.py results/study-draws-robust/study.json
"""

from __future__ import annotations

import json
import statistics as st
import sys


def main(path: str) -> None:
    group = json.load(open(path))["groups"][-1]  # the last group: pooled over the draws when the study has them
    values = {m: v["figures"]["perturbed_std"]["values"] for m, v in group["methods"].items()}
    print(f"group: {group['sweep']}")
    for d in group["differences"]:
        a, b = values[d["a"]], values[d["b"]]
        diff = [a[k] - b[k] for k in a if k in b and a[k] is not None and b[k] is not None]
        mean = st.mean(diff)
        same = sum((x > 0) == (mean > 0) for x in diff if x != 0)
        print(f"{d['label']}: std over instructions {mean:+.2f} ± {st.stdev(diff):.2f} over {len(diff)} cells, "
              f"{same}/{len(diff)} with the mean's sign")


if __name__ == "__main__":
    main(sys.argv[1])
