"""Log-likelihood scoring of label words (the lm-evaluation-harness way of scoring multiple choice).

For a prompt ``p`` and label word ``w`` the score is ``sum_t log P(w_t | p, w_<t)`` over the tokens of
``w`` as the continuation of the formatted prompt (``coin.data.prompts.encode``, no EOS). Every
(prompt, label) pair is one sequence; sequences are sorted by length, batched with right padding,
and the LM head runs only at the positions that predict a label token (``selected_logits``).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
from torch import nn
from tqdm.auto import tqdm

from coin.data.prompts import PromptFormat, encode
from coin.modeling.backbone import selected_logits

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ScoredSequence:
    input_ids: list[int]
    n_prompt: int  # label tokens are input_ids[n_prompt:]


def build_sequences(
    tokenizer, prompts: list[str], label_words: list[str], *, fmt: PromptFormat, max_length: int | None = None
) -> list[ScoredSequence]:
    """One sequence per (prompt, label word), prompt-major: index ``i * len(label_words) + j``."""
    seqs: list[ScoredSequence] = []
    truncated = 0
    for prompt in prompts:
        for word in label_words:
            enc = encode(tokenizer, prompt, word, fmt=fmt, append_eos=False, max_length=max_length)
            if enc.n_response == 0:
                raise ValueError(f"label word {word!r} tokenises to nothing; it cannot be scored")
            truncated += enc.truncated > 0
            seqs.append(ScoredSequence(enc.input_ids, enc.n_prompt))
    if truncated:
        log.warning("%d of %d scored sequences lost prompt tokens from the left to fit %s tokens",
                    truncated, len(seqs), max_length)
    return seqs


def _model_device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def _max_length(model: nn.Module) -> int | None:
    cfg = getattr(model, "config", None)
    return getattr(cfg, "max_position_embeddings", None)


def _collate(
    batch: list[ScoredSequence], pad_id: int, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Right-padded ids and mask, plus (row, col, target) of every scored label token.

    The logit at ``(row, col)`` predicts the token at ``col + 1`` of batch row ``row``.
    """
    width = max(len(s.input_ids) for s in batch)
    ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(batch), width), dtype=torch.long)
    rows, cols, targets = [], [], []
    for b, s in enumerate(batch):
        n = len(s.input_ids)
        ids[b, :n] = torch.tensor(s.input_ids)
        mask[b, :n] = 1
        rows += [b] * (n - s.n_prompt)
        cols += range(s.n_prompt - 1, n - 1)
        targets += s.input_ids[s.n_prompt:]
    pos = torch.tensor([rows, cols, targets], dtype=torch.long, device=device)
    return ids.to(device), mask.to(device), pos[0], pos[1], pos[2]


def _score_batch(model: nn.Module, batch: list[ScoredSequence], pad_id: int, device: torch.device) -> torch.Tensor:
    """Summed label-token log-probs of each sequence in ``batch`` (float32, on CPU)."""
    ids, mask, rows, cols, targets = _collate(batch, pad_id, device)
    _, logits = selected_logits(model, ids, mask, rows, cols)
    logp = torch.log_softmax(logits.float(), dim=-1).gather(1, targets[:, None]).squeeze(1)
    sums = torch.zeros(len(batch), dtype=torch.float32, device=device).index_add_(0, rows, logp)
    return sums.cpu()


def score_sequences(
    model: nn.Module, seqs: list[ScoredSequence], *, pad_id: int, batch_size: int, desc: str = "loglik"
) -> torch.Tensor:
    """Summed label log-probs per sequence, in input order. Longest first: an OOM shows up at once."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    device = _model_device(model)
    order = sorted(range(len(seqs)), key=lambda i: -len(seqs[i].input_ids))
    out = torch.empty(len(seqs), dtype=torch.float32)
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            n_batches = -(-len(order) // batch_size)
            for start in tqdm(range(0, len(order), batch_size), desc=desc, unit="batch", leave=False,
                              disable=n_batches < 2):  # no bar for a single batch (predict)
                idx = order[start:start + batch_size]
                out[idx] = _score_batch(model, [seqs[i] for i in idx], pad_id, device)
    finally:
        model.train(was_training)
    return out


def loglik_scores(
    model: nn.Module,
    tokenizer,
    prompts: list[str],
    label_words: list[str],
    *,
    fmt: PromptFormat = "train",
    batch_size: int = 32,
    length_normalise: bool = False,
    desc: str = "loglik",
) -> torch.Tensor:
    """``(len(prompts), len(label_words))`` log-probabilities of each label word after each prompt.

    ``length_normalise`` divides by the number of label tokens (per-token log-prob), which removes the
    bias towards label words that tokenise into fewer pieces.
    """
    if not label_words:
        raise ValueError("label_words is empty")
    seqs = build_sequences(tokenizer, prompts, label_words, fmt=fmt, max_length=_max_length(model))
    scores = score_sequences(model, seqs, pad_id=_pad_id(tokenizer), batch_size=batch_size, desc=desc)
    if length_normalise:
        scores = scores / torch.tensor([len(s.input_ids) - s.n_prompt for s in seqs], dtype=torch.float32)
    return scores.view(len(prompts), len(label_words))


def predict_labels(
    model: nn.Module,
    tokenizer,
    prompts: list[str],
    label_words: list[str],
    *,
    fmt: PromptFormat = "train",
    batch_size: int = 32,
    length_normalise: bool = False,
) -> torch.Tensor:
    """Index of the most likely label word per prompt (``argmax`` of :func:`loglik_scores`)."""
    scores = loglik_scores(model, tokenizer, prompts, label_words, fmt=fmt, batch_size=batch_size,
                           length_normalise=length_normalise)
    return scores.argmax(dim=1)


def _pad_id(tokenizer) -> int:
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    return int(pad) if pad is not None else 0
