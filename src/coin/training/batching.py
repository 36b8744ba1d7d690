"""Which pair rows go into which batch: seeded, resumable, optionally length-bucketed.

A :class:`BatchStream` yields *global* batches of ``batch_size x world_size`` pair rows forever: epoch
``e`` is a permutation drawn from ``random.Random(f"train-batches:{seed}:{e}")``, cut into batches,
the incomplete tail dropped (so no pair appears twice in one batch, which would make it its own
in-batch negative). Its whole state is ``(epoch, next batch index)``, so a resumed run continues with
exactly the batches an uninterrupted run would have seen. Under DDP rank ``r`` takes rows
``[r*batch_size, (r+1)*batch_size)`` of each global batch.

Length bucketing (``train.bucket_by_length``): each epoch's permutation is cut into windows of
``BUCKET_WINDOW`` batches; inside a window rows are sorted by length and cut into batches, and the
batches of the whole epoch are then shuffled. A batch thus holds pairs of similar length (less
padding, see ``bench/bench_train.py``) drawn from a random window, and every pair is still seen once
per epoch. The length of a row is the character count of its longest sequence (prompt + target of the
original, paraphrase or negative): cheap, no tokenizer, and monotone enough in the token count.
Side effect to know: in-batch negatives are then pairs of similar length.

One example per batch: ``pairs.strategy: all`` writes a row for every (A, B) template pair of an example, so
a batch could hold two rows of one example, and InfoNCE would push apart two prompts with the same input and
answer, which the method counts as positives. When the rows repeat an ``example_id``, each epoch's batches are
repaired by seeded swaps between batches (:func:`spread_examples`) until no batch holds one example twice, where
another batch can take the row. Rows with one row per example (``strategy: random``, the default) have nothing
to repair, and their batches are exactly as before.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Iterator
from typing import Any

from coin.training.collator import GROUP_COLUMNS

BUCKET_WINDOW = 32  # batches per sorting window
log = logging.getLogger(__name__)


def train_rows_of(rows: list[dict[str, Any]], batch_size: int, processes: int = 1) -> list[dict[str, Any]]:
    """The ``split == 'train'`` rows; at least one full contrastive batch of distinct pairs over all processes
    (``batch_size`` per process)."""
    train_rows = [r for r in rows if r.get("split") == "train"]
    need = batch_size * processes
    if len(train_rows) < need:
        what = (f"train.batch_size {batch_size} x {processes} processes = {need}" if processes > 1
                else f"train.batch_size = {batch_size}")
        raise ValueError(
            f"training needs at least {what} pair rows with split 'train', got {len(train_rows)} (of {len(rows)} "
            f"rows); add data or lower train.batch_size" + (" (or launch fewer processes)" if processes > 1 else "")
        )
    return train_rows


def row_length(row: dict[str, Any]) -> int:
    """Characters of the row's longest sequence (prompt + target), over the groups it has."""
    return max(
        len(str(row.get(p, ""))) + len(str(row.get(t, ""))) for p, t in GROUP_COLUMNS.values() if p in row
    )


class BatchStream:
    """Endless, seeded, resumable batches of pair rows (module docstring)."""

    def __init__(
        self, rows: list[dict[str, Any]], batch_size: int, seed: int, *, bucket_by_length: bool = False
    ) -> None:
        if len(rows) < batch_size:
            raise ValueError(f"BatchStream: {len(rows)} rows cannot fill one batch of {batch_size}")
        self.rows, self.batch_size, self.seed, self.bucket = rows, batch_size, seed, bucket_by_length
        self._lengths = [row_length(r) for r in rows] if bucket_by_length else None
        keys = [r.get("example_id", i) for i, r in enumerate(rows)]
        self._examples = keys if len(set(keys)) < len(keys) else None  # None: one row per example
        self.epoch, self.next_batch = 0, 0
        self._cache: tuple[int, list[list[int]]] | None = None
        self._warned = False

    def _epoch_batches(self, epoch: int) -> list[list[int]]:
        """Row indices of every batch of ``epoch`` (deterministic in ``(seed, epoch)``)."""
        if self._cache is not None and self._cache[0] == epoch:
            return self._cache[1]
        rng = random.Random(f"train-batches:{self.seed}:{epoch}")
        order = list(range(len(self.rows)))
        rng.shuffle(order)
        bs = self.batch_size
        usable = len(order) - len(order) % bs
        if self._lengths is None:
            batches = [order[i : i + bs] for i in range(0, usable, bs)]
        else:
            lengths, window = self._lengths, bs * BUCKET_WINDOW
            batches = []
            for w in range(0, usable, window):
                chunk = sorted(order[w : min(w + window, usable)], key=lambda i: lengths[i])
                batches += [chunk[i : i + bs] for i in range(0, len(chunk), bs)]
            rng.shuffle(batches)
        if self._examples is not None:
            left = spread_examples(batches, self._examples, rng)
            if left and not self._warned:  # once per run: every epoch is alike
                self._warned = True
                log.warning("%d of %d rows of epoch %d share a batch with a row of their own example (%d examples, "
                            "batches of %d): InfoNCE pushes those apart although they are positives. Lower "
                            "train.batch_size, add rows, or use pairs.strategy: random (one row per example)",
                            left, usable, epoch, len(set(self._examples)), bs)
        self._cache = (epoch, batches)
        return batches

    def __iter__(self) -> Iterator[list[dict[str, Any]]]:
        return self

    def __next__(self) -> list[dict[str, Any]]:
        batches = self._epoch_batches(self.epoch)
        if self.next_batch >= len(batches):
            self.epoch, self.next_batch = self.epoch + 1, 0
            batches = self._epoch_batches(self.epoch)
        idx = batches[self.next_batch]
        self.next_batch += 1
        return [self.rows[i] for i in idx]

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "next_batch": self.next_batch}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.epoch, self.next_batch = int(state["epoch"]), int(state["next_batch"])


def spread_examples(batches: list[list[int]], keys: list[Any], rng: random.Random, tries: int = 64) -> int:
    """Swap rows between ``batches`` (in place, seeded by ``rng``) so that no batch holds two rows with the same
    ``keys[row]``; a swap never puts a key twice into either batch. Returns the rows left in a batch with their
    key twice (0 unless some key has more rows than there are batches, or ``tries`` random partners failed)."""
    left = 0
    for bi, batch in enumerate(batches):
        held: set[Any] = set()
        for pos, row in enumerate(batch):
            if keys[row] not in held:
                held.add(keys[row])
                continue
            for _ in range(tries):
                bj = rng.randrange(len(batches))
                if bj == bi:
                    continue
                pj = rng.randrange(len(batches[bj]))
                other = batches[bj][pj]
                if keys[other] in held or any(keys[x] == keys[row] for x in batches[bj] if x != other):
                    continue
                batch[pos], batches[bj][pj] = other, row
                held.add(keys[other])
                break
            else:
                left += 1
    return left


def iterate_batches(
    rows: list[dict[str, Any]], batch_size: int, seed: int, *, bucket_by_length: bool = False
) -> Iterator[list[dict[str, Any]]]:
    """Endless seeded batches (a :class:`BatchStream`)."""
    return BatchStream(rows, batch_size, seed, bucket_by_length=bucket_by_length)
