"""Pair rows -> one fused token batch per micro-step (one right-padded row per sequence, or packed).

Sequence layout (B = pairs in the micro-batch, G = groups of the method, N = G*B sequences, T = longest);
without packing, sequence n is row n::

    method coin : rows [0, B) originals | [B, 2B) paraphrases | [2B, 3B) hard negatives   (G=3)
                  (coin without hard negatives drops the third block: G=2)
    method cit  : rows [0, B) originals | [B, 2B) paraphrases                             (G=2)
    method sft  : rows [0, B) originals                                                   (G=1)

Sequence ``g*B + i`` belongs to pair ``i``: pair ``i``'s original, paraphrase and negative are
sequences ``i``, ``B+i`` and ``2B+i``, so the contrastive loss can slice the pooled block by ``B``.

Labels are the input ids with ``-100`` on the prompt (BOS + prompt + response marker) and on the
padding. The negatives' labels are ``-100`` everywhere unless the method reads their response logits
(:attr:`coin.methods.Method.logit_groups`: coin_neg's generation term, or an output-consistency term); then they
are labelled like the others, and :func:`coin.training.loss.generation_sums` puts them in the CE only for a
method whose generation groups include them (coin_neg)::

    encode(tok, "Is it good?", "yes") with the MiniLM tokenizer, padded to T = 14 (n_prompt = 10):

    tokens         = [CLS] is   it   good ?    #    #    #    response :    yes  [SEP] [PAD] [PAD]
    input_ids      = 101   2003 2009 2204 1029 1001 1001 1001 3433     1024 2748 102   0     0
    attention_mask = 1     1    1    1    1    1    1    1    1        1    1    1     0     0
    labels         = -100  -100 -100 -100 -100 -100 -100 -100 -100     -100 2748 102   -100  -100
    resp_cols      = positions 9 and 10 (they predict "yes" and [SEP]); last_index = 11; prompt_len = 10

The loss uses the shifted next-token rule: position ``t`` predicts token ``t+1``. ``resp_rows`` /
``resp_cols`` are the positions ``t`` with ``labels[row, t+1] != -100`` and ``resp_targets`` the
tokens they predict; the LM head is applied at these positions only. ``resp_seq`` is the *sequence*
(0..N-1, group-major as above) each of those positions belongs to.

``prompt_mask`` marks every prompt token; under a prefix-LM backbone (``model.attention: prefix``) the
loss builds the mask in which prompt tokens see each other both ways from it
(:func:`coin.modeling.backbone.packed_attention_mask`).

Packing (``pack=True``, ``train.packing``). The N sequences are laid out first-fit-decreasing into R <= N
rows of length L = the longest sequence, instead of one padded row each, so far fewer pad slots go
through the model. Each row carries ``segment_ids`` (which sequence a token belongs to, -1 on pads) and
``position_ids`` restarting at 0 for every sequence; the model gets a block-diagonal causal mask
(:func:`coin.modeling.backbone.packed_attention_mask`), so each token sees exactly the tokens it would
see alone and the outputs equal the padded layout's. ``seq_row`` / ``seq_start`` / ``seq_len`` say where
sequence n sits; :meth:`Batch.sequence_view` gathers the per-sequence (N, T, H) view for pooling. A
response position never crosses into the next sequence: every sequence starts with prompt tokens,
whose labels are -100.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, fields, replace
from typing import TYPE_CHECKING, Any

import torch

from coin.data.io import DataError
from coin.data.prompts import PromptFormat, encode
from coin.methods import GEN_GROUPS, get_method

log = logging.getLogger(__name__)

if TYPE_CHECKING:  # settings are duck-typed here: the step imports without pydantic (bench/gpu_check.py)
    from coin.config import TrainSettings

__all__ = ["GEN_GROUPS", "GROUP_COLUMNS", "Batch", "PairCollator", "columns_read", "method_groups", "pack_sequences"]

# (prompt column, target column) of each group in a pair row.
GROUP_COLUMNS: dict[str, tuple[str, str]] = {
    "original": ("original_prompt", "target"),
    "paraphrase": ("paraphrase_prompt", "target"),
    "negative": ("negative_prompt", "negative_target"),
}


def method_groups(method: str, hard_negatives: bool = True) -> tuple[str, ...]:
    """The sequence blocks of a batch, in order, for a training method (declared in :mod:`coin.methods`)."""
    return get_method(method).groups(hard_negatives)


def columns_read(methods: list[str], hard_negatives: bool = True) -> dict[str, str]:
    """``{column: the first of methods that trains on it}``: the prompt and target columns of every group the
    methods' batches hold (the training rows are checked for them before a run opens)."""
    out: dict[str, str] = {}
    for m in methods:
        for group in method_groups(m, hard_negatives):
            for column in GROUP_COLUMNS[group]:
                out.setdefault(column, m)
    return out


@dataclass
class Batch:
    input_ids: torch.Tensor       # (R, L) long, right-padded with the pad id; R = N rows unless packed
    attention_mask: torch.Tensor  # (R, L) long, 1 = real token
    labels: torch.Tensor          # (R, L) long, -100 on prompt, pads and groups outside Method.logit_groups
    last_index: torch.Tensor      # (N,) long, in-sequence position of the last real token (= length - 1)
    prompt_len: torch.Tensor      # (N,) long, number of prompt tokens; the last prompt token is prompt_len - 1
    resp_rows: torch.Tensor       # (K,) long, row of each position that predicts a response token
    resp_cols: torch.Tensor       # (K,) long, position t (predicting token t+1)
    resp_targets: torch.Tensor    # (K,) long, the token at t+1
    n_pairs: int                  # B
    groups: tuple[str, ...]       # block names in sequence order, len G
    pair_ids: list[str]           # (B,) for error messages
    resp_seq: torch.Tensor | None = None      # (K,) long, sequence of each response position (None: = resp_rows)
    seq_row: torch.Tensor | None = None       # (N,) long, packed row of each sequence (None: not packed)
    seq_start: torch.Tensor | None = None     # (N,) long, its first position in that row
    seq_len: torch.Tensor | None = None       # (N,) long, its number of tokens
    segment_ids: torch.Tensor | None = None   # (R, L) long, sequence of each token, -1 on pads (packed only)
    position_ids: torch.Tensor | None = None  # (R, L) long, restarting at 0 per sequence (packed only)
    prompt_mask: torch.Tensor | None = None   # (R, L) bool, the token is in its sequence's prompt (prefix LM)

    def to(self, device: torch.device | str) -> "Batch":
        moved = {
            f.name: getattr(self, f.name).to(device, non_blocking=True)
            for f in fields(self)
            if isinstance(getattr(self, f.name), torch.Tensor)
        }
        return replace(self, **moved)

    def block(self, group: str) -> slice:
        """Sequences of one group: ``slice(g*B, (g+1)*B)``."""
        g = self.groups.index(group)
        return slice(g * self.n_pairs, (g + 1) * self.n_pairs)

    @property
    def packed(self) -> bool:
        return self.segment_ids is not None

    @property
    def n_sequences(self) -> int:
        return self.n_pairs * len(self.groups)

    @property
    def sequence_of_response(self) -> torch.Tensor:
        """``(K,)`` sequence index of each response position."""
        return self.resp_rows if self.resp_seq is None else self.resp_seq

    @property
    def n_tokens(self) -> int:
        """Real (non-pad) tokens fed to the model."""
        return int(self.attention_mask.sum())

    def sequence_view(self, hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(R, L, H) -> ((N, T, H), (N, T) mask)``: one right-padded row per sequence, positions in-sequence.

        Unpacked batches already are that view (no copy); packed ones are gathered (T = longest sequence).
        """
        if not self.packed:
            return hidden, self.attention_mask
        assert self.seq_row is not None and self.seq_start is not None and self.seq_len is not None
        t = int(self.seq_len.max())
        pos = torch.arange(t, device=hidden.device)                                    # (T,)
        mask = pos.unsqueeze(0) < self.seq_len.unsqueeze(1)                             # (N, T)
        cols = (self.seq_start.unsqueeze(1) + pos.unsqueeze(0)).clamp(max=hidden.size(1) - 1)  # (N, T)
        return hidden[self.seq_row.unsqueeze(1), cols], mask.long()                    # (N, T, H), (N, T)


def pack_sequences(lengths: list[int]) -> tuple[list[int], list[int], int]:
    """First-fit decreasing into rows of length ``L = max(lengths)``: ``(row of each, start of each, n_rows)``.

    >>> pack_sequences([5, 2, 3, 4, 1])   # L = 5: [5] [4 1] [3 2]
    ([0, 2, 2, 1, 1], [0, 3, 0, 0, 4], 3)
    """
    cap = max(lengths)
    free: list[int] = []                                   # free slots per row
    row_of, start_of = [0] * len(lengths), [0] * len(lengths)
    for i in sorted(range(len(lengths)), key=lambda i: (-lengths[i], i)):
        r = next((r for r, f in enumerate(free) if f >= lengths[i]), len(free))
        if r == len(free):
            free.append(cap)
        row_of[i], start_of[i] = r, cap - free[r]
        free[r] -= lengths[i]
    return row_of, start_of, len(free)


class PairCollator:
    """Callable ``list[pair row] -> Batch`` for one training method."""

    def __init__(
        self,
        tokenizer: Any,
        method: str = "coin",
        *,
        cutoff_len: int = 256,
        hard_negatives: bool = True,
        append_eos: bool = True,
        fmt: PromptFormat = "train",
        pack: bool = False,
    ) -> None:
        self.tokenizer = tokenizer
        self.pack = pack
        self.groups = method_groups(method, hard_negatives)
        # blocks whose responses carry labels: what goes through the LM head (loss.generation_sums keeps the CE
        # of the generation groups only; the output-consistency term also reads the others' logits)
        self.gen_groups = frozenset(get_method(method).logit_groups)
        self.cutoff_len = cutoff_len
        self.append_eos = append_eos
        self.fmt = fmt
        pad = tokenizer.pad_token_id
        if pad is None:
            raise ValueError(f"{type(tokenizer).__name__} has no pad token; load it through load_backbone")
        self.pad_id = int(pad)
        self.cut_sequences = 0  # sequences whose prompt lost tokens from the left to fit cutoff_len (warned once)

    @classmethod
    def from_settings(cls, tokenizer: Any, cfg: TrainSettings, cutoff_len: int) -> "PairCollator":
        return cls(
            tokenizer, cfg.method, cutoff_len=cutoff_len, hard_negatives=cfg.hard_negatives, append_eos=cfg.append_eos,
            pack=cfg.packing,
        )

    def _encode_row(self, row: dict[str, Any], group: str) -> tuple[list[int], int]:
        p_col, t_col = GROUP_COLUMNS[group]
        enc = encode(
            self.tokenizer, row[p_col], row[t_col], fmt=self.fmt, append_eos=self.append_eos, max_length=self.cutoff_len
        )
        if len(enc.input_ids) > self.cutoff_len:  # the response alone does not fit: the prompt cannot give way
            eos = " (with EOS)" if self.append_eos and self.tokenizer.eos_token_id is not None else ""
            raise DataError(
                f"train: {t_col} of pair {row.get('pair_id', '?')} takes {len(enc.input_ids) - enc.n_prompt} tokens"
                f"{eos}, so its sequence is {len(enc.input_ids)} tokens even with the prompt cut to "
                f"{enc.n_prompt}: over pairs.cutoff_len = {self.cutoff_len}. The gate rejects such rows at the cutoff "
                "it checked: validate the pairs at this cutoff (coin validate), or raise pairs.cutoff_len")
        if enc.truncated:
            if not self.cut_sequences:  # the gate rejects such rows; a row set validated at another cutoff is not
                log.warning("train: %s of pair %s is %d tokens over pairs.cutoff_len = %d: its prompt loses them from "
                            "the left (the instruction first). Validate the pairs at this cutoff (coin validate), or "
                            "raise pairs.cutoff_len", p_col, row.get("pair_id", "?"), enc.truncated, self.cutoff_len)
            self.cut_sequences += 1
        return enc.input_ids, enc.n_prompt

    def __call__(self, rows: list[dict[str, Any]]) -> Batch:
        if not rows:
            raise ValueError("PairCollator: empty list of pair rows")
        encoded = [(g, *self._encode_row(r, g)) for g in self.groups for r in rows]  # N = G*B, row-major by group
        n = len(encoded)
        lengths = [len(ids) for _, ids, _ in encoded]
        if self.pack:
            seq_row, seq_start, n_rows = pack_sequences(lengths)
        else:
            seq_row, seq_start, n_rows = list(range(n)), [0] * n, n
        t_max = max(lengths)
        input_ids = torch.full((n_rows, t_max), self.pad_id, dtype=torch.long)     # (R, L)
        attention_mask = torch.zeros((n_rows, t_max), dtype=torch.long)            # (R, L)
        labels = torch.full((n_rows, t_max), -100, dtype=torch.long)               # (R, L)
        segment_ids = torch.full((n_rows, t_max), -1, dtype=torch.long)            # (R, L)
        position_ids = torch.zeros((n_rows, t_max), dtype=torch.long)              # (R, L)
        prompt_len = torch.empty(n, dtype=torch.long)                              # (N,)
        prompt_mask = torch.zeros((n_rows, t_max), dtype=torch.bool)                # (R, L)
        for i, (group, ids, n_prompt) in enumerate(encoded):
            r, a, b = seq_row[i], seq_start[i], seq_start[i] + len(ids)
            ids_t = torch.tensor(ids, dtype=torch.long)
            input_ids[r, a:b] = ids_t
            attention_mask[r, a:b] = 1
            segment_ids[r, a:b] = i
            position_ids[r, a:b] = torch.arange(len(ids))
            prompt_mask[r, a : a + n_prompt] = True
            if group in self.gen_groups:
                labels[r, a + n_prompt : b] = ids_t[n_prompt:]
            prompt_len[i] = n_prompt
        resp_rows, resp_cols = (labels[:, 1:] != -100).nonzero(as_tuple=True)  # (K,), (K,): t predicts t+1
        lengths_t = torch.tensor(lengths, dtype=torch.long)
        packed = {}
        if self.pack:
            packed = {"resp_seq": segment_ids[resp_rows, resp_cols], "seq_row": torch.tensor(seq_row),
                      "seq_start": torch.tensor(seq_start), "seq_len": lengths_t, "segment_ids": segment_ids,
                      "position_ids": position_ids}
        return Batch(
            input_ids=input_ids,
            attention_mask=attention_mask,
            labels=labels,
            last_index=lengths_t - 1,
            prompt_len=prompt_len,
            resp_rows=resp_rows,
            resp_cols=resp_cols,
            resp_targets=labels[resp_rows, resp_cols + 1],
            n_pairs=len(rows),
            groups=self.groups,
            pair_ids=[str(r.get("pair_id", f"#{i}")) for i, r in enumerate(rows)],
            prompt_mask=prompt_mask,
            **packed,
        )
