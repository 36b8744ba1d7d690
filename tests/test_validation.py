"""The paraphrase-validation gate (DESIGN.md §4): real rows pass untouched, each kind of broken row is
rejected by the right check with a reason, a failed gate still writes every output.

Great Expectations runs three times in this file (valid rows, broken rows, failing gate); its import
(~4 s) is paid once per session.
"""

from __future__ import annotations

import copy
import doctest
import json
from pathlib import Path
from typing import Any

import pytest

from coin.config import PairsSettings, ValidateSettings
from coin.data.io import read_json, read_jsonl
from coin.data.pairs import build_pairs
from coin.data.prompts import encode
from coin.modeling.backbone import load_tokenizer
from coin.validation import CHECKS, CheckContext, GateFailed, GateReport, run_gate, token_lengths
from coin.validation import checks as checks_module

CUTOFF = 256


@pytest.fixture(scope="session")
def tokenizer():
    return load_tokenizer("minilm")


@pytest.fixture(scope="session")
def real_rows() -> list[dict[str, Any]]:
    return build_pairs("data", PairsSettings(rows_per_task=5), 42)  # 40 rows, 8 tasks


def rows_copy(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return copy.deepcopy(rows)


def gate(rows, tokenizer, out_dir: Path, *, min_pass_rate: float = 0.0, cutoff: int = CUTOFF) -> GateReport:
    cfg = ValidateSettings(min_pass_rate=min_pass_rate)
    return run_gate(rows, cfg=cfg, cutoff_len=cutoff, tokenizer=tokenizer, out_dir=out_dir)


# --------------------------------------------------------------------------- valid rows


@pytest.fixture(scope="module")
def valid_run(real_rows, tokenizer, tmp_path_factory):
    rows = rows_copy(real_rows)
    out = tmp_path_factory.mktemp("gate_valid")
    return rows, gate(rows, tokenizer, out, min_pass_rate=1.0), out


def test_registry_order():
    assert list(CHECKS) == [
        "schema", "text_valid", "paraphrase_differs", "target_in_answer_set", "inputs_present", "negative_valid", "token_length",
    ]


def test_valid_rows_pass_untouched(valid_run, real_rows):
    rows, report, out = valid_run
    assert rows == real_rows, "run_gate must not modify its input rows"
    assert read_jsonl(out / "valid.jsonl") == real_rows
    assert read_jsonl(out / "rejects.jsonl") == []
    assert (report.rows_in, report.rows_valid, report.rows_rejected, report.pass_rate) == (40, 40, 0, 1.0)
    assert report.passed and set(report.checks) == set(CHECKS)
    assert all(s.failures == 0 and s.pass_rate == 1.0 for s in report.checks.values())


def test_summary_and_docs_written(valid_run):
    _, report, out = valid_run
    summary = read_json(out / "summary.json")
    assert summary == json.loads(json.dumps(report.to_summary()))
    assert summary["rows_in"] == 40 and summary["pass_rate"] == 1.0 and summary["gate_passed"] is True
    assert set(summary["checks"]) == set(CHECKS) and summary["rejects_per_reason"] == {}
    index = out / "data_docs" / "index.html"
    assert index.is_file() and report.data_docs_index == index
    assert list((out / "data_docs" / "validations").rglob("*.html")), "no validation page in the Data Docs site"
    md = report.to_markdown()
    assert "| schema | 1.000 | 0 |" in md and "40/40" in md


def test_token_lengths_match_encode(real_rows, tokenizer):
    prompts = [r["paraphrase_prompt"] for r in real_rows] + [""]
    targets = [r["target"] for r in real_rows] + [""]
    batched = token_lengths(tokenizer, prompts, targets)
    assert batched == [len(encode(tokenizer, p, t).input_ids) for p, t in zip(prompts, targets)]


def test_token_length_cutoff_boundary(real_rows, tokenizer):
    row = real_rows[0]
    longest = max(
        len(encode(tokenizer, row[p], row[t]).input_ids)
        for p, t in (("original_prompt", "target"), ("paraphrase_prompt", "target"), ("negative_prompt", "negative_target"))
    )
    check = CHECKS["token_length"]
    at = check([row], CheckContext(4000, longest, tokenizer))[0]
    below = check([row], CheckContext(4000, longest - 1, tokenizer))[0]
    assert at.passed and not below.passed
    assert f"is {longest} tokens, over pairs.cutoff_len = {longest - 1}" in below.reason
    tiny = check(real_rows, CheckContext(4000, 16, tokenizer))
    assert not any(r.passed for r in tiny)


def test_doctests():
    assert doctest.testmod(checks_module).failed == 0


# --------------------------------------------------------------------------- broken rows, one per check


def _input_field(row: dict[str, Any]) -> str:
    return next(iter(row["inputs"]))


def _corrupt_input(row: dict[str, Any], bad: str) -> None:
    """Append ``bad`` to the first input text, consistently in inputs and both prompts."""
    f = _input_field(row)
    old = row["inputs"][f]
    row["inputs"][f] = old + bad
    for p in ("original_prompt", "paraphrase_prompt"):
        row[p] = row[p].replace(old, old + bad)


def _break(name: str, row: dict[str, Any]) -> None:
    if name == "copy_paraphrase":
        row["paraphrase_instruction"], row["paraphrase_prompt"] = row["original_instruction"], row["original_prompt"]
    elif name == "case_punct_paraphrase":
        row["paraphrase_instruction"] = row["original_instruction"].upper() + " ?!"
        row["paraphrase_prompt"] = "  " + row["original_prompt"] + " ?!"
    elif name == "swapped_target":
        row["target"], row["negative_target"] = row["negative_target"], row["target"]
    elif name == "unknown_target":
        row["target"] = "maybe"
    elif name == "input_missing":
        row["paraphrase_prompt"] = row["paraphrase_prompt"].replace(row["inputs"][_input_field(row)], "")
    elif name == "negative_same_target":
        row["negative_target"], row["negative_label"] = row["target"], row["label"]
    elif name == "negative_same_example":
        row["negative_example_id"] = row["example_id"]
    elif name == "negative_same_prompt":
        row["negative_prompt"] = row["original_prompt"]
    elif name == "too_long":
        row["paraphrase_prompt"] += " word" * 900  # 4500 chars > max_length_chars, > 256 tokens
    elif name == "empty_target":
        row["target"] = "   "
    elif name == "replacement_char":
        _corrupt_input(row, "\ufffd")
    elif name == "lone_surrogate":
        _corrupt_input(row, "\udc80")
    elif name == "null_target":
        row["target"] = None
    elif name == "missing_key":
        del row["negative_prompt"]
    elif name == "label_str":
        row["label"] = str(row["label"])
    elif name == "bad_split":
        row["split"] = "dev"
    else:
        raise KeyError(name)


# case -> (checks that must fail, exact?) ; exact = no other check may fail for this row
BROKEN: dict[str, tuple[set[str], bool]] = {
    "copy_paraphrase": ({"paraphrase_differs"}, True),
    "case_punct_paraphrase": ({"paraphrase_differs"}, True),
    "swapped_target": ({"target_in_answer_set"}, True),
    "unknown_target": ({"schema", "target_in_answer_set"}, True),
    "input_missing": ({"inputs_present"}, True),
    "negative_same_target": ({"negative_valid"}, True),
    "negative_same_example": ({"negative_valid"}, True),
    "negative_same_prompt": ({"negative_valid"}, True),
    "too_long": ({"schema", "token_length"}, True),
    "empty_target": ({"text_valid"}, False),
    "replacement_char": ({"text_valid"}, True),
    "lone_surrogate": ({"text_valid"}, True),
    "null_target": ({"schema"}, False),
    "missing_key": ({"schema"}, False),
    "label_str": ({"schema"}, True),
    "bad_split": ({"schema"}, True),
}
# a reason text that must be in the row's reasons (names the field and what is wrong)
REASONS = {
    "case_punct_paraphrase": "up to case, whitespace and punctuation",
    "unknown_target": "field 'target' = 'maybe' is not in answer_words",
    "input_missing": "does not appear in paraphrase_prompt",
    "negative_same_target": "negative_target equals target",
    "negative_same_example": "negative_example_id equals example_id",
    "too_long": "paraphrase_prompt + target is",
    "replacement_char": "has U+FFFD (replacement character)",
    "lone_surrogate": "has lone surrogate U+DC80",
    "null_target": "field 'target' is missing (null)",
    "missing_key": "field 'negative_prompt' is missing (null)",
    "label_str": "field 'label' is a str",
    "bad_split": "field 'split' = 'dev' is not one of ['train', 'val']",
}


@pytest.fixture(scope="module")
def broken_run(real_rows, tokenizer, tmp_path_factory):
    rows = rows_copy(real_rows)
    sst2 = [r for r in rows if r["task"] == "sst2"][0]  # a one-input task: removing its text empties no template
    for name in BROKEN:
        row = copy.deepcopy(sst2)
        row["pair_id"] = f"broken:{name}"
        _break(name, row)
        rows.append(row)
    rows.append(copy.deepcopy(rows[1]))  # duplicate pair_id: both copies are rejected
    out = tmp_path_factory.mktemp("gate_broken")
    report = gate(rows, tokenizer, out)
    rejects = {}
    for r in read_jsonl(out / "rejects.jsonl"):
        rejects.setdefault(r["pair_id"], []).append(r)
    return rows, report, rejects, out


@pytest.mark.parametrize("name", list(BROKEN))
def test_broken_row_rejected_by_right_check(broken_run, name):
    _, _, rejects, _ = broken_run
    assert f"broken:{name}" in rejects, f"{name} was not rejected"
    (row,) = rejects[f"broken:{name}"]
    must, exact = BROKEN[name]
    failed = set(row["failed_checks"])
    assert must <= failed, f"{name}: failed {failed}, expected {must}; reasons {row['reasons']}"
    if exact:
        assert failed == must, f"{name}: also failed {failed - must}: {row['reasons']}"
    assert row["reasons"] and all(r.split(": ", 1)[0] in failed for r in row["reasons"])
    if name in REASONS:
        assert any(REASONS[name] in r for r in row["reasons"]), row["reasons"]


def test_duplicate_pair_id_rejects_both(broken_run, real_rows):
    _, _, rejects, _ = broken_run
    dup = rejects[real_rows[1]["pair_id"]]
    assert len(dup) == 2 and all(r["failed_checks"] == ["schema"] for r in dup)
    assert "is not unique (2 rows share it)" in dup[0]["reasons"][0]


def test_broken_run_keeps_every_row(broken_run, real_rows):
    rows, report, rejects, out = broken_run
    valid = read_jsonl(out / "valid.jsonl")
    n_rejects = sum(len(v) for v in rejects.values())
    assert len(valid) + n_rejects == len(rows) == report.rows_in  # nothing silently dropped
    assert valid == [r for r in real_rows if r["pair_id"] != real_rows[1]["pair_id"]]
    assert report.rows_rejected == len(BROKEN) + 2
    summary = read_json(out / "summary.json")
    assert summary["rejects_per_reason"]["schema.unique:pair_id"] == 2
    negative_failed = {pid for pid, rs in rejects.items() if "negative_valid" in rs[0]["failed_checks"]}
    # the three broken negatives, and two rows whose negative cannot be checked (null target, no negative_prompt)
    assert negative_failed == {f"broken:{n}" for n in (
        "negative_same_target", "negative_same_example", "negative_same_prompt", "null_target", "missing_key")}
    assert summary["checks"]["negative_valid"]["failures"] == 5
    assert summary["rejects_per_reason"]["negative_valid.unusable"] == 2


def test_surrogate_reject_is_written_escaped(broken_run):
    _, _, rejects, out = broken_run
    (row,) = rejects["broken:lone_surrogate"]
    assert "\\udc80" in row["original_prompt"]
    (out / "rejects.jsonl").read_text(encoding="utf-8")  # valid UTF-8 throughout


# --------------------------------------------------------------------------- the gate itself


def test_gate_failure_raises_after_writing(real_rows, tokenizer, tmp_path):
    rows = rows_copy(real_rows[:10])
    for r in rows[5:]:
        _break("copy_paraphrase", r)
    with pytest.raises(GateFailed) as info:
        gate(rows, tokenizer, tmp_path, min_pass_rate=0.9)
    msg = str(info.value)
    assert "pass rate 0.500 (5/10 rows)" in msg and "min_pass_rate = 0.9" in msg
    assert f"paraphrase_differs: 5 rows (e.g. pair_id {rows[5]['pair_id']!r}" in msg
    assert str(tmp_path / "rejects.jsonl") in msg
    assert isinstance(info.value, RuntimeError) and info.value.report.rows_rejected == 5
    assert [r["pair_id"] for r in read_jsonl(tmp_path / "rejects.jsonl")] == [r["pair_id"] for r in rows[5:]]
    assert read_jsonl(tmp_path / "valid.jsonl") == rows[:5]
    assert read_json(tmp_path / "summary.json")["gate_passed"] is False
    assert (tmp_path / "data_docs" / "index.html").is_file()


def test_no_rows_fails_the_gate(tokenizer, tmp_path):
    with pytest.raises(GateFailed, match="no rows to validate"):
        gate([], tokenizer, tmp_path, min_pass_rate=0.0)
    assert (tmp_path / "rejects.jsonl").read_text() == ""
