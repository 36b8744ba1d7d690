"""Training engine: losses against hand-computed values, pooling, collation, LoRA, the loop, adapters."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from coin.config import LoraSettings, TrainSettings
from coin.data.prompts import encode
from coin.modeling.backbone import load_backbone, load_tokenizer, selected_logits
from coin.modeling.lora import apply_lora, load_adapter, newly_initialised_modules
from coin.training.collator import PairCollator
from coin.training.loop import iterate_batches, train, train_rows_of
from coin.training.loss import coin_step_loss, contrastive_weight, generation_loss, info_nce, pool

TINY_DIRS = ["tiny_llama_dir", "tiny_gpt2_dir", "tiny_bert_encoder_dir"]


def make_rows(n: int, split: str = "train") -> list[dict[str, Any]]:
    words = ["good", "bad", "fine", "awful", "great", "poor", "nice", "grim"]
    return [
        {
            "pair_id": f"sst2:train:{i}:a0:b1",
            "task": "sst2",
            "split": split,
            "original_prompt": f"Is this review positive?\nThe film was {words[i % 8]} {i}.",
            "paraphrase_prompt": f"Review: the film was {words[i % 8]} {i}.\nDoes the reviewer like it?",
            "target": "positive" if i % 2 == 0 else "negative",
            "negative_prompt": f"Is this review positive?\nA {words[(i + 1) % 8]} story {i + 100}.",
            "negative_target": "negative" if i % 2 == 0 else "positive",
        }
        for i in range(n)
    ]


def cfg_for(method: str = "coin", **kw: Any) -> TrainSettings:
    base: dict[str, Any] = {"method": method, "batch_size": 2, "lora": {"r": 4, "alpha": 8, "dropout": 0.0}}
    base.update(kw)
    return TrainSettings.model_validate(base)


@pytest.fixture(scope="module")
def minilm_tok() -> Any:
    return load_tokenizer("minilm")


# --------------------------------------------------------------------------- InfoNCE


def _np_ce(logits: np.ndarray, target: int) -> float:
    return float(-(logits[target] - math.log(sum(math.exp(x) for x in logits))))


def _np_cos(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    an = a / np.linalg.norm(a, axis=1, keepdims=True)
    bn = b / np.linalg.norm(b, axis=1, keepdims=True)
    return an @ bn.T


H_O = [[1.0, 0.0, 0.0], [0.0, 2.0, 0.0], [1.0, 1.0, 1.0]]
H_P = [[2.0, 0.5, 0.0], [0.0, 1.0, 1.0], [1.0, 0.0, 2.0]]
H_N = [[0.0, 0.0, 1.0], [1.0, -1.0, 0.0], [-1.0, 0.0, 1.0]]


@pytest.mark.parametrize("with_neg", [False, True])
def test_info_nce_matches_hand_computation(with_neg: bool) -> None:
    tau = 0.5
    o, p, n = np.array(H_O), np.array(H_P), np.array(H_N)
    s = _np_cos(o, p) / tau
    expected_o, expected_p = 0.0, 0.0
    for i in range(3):
        row_o, row_p = list(s[i]), list(s.T[i])
        if with_neg:
            row_o += list(_np_cos(o, n)[i] / tau)
            row_p += list(_np_cos(p, n)[i] / tau)
        expected_o += _np_ce(np.array(row_o), i) / 3
        expected_p += _np_ce(np.array(row_p), i) / 3
    expected = 0.5 * (expected_o + expected_p)

    t = lambda x: torch.tensor(x, dtype=torch.float64)  # noqa: E731
    loss, pos_cos, neg_cos = info_nce(t(H_O), t(H_P), t(H_N) if with_neg else None, tau)
    assert loss.item() == pytest.approx(expected, rel=1e-6)
    cos = _np_cos(o, p)
    assert pos_cos == pytest.approx(float(np.trace(cos) / 3), rel=1e-6)
    negs = list(cos[~np.eye(3, dtype=bool)])
    if with_neg:
        negs += list(_np_cos(o, n).ravel()) + list(_np_cos(p, n).ravel())
    assert neg_cos == pytest.approx(float(np.mean(negs)), rel=1e-6)


def test_info_nce_hard_negative_raises_loss_and_is_symmetric() -> None:
    o, p = torch.tensor(H_O), torch.tensor(H_P)
    plain, _, _ = info_nce(o, p, None, 0.05)
    swapped, _, _ = info_nce(p, o, None, 0.05)
    assert plain.item() == pytest.approx(swapped.item(), rel=1e-6)
    with_neg, _, _ = info_nce(o, p, p.clone(), 0.05)  # negatives identical to positives: strictly harder
    assert with_neg.item() > plain.item() + 0.1


# --------------------------------------------------------------------------- adaptive weight


def test_adaptive_weight_capped_branch() -> None:
    l_gen = torch.tensor(2.0, requires_grad=True)
    l_cl = torch.tensor(0.5, requires_grad=True)
    term, w = contrastive_weight(l_gen, l_cl, "adaptive", 1000.0, 1.0)
    # c = 1000 * 0.5 = 500 > 2  ->  c * (2 / 500): value 2.0, d/dL_cl = 1000 * 2/500 = 4
    assert term.item() == pytest.approx(2.0)
    assert w == pytest.approx(4.0)
    term.backward()
    assert l_cl.grad.item() == pytest.approx(4.0)
    assert l_gen.grad is None  # the rescale factor is detached


def test_adaptive_weight_uncapped_branch() -> None:
    l_gen = torch.tensor(100.0)
    l_cl = torch.tensor(0.01, requires_grad=True)
    term, w = contrastive_weight(l_gen, l_cl, "adaptive", 1000.0, 1.0)
    # c = 1000 * 0.01 = 10 <= 100: unchanged, w = lambda
    assert term.item() == pytest.approx(10.0)
    assert w == pytest.approx(1000.0)
    term.backward()
    assert l_cl.grad.item() == pytest.approx(1000.0)


def test_adaptive_weight_small_lambda_and_fixed() -> None:
    l_gen, l_cl = torch.tensor(3.0), torch.tensor(2.0, requires_grad=True)
    term, w = contrastive_weight(l_gen, l_cl, "adaptive", 1.0, 9.0)  # c = 2 <= 3: w = lambda = 1
    assert (term.item(), w) == (pytest.approx(2.0), pytest.approx(1.0))
    term, w = contrastive_weight(l_gen, l_cl, "fixed", 1000.0, 0.3)
    assert term.item() == pytest.approx(0.6)
    assert w == pytest.approx(0.3)
    term.backward()
    assert l_cl.grad.item() == pytest.approx(0.3)


# --------------------------------------------------------------------------- pooling

PAD = 1000.0  # a pad value that changes every answer if a pad position is used


def _padded(side: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Two sequences [1, 2, 3] and [4, 6] (H=1), padded; and the prompt span ending at [2] and [4]."""
    if side == "right":
        hidden = torch.tensor([[1.0, 2.0, 3.0, PAD], [4.0, 6.0, PAD, PAD]])
        mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]])
        span_end = torch.tensor([1, 0])
    else:
        hidden = torch.tensor([[PAD, 1.0, 2.0, 3.0], [PAD, PAD, 4.0, 6.0]])
        mask = torch.tensor([[0, 1, 1, 1], [0, 0, 1, 1]])
        span_end = torch.tensor([2, 2])
    return hidden.unsqueeze(-1), mask, span_end


@pytest.mark.parametrize("side", ["right", "left"])
@pytest.mark.parametrize(
    ("how", "full", "prompt"),
    [("last", [3.0, 6.0], [2.0, 4.0]), ("mean", [2.0, 5.0], [1.5, 4.0]), ("max", [3.0, 6.0], [2.0, 4.0])],
)
def test_pool_is_mask_aware(side: str, how: str, full: list[float], prompt: list[float]) -> None:
    hidden, mask, span_end = _padded(side)
    assert pool(hidden, mask, how).squeeze(-1).tolist() == pytest.approx(full)
    assert pool(hidden, mask, how, span_end).squeeze(-1).tolist() == pytest.approx(prompt)


def test_pool_rejects_empty_span() -> None:
    hidden, mask, _ = _padded("left")
    with pytest.raises(ValueError, match="no token"):
        pool(hidden, mask, "last", torch.tensor([0, 0]))


# --------------------------------------------------------------------------- collator


def test_collator_docstring_example(minilm_tok: Any) -> None:
    row = {"pair_id": "x", "original_prompt": "Is it good?", "target": "yes"}
    longer = {"pair_id": "y", "original_prompt": "Is it good? Really good?", "target": "yes"}
    b = PairCollator(minilm_tok, "sft")([row, longer])
    assert b.input_ids[0].tolist() == [101, 2003, 2009, 2204, 1029, 1001, 1001, 1001, 3433, 1024, 2748, 102, 0, 0, 0, 0][
        : b.input_ids.size(1)
    ]
    assert b.labels[0, :12].tolist() == [-100] * 10 + [2748, 102]
    assert (b.labels[0, 12:] == -100).all()
    assert b.last_index[0].item() == 11 and b.prompt_len[0].item() == 10
    assert b.resp_cols[b.resp_rows == 0].tolist() == [9, 10]


@pytest.mark.parametrize(("method", "groups"), [("coin", 3), ("cit", 2), ("sft", 1)])
def test_collator_layout_and_masking(minilm_tok: Any, method: str, groups: int) -> None:
    rows = make_rows(3)
    b = PairCollator(minilm_tok, method, cutoff_len=64)(rows)
    cols = [("original_prompt", "target"), ("paraphrase_prompt", "target"), ("negative_prompt", "negative_target")]
    assert b.input_ids.shape[0] == groups * 3 and b.n_pairs == 3
    assert b.pair_ids == [r["pair_id"] for r in rows]
    for g in range(groups):
        for i, r in enumerate(rows):
            enc = encode(minilm_tok, r[cols[g][0]], r[cols[g][1]], max_length=64)
            k, n = g * 3 + i, len(enc.input_ids)
            assert b.input_ids[k, :n].tolist() == enc.input_ids
            assert b.attention_mask[k].tolist() == [1] * n + [0] * (b.input_ids.size(1) - n)
            assert (b.input_ids[k, n:] == minilm_tok.pad_token_id).all()
            assert b.last_index[k].item() == n - 1 and b.prompt_len[k].item() == enc.n_prompt
            if g < 2:  # -100 exactly on prompt and pads
                assert (b.labels[k, : enc.n_prompt] == -100).all()
                assert b.labels[k, enc.n_prompt : n].tolist() == enc.input_ids[enc.n_prompt :]
                assert (b.labels[k, n:] == -100).all()
            else:  # negatives: no generation loss
                assert (b.labels[k] == -100).all()
    # every supervised label is predicted by exactly one (row, col) position, from col = label position - 1
    assert b.resp_rows.numel() == int((b.labels != -100).sum())
    assert torch.equal(b.resp_targets, b.labels[b.resp_rows, b.resp_cols + 1])
    assert (b.resp_rows < 2 * 3).all()


def test_collator_without_hard_negatives_and_truncation(minilm_tok: Any) -> None:
    rows = make_rows(2)
    rows[0]["original_prompt"] = "word " * 200
    b = PairCollator(minilm_tok, "coin", cutoff_len=32, hard_negatives=False)(rows)
    assert b.groups == ("original", "paraphrase") and b.input_ids.shape == (4, 32)
    assert b.labels[0, -2:].tolist() == minilm_tok("positive", add_special_tokens=False)["input_ids"] + [
        minilm_tok.eos_token_id
    ]


# --------------------------------------------------------------------------- loss on tiny models


def _full_logits_gen_loss(model: torch.nn.Module, b: Any) -> torch.Tensor:
    logits = model(input_ids=b.input_ids, attention_mask=b.attention_mask).logits  # (N, T, V)
    total = torch.zeros(())
    for g in range(2):
        rows = slice(g * b.n_pairs, (g + 1) * b.n_pairs)
        shifted = logits[rows, :-1].reshape(-1, logits.size(-1))
        total = total + F.cross_entropy(shifted, b.labels[rows, 1:].reshape(-1), ignore_index=-100)
    return total


@pytest.mark.parametrize("tiny", TINY_DIRS)
def test_gen_loss_from_selected_logits_equals_full_logits(request: pytest.FixtureRequest, tiny: str) -> None:
    bb = load_backbone(str(request.getfixturevalue(tiny)), device="cpu")
    bb.model.eval()
    b = PairCollator(bb.tokenizer, "coin", cutoff_len=64)(make_rows(3))
    with torch.no_grad():
        _, logits = selected_logits(bb.model, b.input_ids, b.attention_mask, b.resp_rows, b.resp_cols)
        assert logits.shape == (b.resp_rows.numel(), len(bb.tokenizer))  # only K positions, not N*T
        ours, n = generation_loss(logits, b.resp_targets, b.resp_rows, b.n_pairs, b.groups)
        reference = _full_logits_gen_loss(bb.model, b)
    assert n == int((b.labels != -100).sum())
    assert ours.item() == pytest.approx(reference.item(), rel=1e-5)


@pytest.mark.parametrize("tiny", ["tiny_llama_dir", "tiny_gpt2_dir"])
@pytest.mark.parametrize(("pooling", "span"), [("last", "full"), ("mean", "prompt")])
def test_coin_step_loss_on_tiny_models(request: pytest.FixtureRequest, tiny: str, pooling: str, span: str) -> None:
    bb = load_backbone(str(request.getfixturevalue(tiny)), device="cpu")
    cfg = cfg_for("coin", pooling=pooling, pool_span=span)
    model = apply_lora(bb, cfg.lora)
    b = PairCollator.from_settings(bb.tokenizer, cfg, 64)(make_rows(3))
    loss, m = coin_step_loss(model, b, cfg)
    assert set(m) >= {"loss", "l_gen", "l_cl", "w", "pos_cos", "neg_cos", "n_tokens"}
    assert math.isfinite(loss.item()) and m["l_gen"] > 0 and m["l_cl"] > 0
    assert m["loss"] == pytest.approx(m["l_gen"] + m["w"] * m["l_cl"], rel=1e-4)
    assert m["n_tokens"] == float(b.attention_mask.sum())
    loss.backward()
    lora_grads = [p.grad for n, p in model.named_parameters() if "lora_" in n and p.grad is not None]
    assert lora_grads and any(g.abs().sum() > 0 for g in lora_grads)


def test_cit_and_sft_have_no_contrastive_term(tiny_llama_dir: Path) -> None:
    bb = load_backbone(str(tiny_llama_dir), device="cpu")
    model = apply_lora(bb, cfg_for().lora)
    rows = make_rows(3)
    for method in ("cit", "sft"):
        cfg = cfg_for(method)
        b = PairCollator.from_settings(bb.tokenizer, cfg, 64)(rows)
        loss, m = coin_step_loss(model, b, cfg)
        assert m["loss"] == pytest.approx(m["l_gen"]) and m["w"] == 0.0
        assert (b.input_ids.size(0), math.isnan(m["l_cl"])) == ((6, False) if method == "cit" else (3, True))
    coin_b = PairCollator.from_settings(bb.tokenizer, cfg_for("coin"), 64)(rows)
    _, coin_m = coin_step_loss(model, coin_b, cfg_for("coin"))
    assert coin_m["loss"] > coin_m["l_gen"]


# --------------------------------------------------------------------------- LoRA set-up


def test_apply_lora_auto_choices(tiny_bert_encoder_dir: Path, tiny_llama_dir: Path) -> None:
    bert = load_backbone(str(tiny_bert_encoder_dir), device="cpu")
    modules, uncovered = newly_initialised_modules(bert.model, bert.newly_initialised)
    assert modules == ["cls.predictions.transform"]
    assert uncovered == ["cls.predictions.bias", "cls.predictions.decoder.bias"]
    peft_cfg = apply_lora(bert, LoraSettings()).peft_config["default"]
    assert set(peft_cfg.target_modules) == {"query", "value"}
    assert set(peft_cfg.modules_to_save) == {"cls.predictions.transform"}

    llama = load_backbone(str(tiny_llama_dir), device="cpu")
    peft_cfg = apply_lora(llama, LoraSettings()).peft_config["default"]
    assert set(peft_cfg.target_modules) == {"q_proj", "v_proj"} and not peft_cfg.modules_to_save


def test_apply_lora_explicit_and_unknown_architecture(tiny_llama_dir: Path) -> None:
    llama = load_backbone(str(tiny_llama_dir), device="cpu")
    model = apply_lora(llama, LoraSettings(target_modules=["k_proj", "o_proj"], modules_to_save=["lm_head"]))
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    assert any("k_proj.lora_A" in n for n in names) and not any("q_proj.lora" in n for n in names)
    assert any("lm_head.modules_to_save" in n for n in names)

    class Mystery(torch.nn.Module):
        config = type("Cfg", (), {"model_type": "mystery-net"})()

    from coin.modeling.backbone import Backbone

    with pytest.raises(ValueError, match="train.lora.target_modules"):
        apply_lora(Backbone(Mystery(), llama.tokenizer, "x"), LoraSettings())


# --------------------------------------------------------------------------- batches


def test_batches_seeded_train_only_and_cycling() -> None:
    rows = make_rows(6) + make_rows(2, split="val")
    train_rows = train_rows_of(rows, 2)
    assert len(train_rows) == 6
    take = lambda seed: [[r["pair_id"] for r in b] for _, b in zip(range(7), iterate_batches(train_rows, 2, seed))]  # noqa: E731
    a, again, other = take(1), take(1), take(2)
    assert a == again and a != other
    epoch = sorted(pid for batch in a[:3] for pid in batch)
    assert epoch == sorted(r["pair_id"] for r in train_rows)  # one epoch = every train row once
    assert all(len(set(batch)) == 2 for batch in a)
    with pytest.raises(ValueError, match="batch_size"):
        train_rows_of(make_rows(1) + make_rows(5, split="val"), 2)


# --------------------------------------------------------------------------- the loop


def _snapshot(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def _base_name(peft_name: str) -> str:
    return peft_name.replace(".base_layer", "")


def test_train_updates_lora_only_and_saves(tiny_llama_dir: Path, tmp_path: Path) -> None:
    bb = load_backbone(str(tiny_llama_dir), device="cpu")
    before = _snapshot(bb.model)
    logged: list[tuple[int, dict[str, float]]] = []
    cfg = cfg_for("coin", max_steps=3, grad_accum=2, lr=5e-3, log_every=2)
    rows = make_rows(6) + make_rows(2, split="val")
    result = train(bb, rows, cfg, out_dir=tmp_path, seed=0, cutoff_len=64,
                   on_metrics=lambda s, m: logged.append((s, m)), progress=False)

    assert [s for s, _ in logged] == [2, 3] and result.steps == 3 and len(result.history) == 3
    for key in ("loss", "l_gen", "l_cl", "w", "pos_cos", "neg_cos", "lr", "tokens_per_s"):
        assert math.isfinite(logged[-1][1][key]), key
    assert logged[0][1]["lr"] > logged[1][1]["lr"] > 0  # linear decay after warm-up
    assert result.tokens_per_s > 0 and result.wall_time_s > 0

    torch.manual_seed(0)  # train() seeds with its seed before apply_lora: the same LoRA init
    ref = load_backbone(str(tiny_llama_dir), device="cpu")
    apply_lora(ref, cfg.lora)  # injects LoRA layers into ref.model in place, as train() does to bb.model
    init = _snapshot(ref.model)
    n_lora, frozen = 0, 0
    for name, p in bb.model.named_parameters():
        if "lora_" in name:
            assert p.requires_grad and not torch.equal(p.detach(), init[name]), name
            n_lora += 1
        else:
            assert torch.equal(p.detach(), before[_base_name(name)]), name
            frozen += 1
    assert n_lora == 2 * 2 * 2 and frozen == len(before)  # 2 layers x (q, v) x (A, B)
    files = {f.name for f in result.adapter_dir.iterdir()}
    assert {"adapter_config.json", "adapter_model.safetensors", "tokenizer_config.json"} <= files


def test_train_nan_loss_names_step_and_pairs(
    tiny_llama_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import coin.training.loop as loop

    real = loop.coin_step_loss

    def poisoned(model: Any, batch: Any, cfg: Any) -> Any:
        loss, m = real(model, batch, cfg)
        return loss * float("nan"), {**m, "loss": float("nan")}

    monkeypatch.setattr(loop, "coin_step_loss", poisoned)
    bb = load_backbone(str(tiny_llama_dir), device="cpu")
    with pytest.raises(RuntimeError, match=r"step 1: .*sst2:train:\d+:a0:b1"):
        train(bb, make_rows(4), cfg_for(max_steps=2), out_dir=tmp_path, seed=0, cutoff_len=64, progress=False)


@pytest.mark.parametrize("tiny", ["tiny_bert_encoder_dir", "tiny_gpt2_dir"])
def test_adapter_round_trip_gives_identical_logits(request: pytest.FixtureRequest, tiny: str, tmp_path: Path) -> None:
    path = str(request.getfixturevalue(tiny))
    bb = load_backbone(path, device="cpu", seed=0)
    cfg = cfg_for("coin", max_steps=2, lr=1e-2)
    result = train(bb, make_rows(4), cfg, out_dir=tmp_path, seed=0, cutoff_len=64, progress=False)
    b = PairCollator(bb.tokenizer, "sft", cutoff_len=64)(make_rows(3))
    with torch.no_grad():
        trained = bb.model(input_ids=b.input_ids, attention_mask=b.attention_mask).logits

    fresh = load_backbone(path, device="cpu", seed=123)  # another seed: newly initialised heads differ
    with torch.no_grad():
        base = fresh.model(input_ids=b.input_ids, attention_mask=b.attention_mask).logits
        assert not torch.allclose(base, trained, atol=1e-4)
        loaded = load_adapter(fresh, result.adapter_dir)
        assert not loaded.training
        again = loaded(input_ids=b.input_ids, attention_mask=b.attention_mask).logits
    torch.testing.assert_close(again, trained, rtol=0, atol=1e-6)
