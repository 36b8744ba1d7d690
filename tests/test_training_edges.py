"""Training settings at their edges: a later method failing after an earlier one trained, a warm-up as long as the
run, batches that cannot keep an example apart, and what a resumed run logs against a fresh one."""
from __future__ import annotations

import logging
import re
import shutil
from pathlib import Path

import pytest
from helpers_training import adapter_tensors, cfg_for, make_rows

from coin.modeling.backbone import load_backbone
from coin.training.loop import train

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _settings(model_dir: Path, methods: list[str], **train):
    from coin.config import Settings

    return Settings.model_validate({
        "model": {"backbone": str(model_dir), "device": "cpu"},
        "train": {"methods": methods, "max_steps": 2, "batch_size": 2, "checkpoint_every": 1, "autocast": "off",
                  "lora": {"r": 4, "alpha": 8, "target_modules": ["q_proj", "v_proj"]}, **train},
        "register": {"methods": methods}, "study": {"methods": ["base", *methods]}})


def test_a_failed_second_method_keeps_the_first_in_the_index(tiny_llama_dir: Path, tmp_path: Path) -> None:
    from coin import stages
    from coin.data.io import read_json, write_jsonl

    s = _settings(tiny_llama_dir, ["sft", "cit"])
    write_jsonl(stages.Layout(tmp_path, s).valid_file, make_rows(4))
    stages.stage_train(s, tmp_path)
    stages.stage_train(_settings(tiny_llama_dir, ["cit"], lr=2e-3), tmp_path)  # cit's checkpoints: another lr
    with pytest.raises(ValueError, match="cannot resume"):
        stages.stage_train(_settings(tiny_llama_dir, ["sft", "cit"], resume=True), tmp_path)  # sft done, cit refused
    assert (tmp_path / "outputs/train/sft/train.json").exists()
    assert "sft" in read_json(tmp_path / "outputs/train/train.json")["runs"]


def test_adding_a_method_trains_only_that_method(tiny_llama_dir: Path, tmp_path: Path, caplog, monkeypatch) -> None:
    """`coin train` / `dvc repro` (one stage for every method): adding cit to train.methods retrained sft to the same
    weights under a new MLflow run, which the register stage then registered again as a new version. A method whose
    params, pairs, code and saved adapter are unchanged is kept; any of them changed trains it again."""
    from coin import stages
    from coin.data.io import read_json, write_jsonl

    real_reads = stages.stage_reads
    write_jsonl(stages.Layout(tmp_path, _settings(tiny_llama_dir, ["sft"])).valid_file, make_rows(4))
    out = stages.stage_train(_settings(tiny_llama_dir, ["sft"]), tmp_path)
    first = out["runs"]["sft"]
    assert "kept" not in out
    reads = []
    monkeypatch.setattr(stages, "stage_reads", lambda *a, **k: reads.append(a) or real_reads(*a, **k))
    with caplog.at_level(logging.INFO, logger="coin"):
        out = stages.stage_train(_settings(tiny_llama_dir, ["sft", "cit"]), tmp_path)
    both = out["runs"]
    assert out["kept"] == ["sft"]  # said in the result (bench_pipeline notes it), not written into the index
    assert "kept" not in read_json(tmp_path / "outputs/train/train.json")
    assert len(reads) == 1  # the pairs and code hashed once for the call, not once per method
    assert both["sft"]["run_id"] == first["run_id"] and both["cit"]["run_id"] != first["run_id"]
    assert "train[sft]: unchanged since run" in caplog.text
    assert read_json(tmp_path / "outputs/train/train.json")["runs"]["sft"]["run_id"] == first["run_id"]

    def sft_run(**train) -> str:
        return stages.stage_train(_settings(tiny_llama_dir, ["sft", "cit"], **train), tmp_path)["runs"]["sft"]["run_id"]

    assert sft_run() == first["run_id"]
    # logging and checkpointing settings change nothing a training computes (coin.training.TRAIN_RESULT_FREE_KEYS)
    assert sft_run(log_every=2, checkpoint_every=0, keep_checkpoints=1, gradient_checkpointing=True,
                   resume=True) == first["run_id"]
    assert (lr := sft_run(lr=2e-3)) != first["run_id"]  # another learning rate: trained again
    assert sft_run(lr=2e-3) == lr
    adapter = tmp_path / "outputs/train/sft/adapter/adapter_model.safetensors"
    adapter.write_bytes(adapter.read_bytes())  # the same bytes: kept
    assert sft_run(lr=2e-3) == lr
    shutil.copy(tmp_path / "outputs/train/cit/adapter/adapter_model.safetensors", adapter)  # another adapter there
    assert (swapped := sft_run(lr=2e-3)) != lr
    write_jsonl(stages.Layout(tmp_path, _settings(tiny_llama_dir, ["sft"])).valid_file, make_rows(4)[:3])
    assert (pairs := sft_run(lr=2e-3)) != swapped  # other pairs
    explicit = stages.stage_train(_settings(tiny_llama_dir, ["sft", "cit"], lr=2e-3), tmp_path, "sft")
    assert explicit["runs"]["sft"]["run_id"] != pairs  # one method (the flow, after its own cache key): trained
    (tmp_path / "outputs/train/sft/train.json").unlink()  # what the log line says to do to train it again
    assert (fresh := sft_run(lr=2e-3)) != explicit["runs"]["sft"]["run_id"]
    # its MLflow run deleted (the UI's trash): evaluate and register cannot log into it, so it is trained again
    from mlflow import MlflowClient

    from coin.registry.tracking import tracking_uri

    MlflowClient(tracking_uri=tracking_uri(_settings(tiny_llama_dir, ["sft"]), tmp_path)).delete_run(fresh)
    assert sft_run(lr=2e-3) != fresh


def test_a_warmup_as_long_as_the_run_still_trains(tiny_llama_dir: Path, tmp_path: Path) -> None:
    res = train(load_backbone(str(tiny_llama_dir), device="cpu"), make_rows(4),
                cfg_for("sft", max_steps=1, warmup_ratio=0.6, lr=1e-1), out_dir=tmp_path, seed=0, cutoff_len=64,
                progress=False)
    assert res.history[-1]["lr"] > 0
    assert any(float(v.abs().max()) > 0 for k, v in adapter_tensors(res.adapter_dir).items() if "lora_B" in k)


def test_batches_that_must_repeat_an_example_are_reported(caplog) -> None:
    from coin.training.batching import BatchStream

    rows = [dict(r, example_id=f"ex{i % 3}") for i, r in enumerate(make_rows(8))]  # 3 examples, batches of 4
    with caplog.at_level(logging.WARNING, logger="coin.training.batching"):
        next(BatchStream(rows, 4, 0))
    assert "example" in caplog.text


def test_a_resumed_run_logs_what_a_fresh_run_logs(tiny_llama_dir: Path, tmp_path: Path) -> None:
    import mlflow

    from coin.stages import _train_one

    rows = make_rows(4)

    def s(resume):
        return _settings(tiny_llama_dir, ["sft"], max_steps=5, checkpoint_every=2, log_every=2, resume=resume)

    fresh = _train_one(s(False), tmp_path, rows, "sft")
    shutil.rmtree(tmp_path / "outputs/train/sft/checkpoints/step-0000004")
    again = _train_one(s(True), tmp_path, rows, "sft")
    c = mlflow.MlflowClient()

    def steps(run):
        return sorted(m.step for m in c.get_metric_history(run["run_id"], "train/loss"))

    assert steps(again) == steps(fresh) == [2, 4, 5]


@pytest.mark.parametrize("emptied", [True, False])
def test_training_refuses_the_rows_of_a_failed_gate(tiny_llama_dir: Path, tmp_path: Path, emptied: bool) -> None:
    """The gate writes its valid rows before it raises; `coin validate` then `coin train` trained on them, a task
    whose every row was rejected left out without a word. A valid.jsonl with no summary beside it (a file given by
    hand, --pairs) is read as it is."""
    from coin import stages
    from coin.data.io import DataError, write_json, write_jsonl

    s = _settings(tiny_llama_dir, ["sft"])
    lay = stages.Layout(tmp_path, s)
    write_jsonl(lay.valid_file, make_rows(4))
    per_task = {"wnli": {"train_in": 4, "train_valid": 0}} if emptied else {}
    write_json(lay.validated_dir / "summary.json", {"rows_in": 8, "rows_valid": 4, "pass_rate": 0.5,
                                                    "min_pass_rate": 0.9 if not emptied else 0.1,
                                                    "gate_passed": False, "per_task": per_task})
    with pytest.raises(DataError, match="validation gate failed on these rows") as err:
        stages.stage_train(s, tmp_path)
    assert ("every training row of wnli was rejected" in str(err.value)) == emptied
    assert "rejects.jsonl" in str(err.value) and "rerun `coin validate`" in str(err.value)
    assert not (tmp_path / "outputs/train/sft/adapter").exists()
    from coin.study.cell_train import train_cell

    with pytest.raises(DataError, match="validation gate failed on these rows") as err:
        train_cell(s, "sft", 0, "sft-s0", tmp_path / "cell", lay.valid_file, "cpu", progress=False)
    assert "rerun `coin study`" in str(err.value)  # the command that rebuilds a study's pairs, not coin validate
    # nothing to validate: the pairs are at fault, not the rows or the thresholds
    write_json(lay.validated_dir / "summary.json", {"rows_in": 0, "rows_valid": 0, "pass_rate": 0.0,
                                                    "min_pass_rate": 0.9, "gate_passed": False, "per_task": {}})
    with pytest.raises(DataError, match="no rows to validate") as err:
        stages.stage_train(s, tmp_path)
    assert "thresholds" not in str(err.value) and "coin pairs" in str(err.value)
    (lay.validated_dir / "summary.json").unlink()
    stages.stage_train(s, tmp_path)
    assert (tmp_path / "outputs/train/sft/adapter/adapter_config.json").exists()


def test_training_rows_lacking_a_column_their_method_reads_are_refused_before_the_run(tiny_llama_dir: Path,
                                                                                        tmp_path: Path) -> None:
    """A hand-given valid.jsonl with a null paraphrase_prompt failed mid-run as 'unexpected TypeError ... a bug'
    (or not at all, when the data order never drew the row), a null target trained on an empty answer, and a column
    missing from every row gave "no entry 'paraphrase_prompt'" without the file or row."""
    from coin import stages
    from coin.data.io import DataError, write_jsonl
    from coin.study.cell_train import train_cell

    rows = make_rows(4)
    lay = stages.Layout(tmp_path, _settings(tiny_llama_dir, ["cit"]))
    for column, value, said in (("paraphrase_prompt", None, "None, not a non-empty text"),
                                ("target", " ", "' ', not a non-empty text"), ("paraphrase_prompt", ..., "missing")):
        bad = [dict(r) for r in rows]
        if value is ...:
            del bad[2][column]
        else:
            bad[2][column] = value
        write_jsonl(lay.valid_file, bad)
        want = rf"valid.jsonl: row 3 \(pair_id '{bad[2]['pair_id']}'\): column '{column}' is {re.escape(said)}, " \
               r"and method cit trains on it"
        with pytest.raises(DataError, match=want):
            stages.stage_train(_settings(tiny_llama_dir, ["cit"]), tmp_path)
        with pytest.raises(DataError, match=want):
            train_cell(_settings(tiny_llama_dir, ["cit"]), "cit", 0, "cit-s0", tmp_path / "cell", lay.valid_file,
                       "cpu", progress=False)
        assert not (tmp_path / "outputs/train/cit").exists() and not (tmp_path / "cell").exists()
    # sft reads the originals only: a row without its paraphrase trains
    write_jsonl(lay.valid_file, [{k: v for k, v in r.items() if k != "paraphrase_prompt"} for r in rows])
    stages.stage_train(_settings(tiny_llama_dir, ["sft"]), tmp_path)
    assert (tmp_path / "outputs/train/sft/adapter/adapter_config.json").exists()


def test_a_dropped_methods_folder_is_named(tiny_llama_dir: Path, tmp_path: Path, caplog) -> None:
    """dvc plots drew a dropped method's old loss curve beside the current ones, with nothing to say so."""
    from coin import stages
    from coin.data.io import write_jsonl

    write_jsonl(stages.Layout(tmp_path, _settings(tiny_llama_dir, ["sft"])).valid_file, make_rows(4))
    stages.stage_train(_settings(tiny_llama_dir, ["sft", "cit"]), tmp_path)
    with caplog.at_level(logging.WARNING, logger="coin"):
        stages.stage_train(_settings(tiny_llama_dir, ["sft"]), tmp_path)
    said = [r.getMessage() for r in caplog.records if "not in train.methods" in r.getMessage()]
    assert len(said) == 1 and "'cit'" in said[0] and "outputs/train/cit" in said[0], said
    assert (tmp_path / "outputs/train/cit/loss.csv").exists()  # kept: the user's


def test_append_eos_without_an_eos_token_is_said_and_recorded_as_not_done(tiny_gpt2_dir: Path, tmp_path: Path,
                                                                           caplog) -> None:
    """A tokenizer with no EOS (nor SEP): encode appended nothing, without a word, and coin_model.json said
    "append_eos": true, so every record claimed the model had learnt to stop."""
    import json

    from coin import stages

    base = tmp_path / "noeos"
    shutil.copytree(tiny_gpt2_dir, base)
    cfg = json.loads((base / "tokenizer_config.json").read_text())
    for k in ("eos_token", "sep_token", "bos_token", "cls_token", "unk_token", "mask_token"):
        cfg.pop(k, None)
    cfg["tokenizer_class"] = "PreTrainedTokenizerFast"
    (base / "tokenizer_config.json").write_text(json.dumps(cfg))
    for f in base.glob("special_tokens_map.json"):
        f.unlink()
    s = _settings(base, ["sft"], lora={"r": 4, "alpha": 8, "target_modules": "auto"})
    assert load_backbone(str(base)).tokenizer.eos_token_id is None
    with caplog.at_level(logging.WARNING, logger="coin"):
        stages.train_adapter(s, make_rows(4), "sft", tmp_path / "out", progress=False)
    meta = json.loads((tmp_path / "out" / "adapter" / "coin_model.json").read_text())
    assert meta["append_eos"] is False
    assert "train.append_eos = true, but the tokenizer" in caplog.text
    stages.train_adapter(_settings(tiny_gpt2_dir, ["sft"], lora={"r": 4, "alpha": 8, "target_modules": "auto"}),
                         make_rows(4), "sft", tmp_path / "eos", progress=False)
    assert json.loads((tmp_path / "eos" / "adapter" / "coin_model.json").read_text())["append_eos"] is True


SAVE_ADAPTER = """
import sys
from pathlib import Path
from coin.config import LoraSettings
from coin.modeling.backbone import load_backbone
from coin.modeling.lora import apply_lora
from coin.training.checkpoint import save_adapter
from coin.training.distributed import SINGLE
bb = load_backbone(sys.argv[1], device="cpu", seed=0)
model = apply_lora(bb, LoraSettings(target_modules=["q_proj", "v_proj", "k_proj", "o_proj"]))
save_adapter(model, Path(sys.argv[2]), world=SINGLE)
"""


def test_the_adapter_config_is_the_same_bytes_whatever_the_hash_seed(tiny_llama_dir: Path, tmp_path: Path) -> None:
    """peft writes target_modules in set order, which follows PYTHONHASHSEED: identical trainings wrote
    [v_proj, q_proj] and [q_proj, v_proj], so train.json's adapter_sha256 (and the evaluation cache's key) changed
    between runs that trained the same weights. The saved config is canonical now."""
    import os
    import subprocess
    import sys

    texts = []
    for seed in ("1", "3", "7"):
        out = tmp_path / f"adapter-{seed}"
        env = {**os.environ, "PYTHONHASHSEED": seed, "OMP_NUM_THREADS": "1"}
        subprocess.run([sys.executable, "-c", SAVE_ADAPTER, str(tiny_llama_dir), str(out)], env=env, check=True,
                       timeout=300, capture_output=True)
        texts.append((out / "adapter_config.json").read_text())
    assert texts[0] == texts[1] == texts[2]
    assert '"k_proj",\n    "o_proj",\n    "q_proj",\n    "v_proj"' in texts[0]


def test_an_embedded_minilm_adapter_names_its_base_without_the_install_path(tmp_path: Path) -> None:
    """peft wrote the embedded MiniLM's directory inside the checkout's .venv as the adapter's base (in
    adapter_config.json and its README.md card), so the same training in two clones hashed apart (train.json's
    adapter_sha256, the evaluation cache's key, dvc.lock). The adapter now names it ``minilm``, as coin_model.json
    does, and still loads (load_trained reads coin_model.json) with its trained weights and no warning from peft."""
    import json
    import warnings

    import torch

    from coin import stages
    from coin.modeling.adapter import load_trained
    from coin.modeling.backbone import embedded_minilm_path

    s = _settings(Path("minilm"), ["sft"], max_steps=1, checkpoint_every=0,
                  lora={"r": 4, "alpha": 8, "target_modules": "auto"})
    out = tmp_path / "out"
    stages.train_adapter(s, make_rows(2), "sft", out, progress=False)
    adapter = out / "adapter"
    installed = str(embedded_minilm_path())
    assert json.loads((adapter / "adapter_config.json").read_text())["base_model_name_or_path"] == "minilm"
    assert json.loads((adapter / "coin_model.json").read_text())["base"] == "minilm"
    holding = [f.name for f in adapter.iterdir() if f.is_file() and installed.encode() in f.read_bytes()]
    assert holding == [], f"{holding} still name {installed}"
    assert "base_model: minilm" in (adapter / "README.md").read_text()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model, tok, _ = load_trained(adapter, device="cpu")
    assert not [w for w in caught if "base_model" in str(w.message)], [str(w.message) for w in caught]
    assert any(p.abs().sum() > 0 for n, p in model.named_parameters() if "lora_B" in n)  # the trained weights
    with torch.no_grad():
        logits = model(**tok(["A dull, lifeless film."], return_tensors="pt")).logits
    assert torch.isfinite(logits).all()
