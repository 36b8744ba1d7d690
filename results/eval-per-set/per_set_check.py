"""A trained adapter's clean figures scored alone and beside the four perturbed sets, with the evaluation's batching
(batches never span two instruction sets since RESULTS §25): the clean rows must agree to the last digit.

    PYTHONPATH=src:. python results/eval-per-set/per_set_check.py ADAPTER_DIR [OUT_JSON]
"""

import json
import sys
import time

import torch

from coin.config import load_settings
from coin.evaluation.runner import evaluate_model
from coin.modeling.adapter import load_trained


def main() -> None:
    adapter = sys.argv[1]
    torch.set_num_threads(1)
    s = load_settings("params.yaml", [])
    model, tok, meta = load_trained(adapter, device="cpu")
    out = {"adapter": adapter}
    preds = {}
    for name, sets in (("clean alone", ["clean"]), ("beside four sets", list(s.evaluate.instruction_sets))):
        cfg = s.evaluate.model_copy(update={"instruction_sets": sets})
        t0 = time.perf_counter()
        res = evaluate_model(model, tok, cfg, data_dir=s.paths.data_dir, seed=s.seed, model_label="x",
                             label_counts=meta.get("label_counts"))
        p = res.predictions[res.predictions["set"] == "clean"].reset_index(drop=True)
        preds[name] = p
        out[name] = {"sets": sets, "wall_time_s": round(time.perf_counter() - t0, 1),
                     "clean_accuracy": round(100 * float(p.groupby("task")["correct"].mean().mean()), 4)}  # task mean
        print(name, out[name], flush=True)
    a, b = preds["clean alone"], preds["beside four sets"]
    cols = ["task", "instruction_id", "example_id", "scores", "raw_scores", "pred"]
    out["clean rows identical"] = bool(a[cols].equals(b[cols]))
    print(out["clean rows identical"])
    if len(sys.argv) > 2:
        with open(sys.argv[2], "w") as fh:
            json.dump(out, fh, indent=1)


if __name__ == "__main__":
    main()
