"""``pairs.cutoff_len`` longer than the backbone reads is refused, naming the key, by the validation stage (from
the config alone) and by training, before any work: the gate would pass rows training cannot embed."""

from __future__ import annotations

from pathlib import Path

import pytest
from helpers_training import cfg_for, make_rows

from coin.config import ConfigError, load_settings
from coin.modeling.backbone import config_positions, load_backbone
from coin.training.loop import train

ROOT = Path(__file__).resolve().parents[1]


def test_positions_from_the_config_and_the_minilm_default():
    assert config_positions("minilm") == 512


def test_training_refuses_a_cutoff_beyond_the_positions(tiny_llama_dir: Path, tmp_path: Path):
    assert config_positions(str(tiny_llama_dir)) == 512
    with pytest.raises(ConfigError, match=r"pairs.cutoff_len = 600 is longer than model.backbone = .* reads \(512 "
                                          r"positions\); set pairs.cutoff_len to at most 512"):
        train(load_backbone(str(tiny_llama_dir), device="cpu"), make_rows(4), cfg_for("sft", batch_size=2,
              max_steps=1), out_dir=tmp_path / "t", seed=0, cutoff_len=600, progress=False)
    assert not (tmp_path / "t").exists()


def test_the_validation_stage_refuses_it_before_gating(tmp_path: Path):
    from coin.stages import stage_validate

    params = tmp_path / "params.yaml"
    params.write_text((ROOT / "params.yaml").read_text())
    settings = load_settings(params, [f"paths.data_dir={ROOT / 'data'}", "pairs.cutoff_len=1024"])
    with pytest.raises(ConfigError, match="pairs.cutoff_len = 1024 is longer than model.backbone = 'minilm'"):
        stage_validate(settings, tmp_path)
    assert not (tmp_path / "outputs").exists()
