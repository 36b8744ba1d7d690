"""Pair rows, settings and small checks shared by the training tests and their subprocess workers."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from coin.config import TrainSettings

WORDS = ["good", "bad", "fine", "awful", "great", "poor", "nice", "grim"]


def make_rows(n: int, split: str = "train", *, varied_targets: bool = False) -> list[dict[str, Any]]:
    """``n`` explicit (original, paraphrase, negative) pair rows of slightly different lengths.

    ``varied_targets``: every third row answers with a long target, so micro-batches differ in their
    number of response tokens (what token normalisation across accumulation is about).
    """
    def target(i: int, positive: bool) -> str:
        if varied_targets and i % 3 == 0:
            return "positive without any doubt at all" if positive else "negative without any doubt at all"
        return "positive" if positive else "negative"

    return [
        {
            "pair_id": f"sst2:{split}:{i}:a0:b1",
            "task": "sst2",
            "split": split,
            "original_prompt": f"Is this review positive?\nThe film was {WORDS[i % 8]} {i}." + " really" * (i % 4),
            "paraphrase_prompt": f"Review: the film was {WORDS[i % 8]} {i}.\nDoes the reviewer like it?",
            "target": target(i, i % 2 == 0),
            "negative_prompt": f"Is this review positive?\nA {WORDS[(i + 1) % 8]} story {i + 100}.",
            "negative_target": target(i, i % 2 == 1),
        }
        for i in range(n)
    ]


def cfg_for(method: str = "coin", **kw: Any) -> TrainSettings:
    # fp32 (autocast off): the exactness tests compare with fp32 references; bf16 has its own test
    base: dict[str, Any] = {"methods": [method], "batch_size": 2, "lora": {"r": 4, "alpha": 8, "dropout": 0.0},
                            "autocast": "off"}
    base.update(kw)
    return TrainSettings.model_validate(base)


def trainable_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def grads(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.requires_grad and p.grad is not None}


def perturb_lora_b(model: torch.nn.Module, seed: int = 7) -> None:
    """LoRA B starts at zero, which makes every LoRA A gradient zero; give B small seeded values."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(0.05 * torch.randn(p.shape, generator=gen))


def adapter_tensors(adapter_dir: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(Path(adapter_dir) / "adapter_model.safetensors"))


def assert_grads_close(actual: dict[str, torch.Tensor], expected: dict[str, torch.Tensor], rel: float = 1e-5) -> None:
    """Every gradient equal up to float32 summation order: ``|a - e| <= rel * max|e|`` per tensor (+ rtol 1e-4)."""
    assert actual.keys() == expected.keys()
    for name, e in expected.items():
        torch.testing.assert_close(actual[name], e, rtol=1e-4, atol=rel * float(e.abs().max()) + 1e-12,
                                   msg=lambda m, name=name: f"{name}: {m}")


def fused_and_textbook(model: torch.nn.Module, tokenizer: Any, batch: Any, rows: list[dict[str, Any]],
                       cfg: TrainSettings) -> tuple[dict[str, float], dict[str, torch.Tensor], dict[str, float],
                                                    dict[str, torch.Tensor]]:
    """One fused step on ``batch`` and :func:`naive_objective` on ``rows``, each backpropagated from zero gradients:
    ``(fused metrics, fused LoRA grads, textbook metrics, textbook LoRA grads)``."""
    from coin.training.loss import coin_step_loss

    loss, m = coin_step_loss(model, batch, cfg)
    loss.backward()
    ours = grads(model)
    model.zero_grad(set_to_none=True)
    ref_loss, ref = naive_objective(model, tokenizer, rows, cfg)
    ref_loss.backward()
    theirs = grads(model)
    model.zero_grad(set_to_none=True)
    return m, ours, ref, theirs


def naive_objective(
    model: torch.nn.Module, tok: Any, rows: list[dict[str, Any]], cfg: TrainSettings, chunks: int = 1
) -> tuple[torch.Tensor, dict[str, float]]:
    """Any registered method's objective by the textbook: every sequence forwarded alone (no padding at all)
    under a hand-built mask (causal; under the prefix LM its prompt block all ones), full-vocabulary logits,
    pooling by slicing the unpadded hidden states, InfoNCE and the output-consistency divergences by explicit
    loops over pairs and positions.

    ``chunks``: the documented meaning of accumulating that many equal micro-batches. The generation loss is
    token-normalised over all rows; InfoNCE and the consistency term are computed per chunk of rows (each with
    its adaptive weights from that chunk's own L_gen) and averaged over the chunks.
    """
    import torch.nn.functional as F

    from coin.data.prompts import encode
    from coin.methods import get_method
    from coin.modeling.backbone import attention_mode, readout_mode, split_body_head

    method = get_method(cfg.method)
    prefix = attention_mode(model) == "prefix"
    mean_readout = readout_mode(model) == "mean"
    cols = {"original": ("original_prompt", "target"), "paraphrase": ("paraphrase_prompt", "target"),
            "negative": ("negative_prompt", "negative_target")}
    reps: dict[str, list[torch.Tensor]] = {g: [] for g in cols}
    resp: dict[str, list[torch.Tensor]] = {g: [] for g in cols}     # per row: (n_resp, V) response logits
    ce: dict[str, list[torch.Tensor]] = {g: [] for g in cols}       # per row: summed CE, and token counts
    n_tok: dict[str, list[int]] = {g: [] for g in cols}
    for g, (p_col, t_col) in cols.items():
        for r in rows:
            e = encode(tok, r[p_col], r[t_col], max_length=64)
            ids = torch.tensor([e.input_ids])
            mask = torch.ones(ids.size(1), ids.size(1), dtype=torch.bool).tril()
            if prefix:
                mask[: e.n_prompt, : e.n_prompt] = True
            out = model(input_ids=ids, attention_mask=mask[None, None], output_hidden_states=True)
            h = out.hidden_states[-1][0]                                      # (T, H), after the final norm
            logits = out.logits[0, e.n_prompt - 1 : -1]                        # predicts tokens n_prompt..end
            if mean_readout:  # the first response token reads the mean of the prompt's states
                first = split_body_head(model)[1](h[: e.n_prompt].mean(0))
                logits = torch.cat([first.unsqueeze(0), logits[1:]])
            resp[g].append(logits)
            ce[g].append(F.cross_entropy(logits, ids[0, e.n_prompt :], reduction="sum"))
            n_tok[g].append(len(e.input_ids) - e.n_prompt)
            span = h if cfg.pool_span == "full" else h[: e.n_prompt]
            reps[g].append({"last": span[-1], "mean": span.mean(0), "max": span.max(0).values}[cfg.pooling])

    def gen_loss(idx: range) -> torch.Tensor:
        return sum(sum(ce[g][i] for i in idx) / max(sum(n_tok[g][i] for i in idx), 1)
                   for g in method.generation_groups)

    def adaptive(mode: str, lam: float, fixed: float, l_gen: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
        if mode == "fixed":
            return torch.tensor(fixed)
        if lam * value > l_gen:  # the reference's c * min(lam, L_gen / c), c = lam * value
            return (lam * torch.clamp(l_gen / (lam * value), max=lam)).detach()
        return torch.tensor(lam)

    def kl(p_logits: torch.Tensor, q_logits: torch.Tensor) -> torch.Tensor:   # one position each, (V,)
        p, q = F.softmax(p_logits, -1), F.softmax(q_logits, -1)
        return (p * (p.log() - q.log())).sum()

    def div(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:   # one row's response logits each: mean over t
        n = min(a.size(0), b.size(0))
        vals = []
        for t in range(n):
            if cfg.consistency.divergence == "kl":
                vals.append(kl(a[t], b[t]))
            else:
                m = 0.5 * (F.softmax(a[t], -1) + F.softmax(b[t], -1))
                p, q = F.softmax(a[t], -1), F.softmax(b[t], -1)
                vals.append(0.5 * (p * (p.log() - m.log())).sum() + 0.5 * (q * (q.log() - m.log())).sum())
        return torch.stack(vals).mean()

    size = len(rows) // chunks
    l_gen_all = gen_loss(range(len(rows)))
    total = l_gen_all
    parts: dict[str, list[float]] = {k: [] for k in ("l_cl", "w", "div_pos", "div_neg", "l_push", "w_oc")}
    for c in range(chunks):
        idx = range(c * size, (c + 1) * size)
        l_gen = gen_loss(idx)
        if method.info_nce is not None:
            o, p_, n = (torch.stack([reps[g][i] for i in idx]) for g in cols)

            def ce_row(anchor: torch.Tensor, columns: list[torch.Tensor], target: int) -> torch.Tensor:
                s = torch.stack([F.cosine_similarity(anchor, col, dim=0) for col in columns]) / cfg.temperature
                return torch.logsumexp(s, 0) - s[target]

            negs = [*n] if "negative" in method.sequence_groups else []
            b = len(idx)
            l_cl = 0.5 * (sum(ce_row(o[i], [*p_, *negs], i) for i in range(b)) / b
                          + sum(ce_row(p_[i], [*o, *negs], i) for i in range(b)) / b)
            parts["l_cl"].append(l_cl.item())
            if method.trains_contrastive:
                w = adaptive(cfg.cl_weighting, cfg.cl_lambda, cfg.cl_weight, l_gen, l_cl)
                total = total + w * l_cl / chunks
                parts["w"].append(w.item())
        if method.consistency is not None:
            d_pos = torch.stack([div(resp["original"][i], resp["paraphrase"][i]) for i in idx])
            d_neg = torch.stack([div(resp["original"][i], resp["negative"][i]) for i in idx])
            w_oc = adaptive(cfg.consistency.weighting, cfg.consistency.cap, cfg.consistency.weight, l_gen, d_pos.mean())
            push = F.softplus((d_pos - d_neg) / cfg.consistency.push_temperature).mean()
            total = total + (w_oc * d_pos.mean() + cfg.consistency.push_weight * push) / chunks
            parts["div_pos"].append(d_pos.mean().item())
            parts["div_neg"].append(d_neg.mean().item())
            parts["l_push"].append(push.item())
            parts["w_oc"].append(w_oc.item())
    metrics = {"loss": total.item(), "l_gen": l_gen_all.item()}
    metrics.update({k: sum(v) / len(v) for k, v in parts.items() if v})
    # each group's token-mean CE over all rows, whether or not the method trains on it
    metrics.update({f"ce_{g}": (sum(ce[g]) / max(sum(n_tok[g]), 1)).item() for g in cols})
    return total, metrics
