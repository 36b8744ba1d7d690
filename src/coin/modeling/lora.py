"""LoRA adapters on a :class:`~coin.modeling.backbone.Backbone` (peft), and loading them back.

``target_modules='auto'`` uses peft's per-architecture default (``bert``: query/value, ``llama``:
q_proj/v_proj, ``gpt2``: c_attn, ...). ``modules_to_save='auto'`` trains and saves, in full, the
outermost modules whose parameters are *all* newly initialised by ``load_backbone`` (the weights the
checkpoint did not contain), except modules that hold weights tied to the input embeddings. For the
embedded MiniLM that is ``cls.predictions.transform``: it is random on every load, so an adapter
without it would not reproduce its logits (docs/design.md#minilm-as-a-decoder). Newly initialised parameters
outside such a module (MiniLM's ``cls.predictions.bias``, tied to the decoder bias) keep their initial value
and are reported in the log.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from peft.utils import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING
from torch import nn

from coin.modeling.backbone import Backbone, quantization_of

if TYPE_CHECKING:  # settings are duck-typed here: LoRA applies without pydantic (bench/gpu_check.py)
    from coin.config import LoraSettings

log = logging.getLogger(__name__)


def default_target_modules(model: nn.Module) -> list[str]:
    """peft's default LoRA targets for ``model.config.model_type``, or a ValueError that says what to set."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    targets = TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING.get(model_type)
    if not targets:
        raise ValueError(
            f"train.lora.target_modules = 'auto': peft has no default LoRA target modules for architecture "
            f"{model_type!r} ({type(model).__name__}). Set train.lora.target_modules to a list of module names, "
            f"e.g. the attention projections such as ['q_proj', 'v_proj']."
        )
    return list(targets)


def _input_embedding_params(model: nn.Module) -> set[int]:
    get = getattr(model, "get_input_embeddings", None)
    emb = get() if callable(get) else None
    return {id(p) for p in emb.parameters()} if emb is not None else set()


def newly_initialised_modules(model: nn.Module, newly_initialised: list[str]) -> tuple[list[str], list[str]]:
    """``(modules, uncovered)``: the outermost modules made only of newly initialised parameters.

    A module qualifies when it has parameters, all of them are in ``newly_initialised`` (tied aliases
    resolved: ``named_parameters(remove_duplicate=False)``), none is tied to the input embeddings,
    and it is not the whole model. ``uncovered`` lists the newly initialised parameter names that no
    qualifying module contains (they stay frozen at their initial value).
    """
    if not newly_initialised:
        return [], []
    wanted = set(newly_initialised)
    new_ids = {id(p) for n, p in model.named_parameters(remove_duplicate=False) if n in wanted}
    tied = _input_embedding_params(model)

    def qualifies(m: nn.Module) -> bool:
        params = list(m.parameters())
        return bool(params) and all(id(p) in new_ids and id(p) not in tied for p in params)

    chosen: list[str] = []
    for name, module in model.named_modules():
        if not name or any(name.startswith(c + ".") for c in chosen):
            continue
        if qualifies(module):
            chosen.append(name)
    covered = {id(p) for c in chosen for p in model.get_submodule(c).parameters()}
    uncovered = sorted(
        n for n, p in model.named_parameters(remove_duplicate=False) if n in wanted and id(p) not in covered
    )
    return chosen, uncovered


def _uses_conv1d(model: nn.Module, targets: list[str]) -> bool:
    """GPT-2 style ``Conv1D`` targets store weights transposed: peft needs ``fan_in_fan_out``."""
    from transformers.pytorch_utils import Conv1D

    return any(
        isinstance(m, Conv1D) and any(name == t or name.endswith("." + t) for t in targets)
        for name, m in model.named_modules()
    )


def _report_uncovered(model: nn.Module, uncovered: list[str]) -> None:
    params = dict(model.named_parameters(remove_duplicate=False))
    for name in uncovered:
        p = params[name]
        state = "stays at zeros" if bool(torch.all(p == 0)) else "keeps its seeded initial value"
        log.info("newly initialised %s is tied or shared and not trained; it %s", name, state)


def lora_config(backbone: Backbone, cfg: LoraSettings) -> LoraConfig:
    """The peft ``LoraConfig`` for ``cfg``, with the 'auto' choices resolved."""
    model = backbone.model
    targets = default_target_modules(model) if cfg.target_modules == "auto" else list(cfg.target_modules)
    if cfg.modules_to_save == "auto":
        to_save, uncovered = newly_initialised_modules(model, backbone.newly_initialised)
        _report_uncovered(model, uncovered)
    else:
        to_save = list(cfg.modules_to_save)
    if to_save:
        log.info("modules trained and saved in full (modules_to_save): %s", ", ".join(to_save))
    return LoraConfig(
        r=cfg.r,
        lora_alpha=cfg.alpha,
        lora_dropout=cfg.dropout,
        target_modules=targets,
        modules_to_save=to_save or None,
        fan_in_fan_out=_uses_conv1d(model, targets),
        task_type="CAUSAL_LM",
    )


def apply_lora(backbone: Backbone, cfg: LoraSettings) -> PeftModel:
    """Wrap ``backbone.model`` (in place) with trainable LoRA layers; everything else is frozen.

    On a quantised base (``model.quantization``) peft's ``prepare_model_for_kbit_training`` runs first: it
    freezes the base and casts its half-precision non-quantised weights (norms, embeddings, head) to float32 for
    stable training. Gradient checkpointing stays ``train.gradient_checkpointing``'s to decide (the training loop).
    """
    if quantization_of(backbone.model) != "none":
        from peft import prepare_model_for_kbit_training

        prepare_model_for_kbit_training(backbone.model, use_gradient_checkpointing=False)  # in place
    peft_model = get_peft_model(backbone.model, lora_config(backbone, cfg))
    n_train = sum(p.numel() for p in peft_model.parameters() if p.requires_grad)
    n_all = sum(p.numel() for p in peft_model.parameters())
    log.info("LoRA: %d trainable of %d parameters (%.3f%%)", n_train, n_all, 100.0 * n_train / max(n_all, 1))
    return peft_model


def load_adapter(backbone: Backbone, adapter_dir: str | Path) -> PeftModel:
    """A saved adapter on a freshly loaded backbone, in eval mode, for inference."""
    adapter_dir = Path(adapter_dir)
    if not (adapter_dir / "adapter_config.json").exists():
        raise FileNotFoundError(f"{adapter_dir}: no adapter_config.json; expected a directory written by coin train")
    model = PeftModel.from_pretrained(backbone.model, str(adapter_dir), is_trainable=False)
    model.eval()
    return model
