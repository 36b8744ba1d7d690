"""Data parallelism: two CPU processes (torchrun, gloo) on a global batch equal one process on it.

The worker (tests/training_workers.py) runs under ``torchrun --standalone --nproc_per_node 2``: each
rank holds half of the pairs. Gathering the pooled vectors across ranks must give the contrastive
loss of the *whole* global batch (negatives grow with the world size), and the DDP-averaged gradient
must be the gradient of the one-process loss. The same holds for the full loop (accumulation,
clipping, AdamW, checkpoints): the adapters after 2 steps agree.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers_training import adapter_tensors, assert_grads_close, grads, make_rows, perturb_lora_b
from safetensors.torch import load_file
from training_workers import CUTOFF, DDP_GLOBAL_BATCH, DDP_ROWS, ddp_step_cfg, ddp_train_cfg

from coin.modeling.backbone import FusedLM, load_backbone
from coin.modeling.lora import apply_lora
from coin.training.collator import PairCollator
from coin.training.distributed import SINGLE, World, gather_with_local_grad, init_world, is_main_process
from coin.training.loop import accumulate_gradients, train

WORKER = Path(__file__).resolve().parent / "training_workers.py"


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_single_process_world_needs_no_process_group(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    world = init_world(torch.device("cpu"))
    assert world == SINGLE and world.is_main and not world.distributed
    x = torch.ones(2, 3, requires_grad=True)
    assert gather_with_local_grad(x, world) is x
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.delenv("MASTER_ADDR", raising=False)
    with pytest.raises(RuntimeError, match="torchrun"):
        init_world(torch.device("cpu"))
    assert World(rank=1, size=2).is_main is False
    monkeypatch.delenv("RANK", raising=False)
    assert is_main_process()
    monkeypatch.setenv("RANK", "1")
    assert not is_main_process()


def test_two_gloo_processes_equal_one_process(tiny_llama_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "ddp"
    out.mkdir()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join(filter(None, [
        str(WORKER.parent), os.environ.get("PYTHONPATH", "")]))}
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
         str(WORKER), "ddp", str(tiny_llama_dir), str(out), "1"],
        env=env, capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]

    # one process, the whole global batch of 4 pairs, the same initial adapter
    cpu = torch.device("cpu")
    bb = load_backbone(str(tiny_llama_dir), device="cpu")
    cfg = ddp_step_cfg()
    torch.manual_seed(0)
    model = apply_lora(bb, cfg.lora)
    perturb_lora_b(model)
    model.eval()
    collate = PairCollator.from_settings(bb.tokenizer, cfg, CUTOFF)
    rows = make_rows(DDP_GLOBAL_BATCH, varied_targets=True)
    single = accumulate_gradients(FusedLM(model), [collate(rows)], cfg, SINGLE, cpu)
    single_grads = grads(model)

    ddp = json.loads((out / "step_metrics.json").read_text())
    for key in ("loss", "l_gen", "l_cl", "w", "pos_cos", "neg_cos", "n_tokens", "n_resp_tokens",
                "div_pos", "w_oc", "div_neg", "l_push", "w_push"):
        assert ddp[key] == pytest.approx(single[key], rel=1e-5, abs=1e-7), key
    assert_grads_close(load_file(str(out / "step_grads.safetensors")), single_grads)

    # the gathered negatives matter: each rank's half alone has another contrastive loss
    model.zero_grad(set_to_none=True)
    half = accumulate_gradients(FusedLM(model), [collate(rows[: DDP_GLOBAL_BATCH // 2])],
                                cfg.model_copy(update={"batch_size": 2}), SINGLE, cpu)
    assert half["l_cl"] != pytest.approx(single["l_cl"], rel=1e-3)

    # the whole loop: 2 ranks x batch 2 == 1 process x batch 4 (2 steps, accumulation 2, AdamW)
    bb2 = load_backbone(str(tiny_llama_dir), device="cpu")
    result = train(bb2, make_rows(DDP_ROWS, varied_targets=True), ddp_train_cfg(DDP_GLOBAL_BATCH),
                   out_dir=tmp_path / "single", seed=0, cutoff_len=CUTOFF, progress=False)
    ddp_history = json.loads((out / "train_history.json").read_text())
    for ours, theirs in zip(ddp_history, result.history, strict=True):
        for key in ("loss", "l_gen", "l_cl", "div_pos", "l_push", "grad_norm", "lr"):
            assert ours[key] == pytest.approx(theirs[key], rel=1e-4, abs=1e-6), key  # D ~ 1e-4: float32 noise
    a, b = adapter_tensors(out / "adapter"), adapter_tensors(result.adapter_dir)
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=1e-4, atol=1e-6, msg=name)
    ckpt = out / "checkpoints" / "step-0000002"
    assert (ckpt / "rng-rank0.safetensors").is_file() and (ckpt / "rng-rank1.safetensors").is_file()
