"""Registry round trip in a temp MLflow store: log adapter -> register -> champion -> pyfunc predict."""

from pathlib import Path

import pandas as pd
import pytest

from coin.config import LoraSettings, Settings
from coin.data.tasks import TASKS
from coin.modeling.adapter import write_meta
from coin.modeling.backbone import load_backbone
from coin.modeling.lora import apply_lora
from coin.registry.register import log_and_register
from coin.registry.tracking import data_version, setup_tracking, tracking_uri

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture()
def store(tmp_path):
    settings = Settings.model_validate({"paths": {"mlruns_dir": str(tmp_path / "mlruns")}, "tracking": {"experiment": "t"}})
    setup_tracking(settings, tmp_path)
    return settings


def _adapter(tiny_llama_dir: Path, out: Path) -> Path:
    bb = load_backbone(str(tiny_llama_dir), seed=0)
    model = apply_lora(bb, LoraSettings(r=4, alpha=8))
    with __import__("torch").no_grad():  # make the adapter non-trivial so loading it matters
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.add_(0.05)
    adapter = out / "adapter"
    model.save_pretrained(str(adapter))
    bb.tokenizer.save_pretrained(str(adapter))
    write_meta(adapter, {"base": str(tiny_llama_dir), "dtype": "float32", "seed": 0, "method": "coin",
                         "prompt_format": "train", "append_eos": True})
    return adapter


def test_tracking_uri_defaults_to_sqlite_in_mlruns(tmp_path):
    s = Settings.model_validate({})
    assert tracking_uri(s, tmp_path) == f"sqlite:///{tmp_path.resolve() / 'mlruns' / 'mlflow.db'}"
    assert len(data_version(ROOT)) == 36 and data_version(ROOT).endswith(".dir")


def test_register_roundtrip_champion_and_idempotent(store, tmp_path, tiny_llama_dir):
    import mlflow
    from mlflow import MlflowClient

    adapter = _adapter(tiny_llama_dir, tmp_path)
    with mlflow.start_run() as run:
        mlflow.log_param("x", 1)
    reg = log_and_register(adapter, run.info.run_id, "tiny-coin")
    assert reg.created and reg.version == "1" and reg.aliases == ["champion"]
    client = MlflowClient()
    assert client.get_model_version_by_alias("tiny-coin", "champion").run_id == run.info.run_id

    # same run again: no second version
    again = log_and_register(adapter, run.info.run_id, "tiny-coin")
    assert not again.created and again.version == "1"
    assert len(client.search_model_versions("name = 'tiny-coin'")) == 1

    # a second run becomes challenger, the champion stays
    with mlflow.start_run() as run2:
        pass
    second = log_and_register(adapter, run2.info.run_id, "tiny-coin")
    assert second.version == "2" and second.aliases == ["challenger"]
    assert str(client.get_model_version_by_alias("tiny-coin", "champion").version) == "1"

    model = mlflow.pyfunc.load_model("models:/tiny-coin@champion")
    out = model.predict(pd.DataFrame({"instruction": ["Is this 'positive' or 'negative'? "],
                                      "input": ["what a film"], "task": ["sst2"]}))
    assert out["answer"].iloc[0] in TASKS["sst2"].label_words
    assert set(__import__("json").loads(out["scores"].iloc[0])) == set(TASKS["sst2"].label_words)
    free = model.predict(pd.DataFrame({"instruction": ["Say something: "], "input": ["hi"]}),
                         params={"max_new_tokens": 3})
    assert isinstance(free["answer"].iloc[0], str) and free["scores"].iloc[0] == ""
