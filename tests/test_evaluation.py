"""Robustness evaluation: label-word scoring, sampling, metrics, instruction files, runner outputs.

Tiny randomly initialised models (built here from configs, saved with the MiniLM tokenizer) keep
this fast on CPU; the fixtures are local so the file does not depend on a shared conftest.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pandas as pd
import pytest
import torch

from coin.config import EvaluateSettings
from coin.data.io import DataError
from coin.evaluation.instructions import PERTURBATION_LEVELS, load_instruction_sets, perturbation_level
from coin.evaluation.metrics import compute_metrics
from coin.evaluation.runner import EvalResult, evaluate_model, write_eval_outputs
from coin.evaluation.sampling import SplitUnavailable, sample_examples
from coin.evaluation.scoring import loglik_scores, predict_labels
from coin.modeling.backbone import Backbone, load_backbone, load_tokenizer

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "data"
INSTRUCTIONS = DATA / "promptbench" / "coin_perturbed_instructions.json"

PROMPTS = [
    "Classify the sentiment as 'positive' or 'negative': a gripping, beautifully shot film",
    "Is this 'entailment'? Sentence 1: The cat sat. Sentence 2: A cat was sitting on the mat all day long.",
    "ok",
    "Determine whether the two sentences are equivalent: Sentence 1: He left early. Sentence 2: He departed.",
    "Grammar check, answer 'acceptable' or 'unacceptable': The book was wrote by him.",
]
LABELS = ["positive", "negative", "not_entailment"]  # 1, 1 and 5 WordPiece tokens
MARKERS = {"train": "\n\n### Response:\n", "reference": "### Response:"}


# --------------------------------------------------------------------------- fixtures


def _save_tiny(kind: str, path: Path) -> Path:
    from transformers import BertConfig, BertLMHeadModel, LlamaConfig, LlamaForCausalLM

    tok = load_tokenizer("minilm")
    torch.manual_seed(0)
    if kind == "llama":
        cfg = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                          bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                          pad_token_id=tok.pad_token_id, initializer_range=0.3)
        model = LlamaForCausalLM(cfg)
    else:
        cfg = BertConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, max_position_embeddings=512, is_decoder=True,
                         initializer_range=0.3)
        model = BertLMHeadModel(cfg)
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def eval_tiny_dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("eval_tiny")
    return {k: _save_tiny(k, root / k) for k in ("llama", "bert")}


@pytest.fixture(scope="session")
def eval_llama(eval_tiny_dirs: dict[str, Path]) -> Backbone:
    return load_backbone(str(eval_tiny_dirs["llama"]), device="cpu")


@pytest.fixture(scope="session")
def eval_bert(eval_tiny_dirs: dict[str, Path]) -> Backbone:
    return load_backbone(str(eval_tiny_dirs["bert"]), device="cpu")


def _settings(**kw) -> EvaluateSettings:
    base = {"instruction_file": str(INSTRUCTIONS), "batch_size": 16}
    return EvaluateSettings(**{**base, **kw})


# --------------------------------------------------------------------------- scoring


def _hand_scores(model, tok, prompts: list[str], labels: list[str], marker: str, shift: int = 0) -> torch.Tensor:
    """Full-vocabulary forward per (prompt, label), log_softmax, summed over the label tokens.

    ``shift=1`` reads the log-probs one position too late: the off-by-one the real check must catch.
    """
    out = torch.zeros(len(prompts), len(labels))
    for i, p in enumerate(prompts):
        p_ids = [tok.bos_token_id] + tok(p + marker, add_special_tokens=False)["input_ids"]
        for j, w in enumerate(labels):
            w_ids = tok(w, add_special_tokens=False)["input_ids"]
            ids = torch.tensor([p_ids + w_ids])
            with torch.no_grad():
                logp = torch.log_softmax(model(input_ids=ids).logits[0].float(), dim=-1)
            n = len(p_ids)
            out[i, j] = sum(logp[n - 1 + k + shift, t] for k, t in enumerate(w_ids[: len(w_ids) - shift]))
    return out


@pytest.mark.parametrize("kind,fmt", [("llama", "train"), ("bert", "reference"), ("bert", "train")])
def test_loglik_matches_hand_computation(kind: str, fmt: str, request: pytest.FixtureRequest) -> None:
    bb: Backbone = request.getfixturevalue(f"eval_{kind}")
    bb.model.eval()
    got = loglik_scores(bb.model, bb.tokenizer, PROMPTS, LABELS, fmt=fmt, batch_size=4)
    want = _hand_scores(bb.model, bb.tokenizer, PROMPTS, LABELS, MARKERS[fmt])
    assert got.shape == (len(PROMPTS), len(LABELS))
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-5)
    # the comparison is sharp: an off-by-one position or a dropped label token would not pass it
    off_by_one = _hand_scores(bb.model, bb.tokenizer, PROMPTS, LABELS, MARKERS[fmt], shift=1)
    assert (got - off_by_one).abs().max() > 0.1
    assert got[:, 2].mean() < got[:, 0].mean() - 5  # 5 label tokens cost more than 1


def test_length_normalise_divides_by_label_tokens(eval_llama: Backbone) -> None:
    m, tok = eval_llama.model, eval_llama.tokenizer
    total = loglik_scores(m, tok, PROMPTS[:2], LABELS, batch_size=8)
    per_token = loglik_scores(m, tok, PROMPTS[:2], LABELS, batch_size=8, length_normalise=True)
    n_tok = torch.tensor([len(tok(w, add_special_tokens=False)["input_ids"]) for w in LABELS], dtype=torch.float32)
    assert n_tok.tolist() == [1, 1, 5]
    torch.testing.assert_close(per_token, total / n_tok)


@pytest.mark.parametrize("kind", ["llama", "bert"])
def test_batching_invariance(kind: str, request: pytest.FixtureRequest) -> None:
    bb: Backbone = request.getfixturevalue(f"eval_{kind}")
    one = loglik_scores(bb.model, bb.tokenizer, PROMPTS, LABELS, batch_size=1)
    seven = loglik_scores(bb.model, bb.tokenizer, PROMPTS, LABELS, batch_size=7)
    torch.testing.assert_close(one, seven, atol=1e-5, rtol=1e-5)
    preds = predict_labels(bb.model, bb.tokenizer, PROMPTS, LABELS, batch_size=3)
    assert preds.tolist() == one.argmax(dim=1).tolist()


def test_scoring_restores_training_mode_and_works_through_peft(eval_llama: Backbone) -> None:
    from peft import LoraConfig, get_peft_model

    base = loglik_scores(eval_llama.model, eval_llama.tokenizer, PROMPTS[:2], LABELS, batch_size=4)
    peft_model = get_peft_model(eval_llama.model, LoraConfig(r=2, target_modules=["q_proj", "v_proj"]))
    try:
        peft_model.train()
        wrapped = loglik_scores(peft_model, eval_llama.tokenizer, PROMPTS[:2], LABELS, batch_size=4)
        assert peft_model.training  # evaluation switched to eval() and back
    finally:
        eval_llama.model = peft_model.unload()  # the session fixture gets its plain model back
    torch.testing.assert_close(wrapped, base, atol=1e-5, rtol=1e-5)  # LoRA B starts at zero


# --------------------------------------------------------------------------- sampling


def test_sample_is_seeded_sorted_and_capped() -> None:
    rows, caveat = sample_examples(DATA, "rte", 20, seed=7)
    again, _ = sample_examples(DATA, "rte", 20, seed=7)
    other, _ = sample_examples(DATA, "rte", 20, seed=8)
    assert caveat is None
    ids = [r["example_id"] for r in rows]
    assert ids == [r["example_id"] for r in again]
    assert ids != [r["example_id"] for r in other]
    assert len(ids) == len(set(ids)) == 20
    assert [int(i.split(":")[1]) for i in ids] == sorted(int(i.split(":")[1]) for i in ids)
    every, _ = sample_examples(DATA, "wnli", 1000, seed=7)
    assert len(every) == 71  # n = min(n, available)


def test_mnli_uses_marked_fallback_from_both_files() -> None:
    rows, caveat = sample_examples(DATA, "mnli", 200, seed=42)
    assert caveat and "fallback" in caveat
    stems = {r["example_id"].split(":")[0] for r in rows}
    assert stems == {"mnli.validation_matched.textfooler1000", "mnli.validation_mismatched.textfooler1000"}


def test_qqp_sampling_raises_split_unavailable() -> None:
    with pytest.raises(SplitUnavailable) as exc:
        sample_examples(DATA, "qqp", 10, seed=0)
    assert exc.value.task == "qqp" and "no validation split" in exc.value.reason


# --------------------------------------------------------------------------- metrics


def _preds(task: str, set_name: str, correct_per_instruction: list[int], n_examples: int) -> list[dict]:
    rows = []
    for i, n_ok in enumerate(correct_per_instruction):
        for e in range(n_examples):
            label = e % 2
            rows.append({"task": task, "set": set_name, "instruction_id": i, "example_id": f"x{e}",
                         "label": label, "pred": label if e < n_ok else 1 - label})
    return rows


def test_metrics_on_hand_built_table() -> None:
    preds = pd.DataFrame(
        _preds("sst2", "clean", [3, 1], 4)             # 75, 25 -> mean 50, std 25 (ddof 1 would be 35.36)
        + _preds("sst2", "textfooler", [4, 2, 0], 4)   # 100, 50, 0 -> mean 50, std sqrt(5000/3)
        + _preds("rte", "clean", [5, 5], 5)             # 100, 100 -> mean 100, std 0
        + _preds("rte", "textfooler", [1, 2, 3], 5)     # 20, 40, 60 -> mean 40, std sqrt(800/3)
    )
    table, nested = compute_metrics(preds)
    get = lambda t, s: table[(table.task == t) & (table.set == s)].iloc[0]  # noqa: E731
    assert get("sst2", "clean").acc_mean == pytest.approx(50.0)
    assert get("sst2", "clean").acc_std == pytest.approx(25.0)
    assert get("sst2", "textfooler").acc_std == pytest.approx(math.sqrt(5000 / 3))
    assert get("rte", "textfooler").acc_mean == pytest.approx(40.0)
    assert get("rte", "textfooler").acc_std == pytest.approx(math.sqrt(800 / 3))
    assert (get("rte", "textfooler").n_examples, get("rte", "textfooler").n_instructions) == (5, 3)
    # avg over tasks, per set
    assert get("avg", "clean").acc_mean == pytest.approx(75.0)
    assert get("avg", "clean").acc_std == pytest.approx(12.5)
    assert get("avg", "textfooler").acc_mean == pytest.approx(45.0)
    assert nested["sst2"]["clean"] == {"acc_mean": 50.0, "acc_std": 25.0, "n": 4, "n_instructions": 2}
    assert nested["avg"]["textfooler"]["n"] == 9


def test_metrics_reject_duplicate_rows() -> None:
    rows = _preds("sst2", "clean", [1], 2)
    with pytest.raises(ValueError, match="duplicate"):
        compute_metrics(pd.DataFrame(rows + rows[:1]))


# --------------------------------------------------------------------------- instruction files


def test_instruction_sets_load_and_levels() -> None:
    sets = load_instruction_sets(INSTRUCTIONS, ["clean", "checklist"], ["sst2", "qqp"])
    assert set(sets) == {"clean", "checklist"} and set(sets["clean"]) == {"sst2", "qqp"}
    assert all(len(v) == 6 for s in sets.values() for v in s.values())
    assert sets["clean"]["sst2"] != sets["checklist"]["sst2"]
    assert [perturbation_level(s) for s in PERTURBATION_LEVELS] == ["clean", "character", "word", "sentence", "semantic"]
    assert perturbation_level("mine") == "custom"


def _good_doc() -> dict:
    return {"perturbations": {"clean": {"sst2": ["Rate it: ", "Say: "]}, "textfooler": {"sst2": ["Rat it: "]}}}


def test_good_custom_instruction_file_loads(tmp_path: Path) -> None:
    """The base document of the malformed cases is valid: each failure below is its mutation's."""
    good = tmp_path / "good.json"
    good.write_text(json.dumps(_good_doc()), encoding="utf-8")
    assert load_instruction_sets(good, ["clean", "textfooler"], ["sst2"]) == _good_doc()["perturbations"]


@pytest.mark.parametrize(
    "mutate,expect",
    [
        (lambda d: "{not json", ["bad JSON"]),
        (lambda d: {"label_set": {}}, ["'perturbations'"]),
        (lambda d: {"perturbations": {"clean": d["perturbations"]["clean"]}}, ["'textfooler'"]),
        (lambda d: {"perturbations": {**d["perturbations"], "textfooler": {"cola": ["x"]}}},
         ["set 'textfooler'", "task 'sst2'", "perturbations.textfooler.sst2"]),
        (lambda d: {"perturbations": {**d["perturbations"], "textfooler": {"sst2": ["ok", 3]}}},
         ["set 'textfooler'", "task 'sst2'", "perturbations.textfooler.sst2[1]"]),
        (lambda d: {"perturbations": {**d["perturbations"], "clean": {"sst2": ["  "]}}},
         ["set 'clean'", "task 'sst2'", "perturbations.clean.sst2[0]"]),
        (lambda d: {"perturbations": {**d["perturbations"], "clean": {"sst2": []}}},
         ["set 'clean'", "task 'sst2'", "non-empty list"]),
    ],
    ids=["not-json", "no-perturbations", "set-missing", "task-missing", "non-string", "blank", "empty-list"],
)
def test_malformed_instruction_file_is_rejected(tmp_path: Path, mutate, expect: list[str]) -> None:
    doc = mutate(_good_doc())
    path = tmp_path / "instr.json"
    path.write_text(doc if isinstance(doc, str) else json.dumps(doc), encoding="utf-8")
    with pytest.raises(DataError) as exc:
        load_instruction_sets(path, ["clean", "textfooler"], ["sst2"])
    msg = str(exc.value)
    assert str(path) in msg
    for part in expect:
        assert part in msg, msg


# --------------------------------------------------------------------------- runner


@pytest.fixture(scope="module")
def small_run(eval_llama: Backbone) -> EvalResult:
    cfg = _settings(tasks=["qqp", "wnli", "mnli"], instruction_sets=["clean", "textfooler"], samples_per_task=3)
    return evaluate_model(eval_llama.model, eval_llama.tokenizer, cfg, data_dir=DATA, seed=42, model_label="tiny")


def test_runner_skips_qqp_with_reason_and_marks_mnli(small_run: EvalResult) -> None:
    assert set(small_run.skipped) == {"qqp"}
    assert "no validation split" in small_run.skipped["qqp"]
    assert set(small_run.caveats) == {"mnli"} and "fallback" in small_run.caveats["mnli"]
    assert small_run.tasks == ["wnli", "mnli"]
    assert set(small_run.predictions["task"]) == {"wnli", "mnli"}
    assert len(small_run.predictions) == 2 * 2 * 6 * 3  # tasks x sets x instructions x examples
    assert small_run.examples_per_s > 0 and small_run.wall_time_s > 0


def test_runner_uses_identical_sample_for_every_set_and_instruction(small_run: EvalResult) -> None:
    p = small_run.predictions
    for task, grp in p.groupby("task"):
        samples = {key: tuple(sorted(g["example_id"])) for key, g in grp.groupby(["set", "instruction_id"])}
        assert len(samples) == 12
        assert len(set(samples.values())) == 1, f"{task}: different samples across sets/instructions"
        rows, _ = sample_examples(DATA, task, 3, seed=42)
        assert next(iter(samples.values())) == tuple(sorted(r["example_id"] for r in rows))
    assert set(p["level"]) == {"clean", "word"}
    assert (p["pred_word"].notna()).all()


def test_runner_predictions_match_direct_scoring(small_run: EvalResult, eval_llama: Backbone) -> None:
    from coin.data.tasks import get_task

    p = small_run.predictions
    row = p[(p.task == "wnli") & (p.set == "textfooler") & (p.instruction_id == 4)].iloc[1]
    instr = load_instruction_sets(INSTRUCTIONS, ["textfooler"], ["wnli"])["textfooler"]["wnli"][4]
    ex = {r["example_id"]: r for r in sample_examples(DATA, "wnli", 3, seed=42)[0]}[row.example_id]
    spec = get_task("wnli")
    direct = loglik_scores(eval_llama.model, eval_llama.tokenizer, [instr + spec.render_content(ex)],
                           list(spec.label_words), batch_size=1)[0]
    assert row.scores == pytest.approx(direct.tolist(), abs=1e-3)
    assert row.pred == int(direct.argmax()) and row.label == ex["label"]


def test_all_tasks_skipped_is_a_clear_error(eval_llama: Backbone) -> None:
    cfg = _settings(tasks=["qqp"], samples_per_task=2)
    with pytest.raises(ValueError, match="no task could be evaluated.*qqp"):
        evaluate_model(eval_llama.model, eval_llama.tokenizer, cfg, data_dir=DATA, seed=0, model_label="x")


def test_write_eval_outputs(small_run: EvalResult, tmp_path: Path) -> None:
    other = EvalResult(**{**small_run.__dict__, "model_label": "tiny-2"})
    paths = write_eval_outputs([small_run, other], tmp_path / "eval")
    for key in ("metrics", "predictions", "table", "plot"):
        assert paths[key].exists() and paths[key].stat().st_size > 0, key
    metrics = json.loads(paths["metrics"].read_text())
    assert set(metrics) == {"tiny", "tiny-2"}
    assert set(metrics["tiny"]) == {"wnli", "mnli", "avg"}
    cell = metrics["tiny"]["wnli"]["textfooler"]
    want = small_run.metrics.set_index(["task", "set"]).loc[("wnli", "textfooler")]
    assert cell["acc_mean"] == pytest.approx(want.acc_mean, abs=1e-3) and cell["n"] == 3
    lines = paths["predictions"].read_text().splitlines()
    assert len(lines) == 2 * len(small_run.predictions)
    first = json.loads(lines[0])
    assert {"model", "task", "set", "instruction_id", "example_id", "label", "pred", "scores"} <= set(first)
    table = paths["table"].read_text()
    assert table.count("### tiny") == 2  # one block per model ("### tiny" also prefixes "### tiny-2")
    assert "| mnli† |" in table and "| wnli |" in table and "**avg**" in table
    assert "† mnli: fallback" in table and "Skipped qqp" in table
    assert f"{want.acc_mean:.1f} ± {want.acc_std:.1f}" in table
    assert paths["plot"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
