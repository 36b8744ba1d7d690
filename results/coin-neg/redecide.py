"""Exploratory, after the pre-registered result (RESULTS §26): coin_neg's decisions re-made with the *originals'*
label prior instead of the one its adapter recorded (originals' and negatives' labels together, which is uniform on
the binary tasks: a negative's label is never its original's).

The calibrated score is ``raw − content_free + log prior``; the evaluation stores it (5 decimals) and the prior it
used (``settings.label_counts``), so swapping the prior is exact up to that rounding: no model runs. The coin
cells are left as they are (their prior is the originals' already); every cell then goes through the study's own
aggregation (`coin.study.aggregate`: hierarchical bootstrap over seeds and examples, paired differences).

    PYTHONPATH=src:. python results/coin-neg/redecide.py outputs/study-coin-neg [OUT_JSON]
"""

from __future__ import annotations

import json
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np

from coin.data.tasks import get_task
from coin.evaluation.result import load_result
from coin.evaluation.scoring import label_log_prior
from coin.study.aggregate import aggregate, cell_data


def redecide(res, natural: dict[str, list[int]]):
    p = res.predictions.copy()
    used = res.settings["label_counts"]
    shift = {t: (label_log_prior(natural[t]) - label_log_prior(used[t])).tolist() for t in used}
    scores = [[s + d for s, d in zip(row, shift[t], strict=True)]
              for row, t in zip(p["scores"], p["task"], strict=True)]
    p["scores"] = scores
    p["pred"] = [int(np.argmax(r)) for r in scores]
    p["correct"] = p["pred"] == p["label"]
    p["pred_word"] = [get_task(t).label_words[k] for t, k in zip(p["task"], p["pred"], strict=True)]
    return replace(res, predictions=p)


def main() -> None:
    study = Path(sys.argv[1])
    cells_dir = study / "cells"
    natural = json.loads((cells_dir / "coin-s0" / "adapter" / "coin_model.json").read_text())["label_counts"]
    as_run, swapped = [], []
    for d in sorted(p for p in cells_dir.iterdir() if p.is_dir() and not p.name.startswith(".")):
        rec = json.loads((d / "cell.json").read_text())
        res = load_result(d / "eval")
        as_run.append(cell_data(rec, res))
        if rec["cell"]["method"] == "coin_neg":
            same = redecide(res, res.settings["label_counts"])  # the prior it used
            # the stored decisions again, but where the stored (5-decimal) scores tie (at most 0.2% of rows here)
            moved = res.predictions["scores"][same.predictions["pred"] != res.predictions["pred"]]
            assert all(sorted(r)[-1] == sorted(r)[-2] for r in moved), d
            res = redecide(res, natural)
        swapped.append(cell_data(rec, res))
    out = {}
    for name, cells in (("as run (pre-registered)", as_run), ("coin_neg with the originals' prior", swapped)):
        g = aggregate(cells, ["coin_neg", "coin"])["groups"][0]
        row = {m: {f: g["methods"][m]["figures"][f]["mean"] for f in ("clean_acc", "perturbed_acc")}
               | {"clean_ci": g["methods"][m]["interval"]["clean"]} for m in ("coin_neg", "coin")}
        diff = next(x for x in g["differences"] if x["label"] == "coin_neg − coin")
        row["coin_neg − coin"] = {k: diff[k] for k in ("clean", "perturbed", "consistency", "worst_acc")}
        row["per task clean"] = {m: {t: float(np.mean([c.scores["clean"].xs(t, level="task").mean() for c in cells
                                                        if c.method == m])) for t in g["tasks"]}
                                 for m in ("coin_neg", "coin")}
        row["majority"] = g["majority_class"]
        out[name] = row
        print(name, json.dumps(row, indent=1))
    if len(sys.argv) > 2:
        Path(sys.argv[2]).write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
