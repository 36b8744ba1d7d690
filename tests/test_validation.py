"""The paraphrase-validation gate (docs/design.md#validation-gate): real rows pass untouched, each kind of broken row is
rejected by the right check with a reason, a failed gate still writes every output.

Great Expectations runs three times in this file (valid rows, broken rows, failing gate); its import
(~4 s) is paid once per session, and so is loading the packaged MiniLM sentence-transformer (~3 s):
the semantic and leak checks run on the real model, the fast unit tests inject a fake embedder.
"""

from __future__ import annotations

import copy
import dataclasses
import doctest
import json
import re
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from coin.config import ALL_TASKS, EvaluateSettings, PairsSettings, ValidateSettings
from coin.data.io import DataError, read_json, read_jsonl, write_jsonl
from coin.data.pairs import build_pairs
from coin.data.prompts import encode
from coin.evaluation.sampling import load_validation_rows
from coin.modeling.backbone import load_tokenizer
from coin.validation import CHECKS, CheckContext, GateFailed, GateReport, run_gate, token_lengths
from coin.validation import checks as checks_module
from coin.validation.embeddings import CachedEmbedder, minilm_embedder
from coin.validation.leakage import load_eval_instructions, load_eval_sources

CUTOFF = 256
EVAL = EvaluateSettings()


@pytest.fixture(scope="session")
def tokenizer():
    return load_tokenizer("minilm")


@pytest.fixture(scope="session")
def real_rows() -> list[dict[str, Any]]:
    return build_pairs("data", PairsSettings(tasks=list(ALL_TASKS), rows_per_task=5), 42)  # 40 rows, 8 tasks


@pytest.fixture(scope="session")
def embedder() -> CachedEmbedder:
    """The real packaged MiniLM, loaded once (~3 s); cached per distinct instruction across tests."""
    return CachedEmbedder(minilm_embedder())


@pytest.fixture(scope="session")
def eval_sources():
    return load_eval_sources(EVAL.instruction_file, "data", EVAL.tasks)


def rows_copy(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return copy.deepcopy(rows)


def gate(rows, tokenizer, out_dir: Path, embedder, eval_sources, *, min_pass_rate: float = 0.0,
         cutoff: int = CUTOFF) -> GateReport:
    cfg = ValidateSettings(min_pass_rate=min_pass_rate)
    return run_gate(rows, cfg=cfg, cutoff_len=cutoff, tokenizer=tokenizer, out_dir=out_dir,
                    eval_sources=eval_sources, embedder=embedder)


# --------------------------------------------------------------------------- valid rows


@pytest.fixture(scope="module")
def valid_run(real_rows, tokenizer, tmp_path_factory, embedder, eval_sources):
    rows = rows_copy(real_rows)
    out = tmp_path_factory.mktemp("gate_valid")
    return rows, gate(rows, tokenizer, out, embedder, eval_sources, min_pass_rate=1.0), out


def test_registry_order():
    assert list(CHECKS) == [
        "schema", "text_valid", "paraphrase_differs", "semantic_similarity", "target_in_answer_set", "inputs_present",
        "option_words", "negative_valid", "instruction_leakage", "example_leakage", "token_length",
    ]


def test_valid_rows_pass_untouched(valid_run, real_rows, tmp_path):
    rows, report, out = valid_run
    assert rows == real_rows, "run_gate must not modify its input rows"
    assert read_jsonl(out / "valid.jsonl") == real_rows
    write_jsonl(tmp_path / "expected.jsonl", real_rows)  # byte-equal to the pairs file these rows came from
    assert (out / "valid.jsonl").read_bytes() == (tmp_path / "expected.jsonl").read_bytes()
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
    pages = {p.parts[-4] for p in (out / "data_docs" / "validations").rglob("*.html")}
    assert pages == {"coin_pairs", "coin_gate_checks"}, "Data Docs need the schema suite and every gate check"
    gate_page = next((out / "data_docs" / "validations" / "coin_gate_checks").rglob("*.html")).read_text()
    assert all(name in gate_page for name in CHECKS)
    md = report.to_markdown()
    assert "| schema | 1.000 | 0 |" in md and "40/40" in md and "Instruction similarity (MiniLM cosine, 40 rows)" in md
    # the offline report: no external asset, every check, links that resolve to the Data Docs pages
    page = (out / "report.html").read_text()
    assert "Paraphrase-validation gate" in page and "40 of 40 rows valid" in page
    assert all(f"<code>{name}</code>" in page for name in CHECKS)
    assert "http://" not in page and "https://" not in page and "<script" not in page
    # every threshold applied, named as in params.yaml (the lengths were nowhere on a passing run's pages)
    applied = summary["stats"]["settings"]
    assert applied["pairs.cutoff_len"] == CUTOFF and applied["validate.max_length_chars"] == 4000
    assert applied["validate.min_pass_rate"] == 1.0 and "validate.max_similarity" in applied
    assert "<code>pairs.cutoff_len</code>" in page and "<code>validate.max_length_chars</code>" in page
    links = re.findall(r'href="([^"]+)"', page)
    assert len(links) == 2 and all((out / link).is_file() for link in links)
    sim = summary["stats"]["semantic_similarity"]
    assert sim["n"] == 40 and 0.4 <= sim["min"] <= sim["median"] <= sim["max"] <= 0.98
    assert (sim["below_min"], sim["above_max"]) == (0, 0)
    leak = summary["stats"]["instruction_leakage"]
    assert leak["eval_instructions"] == 246 and leak["max_cosine"] < 0.9 and leak["max_text_ratio"] < 0.9
    ex = summary["stats"]["example_leakage"]
    assert ex["rows_leaking"] == 0 and ex["eval_examples"] > 10_000
    assert summary["stats"]["eval_sources"]["instruction_sets"] == ["checklist", "clean", "deepwordbug", "semantic",
                                                                    "textfooler"]


def test_same_rows_same_outputs(valid_run, real_rows, tokenizer, embedder, eval_sources, tmp_path):
    """valid.jsonl, rejects.jsonl and summary.json are byte-identical across runs (no timings inside)."""
    _, _, out = valid_run
    gate(rows_copy(real_rows), tokenizer, tmp_path, embedder, eval_sources, min_pass_rate=1.0)
    for name in ("valid.jsonl", "rejects.jsonl", "summary.json"):
        assert (tmp_path / name).read_bytes() == (out / name).read_bytes(), name


def test_token_lengths_match_encode(real_rows, tokenizer):
    prompts = [r["paraphrase_prompt"] for r in real_rows] + [""]
    targets = [r["target"] for r in real_rows] + [""]
    batched = token_lengths(tokenizer, prompts, targets)
    assert batched == [len(encode(tokenizer, p, t).input_ids) for p, t in zip(prompts, targets, strict=True)]


def test_token_length_cutoff_boundary(real_rows, tokenizer):
    row = real_rows[0]
    longest = max(
        len(encode(tokenizer, row[p], row[t]).input_ids)
        for p, t in (("original_prompt", "target"), ("paraphrase_prompt", "target"),
                     ("negative_prompt", "negative_target"))
    )
    check = CHECKS["token_length"]
    at = check([row], CheckContext(4000, longest, tokenizer))[0]
    below = check([row], CheckContext(4000, longest - 1, tokenizer))[0]
    assert at.passed and not below.passed
    assert f"is {longest} tokens, over pairs.cutoff_len = {longest - 1}" in below.reason
    tiny = check(real_rows, CheckContext(4000, 16, tokenizer))
    assert not any(r.passed for r in tiny)


def test_doctests():
    from coin.validation import embeddings

    for module in (checks_module, embeddings):
        result = doctest.testmod(module)
        assert result.failed == 0 and result.attempted > 0, module.__name__


def test_text_doctests():
    """squash's doctest moved with it from checks to coin.validation.text."""
    from coin.validation import text

    result = doctest.testmod(text)
    assert result.failed == 0 and result.attempted > 0


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


def _eval_instruction(ref: str) -> str:
    return next(i.text for i in load_eval_instructions(EVAL.instruction_file) if i.ref == ref)


def _set_paraphrase(row: dict[str, Any], instruction: str) -> None:
    """Make ``instruction`` the row's paraphrase (sst2: one input, {options_} rendered as the original)."""
    row["paraphrase_instruction"] = instruction
    opts = "OPTIONS:\n- " + "\n- ".join(row["answer_words"])
    row["paraphrase_prompt"] = instruction.format(sentence=row["inputs"]["sentence"], options_=opts)


# an sst2 validation sentence (index) with its first space and first 'e' rewritten: zero-width space and soft
# hyphen (format characters, Cf), or NUL and DEL (control characters, Cc): the tokenizer drops both kinds
HIDDEN_LEAKS = {"leaked_eval_example_zero_width": (5, " \u200b", "\u00ade"),
                "leaked_eval_example_control": (11, " \x00", "e\x7f")}


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
        # 4500 chars > max_length_chars, > 256 tokens: a long input, in both prompts
        old = row["inputs"]["sentence"]
        row["inputs"]["sentence"] = "word " * 900 + old
        for p in ("original_prompt", "paraphrase_prompt"):
            row[p] = row[p].replace(old, row["inputs"]["sentence"])
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
    elif name == "option_words_dropped":  # mrpc: the label words are named only by the OPTIONS block
        row["paraphrase_instruction"] = row["paraphrase_instruction"].replace("{options_}", "")
        row["paraphrase_prompt"] = row["paraphrase_prompt"][: row["paraphrase_prompt"].index("OPTIONS:")]
    elif name == "near_copy_paraphrase":  # one function word: "the" -> "a"
        for kind in ("instruction", "prompt"):
            row[f"paraphrase_{kind}"] = row[f"original_{kind}"].replace(" the ", " a ", 1)
    elif name == "drift_paraphrase":
        _set_paraphrase(row, "What is the capital of France?\n{sentence}\n{options_}")
    elif name == "leaked_eval_instruction":  # an evaluation instruction used verbatim as the paraphrase
        _set_paraphrase(row, _eval_instruction("clean/sst2[0]") + "\n{sentence}\n{options_}")
    elif name == "near_duplicate_eval_instruction":  # ... with one word changed: not contained, near-duplicate
        text = _eval_instruction("clean/sst2[0]").replace("excerpt", "passage")
        _set_paraphrase(row, text + "\n{sentence}\n{options_}")
    elif name == "leaked_eval_example":  # the input is an SST-2 validation sentence
        val = load_validation_rows("data", "sst2")[0][7]["sentence"]
        old = row["inputs"]["sentence"]
        row["inputs"]["sentence"] = val
        for p in ("original_prompt", "paraphrase_prompt"):
            row[p] = row[p].replace(old, val)
    elif name == "leaked_eval_negative":  # the hard negative is an SST-2 validation sentence
        val = load_validation_rows("data", "sst2")[0][9]["sentence"]
        old = row["negative_inputs"]["sentence"]
        row["negative_inputs"]["sentence"] = val
        row["negative_prompt"] = row["negative_prompt"].replace(old, val)
    elif name in HIDDEN_LEAKS:  # the same leak with invisible characters the tokenizer drops
        index, space, e = HIDDEN_LEAKS[name]
        hidden = load_validation_rows("data", "sst2")[0][index]["sentence"].replace(" ", space, 1).replace("e", e, 1)
        old = row["inputs"]["sentence"]
        row["inputs"]["sentence"] = hidden
        for p in ("original_prompt", "paraphrase_prompt"):
            row[p] = row[p].replace(old, hidden)
    elif name == "paraphrase_prompt_drift":  # the prompt trained on is not built from paraphrase_instruction
        row["paraphrase_prompt"] = "Translate this sentence into French: " + row["inputs"]["sentence"]
    elif name == "negative_prompt_other_input":  # negative_inputs (what the leak check reads) not in the prompt
        val = load_validation_rows("data", "sst2")[0][5]["sentence"]
        row["negative_prompt"] = row["negative_prompt"].replace(row["negative_inputs"]["sentence"], val)
    elif name == "empty_negative_input":
        row["negative_inputs"]["sentence"] = " "
    elif name == "label_nan":
        row["label"] = float("nan")
    elif name == "answers_reordered":  # label 1 would name "negative": the calibration prior inverted
        row["answer_words"] = list(reversed(row["answer_words"]))
        row["label"] = row["answer_words"].index(row["target"])
        row["negative_label"] = row["answer_words"].index(row["negative_target"])
    elif name == "answers_of_another_task":  # an mnli row (3 labels) filed as rte (2): training crashed on it
        row["task"] = "rte"
    elif name == "paraphrase_text_appended":  # every chunk of the instruction there, and an order after the input
        text = row["inputs"]["sentence"]
        row["paraphrase_prompt"] = row["paraphrase_prompt"].replace(text, text + " Always answer positive.", 1)
    elif name == "negative_text_appended":
        row["negative_prompt"] += "\nAnswer: " + row["negative_target"]
    elif name == "negative_same_input":  # the original's own input, its options listed the other way round
        row["negative_inputs"] = dict(row["inputs"])
        words = row["answer_words"]
        row["negative_prompt"] = row["original_prompt"].replace("- " + "\n- ".join(words),
                                                                "- " + "\n- ".join(reversed(words)))
        assert row["negative_prompt"] != row["original_prompt"]
    elif name == "leaked_eval_example_in_instruction":  # a validation sentence as the instruction's worked case
        val = load_validation_rows("data", "sst2")[0][3]["sentence"]
        _set_paraphrase(row, f"Is this movie review positive or negative? For example, '{val}' is positive."
                             "\n{sentence}\n{options_}")
    elif name == "wordless_paraphrase":  # no instruction at all: the placeholders and the options
        _set_paraphrase(row, "{sentence}\n{options_}")
    else:
        raise KeyError(name)


# the task of the real row a case starts from (default sst2)
BASE_TASK = {"option_words_dropped": "mrpc", "answers_of_another_task": "mnli"}


# case -> (checks that must fail, exact?) ; exact = no other check may fail for this row
BROKEN: dict[str, tuple[set[str], bool]] = {
    # a copy is also a near-copy by embedding (MiniLM is uncased: case changes keep cosine ~1)
    "copy_paraphrase": ({"paraphrase_differs", "semantic_similarity"}, True),
    # (upper-casing also renames the placeholders and " ?!" lands in the last option: other checks may fire)
    "case_punct_paraphrase": ({"paraphrase_differs"}, False),
    "near_copy_paraphrase": ({"semantic_similarity"}, True),
    "drift_paraphrase": ({"semantic_similarity"}, True),
    "option_words_dropped": ({"option_words"}, True),
    "leaked_eval_instruction": ({"instruction_leakage"}, True),
    "near_duplicate_eval_instruction": ({"instruction_leakage"}, True),
    "leaked_eval_example": ({"example_leakage"}, True),
    "leaked_eval_negative": ({"example_leakage"}, True),
    "swapped_target": ({"target_in_answer_set"}, True),
    "unknown_target": ({"schema", "target_in_answer_set"}, True),
    "input_missing": ({"inputs_present"}, True),
    "negative_same_target": ({"negative_valid"}, True),
    "negative_same_example": ({"negative_valid"}, True),
    "negative_same_prompt": ({"negative_valid"}, False),  # its negative_inputs are then absent too
    "too_long": ({"schema", "token_length"}, True),
    "empty_target": ({"text_valid"}, False),
    "replacement_char": ({"text_valid"}, True),
    "lone_surrogate": ({"text_valid"}, True),
    "null_target": ({"schema"}, False),
    "missing_key": ({"schema"}, False),
    "label_str": ({"schema"}, True),
    "bad_split": ({"schema"}, True),
    "leaked_eval_example_zero_width": ({"example_leakage"}, True),
    "leaked_eval_example_control": ({"example_leakage"}, True),
    "paraphrase_prompt_drift": ({"inputs_present"}, False),
    "negative_prompt_other_input": ({"inputs_present"}, True),
    "empty_negative_input": ({"text_valid"}, False),
    "label_nan": ({"schema"}, False),
    "paraphrase_text_appended": ({"inputs_present"}, True),
    "answers_reordered": ({"target_in_answer_set"}, True),
    "answers_of_another_task": ({"target_in_answer_set"}, False),
    "negative_text_appended": ({"negative_valid"}, True),
    "negative_same_input": ({"negative_valid"}, True),
    "leaked_eval_example_in_instruction": ({"example_leakage"}, False),
    "wordless_paraphrase": ({"paraphrase_differs"}, False),
}
# a reason text that must be in the row's reasons (names the field and what is wrong)
REASONS = {
    "case_punct_paraphrase": "up to case, whitespace and punctuation",
    "near_copy_paraphrase": "above validate.max_similarity = 0.98 (a near-copy",
    "drift_paraphrase": "below validate.min_similarity = 0.4",
    "option_words_dropped": "'not_equivalent', 'equivalent' named in original_prompt's instruction are missing",
    "leaked_eval_instruction": "paraphrase_prompt contains evaluation instruction clean/sst2[0]",
    "near_duplicate_eval_instruction":
        "paraphrase_instruction is a near-duplicate of evaluation instruction clean/sst2[0]",
    "leaked_eval_example": "inputs contain evaluation example sst2.validation:7 of sst2",
    "leaked_eval_negative":
        "the hard negative's inputs (negative_inputs) contain evaluation example sst2.validation:9 of sst2",
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
    "leaked_eval_example_zero_width": "inputs contain evaluation example sst2.validation:5 of sst2",
    "leaked_eval_example_control": "inputs contain evaluation example sst2.validation:11 of sst2",
    "paraphrase_prompt_drift": "paraphrase_prompt does not use paraphrase_instruction",
    "negative_prompt_other_input": "negative_inputs.sentence",
    "empty_negative_input": "field 'negative_inputs.sentence' is empty",
    "label_nan": "field 'label' is a float",
    "paraphrase_text_appended": "paraphrase_prompt is not paraphrase_instruction filled with the row's inputs",
    "answers_reordered": "are sst2's label words in another order; word i must name label i",
    "answers_of_another_task": "has 3 words, but task 'rte' has 2 labels",
    "negative_same_input": "negative_inputs equal inputs (up to Unicode form and whitespace)",
    "leaked_eval_example_in_instruction":
        "paraphrase_instruction contains evaluation example sst2.validation:3 of sst2",
    "wordless_paraphrase": "paraphrase_instruction has no words beside its placeholders",
    "negative_text_appended": "negative_prompt is not original_instruction filled with the row's negative_inputs",
}


@pytest.fixture(scope="module")
def broken_run(real_rows, tokenizer, tmp_path_factory, embedder, eval_sources):
    rows = rows_copy(real_rows)
    # sst2 by default: a one-input task, removing its text empties no template
    first = {t: next(r for r in rows if r["task"] == t) for t in ("sst2", "mrpc", "mnli")}
    for name in BROKEN:
        row = copy.deepcopy(first[BASE_TASK.get(name, "sst2")])
        row["pair_id"] = f"broken:{name}"
        _break(name, row)
        rows.append(row)
    rows.append(copy.deepcopy(rows[1]))  # duplicate pair_id: both copies are rejected
    out = tmp_path_factory.mktemp("gate_broken")
    report = gate(rows, tokenizer, out, embedder, eval_sources)
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


def test_a_nan_label_is_not_called_missing(broken_run):
    (row,) = broken_run[2]["broken:label_nan"]
    assert not any("missing" in r for r in row["reasons"]), row["reasons"]


def test_a_pair_id_with_a_lone_surrogate_is_rejected_and_every_output_written(real_rows, tokenizer, tmp_path,
                                                                               embedder, eval_sources):
    """summary.json and the reports name the first failing row's pair_id: a lone surrogate there crashed the gate
    after valid.jsonl and rejects.jsonl were written (summary and report left from the run before)."""
    rows = rows_copy(real_rows[:20])
    rows[3]["pair_id"] += "\ud800"
    report = gate(rows, tokenizer, tmp_path, embedder, eval_sources, min_pass_rate=0.5)
    assert report.rows_rejected == 1
    summary = read_json(tmp_path / "summary.json")
    assert summary["checks"]["text_valid"]["example_pair_id"].endswith("\\ud800")
    (tmp_path / "report.html").read_text(encoding="utf-8")


def test_duplicate_pair_id_rejects_both(broken_run, real_rows):
    _, _, rejects, _ = broken_run
    dup = rejects[real_rows[1]["pair_id"]]
    assert len(dup) == 2 and all(r["failed_checks"] == ["schema"] for r in dup)
    assert "is not unique (2 rows share it)" in dup[0]["reasons"][0]


def test_an_int_pair_id_does_not_make_its_text_twin_a_duplicate(real_rows):
    """Wrong-typed text fields reached GX as their repr: the int 17 read as '17', and a valid row whose pair_id is
    the text '17' was rejected as 'not unique (1 rows share it)'."""
    rows = rows_copy(real_rows[:2])
    rows[0]["pair_id"], rows[1]["pair_id"] = 17, "17"
    first, second = CHECKS["schema"](rows, CheckContext(max_length_chars=4000, cutoff_len=CUTOFF, tokenizer=None))
    assert second.passed, second.findings
    assert not first.passed and [f.code for f in first.findings] == ["type:pair_id"], first.findings


def test_broken_run_keeps_every_row(broken_run, real_rows):
    rows, report, rejects, out = broken_run
    valid = read_jsonl(out / "valid.jsonl")
    n_rejects = sum(len(v) for v in rejects.values())
    assert len(valid) + n_rejects == len(rows) == report.rows_in  # nothing silently dropped
    assert valid == [r for r in real_rows if r["pair_id"] != real_rows[1]["pair_id"]]
    write_jsonl(out / "expected.jsonl", valid)  # the valid rows, byte for byte as the pairs stage writes them
    assert (out / "valid.jsonl").read_bytes() == (out / "expected.jsonl").read_bytes()
    assert report.rows_rejected == len(BROKEN) + 2
    summary = read_json(out / "summary.json")
    assert summary["rejects_per_reason"]["schema.unique:pair_id"] == 2
    negative_failed = {pid for pid, rs in rejects.items() if "negative_valid" in rs[0]["failed_checks"]}
    # the five broken negatives, two rows whose negative cannot be checked (null target, no negative_prompt), and
    # the blanked negative input (its prompt still holds the old one: not the instruction filled with its inputs)
    assert negative_failed == {f"broken:{n}" for n in (
        "negative_same_target", "negative_same_example", "negative_same_prompt", "negative_text_appended",
        "negative_same_input", "null_target", "missing_key", "empty_negative_input")}
    assert summary["checks"]["negative_valid"]["failures"] == 8
    assert summary["rejects_per_reason"]["negative_valid.unusable"] == 2


def test_surrogate_reject_is_written_escaped(broken_run):
    _, _, rejects, out = broken_run
    (row,) = rejects["broken:lone_surrogate"]
    assert "\\udc80" in row["original_prompt"]
    (out / "rejects.jsonl").read_text(encoding="utf-8")  # valid UTF-8 throughout


def test_rejects_file_is_strict_json(broken_run):
    """A NaN label was written bare (``"label": NaN``), which Python reads but jq, JavaScript and most JSON
    libraries refuse: every line of rejects.jsonl must parse under a strict reader; the NaN is kept as text."""
    _, _, rejects, out = broken_run

    def refuse(token):
        raise ValueError(f"non-standard JSON token {token}")

    for line in (out / "rejects.jsonl").read_text(encoding="utf-8").splitlines():
        json.loads(line, parse_constant=refuse)
    (row,) = rejects["broken:label_nan"]
    assert row["label"] == "NaN"


# --------------------------------------------------------------------------- the gate itself


def test_gate_failure_raises_after_writing(real_rows, tokenizer, tmp_path, embedder, eval_sources):
    rows = rows_copy(real_rows[:10])
    for r in rows[5:]:
        _break("copy_paraphrase", r)
    with pytest.raises(GateFailed) as info:
        gate(rows, tokenizer, tmp_path, embedder, eval_sources, min_pass_rate=0.9)
    msg = str(info.value)
    assert "pass rate 0.500 (5/10 rows)" in msg and "min_pass_rate = 0.9" in msg
    assert f"paraphrase_differs: 5 rows (e.g. pair_id {rows[5]['pair_id']!r}" in msg
    assert str(tmp_path / "rejects.jsonl") in msg and str(tmp_path / "report.html") in msg
    assert isinstance(info.value, RuntimeError) and info.value.report.rows_rejected == 5
    assert [r["pair_id"] for r in read_jsonl(tmp_path / "rejects.jsonl")] == [r["pair_id"] for r in rows[5:]]
    assert read_jsonl(tmp_path / "valid.jsonl") == rows[:5]
    assert read_json(tmp_path / "summary.json")["gate_passed"] is False
    assert (tmp_path / "data_docs" / "index.html").is_file()


def test_per_task_counts_and_a_task_left_without_rows_fails_the_gate(real_rows, tokenizer, tmp_path, embedder,
                                                                     eval_sources, caplog):
    """summary.json counts rows per task (valid + rejected = rows in); a task whose every training row is rejected
    fails the gate although the overall pass rate is above the threshold (a held-out row left does not count:
    training does not read it); one that keeps a few rows is warned about; a row without a known task is counted
    apart and empties nothing."""
    rows = rows_copy(real_rows)  # 5 rows of each of 8 tasks, all split train
    wnli = [r for r in rows if r["task"] == "wnli"]
    for r in wnli[:4]:
        _break("copy_paraphrase", r)
    wnli[4]["split"] = "val"  # valid, but held out
    for r in [r for r in rows if r["task"] == "rte"][:3]:
        _break("copy_paraphrase", r)
    stray = copy.deepcopy(rows[0])
    stray["pair_id"] = "stray"
    del stray["task"]
    rows.append(stray)
    with caplog.at_level("WARNING", logger="coin"), pytest.raises(GateFailed) as info:
        gate(rows, tokenizer, tmp_path, embedder, eval_sources, min_pass_rate=0.75)
    msg = str(info.value)
    assert "every training row of wnli was rejected" in msg and "overall pass rate 0.805" in msg, msg
    # the threshold is no fix for an emptied task, so the message does not offer it
    assert "drop the task (from pairs.tasks, or its rows from a pairs file" in msg, msg
    assert "or lower validate.min_pass_rate." not in msg, msg
    assert "rte kept 2 of 5 rows (pass rate 0.400, below validate.min_pass_rate = 0.75)" in caplog.text
    summary = read_json(tmp_path / "summary.json")
    per_task = summary["per_task"]
    assert per_task["wnli"] == {"rows_in": 5, "valid": 1, "rejected": 4, "pass_rate": 0.2, "train_in": 4,
                                "train_valid": 0}
    assert per_task["rte"]["valid"] == 2 and per_task["sst2"] == {"rows_in": 5, "valid": 5, "rejected": 0,
                                                                    "pass_rate": 1.0, "train_in": 5, "train_valid": 5}
    assert per_task["(no known task)"]["rows_in"] == 1 and info.value.report.emptied_tasks == ["wnli"]
    assert sum(c["valid"] for c in per_task.values()) == summary["rows_valid"] == 33
    assert sum(c["rejected"] for c in per_task.values()) == summary["rows_rejected"] == len(read_jsonl(
        tmp_path / "rejects.jsonl"))
    assert summary["gate_passed"] is False
    assert "Rows per task" in (tmp_path / "report.html").read_text()
    # the verdict says why it failed (the pass rate alone is above the threshold)
    assert "And every training row of wnli was rejected" in (tmp_path / "report.html").read_text()
    assert "FAILED**: 33/41 rows valid" in info.value.report.to_markdown()
    assert "; **every training row of wnli was rejected" in info.value.report.to_markdown().splitlines()[0]
    assert "| wnli | 5 | 1 | 4 | 0.200 (**no training row left**) |" in info.value.report.to_markdown()
    # below the threshold too: lowering it alone is still no fix for the emptied task, and the message said it was
    with pytest.raises(GateFailed) as both:
        gate(rows, tokenizer, tmp_path / "both", embedder, eval_sources, min_pass_rate=0.9)
    msg = str(both.value)
    assert "is below validate.min_pass_rate = 0.9" in msg and "drop the task (from pairs.tasks" in msg, msg
    assert "or lower validate.min_pass_rate." not in msg, msg
    # the stray row alone: rejected, counted apart, and the gate passes at threshold 0
    assert gate([stray, *rows_copy(real_rows)], tokenizer, tmp_path / "again", embedder, eval_sources,
                min_pass_rate=0.0).passed


def test_no_rows_fails_the_gate(tokenizer, tmp_path, embedder, eval_sources):
    with pytest.raises(GateFailed, match="no rows to validate") as err:
        gate([], tokenizer, tmp_path, embedder, eval_sources, min_pass_rate=0.0)
    assert "Build the pairs first" in str(err.value) and "or lower validate.min_pass_rate" not in str(err.value)
    assert (tmp_path / "rejects.jsonl").read_text() == ""
    # every page says so: the Data Docs' verdict read "Succeeded" (GX passes a column check on no rows), and the
    # report page and the markdown summary (the flow's artifact) said FAILED with no reason
    assert _verdict_icons(tmp_path)[2] == "fa-times"
    assert "no rows to validate" in (tmp_path / "report.html").read_text()
    assert "no rows to validate" in err.value.report.to_markdown()


def _verdict_icons(out: Path) -> list[str]:
    """The Data Docs checks page's status icon of each of the gate's three verdict expectations."""
    page = next((out / "data_docs" / "validations" / "coin_gate_checks").rglob("*.html")).read_text()
    icons = []
    for text in ("the gate: at least validate.min_pass_rate", "the gate: no task loses every training row",
                 "the gate: there are rows to validate"):
        before = page[: page.index(text)]
        icons.append(re.findall(r'<i class="fas (fa-[a-z-]+)', before)[-1])
    return icons


def test_the_data_docs_state_the_gates_verdict(real_rows, tokenizer, tmp_path, embedder, eval_sources):
    """The Data Docs showed only that some rows failed some checks ("Failed") when the gate had passed, and
    never the pass rate against validate.min_pass_rate or an emptied task: the gate's verdict is on the page."""
    rows = rows_copy(real_rows)
    _break("unknown_target", rows[0])
    assert gate(rows, tokenizer, tmp_path / "passed", embedder, eval_sources, min_pass_rate=0.9).passed
    assert _verdict_icons(tmp_path / "passed") == ["fa-check-circle", "fa-check-circle", "fa-check-circle"]
    with pytest.raises(GateFailed):
        gate(rows, tokenizer, tmp_path / "rate", embedder, eval_sources, min_pass_rate=1.0)
    assert _verdict_icons(tmp_path / "rate") == ["fa-times", "fa-check-circle", "fa-check-circle"]
    for r in (r for r in rows if r["task"] == "wnli"):
        _break("unknown_target", r)
    with pytest.raises(GateFailed):
        gate(rows, tokenizer, tmp_path / "emptied", embedder, eval_sources, min_pass_rate=0.5)
    assert _verdict_icons(tmp_path / "emptied") == ["fa-check-circle", "fa-times", "fa-check-circle"]


def test_a_gate_that_keeps_no_row_fails_at_any_threshold(real_rows, tokenizer, tmp_path, embedder, eval_sources):
    """Every row rejected (each with a split that is neither train nor val) passed the gate at min_pass_rate 0 with
    an empty valid.jsonl, and training then blamed pairs.val_fraction."""
    rows = [dict(r, split="test") for r in rows_copy(real_rows)]
    with pytest.raises(GateFailed) as err:
        gate(rows, tokenizer, tmp_path, embedder, eval_sources, min_pass_rate=0.0)
    assert err.value.report.rows_valid == 0 and "Every row was rejected" in str(err.value)
    assert "or lower validate.min_pass_rate." not in str(err.value)


def test_a_task_whose_rows_have_a_wrong_split_is_emptied(real_rows, tokenizer, tmp_path, embedder, eval_sources):
    """A task whose rows are all rejected for their split ('Train', missing) had no 'training row' to lose: the
    gate passed and training ran without the task, with only a warning."""
    rows = rows_copy(real_rows)
    for r in (r for r in rows if r["task"] == "sst2"):
        r["split"] = "Train"
    with pytest.raises(GateFailed) as err:
        gate(rows, tokenizer, tmp_path, embedder, eval_sources, min_pass_rate=0.5)
    assert err.value.report.emptied_tasks == ["sst2"]
    assert err.value.report.per_task["sst2"]["train_in"] == 5


@pytest.mark.parametrize("field, value", [
    ("answer_words", ["negative", 1]), ("answer_words", [None, "positive"]), ("answer_words", [["a"], "b"]),
    ("task", ["sst2"]), ("task", {"name": "sst2"})])
def test_a_wrong_typed_answer_word_or_task_is_a_finding_not_a_crash(real_rows, field, value):
    """One row with a number among its answer words, or a list for its task, stopped the whole gate with a
    TypeError (after the schema check had rebuilt data_docs/)."""
    row = copy.deepcopy(next(r for r in real_rows if r["task"] == "sst2"))
    row[field] = value
    (res,) = CHECKS["target_in_answer_set"]([row], CheckContext(max_length_chars=4000, cutoff_len=CUTOFF,
                                                                tokenizer=None))
    if field == "answer_words":
        assert not res.passed and res.findings[0].code == "answer_not_text"


def test_a_list_task_or_a_number_for_answer_words_is_rejected_by_the_whole_gate(real_rows, tokenizer, tmp_path,
                                                                                  embedder, eval_sources):
    """Through run_gate, not one check: a list task crashed the Data Docs' verdict column (unhashable) after
    valid.jsonl was written, and answer_words = 2 crashed inputs_present; each left the last run's verdict."""
    rows = rows_copy(real_rows[:6])
    rows[0]["task"] = ["sst2"]
    rows[1]["answer_words"] = 2
    rows[2]["answer_words"] = True
    report = gate(rows, tokenizer, tmp_path, embedder, eval_sources, min_pass_rate=0.0)
    rejected = {r["pair_id"]: r for r in read_jsonl(tmp_path / "rejects.jsonl")}
    assert set(rejected) == {rows[i]["pair_id"] for i in range(3)} and report.rows_valid == 3
    assert read_json(tmp_path / "summary.json")["rows_rejected"] == 3


def test_training_refuses_rows_that_the_verdict_beside_them_did_not_judge(real_rows, tokenizer, tmp_path, embedder,
                                                                         eval_sources, monkeypatch):
    """A gate stopped between writing valid.jsonl and summary.json (killed; a crash in its pages) left new rows
    beside the last run's passing verdict, and training read them as passed."""
    import coin.validation.schema as schema
    from coin.validation.result import read_training_rows

    rows = rows_copy(real_rows[:10])
    gate(rows, tokenizer, tmp_path, embedder, eval_sources, min_pass_rate=0.9)
    assert read_training_rows(tmp_path / "valid.jsonl", "") == rows  # the verdict's own rows: read
    for r in rows[5:]:
        _break("copy_paraphrase", r)  # a run that would fail the gate ...

    def stopped(*a, **k):
        raise KeyboardInterrupt  # ... stopped while it builds its pages, after valid.jsonl

    monkeypatch.setattr(schema, "document_checks", stopped)
    with pytest.raises(KeyboardInterrupt):
        gate(rows, tokenizer, tmp_path, embedder, eval_sources, min_pass_rate=0.9)
    assert read_json(tmp_path / "summary.json")["gate_passed"] is True  # the last run's verdict ...
    assert len(read_jsonl(tmp_path / "valid.jsonl")) == 5  # ... beside this run's rows
    with pytest.raises(DataError, match=r"valid\.jsonl: not the rows .*summary\.json judged .*Rerun `coin validate`"):
        read_training_rows(tmp_path / "valid.jsonl", "")


def test_training_at_a_shorter_cutoff_than_the_gate_judged_is_refused_before_any_step(real_rows, tokenizer, tmp_path,
                                                                                     embedder, eval_sources):
    """`coin train --set pairs.cutoff_len=N` below the gate's cutoff read the rows, then failed on the first row that
    did not fit, after a number of steps the data order decided (and again on resume). Refused up front now; the
    same or a longer cutoff reads the rows."""
    from coin.validation.result import read_training_rows

    rows = rows_copy(real_rows[:6])
    gate(rows, tokenizer, tmp_path, embedder, eval_sources, cutoff=CUTOFF)
    valid = tmp_path / "valid.jsonl"
    assert read_training_rows(valid, "", cutoff_len=CUTOFF) == read_training_rows(valid, "", cutoff_len=CUTOFF + 64)
    with pytest.raises(DataError, match=rf"judged these rows at pairs.cutoff_len = {CUTOFF}, and training cuts at "
                                        rf"{CUTOFF - 1}: .*Rerun `coin validate` with pairs.cutoff_len = {CUTOFF - 1}"):
        read_training_rows(valid, "", cutoff_len=CUTOFF - 1)


def test_a_gate_that_keeps_no_row_at_threshold_0_says_so_not_an_unnamed_task(real_rows, tokenizer, tmp_path,
                                                                             embedder, eval_sources):
    rows = [dict(r, split="val") for r in rows_copy(real_rows[:5])]
    for r in rows:
        _break("copy_paraphrase", r)
    with pytest.raises(GateFailed) as err:
        gate(rows, tokenizer, tmp_path, embedder, eval_sources, min_pass_rate=0.0)
    msg = str(err.value)
    assert msg.startswith("validation gate failed: no row passed every check (5 rows in, all rejected)."), msg
    assert "every training row of  was" not in msg and err.value.report.emptied_note == "no row passed every check"


# --------------------------------------------------------------------------- semantic and leak checks, unit level


class FakeEmbedder:
    """Texts -> fixed unit vectors: cosine(a, b) is whatever the test sets (no model needed)."""

    def __init__(self, vectors: dict[str, list[float]]) -> None:
        self.vectors = vectors
        self.seen: list[list[str]] = []

    def __call__(self, texts: list[str]) -> np.ndarray:
        self.seen.append(list(texts))
        return np.asarray([self.vectors[t] for t in texts], dtype=np.float64)


def _sim_row(a: str, b: str) -> dict[str, Any]:
    return {"original_instruction": a, "paraphrase_instruction": b}


def test_similarity_bounds_are_inclusive_and_cached():
    # unit vectors whose cosine with "a" is exactly 0.6 / 0.8 (the bounds), 0.28 (drift) and 0.96 (copy)
    fake = FakeEmbedder({"a": [1.0, 0.0], "lo": [0.6, 0.8], "hi": [0.8, 0.6], "drift": [0.28, 0.96],
                         "copy": [0.96, 0.28]})
    ctx = CheckContext(4000, 256, None, cfg=ValidateSettings(min_similarity=0.6, max_similarity=0.8),
                       embedder=CachedEmbedder(fake))
    rows = [_sim_row("a", "lo"), _sim_row("a", "hi"), _sim_row("a", "drift"), _sim_row("a", "copy"),
            _sim_row("a", "lo")]
    res = CHECKS["semantic_similarity"](rows, ctx)
    assert [r.passed for r in res] == [True, True, False, False, True]
    assert res[2].findings[0].code == "meaning_drift" and "0.280, below validate.min_similarity = 0.6" in res[2].reason
    assert res[3].findings[0].code == "near_copy" and "0.960, above validate.max_similarity = 0.8" in res[3].reason
    assert fake.seen == [["a", "copy", "drift", "hi", "lo"]]  # one batched call, each distinct text once
    stats = ctx.stats["semantic_similarity"]
    assert (stats["n"], stats["below_min"], stats["above_max"], stats["min"], stats["max"]) == (5, 1, 1, 0.28, 0.96)


def test_similarity_ignores_inputs_and_options():
    """The embedded text is the instruction only: placeholders by name, no {options_}, no input text."""
    fake = FakeEmbedder({"Is it good? sentence": [1.0, 0.0], "sentence Good or not?": [0.0, 1.0]})
    ctx = CheckContext(4000, 256, None, embedder=CachedEmbedder(fake))
    row = _sim_row("Is it good?\n{sentence}\n{options_}", "{sentence}\nGood or not?\n\n{options_}")
    (res,) = CHECKS["semantic_similarity"]([row], ctx)
    assert fake.seen == [["Is it good? sentence", "sentence Good or not?"]] and res.findings[0].code == "meaning_drift"


def test_checks_without_their_inputs_fail_loudly(real_rows):
    ctx = CheckContext(4000, 256, None)
    with pytest.raises(RuntimeError, match="needs sentence embeddings"):
        CHECKS["semantic_similarity"](real_rows[:1], ctx)
    with pytest.raises(RuntimeError, match="needs what the evaluation uses"):
        CHECKS["example_leakage"](real_rows[:1], ctx)


@pytest.mark.parametrize(("original", "paraphrase", "missing"), [
    # label words named in the instruction text must survive even when the options block is gone
    ("Is it positive or negative?\n{s}\n{o}", "Is it good?\n{s}", ["'negative'", "'positive'"]),
    # the options block alone names them; the paraphrase may name them in its own words instead
    ("Is it good?\n{s}\n{o}", "Answer positive or negative: {s}", []),
    # an input text that happens to contain a label word does not count as naming it
    ("Is it good?\n{s}\n{o}", "Is it good?\n{s}", ["'negative'", "'positive'"]),
])
def test_option_words(original, paraphrase, missing):
    opts = "OPTIONS:\n- negative\n- positive"
    text = "a positive and negative film"
    row = {"task": "sst2", "inputs": {"sentence": text}, "answer_words": ["negative", "positive"],
           "original_prompt": original.format(s=text, o=opts), "paraphrase_prompt": paraphrase.format(s=text, o=opts)}
    (res,) = CHECKS["option_words"]([row], CheckContext(4000, 256, None))
    if missing:
        assert res.findings[0].code == "option_word_missing"
        assert all(w in res.reason for w in missing), res.reason
    else:
        assert res.passed, res.reason


def test_option_words_added_option():
    row = {"task": "rte", "inputs": {"sentence1": "x", "sentence2": "y"},
           "answer_words": ["entailment", "not_entailment"],
           "original_prompt": "x\ny\nOPTIONS:\n- entailment\n- not_entailment",
           "paraphrase_prompt": "x\ny\nOPTIONS:\n- entailment\n- not_entailment\n- neutral"}
    (res,) = CHECKS["option_words"]([row], CheckContext(4000, 256, None))
    assert [f.code for f in res.findings] == ["option_word_added"] and "'neutral'" in res.reason


def test_eval_sources_cover_every_set_and_task(eval_sources):
    instructions = load_eval_instructions(EVAL.instruction_file)
    assert len(instructions) == 246 == len(eval_sources.instructions)
    assert {i.set_name for i in instructions} == {"clean", "deepwordbug", "textfooler", "checklist", "semantic"}
    assert "squad_v2" in {i.task for i in instructions}  # tasks outside the evaluation too
    with_qqp = load_eval_sources(EVAL.instruction_file, "data", ["sst2", "qqp"])
    assert with_qqp.example_tasks == ["sst2"] and len(with_qqp.examples) == 872
    assert any(n.startswith("qqp: evaluation examples not checked") for n in with_qqp.notes)


def test_example_index_matching():
    from coin.validation.leakage import EvalExample, ExampleIndex, example_leaks

    long = "The committee did n't approve the -LRB- revised -RRB- budget for the coming fiscal year."
    index = ExampleIndex([["The committee didn't approve the (revised) budget for the coming fiscal year. More text."],
                          ["short one", "Some premise."]], min_chars=40)
    assert index.rows_with(long) == {0}                    # PTB tokenisation undone, contained in a longer input
    assert index.rows_with("short  one!") == {1}           # equal up to case / space / punctuation
    assert index.rows_with("short") == set()               # short texts must be equal, not contained
    leaks, partial = example_leaks(index, [
        EvalExample("rte", "rte.validation:0", (("sentence1", "Some premise."), ("sentence2", "short one"))),
        EvalExample("rte", "rte.validation:1", (("sentence1", "Some premise."), ("sentence2", "another hypothesis"))),
    ])
    # a shared premise alone is no leak
    assert [e.example_id for e in leaks[1]] == ["rte.validation:0"] and partial == 1


def test_rule_paraphrases_go_through_the_gate(tokenizer, embedder, eval_sources, tmp_path):
    """Generated paraphrases are checked like FLAN ones and (on these tasks) pass; each row names its source."""
    rows = build_pairs("data", PairsSettings(tasks=["sst2", "mrpc", "rte"], rows_per_task=4, paraphrase_source="both",
                                             strategy="all"), 7)
    assert {r["paraphrase_source"] for r in rows} == {"flan", "rules"}
    ctx = CheckContext(4000, CUTOFF, tokenizer, embedder=embedder, eval_sources=eval_sources)
    results, _ = run_checks_without_schema(rows, ctx)
    failed = {name: [i for i, r in enumerate(res) if not r.passed] for name, res in results.items()}
    rules = [i for i, r in enumerate(rows) if r["paraphrase_source"] == "rules"]
    rule_fail = {i for ids in failed.values() for i in ids if i in set(rules)}
    assert len(rule_fail) <= 0.05 * len(rules), {n: [rows[i]["pair_id"] for i in ids] for n, ids in failed.items()}
    for name in ("paraphrase_differs", "inputs_present", "option_words", "instruction_leakage"):
        assert not failed[name], (name, failed[name])


def run_checks_without_schema(rows, ctx):
    from coin.validation import run_checks

    return run_checks(rows, ctx, [n for n in CHECKS if n != "schema"])


def test_read_jsonl_refuses_a_key_twice_as_read_json_does(tmp_path):
    """A pairs or GLUE row with a key written twice: JSON keeps the last, and the gate validated that one."""
    from coin.data.io import DataError

    f = tmp_path / "rows.jsonl"
    f.write_text('{"sentence": "a", "label": 0}\n{"label": 0, "sentence": "b", "label": 1}\n')
    with pytest.raises(DataError, match=r"rows.jsonl:2: key 'label' appears twice"):
        read_jsonl(f)


def test_cosine_of_a_text_with_itself_is_never_above_one(embedder):
    """Unit vectors' dot products reached 1 + 4e-16: with validate.max_similarity 1.0 (the bound turned off) a
    pair whose instruction texts are the same was rejected as 'above 1.0'."""
    texts = ["Is this review positive or negative?", "Does the sentence make sense?"] * 3
    assert float(embedder.cosine(texts, texts).max()) <= 1.0
    assert float(embedder.cosine_matrix(texts, texts).max()) <= 1.0


def test_a_pairs_file_with_a_byte_order_mark_reads(tmp_path):
    """Notepad saves UTF-8 with a BOM: line 1 was 'bad JSON ... fix or remove the line', dropping a valid row."""
    f = tmp_path / "pairs.jsonl"
    f.write_bytes(b"\xef\xbb\xbf" + b'{"a": 1}\n{"a": 2}\n')
    assert read_jsonl(f) == [{"a": 1}, {"a": 2}]


def test_a_json_file_with_a_byte_order_mark_reads_as_a_jsonl_one_does(tmp_path):
    """An instruction file or FLAN template file saved by Notepad was refused with Python's 'decode using
    utf-8-sig', which no user can act on; read_jsonl already read past the mark."""
    from coin.data.io import read_json
    from coin.evaluation.instructions import load_instruction_sets

    f = tmp_path / "mine.json"
    f.write_bytes(b"\xef\xbb\xbf" + json.dumps({"perturbations": {"clean": {"sst2": ["Sentiment: "]}}}).encode())
    assert read_json(f)["perturbations"]["clean"] == {"sst2": ["Sentiment: "]}
    assert load_instruction_sets(f, ["clean"], ["sst2"]) == {"clean": {"sst2": ["Sentiment: "]}}


def test_a_lone_surrogate_escape_is_refused_naming_the_file_line_and_field(tmp_path):
    """An emoji escape cut in half ('\\ud83d', e.g. a substring before JSON.stringify) is valid JSON but no text: a
    data row failed at the next write with an encoding error naming no file (exit 2), an instruction failed coin
    validate with a tokenizer TypeError reported as a bug. A whole pair (an emoji) still reads."""
    from coin.data.io import DataError, read_json

    rows = tmp_path / "sst2.train.jsonl"
    rows.write_text('{"sentence": "fine \\ud83d\\ude00", "label": 1}\n{"sentence": "caf\\u00e9 \\ud83d", "label": 0}\n')
    with pytest.raises(DataError, match=r"sst2\.train\.jsonl:2: field 'sentence' holds a lone UTF-16 surrogate "
                                        r"\(\\ud83d at character 5"):
        read_jsonl(rows)
    rows.write_text('{"sentence": "fine \\ud83d\\ude00", "label": 1}\n')
    assert read_jsonl(rows)[0]["sentence"] == "fine \U0001f600"
    doc = tmp_path / "mine.json"
    doc.write_text('{"perturbations": {"clean": {"sst2": ["Sentiment: ", "Is it good? \\udc00"]}}}')
    with pytest.raises(DataError, match=r"mine\.json: field 'perturbations\.clean\.sst2\[1\]' holds a lone"):
        read_json(doc)


def test_a_pipe_in_a_pair_id_does_not_split_the_summary_table(real_rows, tokenizer, tmp_path, embedder, eval_sources):
    rows = rows_copy(real_rows[:10])
    rows[0]["pair_id"] = "cola|x"
    rows[0]["target"] = "maybe"
    report = gate(rows, tokenizer, tmp_path, embedder, eval_sources)
    line = next(ln for ln in report.to_markdown().splitlines() if "cola" in ln and ln.startswith("| target_in"))
    assert line.count(" | ") == 3 and "cola\\|x" in line, line


def test_quiet_gx_drops_the_info_chatter_of_a_logger_that_sets_its_own_level():
    """great_expectations.data_context.types.base sets INFO on itself at import: "Created temporary directory ...
    for ephemeral docs site" was printed by every validate."""
    import logging

    from coin.validation.schema import quiet_gx

    quiet_gx()
    import great_expectations.data_context.types.base  # noqa: F401

    quiet_gx()
    assert not logging.getLogger("great_expectations.data_context.types.base").isEnabledFor(logging.INFO)


def test_the_gates_embedder_loads_without_a_progress_bar(capfd):
    from coin.validation.embeddings import minilm_embedder

    minilm_embedder()
    assert "Loading weights" not in capfd.readouterr().err


def test_the_report_logged_to_mlflow_finds_its_data_docs_pages(valid_run, tmp_path):
    """report.html links to the Data Docs pages by relative links; only summary.json, rejects.jsonl and report.html
    were logged, so every link of the run's report was dead in MLflow."""
    import shutil

    import mlflow
    from mlflow import MlflowClient

    from coin.config import Settings
    from coin.layout import Layout
    from coin.registry.tracking import setup_tracking
    from coin.stages import _log_gate

    _, report, out = valid_run
    settings = Settings.model_validate({"paths": {"mlruns_dir": str(tmp_path / "mlruns")}})
    lay = Layout(tmp_path, settings)
    shutil.copytree(out, lay.validated_dir)
    setup_tracking(settings, tmp_path)
    with mlflow.start_run() as run:
        _log_gate(report, lay)
    client = MlflowClient()

    def files(path: str) -> list[str]:
        return [x for a in client.list_artifacts(run.info.run_id, path)
                for x in (files(a.path) if a.is_dir else [a.path])]

    logged = set(files("validate"))
    links = re.findall(r'href="([^"#]+)"', (lay.validated_dir / "report.html").read_text())
    assert links and all(f"validate/{link}" in logged for link in links), (links, sorted(logged))
    assert not any("/static/" in p for p in logged)  # the pages' fonts and styles stay behind


def test_a_cosine_beside_its_bound_is_printed_with_the_digits_that_tell_them_apart():
    """0.68487 against min_similarity 0.685 read "is 0.685, below validate.min_similarity = 0.685"; a cosine just
    below 0.684867710895852 read "0.685, below" it."""
    from coin.validation.text import apart as _apart

    assert _apart(0.68487, 0.685) == "0.6849" and _apart(0.9803, 0.98) == "0.9803"
    assert _apart(0.6848677108, 0.684867710895852) == "0.6848677" and _apart(0.5, 0.4) == "0.500"


def test_the_gates_pages_show_row_text_as_text_whole_or_marked_cut(real_rows, tokenizer, tmp_path, embedder,
                                                                     eval_sources):
    """A target '<script>...' ran as markup in the Data Docs page; a line break in a pair_id split the markdown
    summary's row; its threshold was rounded to 3 decimals (FAILED beside "pass rate 0.997, threshold 0.997"); a
    reason longer than 300 characters was cut with nothing to say so."""
    rows = rows_copy(real_rows[:8])
    rows[0]["pair_id"] = "row|one\nsecond <b>line</b>"  # the first failing row: the one the summaries name
    rows[0]["target"] = "ok " * 120
    rows[1]["target"] = "<script>alert('x')</script>"
    with pytest.raises(GateFailed) as info:
        gate(rows, tokenizer, tmp_path, embedder, eval_sources, min_pass_rate=0.7654)
    pages = "".join(p.read_text() for p in (tmp_path / "data_docs").rglob("*.html"))
    assert "<script>alert" not in pages and "&lt;script&gt;alert" in pages
    assert "&amp;lt;script" not in pages  # escaped once, not twice
    md = info.value.report.to_markdown()
    row = next(line for line in md.splitlines() if "row\\|one" in line)
    assert row.endswith(" |") and "second <b>line</b>" in row  # the whole cell on one line
    assert "threshold 0.7654" in md and "pass rate 0.750" in md
    assert len(info.value.report.checks["target_in_answer_set"].example_reason) > 300
    assert "… (cut; whole in rejects.jsonl)" in (tmp_path / "report.html").read_text()


def test_the_schema_page_shows_failing_values_as_text_and_the_gate_reads_the_same_numbers(real_rows, tokenizer,
                                                                                          tmp_path, embedder,
                                                                                          eval_sources):
    """The schema suite's page printed a failing task, split, pair_id or prompt unescaped ('<img onerror=...>' ran as
    markup); the failure message printed a pass rate of 0.68750 as "0.688 ... is below validate.min_pass_rate =
    0.68751" and cut its example reason mid-word at 200 characters with nothing to say so."""
    rows = rows_copy(real_rows[:16])
    rows[0]["task"] = "<img src=x onerror=alert(1)>"
    rows[1]["split"] = "<b>BOLDSPLIT</b>"
    rows[2]["pair_id"] = rows[3]["pair_id"] = "<u>UNDERPID</u>"
    rows[4]["original_prompt"] = "<i>" * 1400  # 4,200 characters as written (more once escaped): too long
    rows[5]["original_prompt"] = "<" * 4000    # exactly validate.max_length_chars as written: not too long
    rows[0]["split"] = "training" + "y" * 150  # the first failing row's reason, the one the message quotes: long
    with pytest.raises(GateFailed) as info:
        gate(rows, tokenizer, tmp_path, embedder, eval_sources, min_pass_rate=0.99)
    report = info.value.report
    pages = "".join(p.read_text() for p in (tmp_path / "data_docs").rglob("*.html"))
    for markup in ("<img src=x", "<b>BOLDSPLIT", "<u>UNDERPID", "<i><i>"):
        assert markup not in pages, markup
    assert "&lt;u&gt;UNDERPID&lt;/u&gt;" in pages
    rejects = [json.loads(line) for line in (tmp_path / "rejects.jsonl").open()]
    reasons = {r["pair_id"]: json.dumps(r["reasons"]) for r in rejects}
    first = reasons[real_rows[0]["pair_id"]]
    assert "is not one of" in first and "<img src=x onerror" in first
    assert "has 4200 chars, outside 1..4000" in reasons[real_rows[4]["pair_id"]]
    assert "chars, outside" not in reasons.get(real_rows[5]["pair_id"], "")  # its tokens are what is too long
    assert "is not unique (2 rows share it)" in reasons["<u>UNDERPID</u>"]
    # the headline's pass rate reads below the threshold it failed, however close
    close = dataclasses.replace(report, min_pass_rate=report.pass_rate + 1e-5)
    rate = re.search(r"pass rate ([0-9.]+) \(", close.failure_message()).group(1)
    assert float(rate) < close.min_pass_rate, rate
    assert "(cut; whole in " in report.failure_message()
