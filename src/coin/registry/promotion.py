"""Robustness-gated promotion: a registered candidate (alias ``challenger``) becomes ``champion`` only if
it is measurably more robust than the current champion without giving up clean accuracy.

The rule (:func:`decide_promotion`, a pure function on numbers), with accuracies in the units of the
evaluation's ``metrics.json`` (percent) and both thresholds in percentage points:

- no champion yet: promote;
- champion evaluated under another protocol (sample, sets, instructions, scoring; both recorded): do
  not promote, say why (the figures are not comparable);
- else promote iff ``candidate.perturbed_acc - champion.perturbed_acc >= min_improvement`` *and* that
  gain is > 0 (a tie never replaces the champion, even with ``min_improvement = 0``), *and*
  ``champion.clean_acc - candidate.clean_acc <= max_clean_drop``.

Differences are rounded to 6 decimals before comparing, so figures read back from registry tags
(strings) give exactly the decision made from the floats.

:func:`promote_version` applies the rule in the MLflow registry. Every version carries its own figures
as tags (``coin.clean_acc``, ``coin.perturbed_acc``), the champion's figures are read back from *its*
tags, and the decision, its reason, both models' figures and the thresholds are written to the
candidate version's tags (``coin.promotion.*``) and description. The decision can therefore be
re-derived from the registry alone (:func:`decision_from_tags`). Re-running it for a version that
already has a decision changes nothing and returns the recorded decision.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

log = logging.getLogger("coin")

CHAMPION = "champion"
CHALLENGER = "challenger"

TAG_CLEAN = "coin.clean_acc"
TAG_PERTURBED = "coin.perturbed_acc"
TAG_PROTOCOL = "coin.eval_protocol"
TAG_DECISION = "coin.promotion.decision"
TAG_REASON = "coin.promotion.reason"
TAG_CHAMPION_VERSION = "coin.promotion.champion_version"
TAG_CHAMPION_CLEAN = "coin.promotion.champion_clean_acc"
TAG_CHAMPION_PERTURBED = "coin.promotion.champion_perturbed_acc"
TAG_MIN_IMPROVEMENT = "coin.promotion.min_improvement"
TAG_MAX_CLEAN_DROP = "coin.promotion.max_clean_drop"
NONE = "none"
_DIGITS = 6


class PromotionError(RuntimeError):
    """The registry lacks what the gate needs (e.g. a champion without recorded figures)."""


@dataclass(frozen=True)
class ModelFigures:
    """The two figures the gate compares, in percent: clean accuracy and mean perturbed accuracy, and the
    evaluation protocol they were measured under (``coin.evaluation.result.evaluation_protocol``; None
    when unknown, e.g. a version registered before protocols were recorded)."""

    clean_acc: float
    perturbed_acc: float
    protocol: str | None = None

    def __post_init__(self) -> None:
        for name in ("clean_acc", "perturbed_acc"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
                raise ValueError(f"{name} = {v!r}: must be a finite number (accuracy in percent)")

    @classmethod
    def from_summary(cls, summary: Mapping[str, Any], *, source: str = "robustness summary") -> ModelFigures:
        """From :func:`coin.evaluation.robustness_summary`'s dict (extra keys are ignored)."""
        missing = [k for k in ("clean_acc", "perturbed_acc") if k not in summary]
        if missing:
            raise PromotionError(f"{source} lacks {missing}; has {sorted(summary)}. "
                                 "It must give clean_acc and perturbed_acc (percent).")
        try:
            return cls(float(summary["clean_acc"]), float(summary["perturbed_acc"]))
        except (TypeError, ValueError) as exc:
            raise PromotionError(f"{source}: {exc}") from None

    def to_tags(self) -> dict[str, str]:
        tags = {TAG_CLEAN: _fmt(self.clean_acc), TAG_PERTURBED: _fmt(self.perturbed_acc)}
        return {**tags, TAG_PROTOCOL: self.protocol} if self.protocol else tags

    def rounded(self) -> ModelFigures:
        """As read back from tags (``_DIGITS`` decimals)."""
        return ModelFigures(round(self.clean_acc, _DIGITS), round(self.perturbed_acc, _DIGITS), self.protocol)


@dataclass(frozen=True)
class PromotionDecision:
    promote: bool
    reason: str
    candidate: ModelFigures
    champion: ModelFigures | None          # None: there was no champion
    champion_version: str | None
    min_improvement: float
    max_clean_drop: float

    @property
    def decision(self) -> str:
        return "promoted" if self.promote else "rejected"

    def to_tags(self) -> dict[str, str]:
        """The version tags that record this decision (all strings, as MLflow stores them)."""
        champ = self.champion
        return {
            **self.candidate.to_tags(),
            TAG_DECISION: self.decision,
            TAG_REASON: self.reason,
            TAG_CHAMPION_VERSION: self.champion_version or NONE,
            TAG_CHAMPION_CLEAN: _fmt(champ.clean_acc) if champ else NONE,
            TAG_CHAMPION_PERTURBED: _fmt(champ.perturbed_acc) if champ else NONE,
            TAG_MIN_IMPROVEMENT: _fmt(self.min_improvement),
            TAG_MAX_CLEAN_DROP: _fmt(self.max_clean_drop),
        }

    def description(self) -> str:
        """The model version's description: decision, reason and both models' figures."""
        c = self.candidate
        lines = [f"Promotion gate: {self.decision.upper()}. {self.reason}", "",
                 "| model | clean acc (%) | mean perturbed acc (%) |", "|---|---|---|",
                 f"| this version (candidate) | {_fmt(c.clean_acc)} | {_fmt(c.perturbed_acc)} |"]
        if self.champion is not None:
            lines.append(f"| champion (version {self.champion_version}) | {_fmt(self.champion.clean_acc)} | "
                         f"{_fmt(self.champion.perturbed_acc)} |")
        else:
            lines.append("| champion | none | none |")
        if c.protocol:
            lines += ["", f"Evaluation protocol: {c.protocol}."]
        lines += ["", f"Rule: promote iff perturbed gain >= {_fmt(self.min_improvement)} pp (and > 0) and clean drop "
                      f"<= {_fmt(self.max_clean_drop)} pp (register.min_improvement / register.max_clean_drop)."]
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["decision"] = self.decision
        return d


def _fmt(x: float) -> str:
    """A float as a tag string that parses back to the same decision (``repr`` of the rounded value)."""
    return repr(round(float(x), _DIGITS))


def decide_promotion(candidate: ModelFigures, champion: ModelFigures | None, *, min_improvement: float,
                     max_clean_drop: float, champion_version: str | None = None) -> PromotionDecision:
    """The gate on numbers alone (see the module docstring for the rule)."""
    if min_improvement < 0 or max_clean_drop < 0:
        raise ValueError(f"min_improvement = {min_improvement}, max_clean_drop = {max_clean_drop}: both must be >= 0")

    def decision(promote: bool, reason: str) -> PromotionDecision:
        return PromotionDecision(promote, reason, candidate, champion, champion_version if champion else None,
                                 float(min_improvement), float(max_clean_drop))

    if champion is None:
        return decision(True, "No champion yet: the first candidate becomes champion.")
    if candidate.protocol and champion.protocol and candidate.protocol != champion.protocol:
        return decision(False, "Not comparable: the champion was evaluated under another protocol "
                        f"(champion: {champion.protocol} | candidate: {candidate.protocol}). Its figures cannot "
                        "gate this candidate; evaluate both under one protocol (evaluate.* as for the champion), "
                        "or move the champion alias by hand.")
    gain = round(candidate.perturbed_acc - champion.perturbed_acc, _DIGITS)
    drop = round(champion.clean_acc - candidate.clean_acc, _DIGITS)
    need = round(float(min_improvement), _DIGITS)
    tol = round(float(max_clean_drop), _DIGITS)
    figures = (f"mean perturbed accuracy {_fmt(candidate.perturbed_acc)} vs {_fmt(champion.perturbed_acc)} "
               f"(gain {gain:+g} pp, needed >= {need:g} and > 0); clean accuracy {_fmt(candidate.clean_acc)} vs "
               f"{_fmt(champion.clean_acc)} (drop {drop:+g} pp, allowed <= {tol:g})")
    if gain <= 0 or gain < need:
        return decision(False, f"Not more robust than the champion by the margin: {figures}.")
    if drop > tol:
        return decision(False, f"Clean accuracy drops past the tolerance: {figures}.")
    return decision(True, f"More robust by the margin, clean accuracy within tolerance: {figures}.")


def figures_from_tags(tags: Mapping[str, str], *, what: str) -> ModelFigures | None:
    """A version's own figures from its tags; None when it has none."""
    if TAG_CLEAN not in tags and TAG_PERTURBED not in tags:
        return None
    try:
        return ModelFigures(float(tags[TAG_CLEAN]), float(tags[TAG_PERTURBED]), tags.get(TAG_PROTOCOL))
    except (KeyError, ValueError) as exc:
        raise PromotionError(f"{what}: tags {TAG_CLEAN}/{TAG_PERTURBED} are incomplete or not numbers "
                             f"({ {k: tags.get(k) for k in (TAG_CLEAN, TAG_PERTURBED)} }): {exc}. "
                             "Fix them with MlflowClient().set_model_version_tag.") from None


def decision_from_tags(tags: Mapping[str, str]) -> PromotionDecision | None:
    """The decision recorded on a version (None if it has none), rebuilt from its tags alone."""
    if TAG_DECISION not in tags:
        return None
    candidate = figures_from_tags(tags, what="recorded decision")
    if candidate is None:
        raise PromotionError(f"a version has {TAG_DECISION} but no {TAG_CLEAN}/{TAG_PERTURBED} tags")
    champ_version = tags.get(TAG_CHAMPION_VERSION, NONE)
    champion = None
    if champ_version != NONE:
        champion = ModelFigures(float(tags[TAG_CHAMPION_CLEAN]), float(tags[TAG_CHAMPION_PERTURBED]))
    return PromotionDecision(
        promote=tags[TAG_DECISION] == "promoted", reason=tags.get(TAG_REASON, ""), candidate=candidate,
        champion=champion, champion_version=None if champ_version == NONE else champ_version,
        min_improvement=float(tags.get(TAG_MIN_IMPROVEMENT, "nan")),
        max_clean_drop=float(tags.get(TAG_MAX_CLEAN_DROP, "nan")),
    )


def candidate_figures(metrics_json: str | Path, model_label: str) -> ModelFigures:
    """A model's gate figures from the evaluation's ``metrics.json`` (via ``coin.evaluation.robustness_summary``)."""
    from coin.evaluation import robustness_summary  # the evaluation owns how the figures are aggregated

    from coin.data.io import read_json
    from coin.evaluation.result import evaluation_protocol

    summary = robustness_summary(metrics_json, model_label)
    figures = ModelFigures.from_summary(summary, source=f"{metrics_json} [{model_label}]")
    info_file = Path(metrics_json).with_name("eval_info.json")  # written beside metrics.json by the report
    info = read_json(info_file).get(model_label) if info_file.exists() else None
    if not isinstance(info, dict):
        log.warning("%s: no entry for %s; the gate cannot check that the champion was evaluated the same way",
                    info_file, model_label)
        return figures
    return ModelFigures(figures.clean_acc, figures.perturbed_acc, evaluation_protocol(info))


def _alias_version(client, name: str, alias: str):
    from mlflow.exceptions import MlflowException

    try:
        return client.get_model_version_by_alias(name, alias)
    except MlflowException as exc:  # no such alias (INVALID_PARAMETER_VALUE "... alias X not found") or model
        code = getattr(exc, "error_code", "")
        if code == "RESOURCE_DOES_NOT_EXIST" or (code == "INVALID_PARAMETER_VALUE" and "not found" in str(exc)):
            return None
        raise


def promote_version(name: str, version: str | int, figures: ModelFigures, *, min_improvement: float,
                    max_clean_drop: float, client=None) -> PromotionDecision:
    """Apply the gate to registered version ``version`` of ``name`` (which should carry ``challenger``).

    Records the decision on the version (tags + description) and, if promoted, moves ``champion`` to it.
    Idempotent: a version that already has a recorded decision is left as it is and that decision
    returned (a warning is logged if ``figures`` differ from the recorded ones).
    """
    from mlflow import MlflowClient

    client = client or MlflowClient()
    version = str(version)
    mv = client.get_model_version(name, version)
    recorded = decision_from_tags(mv.tags)
    if recorded is not None:
        if recorded.candidate != figures.rounded():
            log.warning("%s version %s was already %s with figures %s; the figures given now (%s) differ "
                        "(re-evaluated?). The recorded decision stands; register a new training run to re-decide.",
                        name, version, recorded.decision, recorded.candidate, figures)
        return recorded

    champ_mv = _alias_version(client, name, CHAMPION)
    champion = None
    if champ_mv is not None and str(champ_mv.version) != version:
        champion = figures_from_tags(champ_mv.tags, what=f"champion {name} version {champ_mv.version}")
        if champion is None:
            raise PromotionError(
                f"the champion, {name} version {champ_mv.version}, has no recorded figures ({TAG_CLEAN}, "
                f"{TAG_PERTURBED}); it was registered before gated promotion. Tag it with its evaluation figures "
                f"(MlflowClient().set_model_version_tag({name!r}, '{champ_mv.version}', '{TAG_CLEAN}', '<pct>'), "
                f"same for {TAG_PERTURBED}) or remove the alias (delete_registered_model_alias({name!r}, 'champion')).")
    if champ_mv is not None and str(champ_mv.version) == version:
        # champion already: an earlier run was interrupted after moving the alias (its tags are there but
        # the final decision tag is not), or the alias was set by hand. Record that; move nothing.
        partial = decision_from_tags({**mv.tags, TAG_DECISION: "promoted"}) if TAG_REASON in mv.tags else None
        decision = partial or PromotionDecision(
            True, "Already the champion (alias set before this gate ran).", figures, None, None,
            float(min_improvement), float(max_clean_drop))
    else:
        decision = decide_promotion(figures, champion, min_improvement=min_improvement,
                                    max_clean_drop=max_clean_drop,
                                    champion_version=str(champ_mv.version) if champ_mv is not None else None)
    client.update_model_version(name, version, description=decision.description())
    tags = decision.to_tags()
    for key in sorted(k for k in tags if k != TAG_DECISION):
        client.set_model_version_tag(name, version, key, tags[key])
    if decision.promote:
        client.set_registered_model_alias(name, CHAMPION, version)
    client.set_model_version_tag(name, version, TAG_DECISION, tags[TAG_DECISION])  # last: marks it decided
    log.info("%s version %s: %s. %s", name, version, decision.decision, decision.reason)
    return decision
