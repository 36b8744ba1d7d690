"""The output-consistency objective (methods ``consistency`` and ``coin_consistency``): each part against a hand
computation, its gradients against the textbook objective, and accumulation / packing equivalence."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from helpers_training import (
    assert_grads_close,
    cfg_for,
    fused_and_textbook,
    grads,
    make_rows,
    naive_objective,
    perturb_lora_b,
)

from coin.config import ConfigError, Settings
from coin.methods import CONSISTENCY_METRICS, METHODS, get_method
from coin.modeling.backbone import FusedLM, load_backbone
from coin.modeling.lora import apply_lora
from coin.training.collator import PairCollator
from coin.training.distributed import SINGLE
from coin.training.loop import accumulate_gradients, train
from coin.training.loss import coin_step_loss, divergence, response_index

CONSISTENCY_METHODS = [m for m, d in METHODS.items() if d.consistency is not None]

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _np_softmax(z: np.ndarray) -> np.ndarray:
    e = np.exp(z - z.max())
    return e / e.sum()


@pytest.mark.parametrize("kind", ["kl", "js"])
def test_divergence_matches_hand_computation(kind: str) -> None:
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(3, 7)), rng.normal(size=(3, 7)) * 2
    want = []
    for za, zb in zip(a, b, strict=True):
        p, q = _np_softmax(za), _np_softmax(zb)
        if kind == "kl":
            want.append(float(np.sum(p * np.log(p / q))))
        else:
            m = (p + q) / 2
            want.append(0.5 * float(np.sum(p * np.log(p / m))) + 0.5 * float(np.sum(q * np.log(q / m))))
    got = divergence(torch.tensor(a, dtype=torch.float64), torch.tensor(b, dtype=torch.float64), kind)
    assert got.tolist() == pytest.approx(want, rel=1e-5)
    assert divergence(torch.tensor(a), torch.tensor(a), kind).abs().max() < 1e-6      # D(p, p) = 0
    if kind == "js":  # symmetric and at most ln 2
        assert torch.allclose(got, divergence(torch.tensor(b), torch.tensor(a), kind), atol=1e-6)
        assert float(divergence(torch.tensor([[50.0, 0.0]]), torch.tensor([[0.0, 50.0]]), "js")) == pytest.approx(
            math.log(2), rel=1e-6)
    else:  # KL is not symmetric
        assert not torch.allclose(got, divergence(torch.tensor(b), torch.tensor(a), kind), atol=1e-3)


def test_response_index_keeps_each_sequences_order() -> None:
    # positions of sequences 1, 0, 1, 2, 0: sequence 0 is positions 1 and 4, in that order
    assert response_index(torch.tensor([1, 0, 1, 2, 0]), 4).tolist() == [[1, 4], [0, 2], [3, -1], [-1, -1]]


def test_the_methods_are_declared_with_their_metrics() -> None:
    for name in CONSISTENCY_METHODS:
        m = get_method(name)
        assert m.logit_groups == ("original", "paraphrase", "negative")     # the negative's logits are read
        assert m.generation_groups == ("original", "paraphrase")            # ... but carry no CE
        assert set(CONSISTENCY_METRICS) <= set(m.metrics)
    assert get_method("coin_consistency").trains_contrastive and not get_method("consistency").trains_contrastive
    assert all(not set(CONSISTENCY_METRICS) & set(get_method(m).metrics) for m in ("coin", "cit", "sft"))


def test_consistency_settings_are_validated() -> None:
    with pytest.raises(ConfigError, match=r"train\.consistency\.divergence"):
        Settings.model_validate({"train": {"consistency": {"divergence": "hellinger"}}})
    with pytest.raises(ConfigError, match=r"train\.consistency\.push_weigth"):
        Settings.model_validate({"train": {"consistency": {"push_weigth": 1.0}}})


def _model(tiny_dir: Path, cfg: Any) -> Any:
    bb = load_backbone(str(tiny_dir), device="cpu")
    torch.manual_seed(0)
    model = apply_lora(bb, cfg.lora)
    perturb_lora_b(model)
    model.eval()
    return bb, model


@pytest.mark.parametrize(
    ("method", "tiny", "divergence_kind", "weighting", "packing"),
    [
        ("consistency", "tiny_llama_dir", "kl", "fixed", False),
        ("consistency", "tiny_llama_dir", "js", "adaptive", True),
        ("coin_consistency", "tiny_llama_dir", "kl", "adaptive", True),
        ("coin_consistency", "tiny_gpt2_dir", "js", "fixed", False),
        ("consistency", "tiny_bert_encoder_dir", "kl", "adaptive", True),   # prefix LM, mean readout
    ],
)
def test_consistency_step_equals_the_textbook_objective(
    request: pytest.FixtureRequest, method: str, tiny: str, divergence_kind: str, weighting: str, packing: bool
) -> None:
    """Values and LoRA gradients of the fused step equal the objective computed sequence by sequence, with
    full-vocabulary logits and the divergences by explicit loops. Targets of different lengths make the
    negative's response longer or shorter than the original's (only the aligned positions count)."""
    # weights large enough that the consistency gradient is not lost in the generation gradient's tolerance
    cfg = cfg_for(method, packing=packing, consistency={"divergence": divergence_kind, "weighting": weighting,
                                                        "weight": 300.0, "push_weight": 50.0, "push_temperature": 0.1})
    bb, model = _model(request.getfixturevalue(tiny), cfg)
    rows = make_rows(3, varied_targets=True)
    b = PairCollator.from_settings(bb.tokenizer, cfg, 64)(rows)
    assert b.packed == packing
    m, ours, ref, theirs = fused_and_textbook(model, bb.tokenizer, b, rows, cfg)
    keys = ["loss", "l_gen", "div_pos", "div_neg", "l_push", "w_oc"] + (["l_cl"] if method == "coin_consistency"
                                                                       else [])
    for key in keys:
        assert m[key] == pytest.approx(ref[key], rel=2e-5, abs=1e-6), key
    assert m["w_push"] == 50.0 and m["div_pos"] > 0 and m["div_neg"] > 0
    if weighting == "adaptive":
        assert m["w_oc"] == pytest.approx(min(cfg.consistency.cap, m["l_gen"] / m["div_pos"]), rel=1e-5)
    assert_grads_close(ours, theirs)
    assert any(g.abs().sum() > 0 for n, g in ours.items() if "lora_A" in n)


def test_the_consistency_term_changes_the_gradient(tiny_llama_dir: Path) -> None:
    """The test above can fail: cit (the same generation loss, no consistency) has another gradient, and so has
    the consistency method without its push."""
    rows = make_rows(3, varied_targets=True)
    out = {}
    for name, cfg in {"consistency": cfg_for("consistency"), "cit": cfg_for("cit"),
                      "no_push": cfg_for("consistency", consistency={"push_weight": 0.0})}.items():
        bb, model = _model(tiny_llama_dir, cfg)
        loss, m = coin_step_loss(model, PairCollator.from_settings(bb.tokenizer, cfg, 64)(rows), cfg)
        loss.backward()
        out[name] = (grads(model), m)
    g, m = out["consistency"]
    assert m["l_gen"] == pytest.approx(out["cit"][1]["l_gen"], rel=1e-6)
    for other in ("cit", "no_push"):
        assert any(not torch.allclose(g[n], out[other][0][n], rtol=1e-3, atol=1e-7) for n in g), other
    no_push = out["no_push"][1]
    assert no_push["w_push"] == 0.0 and math.isnan(no_push["l_push"])
    # the negatives are still forwarded without the push, so D_neg is logged (it was NaN), and it is the same
    # divergence as with the push on: the same weights, the same logits
    assert no_push["div_neg"] == pytest.approx(m["div_neg"], rel=1e-5) and no_push["div_neg"] > 0


def test_without_hard_negatives_only_the_pull_remains(tiny_llama_dir: Path) -> None:
    cfg = cfg_for("consistency", hard_negatives=False)
    bb, model = _model(tiny_llama_dir, cfg)
    b = PairCollator.from_settings(bb.tokenizer, cfg, 64)(make_rows(3))
    assert b.groups == ("original", "paraphrase")
    _, m = coin_step_loss(model, b, cfg)
    assert m["w_push"] == 0.0 and math.isnan(m["l_push"]) and math.isnan(m["div_neg"])
    assert m["loss"] == pytest.approx(m["l_gen"] + m["w_oc"] * m["div_pos"], rel=1e-6)


@pytest.mark.parametrize(("method", "packing", "weighting"),
                         [("consistency", True, "adaptive"), ("consistency", False, "fixed"),
                          ("coin_consistency", True, "fixed"), ("coin_consistency", False, "adaptive")])
def test_grad_accumulation_equals_the_big_batch(tiny_llama_dir: Path, method: str, packing: bool,
                                                weighting: str) -> None:
    """grad_accum = 2 x batch 2 gives the gradient of one batch of 4 whose InfoNCE and consistency terms are
    computed per half (each with its own adaptive weights), the generation loss over all its response tokens,
    although the two micro-batches carry different numbers of response tokens."""
    cfg = cfg_for(method, packing=packing, consistency={"weighting": weighting, "weight": 300.0, "push_weight": 50.0,
                                                        "push_temperature": 0.1})
    bb, model = _model(tiny_llama_dir, cfg)
    all_rows = make_rows(6, varied_targets=True)
    rows = [all_rows[i] for i in (0, 3, 1, 2)]  # micro-batch 1: two long targets, micro-batch 2: two short
    collate = PairCollator.from_settings(bb.tokenizer, cfg, 64)
    small = [collate(rows[:2]), collate(rows[2:])]
    assert small[0].resp_rows.numel() > small[1].resp_rows.numel()
    m = accumulate_gradients(FusedLM(model), small, cfg, SINGLE, torch.device("cpu"))
    accumulated = grads(model)
    model.zero_grad(set_to_none=True)
    ref_loss, ref = naive_objective(model, bb.tokenizer, rows, cfg, chunks=2)
    ref_loss.backward()
    assert_grads_close(accumulated, grads(model))
    for key in ("loss", "l_gen", "div_pos", "l_push", "w_oc"):
        assert m[key] == pytest.approx(ref[key], rel=2e-5, abs=1e-6), key
    # ... and a step whose consistency term is a mean of per-micro-batch means over the step's tokens is not it:
    model.zero_grad(set_to_none=True)
    for b in small:
        (coin_step_loss(model, b, cfg)[0] / 2).backward()
    naive = grads(model)
    assert any(not torch.allclose(naive[n], accumulated[n], rtol=1e-3, atol=1e-7) for n in accumulated)


@pytest.mark.parametrize("method", list(METHODS))
def test_every_declared_metric_reaches_the_step_log(tiny_llama_dir: Path, tmp_path: Path, method: str) -> None:
    """Each method's step history carries every metric it declares (a dropped metric fails here)."""
    bb = load_backbone(str(tiny_llama_dir), device="cpu")
    cfg = cfg_for(method, max_steps=2, grad_accum=2, log_every=1, checkpoint_every=0)
    result = train(bb, make_rows(8), cfg, out_dir=tmp_path, seed=0, cutoff_len=64, progress=False)
    declared = {m.name for m in get_method(method).metrics}
    assert len(result.history) == 2
    for step in result.history:
        assert declared <= set(step), sorted(declared - set(step))
