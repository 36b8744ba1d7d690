"""The ``schema`` check: a Great Expectations 1.x suite on a pandas DataFrame of the pair rows.

GX validates the columns; failures come back per row through ``result_format=COMPLETE`` with
``unexpected_index_column_names=["_row"]`` (the row's position, so duplicate or null pair_ids still map
to exactly one row). Checks GX cannot express on pandas (python types, "target is in this row's list")
are computed here as bool columns that GX then validates to be ``True`` (docs/design.md#great-expectations).

The DataFrame (all ``object`` dtype, never the caller's rows)::

    _row | pair_id ... negative_target      | type_ok__label ... | target_in_answers | negative_target_in_answers
    0    | raw values (wrong-typed strings   | True when null or  | bool              | bool
    ...  | shown as their repr, see _frame)  | the right type     |                   |

``great_expectations`` takes ~4 s to import, so it is imported inside :func:`schema_check` only.
"""

from __future__ import annotations

import html
import logging
import math
import shutil
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from coin.config import ALL_TASKS
from coin.data.pairs import PAIR_COLUMNS
from coin.validation.text import replace_surrogates, shorten
from coin.validation.types import CheckContext, CheckResult, Finding, Row

SPLITS = ("train", "val")
# python type of every pair column; inputs = {field: text}, answer_words = [word, ...]
FIELD_TYPES: dict[str, type] = {c: str for c in PAIR_COLUMNS} | {
    "label": int, "negative_label": int, "template_a": int, "template_b": int, "inputs": dict, "answer_words": list,
    "negative_inputs": dict,
}
SUITE_NAME = "coin_pairs"


def quiet_gx() -> None:
    """Keep Great Expectations' warnings, drop its INFO chatter: importing it logs ~200 "Skipping registering
    function" lines, which a stage run (``dvc repro``, ``coin validate``) would print. Called before every import."""
    logging.getLogger("great_expectations").setLevel(logging.WARNING)
    # this one sets INFO on itself at import ("Created temporary directory ... for ephemeral docs site")
    logging.getLogger("great_expectations.data_context.types.base").setLevel(logging.WARNING)


def _type_ok(value: Any, typ: type) -> bool:
    """Null counts as ok here (the not-null expectation reports it once)."""
    if value is None:
        return True
    if typ is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if typ is dict:
        return isinstance(value, dict) and all(isinstance(k, str) and isinstance(v, str) for k, v in value.items())
    if typ is list:
        return isinstance(value, list) and all(isinstance(v, str) for v in value)
    return isinstance(value, typ)


def _type_name(typ: type) -> str:
    return {dict: "dict of str -> str", list: "list of str"}.get(typ, typ.__name__)


def _in_answers(row: Row, field: str) -> bool:
    """``row[field] in row['answer_words']``; True when either is null (not-null reports that)."""
    words, value = row.get("answer_words"), row.get(field)
    if words is None or value is None:
        return True
    return isinstance(words, list) and value in words


def _gx_safe(value: Any) -> Any:
    """GX encodes values as UTF-8 and raises on lone surrogates (text_valid reports them), and reads a NaN or
    infinite float as null ("missing"): such a value is passed as its text, so the type check names it."""
    if isinstance(value, str):
        return replace_surrogates(value)
    if isinstance(value, float) and not math.isfinite(value):
        return repr(value)
    if isinstance(value, dict):
        return {_gx_safe(k): _gx_safe(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_gx_safe(v) for v in value]
    return value


def _frame(rows: Sequence[Row]) -> Any:
    import pandas as pd

    cols: dict[str, list[Any]] = {"_row": list(range(len(rows)))}
    for c, typ in FIELD_TYPES.items():
        values = [_gx_safe(r.get(c)) for r in rows]
        if typ is str:  # a wrong-typed value would break GX's string expectations; type_ok__<c> reports it
            # typed, so it cannot equal a text value: the int 17 shown as '17' made pair_id '17' "not unique"
            values = [v if v is None or isinstance(v, str) else f"<{type(v).__name__}> {v!r}" for v in values]
        if typ is str:
            # the schema page shows failing values as HTML, unescaped: a task '<img onerror=...>' or a prompt's
            # markup ran on the page. Escaping is one-to-one, so uniqueness and set membership are unchanged; the
            # lengths are taken before it, from the text the row holds
            cols[f"length__{c}"] = [len(v) if isinstance(v, str) else None for v in values]
            values = [html.escape(v) if isinstance(v, str) else v for v in values]
        cols[c] = values
    for c, typ in FIELD_TYPES.items():
        cols[f"type_ok__{c}"] = [_type_ok(r.get(c), typ) for r in rows]
    cols["target_in_answers"] = [_in_answers(r, "target") for r in rows]
    cols["negative_target_in_answers"] = [_in_answers(r, "negative_target") for r in rows]
    return pd.DataFrame(cols, dtype=object)


# --------------------------------------------------------------------------- the suite


@dataclass(frozen=True)
class Rule:
    expectation: Any                         # a great_expectations.expectations.Expectation
    code: str                                # "not_null:target", "unique:pair_id", ...
    message: Callable[[Row], str]            # the reason for a failing row (names the field)


def _rules(gxe: Any, max_chars: int, pair_id_counts: Counter) -> list[Rule]:
    rules: list[Rule] = []
    for c in PAIR_COLUMNS:
        rules.append(Rule(
            gxe.ExpectColumnValuesToNotBeNull(column=c, description=f"{c} is required"),
            f"not_null:{c}", lambda r, c=c: f"field '{c}' is missing (null)",
        ))
    rules.append(Rule(
        gxe.ExpectColumnValuesToBeUnique(column="pair_id", description="pair_id identifies one row"),
        "unique:pair_id",
        lambda r: f"pair_id {r.get('pair_id')!r} is not unique ({pair_id_counts[r.get('pair_id')]} rows share it)",
    ))
    for c, typ in FIELD_TYPES.items():
        rules.append(Rule(
            gxe.ExpectColumnValuesToBeInSet(column=f"type_ok__{c}", value_set=[True],
                                            description=f"{c} is a {_type_name(typ)}"),
            f"type:{c}",
            lambda r, c=c, typ=typ: f"field '{c}' is a {type(r.get(c)).__name__} ({str(r.get(c))[:40]!r}), "
                                    f"expected {_type_name(typ)}",
        ))
    for c, allowed in (("split", SPLITS), ("task", ALL_TASKS)):
        rules.append(Rule(
            gxe.ExpectColumnValuesToBeInSet(column=c, value_set=list(allowed),
                                            description=f"{c} is one of {list(allowed)}"),
            f"in_set:{c}", lambda r, c=c, allowed=allowed: f"field '{c}' = {r.get(c)!r} is not one of {list(allowed)}",
        ))
    for c in ("original_prompt", "paraphrase_prompt", "negative_prompt"):
        rules.append(Rule(
            gxe.ExpectColumnValuesToBeBetween(
                column=f"length__{c}", min_value=1, max_value=max_chars,
                description=f"{c} has 1..{max_chars} chars (validate.max_length_chars)"
            ),
            f"length:{c}",
            lambda r, c=c: f"field '{c}' has {len(str(r.get(c)))} chars, outside 1..{max_chars} "
                           "(validate.max_length_chars)",
        ))
    for c, t in (("target_in_answers", "target"), ("negative_target_in_answers", "negative_target")):
        rules.append(Rule(
            gxe.ExpectColumnValuesToBeInSet(column=c, value_set=[True],
                                            description=f"{t} is one of the row's answer_words"),
            c, lambda r, t=t: f"field '{t}' = {r.get(t)!r} is not in answer_words {r.get('answer_words')!r}",
        ))
    return rules


# --------------------------------------------------------------------------- running it


def _context(gx: Any, ctx: CheckContext) -> tuple[Any, list[str]]:
    quiet_gx()
    from great_expectations.data_context.types.base import ProgressBarsConfig

    gctx = gx.get_context(mode="ephemeral")
    gctx.variables.progress_bars = ProgressBarsConfig(globally=False)
    sites: list[str] = []
    if ctx.docs_dir is not None:
        shutil.rmtree(ctx.docs_dir, ignore_errors=True)  # one run's site, no stale validation pages
        gctx.add_data_docs_site("gate", {
            "class_name": "SiteBuilder",
            "site_index_builder": {"class_name": "DefaultSiteIndexBuilder"},
            "store_backend": {"class_name": "TupleFilesystemStoreBackend", "base_directory": str(ctx.docs_dir)},
        })
        sites = ["gate"]
    return gctx, sites


def _validate(rows: Sequence[Row], rules: list[Rule], ctx: CheckContext) -> list[Any]:
    """Run the suite through a checkpoint (which also builds Data Docs); one GX result per rule."""
    quiet_gx()
    import great_expectations as gx

    gctx, sites = _context(gx, ctx)
    batch = (gctx.data_sources.add_pandas("pairs").add_dataframe_asset("pairs")
             .add_batch_definition_whole_dataframe("all"))
    suite = gctx.suites.add(gx.ExpectationSuite(name=SUITE_NAME))
    for rule in rules:
        suite.add_expectation(rule.expectation)
    vd = gctx.validation_definitions.add(gx.ValidationDefinition(name="pairs", data=batch, suite=suite))
    actions = [gx.checkpoint.UpdateDataDocsAction(name="docs", site_names=sites)] if sites else []
    cp = gctx.checkpoints.add(gx.Checkpoint(
        name="gate", validation_definitions=[vd], actions=actions,
        result_format={"result_format": "COMPLETE", "unexpected_index_column_names": ["_row"]},
    ))
    res = cp.run(batch_parameters={"dataframe": _frame(rows)})
    results = list(res.run_results.values())[0].results
    if sites:
        ctx.artifacts["data_docs_index"] = ctx.docs_dir / "index.html"
        ctx.artifacts["gx"] = (gctx, sites)  # document_checks adds the other checks' page to this site
    return results


CHECKS_SUITE = "coin_gate_checks"
VALID_COLUMN = "gate: row passes every check"   # the checks page's verdict columns
TASK_COLUMN = "gate: its task keeps a training row"


def document_checks(ctx: CheckContext, rows: Sequence[Row], results: dict[str, list[CheckResult]],
                    report: Any = None) -> None:
    """Add a page for *every* gate check to the Data Docs site the schema check built.

    One column per check holds each row's reasons (null when it passed), validated by
    ``expect_column_values_to_be_null``: the page shows each check's failure count and its most
    frequent reasons, next to the schema suite's page. With the gate's ``report`` (a
    :class:`~coin.validation.result.GateReport`), two more expectations state its verdict: at least
    ``validate.min_pass_rate`` of the rows (and at least one) pass every check, and no task loses every training
    row; so the page says what the gate decided, not only that some rows failed. No-op when no site was built.
    """
    if "gx" not in ctx.artifacts:
        return
    quiet_gx()
    import great_expectations as gx
    import great_expectations.expectations as gxe
    import pandas as pd

    gctx, sites = ctx.artifacts["gx"]
    # the page shows these cells' text as HTML, unescaped: a row's text ("<script>" in a target) ran as markup
    cols: dict[str, list[Any]] = {
        "_row": list(range(len(rows))),
        "pair_id": [html.escape(replace_surrogates(r["pair_id"])) if isinstance(r.get("pair_id"), str)
                    else html.escape(f"<row {i}>") for i, r in enumerate(rows)],
    }
    for name, res in results.items():
        cols[name] = [None if r.passed else html.escape(shorten(replace_surrogates(r.reason), 300, "rejects.jsonl"))
                      for r in res]
    verdict = []
    if report is not None:
        emptied = set(report.emptied_tasks)
        cols[VALID_COLUMN] = [all(res[i].passed for res in results.values()) for i in range(len(rows))]
        # a task that is no string (a list, a dict: a schema finding) is unhashable, and crashed the gate after it
        # had written valid.jsonl, leaving the last run's verdict beside it
        cols[TASK_COLUMN] = [not (isinstance(r.get("task"), str) and r["task"] in emptied) for r in rows]
        verdict = [
            gxe.ExpectColumnValuesToBeInSet(
                column=VALID_COLUMN, value_set=[True], mostly=max(report.min_pass_rate, 1e-9),
                description=f"the gate: at least validate.min_pass_rate = {report.min_pass_rate:g} of the rows, and "
                            "at least one, pass every check"),
            gxe.ExpectColumnValuesToBeInSet(
                column=TASK_COLUMN, value_set=[True],
                description="the gate: no task loses every training row (training would lack it)"),
            gxe.ExpectTableRowCountToBeBetween(  # GX passes a column check on no rows at all
                min_value=1, description="the gate: there are rows to validate"),
        ]
    frame = pd.DataFrame(cols, dtype=object)
    batch = (gctx.data_sources.add_pandas("gate").add_dataframe_asset("checks")
             .add_batch_definition_whole_dataframe("all"))
    suite = gctx.suites.add(gx.ExpectationSuite(name=CHECKS_SUITE))
    for name in results:
        suite.add_expectation(gxe.ExpectColumnValuesToBeNull(
            column=name, description=f"every row passes gate check '{name}' (a failing row shows its reasons)"))
    for expectation in verdict:
        suite.add_expectation(expectation)
    vd = gctx.validation_definitions.add(gx.ValidationDefinition(name="gate_checks", data=batch, suite=suite))
    cp = gctx.checkpoints.add(gx.Checkpoint(
        name="gate_checks", validation_definitions=[vd],
        actions=[gx.checkpoint.UpdateDataDocsAction(name="docs", site_names=sites)],
        result_format={"result_format": "SUMMARY", "unexpected_index_column_names": ["pair_id"]},
    ))
    cp.run(batch_parameters={"dataframe": frame})


def _key(config: Any) -> tuple[str, str | None]:
    return config.type, config.kwargs.get("column")


def _failing_rows(result: Any) -> list[int]:
    """Row positions GX reports as unexpected; raises if GX could not evaluate the expectation."""
    info = result.exception_info or {}
    # either {"raised_exception": ..., "exception_message": ...} or {metric_id: that dict, ...}
    for exc in [info, *(v for v in info.values() if isinstance(v, dict))]:
        if exc.get("raised_exception"):
            raise RuntimeError(
                f"great_expectations could not evaluate {_key(result.expectation_config)}: "
                f"{exc.get('exception_message')}"
            )
    if result.success:
        return []
    index = result.result.get("unexpected_index_list")
    if index is None:
        raise RuntimeError(f"great_expectations gave no failing rows for {_key(result.expectation_config)}; "
                           "cannot map to rows")
    return sorted({int(item["_row"]) for item in index})


def schema_check(rows: Sequence[Row], ctx: CheckContext) -> list[CheckResult]:
    counts = Counter(r.get("pair_id") for r in rows if isinstance(r.get("pair_id"), str))
    quiet_gx()
    import great_expectations.expectations as gxe

    rules = _rules(gxe, ctx.max_length_chars, counts)
    by_key = {_key(rule.expectation.configuration): rule for rule in rules}
    findings: list[list[Finding]] = [[] for _ in rows]
    for result in _validate(rows, rules, ctx):
        rule = by_key[_key(result.expectation_config)]
        for i in _failing_rows(result):
            findings[i].append(Finding(rule.code, rule.message(rows[i])))
    return [CheckResult(tuple(f)) for f in findings]

