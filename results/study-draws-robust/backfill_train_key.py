"""One-off: give §23's study cells (trained at bd03129, before cells recorded ``train_key``) the training key the
current code computes, so a study that only changes the evaluation reuses their adapters (``coin.study.cell``).

Honest only when nothing a training reads changed since the cells trained; PLAN.md says why that holds here. Each
cell is checked first: its recorded params, restricted to what training reads, must equal the current ones, and its
recorded pairs hash must equal the hash of its draw's ``valid.jsonl`` now. A cell that fails either is left alone
(it will train again).

    PYTHONPATH=src:. python results/study-draws-robust/backfill_train_key.py params.yaml outputs/study-draws \
        --sweep 'pairs.seed=[42,7,11]' --set 'study.methods=[coin,sft]'
"""

from __future__ import annotations

import argparse
import json

from coin.data.io import write_json
from coin.stage_specs import select_params
from coin.study.grid import cell_named, cell_settings, load_study, sweep_overrides, valid_file
from coin.study.keys import CELL_PARAMS_EXCLUDE, TRAIN_PARAMS, sha256_files, train_key


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("params")
    ap.add_argument("out_dir")
    ap.add_argument("--sweep")
    ap.add_argument("--set", action="append", default=[])
    a = ap.parse_args()
    settings, root = load_study(a.params, [*a.set, *sweep_overrides(a.sweep), f"study.out_dir={a.out_dir}"])
    for f in sorted((root / a.out_dir / "cells").glob("*/cell.json")):
        rec = json.loads(f.read_text())
        name = rec["cell"]["name"]
        if rec.get("train_key"):
            print(f"{name}: has a train_key already, left alone")
            continue
        cell = cell_named(settings, name)
        s = cell_settings(settings, cell)
        now = select_params(s, TRAIN_PARAMS, CELL_PARAMS_EXCLUDE)
        then = {k: v for k, v in rec["params"].items() if k in now}
        pairs = sha256_files([valid_file(settings, root, cell)])
        if now != then or set(now) - set(then):
            diff = sorted(k for k in now if then.get(k, "<missing>") != now[k])
            print(f"{name}: training params differ ({diff}), left alone: it will train again")
            continue
        if rec["key_parts"].get("pairs") != pairs:
            print(f"{name}: its pairs differ from its draw's valid.jsonl now, left alone: it will train again")
            continue
        rec["train_key"] = train_key(s, cell, pairs)
        rec.setdefault("train_key_backfilled", "results/study-draws-robust/backfill_train_key.py")
        write_json(f, rec)
        print(f"{name}: train_key {rec['train_key'][:12]} written")


if __name__ == "__main__":
    main()
