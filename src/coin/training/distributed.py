"""Data-parallel training under ``torchrun`` / ``accelerate launch`` (DDP), and the single-process case.

The launcher sets ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR`` and ``MASTER_PORT``;
:func:`init_world` joins the process group from them (``nccl`` on CUDA, ``gloo`` on CPU), or returns
the one-process :data:`SINGLE` world when ``WORLD_SIZE`` is unset or 1. Nothing here hard-codes a
device: the model already sits where :func:`coin.modeling.backbone.pick_device` put it
(``cuda:LOCAL_RANK`` under torchrun, else CPU).

Loss scaling under DDP. DDP *averages* gradients over the W ranks. Every rank therefore backpropagates
``W x`` its share of the global objective, so that the average is the gradient of the global
objective itself, exactly as one process holding the whole global batch would compute it:

- generation: rank r's share is ``sum over its response tokens of CE / (response tokens on all
  ranks)``; the denominators are all-reduced before the forward pass;
- contrastive: each rank gathers the pooled vectors of all ranks (:func:`gather_with_local_grad`: the
  rank's own slice keeps its autograd graph, the other slices are constants) and computes the full
  global InfoNCE. Its gradient reaches rank r only through rank r's own rows, so the DDP average of
  ``W x`` that loss is the full gradient. Negatives therefore grow with the world size: the contrastive
  batch is ``batch_size x W`` pairs.
"""

from __future__ import annotations

import contextlib
import datetime
import os
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class World:
    """Where this process stands in the data-parallel group."""

    rank: int = 0
    size: int = 1
    created: bool = False  # True when init_world created the process group (and finish() destroys it)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.size > 1

    def all_reduce_sum(self, values: torch.Tensor) -> torch.Tensor:
        """Element-wise sum over ranks (a new tensor; no autograd); identity in one process."""
        if not self.distributed:
            return values
        out = values.detach().clone()
        dist.all_reduce(out, op=dist.ReduceOp.SUM)
        return out

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier()

    def finish(self) -> None:
        """Leave the process group if :func:`init_world` created it."""
        if self.created and dist.is_initialized():
            dist.destroy_process_group()


SINGLE = World()


def env_world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def init_world(device: torch.device) -> World:
    """The data-parallel world from the launcher's environment; joins the process group if needed.

    Reuses a process group that the caller (e.g. ``accelerate``) already initialised.
    """
    if dist.is_available() and dist.is_initialized():
        return World(dist.get_rank(), dist.get_world_size(), created=False)
    size = env_world_size()
    if size <= 1:
        return SINGLE
    if not dist.is_available():
        raise RuntimeError(f"WORLD_SIZE={size} but this torch build has no torch.distributed; launch one process")
    missing = [k for k in ("RANK", "MASTER_ADDR", "MASTER_PORT") if k not in os.environ]
    if missing:
        raise RuntimeError(
            f"WORLD_SIZE={size} but {', '.join(missing)} not set; start with `torchrun --nproc_per_node N` "
            f"or `accelerate launch`, which set them"
        )
    backend = "nccl" if device.type == "cuda" else "gloo"
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group(backend=backend, timeout=datetime.timedelta(minutes=30))
    return World(dist.get_rank(), dist.get_world_size(), created=True)


def gather_with_local_grad(x: torch.Tensor, world: World) -> torch.Tensor:
    """``(n, ...) -> (W*n, ...)``: every rank's ``x`` stacked in rank order; only the own slice has grad.

    This is the standard trick for a global contrastive loss under DDP (see the module docstring for
    why ``W x`` the global loss then gives the exact gradient after DDP's average).
    """
    if not world.distributed:
        return x
    parts = [torch.empty_like(x) for _ in range(world.size)]
    dist.all_gather(parts, x.detach().contiguous())
    parts[world.rank] = x
    return torch.cat(parts, dim=0)


@contextlib.contextmanager
def maybe_no_sync(module: torch.nn.Module, skip_sync: bool) -> Iterator[None]:
    """DDP's ``no_sync()`` for all but the last micro-batch of an optimiser step; a no-op otherwise."""
    if skip_sync and isinstance(module, torch.nn.parallel.DistributedDataParallel):
        with module.no_sync():
            yield
    else:
        yield


def is_main_process() -> bool:
    """True in a single process and on rank 0 under ``torchrun`` / ``accelerate launch`` (read from ``RANK``,
    so it works before the process group exists): the process that should log to MLflow and write files."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank() == 0
    return int(os.environ.get("RANK", "0")) == 0
