"""Pair rows -> one fused, right-padded token batch per micro-step.

Layout (B = pairs in the micro-batch, G = groups of the method, N = G*B sequences, T = longest)::

    method coin : rows [0, B) originals | [B, 2B) paraphrases | [2B, 3B) hard negatives   (G=3)
                  (coin without hard negatives drops the third block: G=2)
    method cit  : rows [0, B) originals | [B, 2B) paraphrases                             (G=2)
    method sft  : rows [0, B) originals                                                   (G=1)

Row ``g*B + i`` belongs to pair ``i``: pair ``i``'s original, paraphrase and negative are rows
``i``, ``B+i`` and ``2B+i``, so the contrastive loss can slice the pooled block by ``B``.

Labels are the input ids with ``-100`` on the prompt (BOS + prompt + response marker) and on the
padding; the negatives carry no generation loss, so their labels are ``-100`` everywhere::

    encode(tok, "Is it good?", "yes") with the MiniLM tokenizer, padded to T = 14 (n_prompt = 10):

    tokens         = [CLS] is   it   good ?    #    #    #    response :    yes  [SEP] [PAD] [PAD]
    input_ids      = 101   2003 2009 2204 1029 1001 1001 1001 3433     1024 2748 102   0     0
    attention_mask = 1     1    1    1    1    1    1    1    1        1    1    1     0     0
    labels         = -100  -100 -100 -100 -100 -100 -100 -100 -100     -100 2748 102   -100  -100
    resp_cols      = positions 9 and 10 (they predict "yes" and [SEP]); last_index = 11; prompt_len = 10

The loss uses the shifted next-token rule: position ``t`` predicts token ``t+1``. ``resp_rows`` /
``resp_cols`` are the positions ``t`` with ``labels[row, t+1] != -100`` and ``resp_targets`` the
tokens they predict; the LM head is applied at these positions only.
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace
from typing import Any

import torch

from coin.config import TrainSettings
from coin.data.prompts import PromptFormat, encode

# (prompt column, target column) of each group in a pair row.
GROUP_COLUMNS: dict[str, tuple[str, str]] = {
    "original": ("original_prompt", "target"),
    "paraphrase": ("paraphrase_prompt", "target"),
    "negative": ("negative_prompt", "negative_target"),
}
GEN_GROUPS: frozenset[str] = frozenset({"original", "paraphrase"})  # groups that carry L_gen


def method_groups(method: str, hard_negatives: bool = True) -> tuple[str, ...]:
    """The sequence blocks of a batch, in order, for a training method."""
    if method == "coin":
        return ("original", "paraphrase", "negative") if hard_negatives else ("original", "paraphrase")
    if method == "cit":
        return ("original", "paraphrase")
    if method == "sft":
        return ("original",)
    raise ValueError(f"train.method = {method!r}: use one of coin, cit, sft")


@dataclass
class Batch:
    input_ids: torch.Tensor       # (N, T) long, right-padded with the pad id
    attention_mask: torch.Tensor  # (N, T) long, 1 = real token
    labels: torch.Tensor          # (N, T) long, -100 on prompt, pads and every negative row
    last_index: torch.Tensor      # (N,) long, position of the last real token (= length - 1)
    prompt_len: torch.Tensor      # (N,) long, number of prompt tokens; the last prompt token is prompt_len - 1
    resp_rows: torch.Tensor       # (K,) long, row of each position that predicts a response token
    resp_cols: torch.Tensor       # (K,) long, position t (predicting token t+1)
    resp_targets: torch.Tensor    # (K,) long, the token at t+1
    n_pairs: int                  # B
    groups: tuple[str, ...]       # block names in row order, len G
    pair_ids: list[str]           # (B,) for error messages

    def to(self, device: torch.device | str) -> "Batch":
        moved = {
            f.name: getattr(self, f.name).to(device, non_blocking=True)
            for f in fields(self)
            if isinstance(getattr(self, f.name), torch.Tensor)
        }
        return replace(self, **moved)

    def block(self, group: str) -> slice:
        """Rows of one group: ``slice(g*B, (g+1)*B)``."""
        g = self.groups.index(group)
        return slice(g * self.n_pairs, (g + 1) * self.n_pairs)

    @property
    def n_tokens(self) -> int:
        """Real (non-pad) tokens fed to the model."""
        return int(self.attention_mask.sum())


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
    ) -> None:
        self.tokenizer = tokenizer
        self.groups = method_groups(method, hard_negatives)
        self.cutoff_len = cutoff_len
        self.append_eos = append_eos
        self.fmt = fmt
        pad = tokenizer.pad_token_id
        if pad is None:
            raise ValueError(f"{type(tokenizer).__name__} has no pad token; load it through load_backbone")
        self.pad_id = int(pad)

    @classmethod
    def from_settings(cls, tokenizer: Any, cfg: TrainSettings, cutoff_len: int) -> "PairCollator":
        return cls(
            tokenizer, cfg.method, cutoff_len=cutoff_len, hard_negatives=cfg.hard_negatives, append_eos=cfg.append_eos
        )

    def _encode_row(self, row: dict[str, Any], group: str) -> tuple[list[int], int]:
        p_col, t_col = GROUP_COLUMNS[group]
        enc = encode(
            self.tokenizer, row[p_col], row[t_col], fmt=self.fmt, append_eos=self.append_eos, max_length=self.cutoff_len
        )
        return enc.input_ids, enc.n_prompt

    def __call__(self, rows: list[dict[str, Any]]) -> Batch:
        if not rows:
            raise ValueError("PairCollator: empty list of pair rows")
        encoded = [(g, *self._encode_row(r, g)) for g in self.groups for r in rows]  # N = G*B, row-major by group
        n, t_max = len(encoded), max(len(ids) for _, ids, _ in encoded)
        input_ids = torch.full((n, t_max), self.pad_id, dtype=torch.long)     # (N, T)
        attention_mask = torch.zeros((n, t_max), dtype=torch.long)            # (N, T)
        labels = torch.full((n, t_max), -100, dtype=torch.long)               # (N, T)
        lengths = torch.empty(n, dtype=torch.long)                            # (N,)
        prompt_len = torch.empty(n, dtype=torch.long)                         # (N,)
        for i, (group, ids, n_prompt) in enumerate(encoded):
            ids_t = torch.tensor(ids, dtype=torch.long)
            input_ids[i, : len(ids)] = ids_t
            attention_mask[i, : len(ids)] = 1
            if group in GEN_GROUPS:
                labels[i, n_prompt : len(ids)] = ids_t[n_prompt:]
            lengths[i], prompt_len[i] = len(ids), n_prompt
        resp_rows, resp_cols = (labels[:, 1:] != -100).nonzero(as_tuple=True)  # (K,), (K,): t predicts t+1
        return Batch(
            input_ids=input_ids,
            attention_mask=attention_mask,
            labels=labels,
            last_index=lengths - 1,
            prompt_len=prompt_len,
            resp_rows=resp_rows,
            resp_cols=resp_cols,
            resp_targets=labels[resp_rows, resp_cols + 1],
            n_pairs=len(rows),
            groups=self.groups,
            pair_ids=[str(r.get("pair_id", f"#{i}")) for i, r in enumerate(rows)],
        )
