"""One home for a training method: its name, the sequence groups it needs, the loss terms it adds and how
each of its step metrics is reduced.

A leaf module (no torch, no other ``coin`` module), so :mod:`coin.config` builds its ``Literal`` of method
names from :data:`METHODS` and validates against it. Its readers:

- :mod:`coin.config`: ``train.methods`` / ``register.methods`` accept exactly the registered names;
  ``TRAIN_METHODS`` / ``STUDY_METHODS`` (study grid, paired differences) are :data:`METHODS` in declaration order.
- :mod:`coin.training.collator`: the sequence blocks of a batch (:meth:`Method.groups`) and which of them
  carry labels (:attr:`Method.generation_groups`).
- :mod:`coin.training.loss`: the generation groups and whether InfoNCE is trained (``train.cl_weighting``)
  or only measured (no gradient, ``w = 0``).
- :mod:`coin.training.loop`: a step's metrics are its micro-batches' metrics reduced as :attr:`Method.metrics`
  declares (:meth:`Method.reduce`); a metric the loss returns that is not declared raises.
- ``dvc.yaml``'s loss plots list one file per registered method (tests/test_methods.py checks it).

Declaration order matters: study paired differences are ``earlier - later`` (coin_consistency-coin, ...,
consistency-cit, coin-cit, coin-sft, cit-sft).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

# Every sequence group a pair row can give, in batch order (prompt/target columns: coin.training.collator).
SEQUENCE_GROUPS: tuple[str, ...] = ("original", "paraphrase", "negative")
# Groups whose responses can carry a generation loss. All three: the hard negative is the original's instruction on
# another example x' with *its* answer y' (coin.data.pairs), a right answer to its own input; what makes it a hard
# negative is that y' differs from the original's answer. coin and the paper leave it out of L_gen; coin_neg
# trains on it too.
GEN_GROUPS: frozenset[str] = frozenset({"original", "paraphrase", "negative"})

Reduction = Literal["mean", "sum", "last"]
_REDUCTIONS: tuple[str, ...] = ("mean", "sum", "last")


@dataclass(frozen=True)
class Generation:
    """Token-mean cross-entropy on one group's response tokens, normalised over the whole optimiser step."""

    group: str


@dataclass(frozen=True)
class InfoNCE:
    """Symmetric InfoNCE between the original and paraphrase blocks (hard negatives as extra columns if the
    method has the ``negative`` group). ``weighting``: ``cl_weighting`` = added with the weight of
    ``train.cl_weighting`` (adaptive or fixed); ``measured`` = computed without gradient and logged, ``w = 0``."""

    weighting: Literal["cl_weighting", "measured"] = "cl_weighting"


@dataclass(frozen=True)
class OutputConsistency:
    """Output consistency (CoIPO-style, ``train.consistency``): at aligned response positions, a divergence ``D``
    (KL(P_orig || P_para) or Jensen-Shannon) between the next-token distributions under the original instruction
    and under its paraphrase, added as ``w_oc * mean_i D_pos,i``. With ``push`` (and the ``negative`` group), a
    contrastive part ``w_push * mean_i softplus((D_pos,i - D_neg,i) / tau_push)`` pushes the hard negative's
    distribution away from the original's. Means over the pairs of the micro-batch on all ranks, like InfoNCE."""

    push: bool = True

    @property
    def groups(self) -> tuple[str, ...]:
        """The groups whose response logits it reads."""
        return ("original", "paraphrase", "negative") if self.push else ("original", "paraphrase")


LossTerm = Generation | InfoNCE | OutputConsistency


@dataclass(frozen=True)
class Metric:
    """One step metric: ``reduce`` over the micro-batches of the step of the micro-batch metric ``source``
    (default: ``name``); with ``offset`` the step value is ``step[offset] + reduce(part[source] - part[offset])``.

    Micro-batch metrics are already over all ranks (the loss all-reduces/gathers them), so the same reduction
    gives the same value on every rank.
    """

    name: str
    reduce: Reduction
    source: str | None = None
    offset: str | None = None

    def __post_init__(self) -> None:
        if self.reduce not in _REDUCTIONS:
            raise ValueError(f"metric {self.name!r}: reduce = {self.reduce!r}; use one of {', '.join(_REDUCTIONS)}")

    @property
    def reads(self) -> tuple[str, ...]:
        """The micro-batch metrics it reads."""
        return (self.source or self.name, *((self.offset,) if self.offset else ()))


# The step metrics of coin_step_loss, in logging order (every current method returns all of them).
STEP_METRICS: tuple[Metric, ...] = (
    Metric("l_cl", "mean"),                        # contrastive values: means over micro-batches
    Metric("w", "mean"),
    Metric("pos_cos", "mean"),
    Metric("neg_cos", "mean"),
    Metric("l_gen", "sum", source="l_gen_part"),   # parts token-normalised over the step: their sum
    Metric("loss", "mean", offset="l_gen"),        # step L_gen + mean of the micro-batches' weighted w * L_cl
    Metric("n_tokens", "sum"),                     # counts: sums
    Metric("n_slots", "sum"),
    Metric("n_resp_tokens", "sum"),
)

# What an OutputConsistency term adds: its divergences (the pull's value is div_pos) and its parts' values and weights.
CONSISTENCY_METRICS: tuple[Metric, ...] = (
    Metric("div_pos", "mean"),     # mean D(original, paraphrase) over the pairs: the pull term's value
    Metric("w_oc", "mean"),        # its weight (fixed, or the adaptive rule's per micro-batch)
    Metric("div_neg", "mean"),     # mean D(original, hard negative): NaN without negatives (logged with the push off)
    Metric("l_push", "mean"),      # the push term's value, mean softplus((D_pos - D_neg) / tau_push)
    Metric("w_push", "mean"),      # its weight (0 without negatives)
)


def _term_metrics(terms: Sequence[LossTerm]) -> tuple[Metric, ...]:
    """The step metrics of a method with these terms: the shared ones, then each extra term's own."""
    return STEP_METRICS + (CONSISTENCY_METRICS if any(isinstance(t, OutputConsistency) for t in terms) else ())


@dataclass(frozen=True)
class Method:
    """A training method, declared once."""

    name: str
    description: str
    sequence_groups: tuple[str, ...]          # blocks of a batch, in order (a subset of SEQUENCE_GROUPS, in its order)
    terms: tuple[LossTerm, ...]               # what its objective adds up
    metrics: tuple[Metric, ...] = ()          # () = read off the terms (STEP_METRICS + each term's own)

    def __post_init__(self) -> None:
        where = f"method {self.name!r}"
        if not self.metrics:
            object.__setattr__(self, "metrics", _term_metrics(self.terms))
        if not self.name or not self.name.isidentifier():
            raise ValueError(f"{where}: the name must be a non-empty identifier")
        if list(self.sequence_groups) != [g for g in SEQUENCE_GROUPS if g in self.sequence_groups] \
                or "original" not in self.sequence_groups:
            raise ValueError(f"{where}: sequence_groups {self.sequence_groups} must include 'original' and follow "
                             f"the order {SEQUENCE_GROUPS} without repeats")
        for t in self.terms:
            if isinstance(t, Generation) and (t.group not in GEN_GROUPS or t.group not in self.sequence_groups):
                raise ValueError(f"{where}: generation on {t.group!r} needs a group of {sorted(GEN_GROUPS)} "
                                 "that the method has")
            if isinstance(t, InfoNCE) and "paraphrase" not in self.sequence_groups:
                raise ValueError(f"{where}: InfoNCE needs the 'paraphrase' group")
            if isinstance(t, OutputConsistency) and not set(t.groups) <= set(self.sequence_groups):
                raise ValueError(f"{where}: output consistency{' with push' if t.push else ''} needs the groups "
                                 f"{t.groups}")
        for kind in (InfoNCE, OutputConsistency):
            if sum(isinstance(t, kind) for t in self.terms) > 1:
                raise ValueError(f"{where}: at most one {kind.__name__} term")
        names = [m.name for m in self.metrics]
        if len(set(names)) != len(names):
            raise ValueError(f"{where}: a metric is declared twice in {names}")
        for i, m in enumerate(self.metrics):
            if m.offset and m.offset not in names[:i]:
                raise ValueError(f"{where}: metric {m.name!r} is offset by {m.offset!r}, which must be declared "
                                 "before it")

    def groups(self, hard_negatives: bool = True) -> tuple[str, ...]:
        """The sequence blocks of a batch, in order (``train.hard_negatives = false`` drops the negatives; refused
        for a method that trains on them, :attr:`needs_negatives`)."""
        if not hard_negatives and self.needs_negatives:
            raise ValueError(f"method {self.name!r} has a generation loss on the hard negatives, so it needs "
                             "train.hard_negatives = true")
        return tuple(g for g in self.sequence_groups if hard_negatives or g != "negative")

    @property
    def needs_negatives(self) -> bool:
        """Whether the objective reads the hard negatives beyond InfoNCE's extra columns: a generation term on them.
        ``train.hard_negatives = false`` would silently drop a term of such a method, so the settings refuse it."""
        return "negative" in self.generation_groups

    @property
    def generation_groups(self) -> tuple[str, ...]:
        """The groups with a generation term, in batch order."""
        gen = {t.group for t in self.terms if isinstance(t, Generation)}
        return tuple(g for g in self.sequence_groups if g in gen)

    @property
    def logit_groups(self) -> tuple[str, ...]:
        """The groups whose response positions go through the LM head: generation, plus what consistency reads."""
        oc = self.consistency
        need = set(self.generation_groups) | (set(oc.groups) if oc else set())
        return tuple(g for g in self.sequence_groups if g in need)

    @property
    def consistency(self) -> OutputConsistency | None:
        return next((t for t in self.terms if isinstance(t, OutputConsistency)), None)

    @property
    def info_nce(self) -> InfoNCE | None:
        return next((t for t in self.terms if isinstance(t, InfoNCE)), None)

    @property
    def trains_contrastive(self) -> bool:
        """InfoNCE is part of the objective (with gradient), weighted by ``train.cl_weighting``."""
        return self.info_nce is not None and self.info_nce.weighting == "cl_weighting"

    def reduce(self, parts: Sequence[Mapping[str, float]]) -> dict[str, float]:
        """A step's metrics from its micro-batches' metrics, in declaration order.

        Raises if a micro-batch returns a metric the method does not declare (it would otherwise be lost).
        """
        if not parts:
            raise ValueError(f"method {self.name!r}: no micro-batch metrics to reduce")
        declared = {k for m in self.metrics for k in m.reads}
        for p in parts:
            undeclared = sorted(set(p) - declared)
            if undeclared:
                raise ValueError(
                    f"method {self.name!r}: the loss returned metric(s) {undeclared} that the method does not "
                    "declare; add them to its metrics in coin.methods with a reduction (mean, sum or last)"
                )
        out: dict[str, float] = {}
        for m in self.metrics:
            src = m.source or m.name
            try:
                vals = [p[src] - p[m.offset] if m.offset else p[src] for p in parts]
            except KeyError as e:
                raise ValueError(f"method {self.name!r}: metric {m.name!r} is declared but the loss did not "
                                 f"return {e.args[0]!r}") from None
            if m.reduce == "mean":
                v = sum(vals) / len(vals)
            elif m.reduce == "sum":
                v = sum(vals)
            else:
                v = vals[-1]
            out[m.name] = out[m.offset] + v if m.offset else v
        return out


# The registry, in declaration order (study paired differences follow it: each newer objective minus coin, cit
# and sft; coin-cit, coin-sft, cit-sft).
METHODS: dict[str, Method] = {
    m.name: m
    for m in (
        Method(
            "coin_consistency", "coin + w_oc*D(orig,para) + w_push*push(neg)",
            ("original", "paraphrase", "negative"),
            (Generation("original"), Generation("paraphrase"), InfoNCE("cl_weighting"), OutputConsistency()),
        ),
        Method(
            "consistency", "L_gen(orig)+L_gen(para)+w_oc*D(orig,para)+w_push*push(neg), no L_cl",
            ("original", "paraphrase", "negative"),
            (Generation("original"), Generation("paraphrase"), OutputConsistency()),
        ),
        Method(
            "coin_neg", "coin + L_gen(neg): the hard negative, a right answer to another input, trained on too",
            ("original", "paraphrase", "negative"),
            (Generation("original"), Generation("paraphrase"), Generation("negative"), InfoNCE("cl_weighting")),
        ),
        Method(
            "coin", "L_gen(orig)+L_gen(para)+w*L_cl",
            ("original", "paraphrase", "negative"),
            (Generation("original"), Generation("paraphrase"), InfoNCE("cl_weighting")),
        ),
        Method(
            "cit", "no L_cl",
            ("original", "paraphrase"),
            (Generation("original"), Generation("paraphrase"), InfoNCE("measured")),
        ),
        Method(
            "sft", "originals only",
            ("original",),
            (Generation("original"),),
        ),
    )
}


def get_method(name: str) -> Method:
    """The registered method ``name``; a ValueError naming the registered ones otherwise."""
    try:
        return METHODS[name]
    except KeyError:
        raise ValueError(f"train.method = {name!r}: use one of {', '.join(METHODS)}") from None
