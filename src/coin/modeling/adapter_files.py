"""What an adapter directory holds, without loading anything (no torch): the files that make it, whether it has
its weights, and its content hash. :mod:`coin.modeling.adapter` loads it."""

from __future__ import annotations

import hashlib
from pathlib import Path

META_FILE = "coin_model.json"  # the adapter's record: base model, attention, readout, calibration, ...
ADAPTER_WEIGHTS = ("*.safetensors", "*.bin")  # peft's weight files
ADAPTER_FILES = (META_FILE, "adapter_config.json", *ADAPTER_WEIGHTS)  # what makes an adapter and what it computes


def _glob(adapter_dir: Path, patterns: tuple[str, ...]) -> list[Path]:
    return sorted({p for pat in patterns for p in Path(adapter_dir).glob(pat) if p.is_file()})


def has_adapter(adapter_dir: Path) -> bool:
    """An adapter that loads: its config *and* its weights (a study cell brought back from a GPU machine without
    its weights, as ``experiments/gpu_study.sh`` packs all but ADAPTERS_OF, has only the config)."""
    return (Path(adapter_dir) / "adapter_config.json").is_file() and bool(_glob(adapter_dir, ADAPTER_WEIGHTS))


def adapter_sha256(adapter_dir: Path) -> str:
    """Content hash of an adapter's :data:`ADAPTER_FILES` (the evaluation records it with a model's figures;
    registration checks that the adapter it logs is the one evaluated; the evaluation cache keys adapters by it)."""
    h = hashlib.sha256()
    for f in _glob(adapter_dir, ADAPTER_FILES):
        h.update(f.name.encode() + b"\0" + f.read_bytes())
    return h.hexdigest()
