"""CoIN losses: generation loss on response tokens, symmetric InfoNCE, the adaptive weight, pooling.

``L = L_gen(original) + L_gen(paraphrase) + w * L_cl`` (DESIGN.md §1). Everything here is pure
tensor code: no logging, no side effects; :func:`coin_step_loss` returns metrics as floats for the
caller to log.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from coin.config import TrainSettings
from coin.modeling.backbone import selected_logits
from coin.training.collator import GEN_GROUPS, Batch

Pooling = Literal["last", "mean", "max"]


# --------------------------------------------------------------------------- pooling


def _span_mask(attention_mask: torch.Tensor, span_end: torch.Tensor | None) -> torch.Tensor:
    """``(B, T)`` bool: real tokens at positions ``<= span_end`` (absolute positions; any padding side)."""
    mask = attention_mask.bool()                                                  # (B, T)
    if span_end is not None:
        pos = torch.arange(mask.size(1), device=mask.device)                      # (T,)
        mask = mask & (pos.unsqueeze(0) <= span_end.to(mask.device).unsqueeze(1))  # (B, T)
    return mask


def pool(
    hidden: torch.Tensor,
    attention_mask: torch.Tensor,
    how: Pooling = "last",
    span_end: torch.Tensor | None = None,
) -> torch.Tensor:
    """``(B, T, H) -> (B, H)`` over the real tokens at positions ``<= span_end`` (all real tokens if None).

    - ``last``: the hidden state at the last such position (the last real token, or the last prompt
      token with ``span_end = prompt_len - 1`` under right padding).
    - ``mean`` / ``max``: over those positions only; pads never contribute.

    Positions are absolute, so left and right padding both work.
    """
    mask = _span_mask(attention_mask, span_end)                                   # (B, T)
    if not bool(mask.any(dim=1).all()):
        raise ValueError("pool: a sequence has no token inside its pooling span")
    if how == "last":
        pos = torch.arange(mask.size(1), device=mask.device)                      # (T,)
        idx = torch.where(mask, pos, -1).amax(dim=1)                              # (B,)
        return hidden[torch.arange(hidden.size(0), device=hidden.device), idx]    # (B, H)
    m = mask.unsqueeze(-1)                                                        # (B, T, 1)
    if how == "mean":
        total = (hidden * m.to(hidden.dtype)).sum(dim=1)                          # (B, H)
        return total / m.sum(dim=1).to(hidden.dtype)                              # (B, H)
    if how == "max":
        return hidden.masked_fill(~m, torch.finfo(hidden.dtype).min).amax(dim=1)  # (B, H)
    raise ValueError(f"train.pooling = {how!r}: use one of last, mean, max")


# --------------------------------------------------------------------------- contrastive


def info_nce(
    h_orig: torch.Tensor,
    h_para: torch.Tensor,
    h_neg: torch.Tensor | None,
    temperature: float,
) -> tuple[torch.Tensor, float, float]:
    """Symmetric InfoNCE over cosine similarities; ``(loss, mean positive cos, mean negative cos)``.

    ``S = cos(h_o, h_p) / tau`` (B, B). Direction o->p scores row i against ``[S_i | cos(h_o_i, h_n)/tau]``
    (B + B columns, target i); direction p->o against ``[S^T_i | cos(h_p_i, h_n)/tau]``. The loss is
    the mean of the two cross-entropies; with ``h_neg=None`` it is plain CLIP. The negative cosine
    averages the off-diagonal of ``cos(h_o, h_p)`` and every hard-negative cosine.
    """
    o = F.normalize(h_orig.float(), dim=-1)                       # (B, H)
    p = F.normalize(h_para.float(), dim=-1)                       # (B, H)
    cos_op = o @ p.T                                              # (B, B), diagonal = positives
    b = cos_op.size(0)
    target = torch.arange(b, device=cos_op.device)                # (B,)
    off_diag = ~torch.eye(b, dtype=torch.bool, device=cos_op.device)
    negatives = [cos_op[off_diag]]
    logits_o, logits_p = cos_op, cos_op.T                         # (B, B) each
    if h_neg is not None:
        n = F.normalize(h_neg.float(), dim=-1)                    # (B, H)
        cos_on, cos_pn = o @ n.T, p @ n.T                         # (B, B) each
        logits_o = torch.cat([cos_op, cos_on], dim=1)             # (B, 2B)
        logits_p = torch.cat([cos_op.T, cos_pn], dim=1)           # (B, 2B)
        negatives += [cos_on.flatten(), cos_pn.flatten()]
    loss = 0.5 * (
        F.cross_entropy(logits_o / temperature, target) + F.cross_entropy(logits_p / temperature, target)
    )
    with torch.no_grad():
        pos_cos = float(cos_op.diagonal().mean())
        neg = torch.cat(negatives)
        neg_cos = float(neg.mean()) if neg.numel() else math.nan
    return loss, pos_cos, neg_cos


def contrastive_weight(
    l_gen: torch.Tensor,
    l_cl: torch.Tensor,
    mode: Literal["adaptive", "fixed"],
    lam: float,
    fixed: float,
) -> tuple[torch.Tensor, float]:
    """``(weighted contrastive term, effective w)``.

    adaptive (reference ``scale_contrastive_loss``): ``c = lam * L_cl``; if ``c > L_gen`` then
    ``c = c * min(lam, L_gen / c)`` with both values detached. Its value is then ``L_gen`` and its
    gradient is ``L_gen / L_cl`` times that of ``L_cl``: in effect ``w = min(lam, L_gen / L_cl)``.
    fixed: ``w = fixed``.
    """
    if mode == "fixed":
        return fixed * l_cl, float(fixed)
    if mode != "adaptive":
        raise ValueError(f"train.cl_weighting = {mode!r}: use adaptive or fixed")
    c = lam * l_cl
    if bool(c != 0) and bool(c > l_gen):
        ratio = l_gen.detach() / c.detach()
        c = c * torch.clamp(ratio, max=lam)
        return c, min(float(lam), float(l_gen.detach() / l_cl.detach()))
    return c, float(lam)


# --------------------------------------------------------------------------- generation


def generation_loss(
    logits: torch.Tensor,
    targets: torch.Tensor,
    rows: torch.Tensor,
    n_pairs: int,
    groups: tuple[str, ...],
) -> tuple[torch.Tensor, int]:
    """Sum over the generation groups of the mean token CE of that group; ``(loss, response tokens)``.

    ``logits`` (K, V) are the LM-head outputs at the K response positions only, ``targets`` (K,) the
    tokens they predict, ``rows`` (K,) their sequence rows (group = row // n_pairs).
    """
    ce = F.cross_entropy(logits.float(), targets, reduction="none")            # (K,)
    group_of = torch.div(rows, n_pairs, rounding_mode="floor")                   # (K,)
    loss = logits.new_zeros((), dtype=torch.float32)
    for g, name in enumerate(groups):
        if name not in GEN_GROUPS:
            continue
        sel = group_of == g                                                      # (K,)
        loss = loss + ce[sel].sum() / sel.sum().clamp(min=1)
    return loss, int(targets.numel())


# --------------------------------------------------------------------------- one step


def coin_step_loss(model: nn.Module, batch: Batch, cfg: TrainSettings) -> tuple[torch.Tensor, dict[str, float]]:
    """Loss of one micro-batch in one fused forward pass over all its sequences.

    Metrics (floats): loss, l_gen, l_cl, w, pos_cos, neg_cos, n_tokens (real tokens forwarded),
    n_resp_tokens. For ``cit`` the contrastive loss and cosines are measured without gradient
    (w = 0) so runs can be compared; for ``sft`` they are NaN (no paraphrases in the batch).
    """
    hidden, logits = selected_logits(                                            # (N, T, H), (K, V)
        model, batch.input_ids, batch.attention_mask, batch.resp_rows, batch.resp_cols
    )
    l_gen, n_resp = generation_loss(logits, batch.resp_targets, batch.resp_rows, batch.n_pairs, batch.groups)
    l_cl, w, pos_cos, neg_cos = _contrastive(hidden, batch, cfg)
    if cfg.method == "coin":
        term, w = contrastive_weight(l_gen, l_cl, cfg.cl_weighting, cfg.cl_lambda, cfg.cl_weight)
        loss = l_gen + term
    else:
        loss = l_gen
    metrics = {
        "loss": float(loss.detach()),
        "l_gen": float(l_gen.detach()),
        "l_cl": float(l_cl.detach()),
        "w": float(w),
        "pos_cos": pos_cos,
        "neg_cos": neg_cos,
        "n_tokens": float(batch.n_tokens),
        "n_resp_tokens": float(n_resp),
    }
    return loss, metrics


def _contrastive(hidden: torch.Tensor, batch: Batch, cfg: TrainSettings) -> tuple[torch.Tensor, float, float, float]:
    """``(L_cl, w placeholder, pos_cos, neg_cos)`` from the pooled blocks of the fused batch."""
    if "paraphrase" not in batch.groups:
        return hidden.new_tensor(math.nan, dtype=torch.float32), 0.0, math.nan, math.nan
    span_end = batch.prompt_len - 1 if cfg.pool_span == "prompt" else None        # (N,) or None
    with torch.set_grad_enabled(torch.is_grad_enabled() and cfg.method == "coin"):
        pooled = pool(hidden, batch.attention_mask, cfg.pooling, span_end)       # (N, H)
        h_neg = pooled[batch.block("negative")] if "negative" in batch.groups else None
        l_cl, pos_cos, neg_cos = info_nce(
            pooled[batch.block("original")], pooled[batch.block("paraphrase")], h_neg, cfg.temperature
        )
    return l_cl, 0.0, pos_cos, neg_cos
