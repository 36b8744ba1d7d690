"""Do two checkouts train coin, cit and sft to the same adapters? (RESULTS.md §6: the §4 study's cells reused.)

    git worktree add /tmp/old <commit>
    for w in /tmp/old .; do (cd $w && PYTHONPATH=$w/src OMP_NUM_THREADS=1 \\
        ./run.sh python experiments/same_adapters.py $w); done      # compare the printed digests

4 steps of each method on MiniLM with the tests' pair rows (batch 4, bf16 autocast where native, LoRA dropout on),
seed 0; prints the adapter file's sha256 prefix and the step losses. Equal digests = bit-identical training.
"""

import hashlib
import sys
import tempfile
from pathlib import Path

import torch

if len(sys.argv) > 1 and sys.argv[1] in ("-h", "--help"):
    print(__doc__)
    raise SystemExit(0)
CHECKOUT = Path(sys.argv[1] if len(sys.argv) > 1 else ".")
if not (CHECKOUT / "tests" / "helpers_training.py").is_file():
    raise SystemExit(f"{CHECKOUT}: not a checkout of this project (no tests/helpers_training.py); pass its root")
sys.path.insert(0, str(CHECKOUT / "tests"))
torch.set_num_threads(1)

from helpers_training import cfg_for, make_rows  # noqa: E402

from coin.modeling.backbone import load_backbone  # noqa: E402
from coin.training.loop import train  # noqa: E402

for method in ("coin", "cit", "sft"):
    bb = load_backbone("minilm", device="cpu", seed=0)
    with tempfile.TemporaryDirectory() as d:
        cfg = cfg_for(method, max_steps=4, batch_size=4, lr=1e-3, checkpoint_every=0, autocast="auto",
                      lora={"r": 4, "alpha": 8, "dropout": 0.05})
        r = train(bb, make_rows(16, varied_targets=True), cfg, out_dir=Path(d), seed=0, cutoff_len=64, progress=False)
        digest = hashlib.sha256((Path(r.adapter_dir) / "adapter_model.safetensors").read_bytes()).hexdigest()[:16]
        print(method, digest, [round(x["loss"], 6) for x in r.history])
