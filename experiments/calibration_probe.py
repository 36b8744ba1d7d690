"""The calibration probe of RESULTS.md: re-decide a finished clean evaluation three ways (raw argmax, minus the
content-free scores, plus the training label prior) from its saved per-item scores and one extra forward pass per
instruction. OUT is an out_dir of `coin train` + `coin evaluate` (evaluate.calibration: none); of its predictions the
clean loglik rows of model METHOD are re-decided:

    ./run.sh python experiments/calibration_probe.py OUT coin
"""
import collections
import json
import math
import sys

import torch

from coin.data.tasks import get_task
from coin.evaluation.instructions import load_instruction_sets
from coin.evaluation.scoring import score_label_words
from coin.modeling.adapter import load_trained
from coin.modeling.backbone import autocast_context
from coin.predict import join_instruction


def probe_rows(preds: list[dict], method: str, where: str = "predictions") -> list[dict]:
    """The clean loglik rows of model ``method``: the ones whose saved label scores the probe re-decides (an
    evaluation may hold other models, and generate rows, which have no label scores)."""
    models = sorted({p["model"] for p in preds})
    if method not in models:
        raise SystemExit(f"{where}: no predictions of model {method!r}; it holds {models}")
    rows = [p for p in preds if p["model"] == method and p.get("set") == "clean"
            and p.get("scoring", "loglik") == "loglik"]
    if not rows:
        raise SystemExit(f"{where}: model {method!r} has no clean loglik rows; evaluate it with evaluate.scoring "
                         "including loglik and the clean set")
    return rows


def main(argv: list[str]) -> int:
    if len(argv) != 2 or argv[0] in ("-h", "--help"):
        raise SystemExit("usage: python experiments/calibration_probe.py OUT_DIR METHOD  (OUT_DIR: a run's outputs/ "
                         "with train/<METHOD>/adapter, evaluate/predictions.jsonl and validated/valid.jsonl)")
    torch.set_num_threads(2)
    out = argv[0].rstrip("/")
    method = argv[1]
    where = f"{out}/evaluate/predictions.jsonl"
    preds = probe_rows([json.loads(line) for line in open(where) if line.strip()], method, where)
    model, tok, meta = load_trained(f"{out}/train/{method}/adapter")
    tasks = sorted({p["task"] for p in preds})
    instr = load_instruction_sets("data/promptbench/coin_perturbed_instructions.json", ["clean"], tasks)
    # training prior per task
    valid = [json.loads(line) for line in open(f"{out}/validated/valid.jsonl")]
    prior = {}
    for t in tasks:
        c = collections.Counter(r["label"] for r in valid if r["task"] == t and r["split"] == "train")
        n = sum(c.values())
        k = get_task(t).num_labels
        prior[t] = [math.log((c[i] + 1) / (n + k)) for i in range(k)]
    cf = {}
    with autocast_context(torch.device("cpu"), "auto"):
        for t in tasks:
            words = list(get_task(t).label_words)
            for variant in ["N/A", ""]:
                prompts = [join_instruction(ins, variant) for ins in instr["clean"][t]]
                s = score_label_words(model, tok, prompts, words).scores
                cf[(t, variant)] = s
    for variant in ["N/A", ""]:
        res = collections.defaultdict(lambda: [0, 0, 0, 0])
        for p in preds:
            t = p["task"]
            s = torch.tensor(p["scores"])
            c = cf[(t, variant)][p["instruction_id"]]
            pr = torch.tensor(prior[t])
            r = res[t]
            r[0] += int(int(s.argmax()) == p["label"])
            r[1] += int(int((s - c).argmax()) == p["label"])
            r[2] += int(int((s - c + pr).argmax()) == p["label"])
            r[3] += 1
        print(f"content-free {variant!r}")
        tot = [0, 0, 0]
        for t, r in res.items():
            print(f"  {t:5s} raw {100*r[0]/r[3]:5.1f}  cc {100*r[1]/r[3]:5.1f}  cc+prior {100*r[2]/r[3]:5.1f}")
            for i in range(3):
                tot[i] += 100 * r[i] / r[3] / len(res)
        print(f"  avg   raw {tot[0]:5.1f}  cc {tot[1]:5.1f}  cc+prior {tot[2]:5.1f}")
    return 0


if __name__ == "__main__":
    from coin.cli import run_script  # a user error in two lines, a bug with its traceback

    raise SystemExit(run_script(main, sys.argv[1:]))
