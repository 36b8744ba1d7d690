"""Quantised bases (``model.quantization``: none | 8bit | 4bit, ``model.double_quant``): the settings, the refusal
when bitsandbytes cannot serve them, loading, LoRA training through the project's own loop on top of them, the
adapter loaded back on a base quantised the same way (coin_model.json), the embedded MiniLM quantised, and a
registered 4-bit adapter answering through the MLflow pyfunc.

bitsandbytes >= 0.46 runs 8-bit and 4-bit layers on CPU as well, so everything here really runs on CPU; the tests
that need it are skipped, saying so, only where bitsandbytes is not installed."""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from helpers_training import adapter_tensors, cfg_for, make_rows

from coin.config import ConfigError, Settings, load_settings
from coin.modeling import backbone as backbone_mod
from coin.modeling.adapter import load_trained, read_meta, write_meta
from coin.modeling.backbone import load_backbone, quantization_of
from coin.registry.errors import ModelUnavailable

ROOT = Path(__file__).resolve().parents[1]
HAVE_BNB = importlib.util.find_spec("bitsandbytes") is not None
needs_bnb = pytest.mark.skipif(not HAVE_BNB, reason="bitsandbytes is not installed (a project dependency: "
                                                    "pip install -e . installs it)")

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _settings(backbone: str, quantization: str) -> Settings:
    lora = {"r": 4, "alpha": 8, "dropout": 0.0}
    if "llama" in backbone:
        lora["target_modules"] = ["q_proj", "v_proj"]
    return Settings.model_validate({
        "model": {"backbone": backbone, "device": "cpu", "quantization": quantization},
        "train": {"methods": ["coin"], "max_steps": 2, "batch_size": 2, "lr": 1e-2, "checkpoint_every": 0,
                  "autocast": "off", "lora": lora},
        "register": {"methods": ["coin"]},
    })


def _logits(model, tok) -> torch.Tensor:
    enc = tok(["Is this review positive?\nA fine film.", "Say something"], return_tensors="pt", padding=True)
    with torch.no_grad():
        return model(input_ids=enc.input_ids, attention_mask=enc.attention_mask).logits


# --------------------------------------------------------------------------- settings


def test_the_settings_default_to_an_unquantised_base():
    m = Settings.model_validate({}).model
    assert (m.quantization, m.double_quant) == ("none", True)
    m = Settings.model_validate({"model": {"quantization": "4bit", "double_quant": False}}).model
    assert (m.quantization, m.double_quant) == ("4bit", False)


@pytest.mark.parametrize(("model", "key"), [({"quantization": "3bit"}, "model.quantization"),
                                            ({"quantization": 4}, "model.quantization"),
                                            ({"quantization": "nf4"}, "model.quantization"),
                                            ({"double_quant": "maybe"}, "model.double_quant")])
def test_bad_values_are_refused_naming_the_key(model, key):
    with pytest.raises(ConfigError, match=rf"{key}"):
        Settings.model_validate({"model": model})


# --------------------------------------------------------------------------- bitsandbytes missing / no backend


def _no_bitsandbytes():
    raise ImportError("No module named 'bitsandbytes'")


def _params(tmp_path: Path, quantization: str) -> Path:
    p = tmp_path / "params.yaml"
    p.write_text((ROOT / "params.yaml").read_text().replace("quantization: none", f"quantization: {quantization}"))
    return p


@pytest.mark.parametrize("quantization", ["8bit", "4bit"])
def test_without_bitsandbytes_the_settings_are_refused_before_any_work(tmp_path, monkeypatch, quantization):
    monkeypatch.setattr(backbone_mod, "_import_bitsandbytes", _no_bitsandbytes)
    with pytest.raises(ConfigError, match=rf"model.quantization = '{quantization}' needs bitsandbytes, which is not "
                                          r"installed.*install it \(pip install 'bitsandbytes>=0.46.1', a project "
                                          r"dependency\); or set model.quantization: none"):
        load_settings(_params(tmp_path, quantization))
    load_settings(_params(tmp_path, "none"))  # an unquantised base needs nothing


def test_without_bitsandbytes_the_loader_refuses_before_loading(tiny_llama_dir, monkeypatch):
    monkeypatch.setattr(backbone_mod, "_import_bitsandbytes", _no_bitsandbytes)

    def never(*a, **kw):
        raise AssertionError("a model was loaded")

    monkeypatch.setattr("transformers.AutoModelForCausalLM.from_pretrained", never)
    with pytest.raises(ConfigError, match=r"model.quantization = '4bit' needs bitsandbytes.*model.quantization: none"):
        load_backbone(str(tiny_llama_dir), device="cpu", quantization="4bit")


def test_without_bitsandbytes_a_quantised_adapter_names_its_coin_model_json(tmp_path, monkeypatch, tiny_llama_dir):
    monkeypatch.setattr(backbone_mod, "_import_bitsandbytes", _no_bitsandbytes)
    write_meta(tmp_path, {"base": str(tiny_llama_dir), "quantization": "4bit", "double_quant": True})
    with pytest.raises(ModelUnavailable, match=r"coin_model.json: quantization = '4bit' needs bitsandbytes.*install "
                                               r"it \(pip install 'bitsandbytes>=0.46.1'.*trained on a base "
                                               r"quantised so"):
        load_trained(tmp_path, device="cpu")


def test_without_a_backend_for_the_device_the_settings_are_refused(tmp_path, monkeypatch):
    fake = SimpleNamespace(__version__="0.50.2", supported_torch_devices={"cuda"})
    monkeypatch.setattr(backbone_mod, "_import_bitsandbytes", lambda: fake)
    with pytest.raises(ConfigError, match=r"model.quantization = '4bit' has no bitsandbytes 0.50.2 backend for device "
                                          r"'cpu' \(it supports cuda\): set model.device to one of those; or set "
                                          r"model.quantization: none"):
        load_settings(_params(tmp_path, "4bit"))
    old = SimpleNamespace(__version__="0.42.0", supported_torch_devices={"cpu"})
    monkeypatch.setattr(backbone_mod, "_import_bitsandbytes", lambda: old)
    with pytest.raises(ConfigError, match=r"needs bitsandbytes >= 0.46.1, this is 0.42.0: upgrade it"):
        load_settings(_params(tmp_path, "4bit"))


def test_the_cli_exits_with_the_configuration_code_and_the_fix(tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from coin.cli import ExitCode, app

    monkeypatch.setattr(backbone_mod, "_import_bitsandbytes", _no_bitsandbytes)
    res = CliRunner().invoke(app, ["train", "--params", str(_params(tmp_path, "none")),
                                   "--set", "model.quantization=4bit"])
    assert res.exit_code == ExitCode.CONFIG, res.output
    flat = " ".join(res.output.split())
    assert "model.quantization = '4bit' needs bitsandbytes" in flat and "set model.quantization: none" in flat
    assert not (tmp_path / "outputs").exists()  # nothing ran


# --------------------------------------------------------------------------- loading


@needs_bnb
@pytest.mark.parametrize(("quantization", "double_quant", "layer"),
                         [("4bit", True, "Linear4bit"), ("4bit", False, "Linear4bit"), ("8bit", True, "Linear8bitLt")])
def test_a_quantised_base_loads_with_its_head_in_full_precision(tiny_llama_dir, quantization, double_quant, layer):
    bb = load_backbone(str(tiny_llama_dir), device="cpu", quantization=quantization, double_quant=double_quant)
    q_proj = bb.model.model.layers[0].self_attn.q_proj
    assert type(q_proj).__name__ == layer
    assert type(bb.model.lm_head) is torch.nn.Linear and bb.model.lm_head.weight.dtype == torch.float32
    assert quantization_of(bb.model) == bb.quantization == quantization
    assert bb.double_quant == (double_quant and quantization == "4bit")
    if quantization == "4bit":
        assert q_proj.weight.quant_state.quant_type == "nf4"
        assert q_proj.weight.quant_state.nested == double_quant  # double quantisation: quantised constants
        assert q_proj.weight.quant_state.dtype == torch.float32  # the compute dtype: model.dtype auto on CPU
    logits = _logits(bb.model, bb.tokenizer)
    assert torch.isfinite(logits).all()
    plain = load_backbone(str(tiny_llama_dir), device="cpu")
    assert not torch.equal(logits, _logits(plain.model, plain.tokenizer))  # really quantised...
    torch.testing.assert_close(logits, _logits(plain.model, plain.tokenizer), atol=0.5, rtol=0.1)  # ...the same model


@needs_bnb
def test_a_checkpoint_saved_quantised_loads_only_as_saved(tiny_llama_dir, tmp_path):
    """A checkpoint saved quantised (a "-bnb-4bit" upload) loads as it was saved whatever model.quantization says:
    coin_model.json recorded the setting, not the model, and with quantization none on this CPU the 4-bit model
    crashed in bitsandbytes' bf16 re-packing ("shape '[32, 0]' is invalid"). Refused at load and in the plan, naming
    the settings to use; loaded as saved when they agree."""
    from coin.modeling.memory import plan_training

    saved = {}
    for q in ("4bit", "8bit"):
        bb = load_backbone(str(tiny_llama_dir), device="cpu", quantization=q, double_quant=False)
        saved[q] = tmp_path / f"saved{q}"
        bb.model.save_pretrained(saved[q])
        bb.tokenizer.save_pretrained(saved[q])
    with pytest.raises(ConfigError, match=r"saved quantised .*4bit\), but model.quantization = none.*set "
                                          r"model.quantization: 4bit, model.double_quant: false"):
        load_backbone(str(saved["4bit"]), device="cpu")
    with pytest.raises(ConfigError, match=r"but model.double_quant = true; .*model.double_quant: false"):
        load_backbone(str(saved["4bit"]), device="cpu", quantization="4bit", double_quant=True)
    with pytest.raises(ConfigError, match=r"8bit\), but model.quantization = 4bit"):
        load_backbone(str(saved["8bit"]), device="cpu", quantization="4bit")
    with pytest.raises(ConfigError, match="but model.quantization = none"):  # before the plan counts it at fp32
        plan_training(_settings(str(saved["8bit"]), "none"), device="cpu")
    bb = load_backbone(str(saved["4bit"]), device="cpu", quantization="4bit", double_quant=False)
    assert quantization_of(bb.model) == bb.quantization == "4bit"
    assert torch.isfinite(_logits(bb.model, bb.tokenizer)).all()  # the CPU path, not the re-packing that crashed
    config = json.loads((saved["4bit"] / "config.json").read_text())
    config["quantization_config"]["quant_method"] = "gptq"
    (saved["4bit"] / "config.json").write_text(json.dumps(config))
    with pytest.raises(ConfigError, match="gptq.*bitsandbytes only: give the unquantised checkpoint"):
        load_backbone(str(saved["4bit"]), device="cpu", quantization="4bit")


@needs_bnb
def test_a_checkpoint_without_some_body_weights_is_refused_naming_them(tiny_llama_dir, tmp_path):
    import shutil

    from safetensors.torch import load_file, save_file

    ckpt = tmp_path / "partial"
    shutil.copytree(tiny_llama_dir, ckpt)
    weights = load_file(str(ckpt / "model.safetensors"))
    del weights["model.layers.1.mlp.up_proj.weight"]
    save_file(weights, str(ckpt / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(ConfigError, match=r"model.quantization = '4bit': the checkpoint has no weights for "
                                          r"model.layers.1.mlp.up_proj.*model.quantization: none"):
        load_backbone(str(ckpt), device="cpu", quantization="4bit")


# --------------------------------------------------------------------------- training and loading back


def _train(backbone: str, quantization: str, out: Path):
    """Two optimiser steps of coin through the pipeline's own entry (load_backbone, train(), coin_model.json)."""
    from coin.stages import train_adapter

    return train_adapter(_settings(backbone, quantization), make_rows(4), "coin", out, progress=False)


@needs_bnb
@pytest.mark.parametrize("quantization", ["4bit", "8bit"])
def test_lora_trains_on_a_quantised_base_and_reloads_to_the_same_logits(tiny_llama_dir, tmp_path, quantization,
                                                                        monkeypatch):
    seen = {}
    real_load = backbone_mod.load_backbone

    def spy(*a, **kw):  # keep the trained in-memory model to compare with the reloaded one
        seen["bb"] = real_load(*a, **kw)
        return seen["bb"]

    monkeypatch.setattr(backbone_mod, "load_backbone", spy)  # what train_adapter imports when it runs
    result = _train(str(tiny_llama_dir), quantization, tmp_path)
    monkeypatch.undo()
    losses = [h["loss"] for h in result.history]
    assert len(losses) == 2 and all(math.isfinite(v) for v in losses)
    lora = {k: v for k, v in adapter_tensors(result.adapter_dir).items() if "lora_" in k}
    assert lora and all(bool(v.abs().sum() > 0) for k, v in lora.items() if "lora_B" in k)  # B starts at zero
    meta = read_meta(result.adapter_dir)
    assert meta["quantization"] == quantization and meta["double_quant"] == (quantization == "4bit")

    trained = seen["bb"].model
    assert quantization_of(trained) == quantization and not trained.training
    model, tok, _ = load_trained(result.adapter_dir, device="cpu")
    assert quantization_of(model) == quantization  # loaded the way it was trained, from coin_model.json
    torch.testing.assert_close(_logits(model, tok), _logits(trained, tok), atol=1e-5, rtol=1e-5)


@needs_bnb
def test_gradient_checkpointing_on_a_4bit_base_gives_the_same_steps(tiny_llama_dir, tmp_path):
    """prepare_model_for_kbit_training leaves gradient checkpointing to train.gradient_checkpointing."""
    from coin.training.loop import train

    history = {}
    for gc in (False, True):
        bb = load_backbone(str(tiny_llama_dir), device="cpu", quantization="4bit")
        cfg = cfg_for(max_steps=2, lr=1e-2, gradient_checkpointing=gc,
                      lora={"r": 4, "alpha": 8, "dropout": 0.0, "target_modules": ["q_proj", "v_proj"]})
        result = train(bb, make_rows(4), cfg, out_dir=tmp_path / str(gc), seed=0, cutoff_len=64, progress=False)
        history[gc] = [v for h in result.history for v in (h["loss"], h["grad_norm"])]
        assert bb.model.is_activation_checkpointing == gc
    assert history[True] == pytest.approx(history[False], rel=1e-5)


@needs_bnb
@pytest.mark.parametrize("quantization", ["4bit", "8bit"])
def test_the_embedded_minilm_trains_quantised_with_its_new_head_in_full(tmp_path, quantization):
    """MiniLM is a BERT encoder run as a decoder: its LM-head transform is newly initialised. Quantised like the
    body it would be left a float tensor inside a bitsandbytes layer (whose forward fails); it stays in full
    precision and is trained in full (modules_to_save), the body's linear layers are quantised."""
    bb = load_backbone("minilm", device="cpu", quantization=quantization)
    layer = {"4bit": "Linear4bit", "8bit": "Linear8bitLt"}[quantization]
    assert type(bb.model.bert.encoder.layer[0].attention.self.query).__name__ == layer
    assert type(bb.model.cls.predictions.transform.dense) is torch.nn.Linear
    result = _train("minilm", quantization, tmp_path)
    assert all(math.isfinite(h["loss"]) for h in result.history)
    saved = adapter_tensors(result.adapter_dir)
    assert any("cls.predictions.transform" in k for k in saved)  # the new head, trained in full
    model, tok, meta = load_trained(result.adapter_dir, device="cpu")
    assert (meta["quantization"], meta["attention"], meta["readout"]) == (quantization, "prefix", "mean")
    assert type(model.get_base_model().bert.encoder.layer[0].attention.self.query.base_layer).__name__ == layer


# --------------------------------------------------------------------------- registry


@needs_bnb
def test_an_adapter_trained_on_a_4bit_base_registers_and_predicts(tiny_llama_dir, tmp_path):
    """A real MLflow store in tmp_path: the logged pyfunc loads the base 4-bit (coin_model.json) and answers as the
    adapter loaded directly does; the version is tagged with its quantisation."""
    import mlflow
    import pandas as pd
    from mlflow import MlflowClient

    from coin.predict import answer_rows
    from coin.registry.register import log_candidate
    from coin.registry.tracking import setup_tracking

    settings = Settings.model_validate({"paths": {"mlruns_dir": str(tmp_path / "mlruns")},
                                        "tracking": {"experiment": "q"}})
    setup_tracking(settings, tmp_path)
    result = _train(str(tiny_llama_dir), "4bit", tmp_path / "train")
    with mlflow.start_run() as run:
        pass
    reg = log_candidate(result.adapter_dir, run.info.run_id, "tiny-4bit")
    client = MlflowClient()
    tags = client.get_model_version("tiny-4bit", reg.version).tags
    assert tags["coin.quantization"] == "4bit"
    assert mlflow.models.get_model_info(reg.model_uri).metadata["coin_quantization"] == "4bit"

    rows = pd.DataFrame({"instruction": ["Is this 'positive' or 'negative'? "], "input": ["what a film"],
                         "task": ["sst2"]})
    pyfunc = mlflow.pyfunc.load_model(reg.model_uri)
    assert quantization_of(pyfunc.unwrap_python_model().model) == "4bit"
    got = pyfunc.predict(rows, params={"return_scores": True})
    model, tok, meta = load_trained(result.adapter_dir, device="cpu")
    want = answer_rows(model, tok, meta, rows, max_new_tokens=7)
    assert got["answer"].iloc[0] == want["answer"].iloc[0]
    got_scores, want_scores = json.loads(got["scores"].iloc[0]), json.loads(want["scores"].iloc[0])
    assert got_scores.keys() == want_scores.keys()
    for k in want_scores:
        assert got_scores[k] == pytest.approx(want_scores[k], abs=1e-4)
