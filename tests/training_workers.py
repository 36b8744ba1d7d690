"""Subprocess entry points for test_distributed.py and test_resume.py (not a test module).

    torchrun --standalone --nproc_per_node 2 tests/training_workers.py ddp MODEL_DIR OUT_DIR THREADS
    torchrun --standalone --nproc_per_node 2 tests/training_workers.py fsdp MODEL_DIR OUT_DIR THREADS ENCODER_DIR
    torchrun --standalone --nproc_per_node 2 tests/training_workers.py twice MODEL_DIR OUT_DIR THREADS
    python tests/training_workers.py killed MODEL_DIR OUT_DIR THREADS KILL_AT_STEP
"""

from __future__ import annotations

import json
import os
import signal
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
from helpers_training import cfg_for, grads, make_rows, perturb_lora_b  # noqa: E402
from safetensors.torch import save_file  # noqa: E402

CUTOFF = 64
DDP_ROWS = 8          # pair rows of the distributed test
DDP_GLOBAL_BATCH = 4  # pairs per micro-batch over all ranks


# coin_consistency: coin's gathered InfoNCE and the consistency term's all-reduced means and adaptive weight in one run
DDP_METHOD = "coin_consistency"
DDP_CONSISTENCY = {"weighting": "adaptive", "push_weight": 50.0, "push_temperature": 0.1}


def ddp_step_cfg():
    return cfg_for(DDP_METHOD, batch_size=DDP_GLOBAL_BATCH, consistency=DDP_CONSISTENCY)


def ddp_train_cfg(batch_size: int):
    return cfg_for(DDP_METHOD, batch_size=batch_size, grad_accum=2, max_steps=2, lr=1e-2, checkpoint_every=1,
                   consistency=DDP_CONSISTENCY)


def resume_cfg():
    """Everything that could break an exact resume: dropout (RNG), bucketing and accumulation (data
    position), warm-up/decay (scheduler), AdamW moments, a trained head (modules_to_save)."""
    return cfg_for("coin", max_steps=6, grad_accum=2, lr=1e-2, warmup_ratio=0.34, checkpoint_every=2,
                   keep_checkpoints=2, bucket_by_length=True, log_every=1,
                   lora={"r": 4, "alpha": 8, "dropout": 0.1})


def resume_rows():
    return make_rows(10, varied_targets=True)


def _rank_step_setup(model_dir: str, update: dict):
    """Join the 2-process world; this rank's model (the seeded LoRA, B perturbed, eval mode), step settings and
    its half of the global batch, collated."""
    from coin.modeling.backbone import load_backbone
    from coin.modeling.lora import apply_lora
    from coin.training.collator import PairCollator
    from coin.training.distributed import init_world

    world = init_world(torch.device("cpu"))
    assert world.size == 2, world
    per_rank = DDP_GLOBAL_BATCH // world.size
    bb = load_backbone(model_dir, device="cpu")
    cfg = ddp_step_cfg().model_copy(update={"batch_size": per_rank, **update})
    torch.manual_seed(0)
    model = apply_lora(bb, cfg.lora)
    perturb_lora_b(model)
    model.eval()
    rows = make_rows(DDP_GLOBAL_BATCH, varied_targets=True)[world.rank * per_rank : (world.rank + 1) * per_rank]
    return world, per_rank, cfg, model, PairCollator.from_settings(bb.tokenizer, cfg, CUTOFF)(rows)


def run_ddp(model_dir: str, out_dir: Path) -> None:
    """One CoIN step on this rank's shard (loss + gradients), then 2 steps of the real loop."""
    from coin.modeling.backbone import FusedLM, load_backbone
    from coin.training.loop import accumulate_gradients, train

    world, per_rank, cfg, model, batch = _rank_step_setup(model_dir, {})
    cpu = torch.device("cpu")
    fused = torch.nn.parallel.DistributedDataParallel(FusedLM(model))
    metrics = accumulate_gradients(fused, [batch], cfg, world, cpu)
    g = grads(model)

    bb2 = load_backbone(model_dir, device="cpu")
    result = train(bb2, make_rows(DDP_ROWS, varied_targets=True), ddp_train_cfg(per_rank), out_dir=out_dir,
                   seed=0, cutoff_len=CUTOFF, progress=False)
    # step 2's checkpoint unreadable on rank 1 only: both ranks fall back to step 1 together (one alone would hang)
    import shutil

    damaged = out_dir / "damaged"
    if world.is_main:
        shutil.copytree(out_dir / "checkpoints", damaged / "checkpoints")
        (damaged / "checkpoints" / "step-0000002" / "rng-rank1.safetensors").write_bytes(b"not safetensors")
    world.barrier()
    resumed = train(load_backbone(model_dir, device="cpu"), make_rows(DDP_ROWS, varied_targets=True),
                    ddp_train_cfg(per_rank), out_dir=damaged, seed=0, cutoff_len=CUTOFF, progress=False, resume=True)
    if world.is_main:
        save_file({k: v.contiguous() for k, v in g.items()}, str(out_dir / "step_grads.safetensors"))
        (out_dir / "step_metrics.json").write_text(json.dumps(metrics))
        (out_dir / "train_history.json").write_text(json.dumps(result.history))
        (out_dir / "damaged_resume.json").write_text(json.dumps({"resumed_from": resumed.resumed_from,
                                                                 "history": resumed.history}))
    world.finish()  # init_world created the group here; train() reused it and left it alone


def run_fsdp(model_dir: str, out_dir: Path, encoder_dir: str) -> None:
    """The DDP worker's checks under FSDP2 shards (``train.sharding: fsdp``), then a resume: the full run's step-1
    checkpoint copied into a fresh directory and continued to step 2 must give the same adapter. Last, the loop on
    a BERT encoder run as a prefix LM (MiniLM's case: tied embeddings, a head trained in full)."""
    import shutil

    from coin.modeling.backbone import FusedLM, load_backbone
    from coin.training.distributed import full_tensor, shard_model
    from coin.training.loop import accumulate_gradients, train

    world, per_rank, cfg, model, batch = _rank_step_setup(model_dir, {"sharding": "fsdp"})
    cpu = torch.device("cpu")
    fused = FusedLM(model)
    units = shard_model(fused, model, world, cpu)
    sharded = [n for n, p in model.named_parameters() if hasattr(p, "full_tensor")]
    metrics = accumulate_gradients(fused, [batch], cfg, world, cpu)
    g = {n: full_tensor(p.grad).detach().clone() for n, p in model.named_parameters()
         if p.requires_grad and p.grad is not None}  # a collective: every rank gathers

    train_cfg = ddp_train_cfg(per_rank).model_copy(update={"sharding": "fsdp"})
    result = train(load_backbone(model_dir, device="cpu"), make_rows(DDP_ROWS, varied_targets=True), train_cfg,
                   out_dir=out_dir / "run", seed=0, cutoff_len=CUTOFF, progress=False)
    if world.is_main:
        shutil.copytree(out_dir / "run" / "checkpoints" / "step-0000001",
                        out_dir / "resumed" / "checkpoints" / "step-0000001")
    world.barrier()
    resumed = train(load_backbone(model_dir, device="cpu"), make_rows(DDP_ROWS, varied_targets=True), train_cfg,
                    out_dir=out_dir / "resumed", seed=0, cutoff_len=CUTOFF, progress=False, resume=True)
    train(load_backbone(encoder_dir, device="cpu"), make_rows(DDP_ROWS, varied_targets=True), train_cfg,
          out_dir=out_dir / "encoder", seed=0, cutoff_len=CUTOFF, progress=False)
    if world.is_main:
        save_file({k: v.contiguous() for k, v in g.items()}, str(out_dir / "step_grads.safetensors"))
        (out_dir / "step_metrics.json").write_text(json.dumps(metrics))
        (out_dir / "train_history.json").write_text(json.dumps(result.history))
        (out_dir / "resumed_history.json").write_text(json.dumps(resumed.history))
        (out_dir / "wrapping.json").write_text(json.dumps({
            "layer_units": units, "sharded_params": len(sharded),
            "all_params": sum(1 for _ in model.parameters()), "resumed_from": resumed.resumed_from}))
    world.finish()


def run_twice(model_dir: str, out_dir: Path) -> None:
    """Two train() calls in one process, as `coin train` with two train.methods under torchrun: the first creates
    the process group, the second must reuse it (re-creating it on the launcher's store raced)."""
    import torch.distributed as dist

    from coin.modeling.backbone import load_backbone
    from coin.training.loop import train

    losses = []
    for method in ("coin", "cit"):
        cfg = cfg_for(method, batch_size=2, max_steps=2, lr=1e-2, checkpoint_every=0)
        res = train(load_backbone(model_dir, device="cpu", seed=0), make_rows(DDP_ROWS, varied_targets=True), cfg,
                    out_dir=out_dir / method, seed=0, cutoff_len=CUTOFF, progress=False)
        assert dist.is_initialized(), "train() left the process group: the next method would create it again"
        losses.append(res.history[-1])
    if dist.get_rank() == 0:
        (out_dir / "twice.json").write_text(json.dumps(losses))


def run_killed(model_dir: str, out_dir: Path, kill_at: int) -> None:
    """Train with the resume settings and SIGKILL this very process right after step ``kill_at``."""
    from coin.modeling.backbone import load_backbone
    from coin.training.loop import train

    def on_metrics(step: int, _: dict[str, float]) -> None:
        if step == kill_at:
            os.kill(os.getpid(), signal.SIGKILL)

    bb = load_backbone(model_dir, device="cpu", seed=0)
    train(bb, resume_rows(), resume_cfg(), out_dir=out_dir, seed=0, cutoff_len=CUTOFF, on_metrics=on_metrics,
          progress=False)
    raise SystemExit("not killed")


if __name__ == "__main__":
    mode, model_dir, out = sys.argv[1], sys.argv[2], Path(sys.argv[3])
    torch.set_num_threads(int(sys.argv[4]))
    if mode == "ddp":
        run_ddp(model_dir, out)
    elif mode == "fsdp":
        run_fsdp(model_dir, out, sys.argv[5])
    elif mode == "twice":
        run_twice(model_dir, out)
    elif mode == "killed":
        run_killed(model_dir, out, int(sys.argv[5]))
    else:
        raise SystemExit(f"unknown mode {mode!r}")
