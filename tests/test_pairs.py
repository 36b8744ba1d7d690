"""Pair rendering on the real GLUE rows and FLAN templates shipped in data/."""

import json
import shutil
from pathlib import Path

import pytest

from coin.config import ConfigError, PairsSettings, Settings
from coin.data.io import DataError, read_jsonl, write_jsonl
from coin.data.pairs import PAIR_COLUMNS, build_pairs, build_task_pairs
from coin.data.tasks import TASKS
from coin.data.templates import format_options

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "data"


def _cfg(**kw):
    base = dict(tasks=["rte", "sst2"], rows_per_task=12, val_fraction=0.25)
    base.update(kw)
    return PairsSettings(**base)


def test_shuffled_option_order_keeps_the_rows_and_varies_only_the_listed_order():
    """pairs.option_order: shuffled lists each example's options in a seeded order shared by the original, its
    paraphrase and the negative; the rows, targets and negatives drawn are those of the fixed order."""
    from coin.validation.checks import option_block

    kw = dict(tasks=["sst2", "mnli", "rte"], rows_per_task=40)
    fixed = build_pairs(DATA, _cfg(**kw), seed=3)
    shuffled = build_pairs(DATA, _cfg(option_order="shuffled", **kw), seed=3)
    assert shuffled == build_pairs(DATA, _cfg(option_order="shuffled", **kw), seed=3)  # seeded
    keep = ("pair_id", "example_id", "label", "target", "negative_example_id", "template_a", "template_b")
    assert [{k: r[k] for k in keep} for r in fixed] == [{k: r[k] for k in keep} for r in shuffled]
    orders = set()
    for f, r in zip(fixed, shuffled, strict=True):
        assert option_block(f["original_prompt"]) == r["answer_words"]  # fixed: label order
        listed = option_block(r["original_prompt"])
        assert sorted(listed) == sorted(r["answer_words"])
        assert option_block(r["paraphrase_prompt"]) == listed and option_block(r["negative_prompt"]) == listed
        # the prompts differ from the fixed order's in the options block only
        assert r["original_prompt"].replace(format_options(listed), format_options(r["answer_words"])) == \
            f["original_prompt"]
        orders.add((r["task"], tuple(listed)))
    # every order of sst2's two options and more than two of mnli's six occur
    assert {o for t, o in orders if t == "sst2"} == {("negative", "positive"), ("positive", "negative")}
    assert len({o for t, o in orders if t == "mnli"}) > 2


def test_rows_are_explicit_triplets_on_real_rows():
    rows = build_pairs(DATA, _cfg(), seed=1)
    assert len(rows) == 24
    first_rte = read_jsonl(DATA / "glue" / "rte.train.jsonl")
    for r in rows:
        assert set(r) == set(PAIR_COLUMNS)
        assert r["template_a"] != r["template_b"]
        assert r["target"] == TASKS[r["task"]].label_words[r["label"]]
        assert r["negative_target"] != r["target"] and r["negative_label"] != r["label"]
        assert r["negative_example_id"] != r["example_id"]
        for text in r["inputs"].values():
            assert text in r["original_prompt"] and text in r["paraphrase_prompt"]
        assert r["original_prompt"] != r["paraphrase_prompt"]
        assert r["original_prompt"].endswith(format_options(r["answer_words"]))
    # the rendered rte input is the real GLUE row its id points to (line number in the train file)
    r = next(r for r in rows if r["task"] == "rte")
    src = first_rte[int(r["example_id"].split(":")[-1])]
    assert r["inputs"] == {"sentence1": src["sentence1"], "sentence2": src["sentence2"]}
    # the negative uses the original's template A on the other example
    neg_src = first_rte[int(r["negative_example_id"].split(":")[-1])]
    assert neg_src["sentence1"] in r["negative_prompt"]


def test_flan_answer_words_option():
    rows = build_pairs(DATA, _cfg(tasks=["rte"], answers="flan"), seed=1)
    assert {r["target"] for r in rows} <= {"yes", "no"}
    assert all("OPTIONS:\n- yes\n- no" in r["original_prompt"] for r in rows)


def test_deterministic_bytes(tmp_path):
    a = write_jsonl(tmp_path / "a.jsonl", build_pairs(DATA, _cfg(), seed=3))
    b = write_jsonl(tmp_path / "b.jsonl", build_pairs(DATA, _cfg(), seed=3))
    assert a == b and (tmp_path / "a.jsonl").read_bytes() == (tmp_path / "b.jsonl").read_bytes()
    c = build_pairs(DATA, _cfg(), seed=4)
    assert [r["pair_id"] for r in c] != [json.loads(line)["pair_id"] for line in (tmp_path / "a.jsonl").open()]


def test_split_is_by_example_and_sized():
    rows = build_pairs(DATA, _cfg(tasks=["sst2"], rows_per_task=20, strategy="all", val_fraction=0.25), seed=0)
    val = {r["example_id"] for r in rows if r["split"] == "val"}
    train = {r["example_id"] for r in rows if r["split"] == "train"}
    assert len(val) == 5 and len(train) == 15 and not (val & train)
    # "all": every ordered pair of the 8 sst2 classification templates
    assert len(rows) == 20 * 8 * 7


def test_template_ids_are_checked():
    with pytest.raises(DataError, match=r"template ids \[8\] of task sst2 are not usable classification templates"):
        list(build_task_pairs(DATA, "sst2", _cfg(templates=[0, 8]), seed=0))


def test_a_template_that_repeats_another_is_named_as_a_copy():
    """FLAN's CoLA template 3 is a classification template whose text repeats template 0's; naming it was refused
    as 'not usable' with no word of why."""
    with pytest.raises(DataError, match=r"template ids \[3\] of task cola .*template 3 repeats template 0's text"):
        list(build_task_pairs(DATA, "cola", _cfg(tasks=["cola"], templates=[0, 3]), seed=0))


def test_malformed_train_file_names_file_line_field(tmp_path):
    (tmp_path / "glue").mkdir()
    (tmp_path / "flan").mkdir()
    (tmp_path / "flan" / "flan_glue_templates.json").write_text(
        (DATA / "flan" / "flan_glue_templates.json").read_text())
    f = tmp_path / "glue" / "sst2.train.jsonl"
    f.write_text('{"sentence": "ok", "label": 1}\n{"sentence": "x", "label": "1"}\n')
    with pytest.raises(DataError, match=r"sst2.train.jsonl:2: field 'label' should be int"):
        build_pairs(tmp_path, _cfg(tasks=["sst2"]), seed=0)
    f.write_text('{"sentence": "ok", "label": 1}\n{"label": 0}\n')
    with pytest.raises(DataError, match=r"sst2.train.jsonl:2: missing field 'sentence'"):
        build_pairs(tmp_path, _cfg(tasks=["sst2"]), seed=0)
    f.write_text('{"sentence": "ok", "label": 1}\n{"sentence": "x", "label": 0\n')
    with pytest.raises(DataError, match=r"sst2.train.jsonl:2: bad JSON"):
        build_pairs(tmp_path, _cfg(tasks=["sst2"]), seed=0)


# --------------------------------------------------------------------------- paraphrase sources


@pytest.mark.parametrize("source", ["flan", "rules", "both"])
@pytest.mark.parametrize("strategy", ["random", "all"])
def test_deterministic_bytes_every_source(tmp_path, source, strategy):
    cfg = _cfg(tasks=["rte", "sst2", "qnli"], rows_per_task=6, paraphrase_source=source, strategy=strategy)
    write_jsonl(tmp_path / "a.jsonl", build_pairs(DATA, cfg, seed=5))
    write_jsonl(tmp_path / "b.jsonl", build_pairs(DATA, cfg, seed=5))
    assert (tmp_path / "a.jsonl").read_bytes() == (tmp_path / "b.jsonl").read_bytes()
    rows = read_jsonl(tmp_path / "a.jsonl")
    assert len({r["pair_id"] for r in rows}) == len(rows)
    assert {r["paraphrase_source"] for r in rows} == ({"flan", "rules"} if source == "both" else {source})


def test_rule_paraphrases_keep_placeholders_and_option_words():
    from coin.data.templates import placeholders

    rows = build_pairs(DATA, _cfg(tasks=["sst2", "cola", "mrpc", "rte"], rows_per_task=20, paraphrase_source="rules",
                                  strategy="all"), seed=0)
    assert rows and all(r["paraphrase_source"] == "rules" for r in rows)
    for r in rows:
        a, b = r["original_instruction"], r["paraphrase_instruction"]
        assert a != b and r["template_a"] == r["template_b"] and ":b" + str(r["template_a"]) + "r" in r["pair_id"]
        assert placeholders(a) == placeholders(b)
        for word in TASKS[r["task"]].label_words + ("positive", "negative"):
            # a word the original names is still named, and no label word is introduced
            assert (f" {word}" in a) == (f" {word}" in b), (word, a, b)
        for text in r["inputs"].values():
            assert text in r["paraphrase_prompt"]
        assert r["paraphrase_prompt"].endswith(format_options(r["answer_words"]))


def test_templates_without_a_rule_paraphrase_are_said_or_refused(caplog):
    """With paraphrase_source rules a template that no rule rewords is never an original: named in a warning (it
    was dropped silently; wnli kept 1 template of 10), and refused where pairs.templates lists it by id."""
    with caplog.at_level("WARNING", logger="coin"):
        rows = list(build_task_pairs(DATA, "wnli", _cfg(tasks=["wnli"], rows_per_task=30, paraphrase_source="rules"),
                                     seed=0))
    used = {r["template_a"] for r in rows}
    said = [r.getMessage() for r in caplog.records if "have no paraphrase" in r.getMessage()]
    assert len(said) == 1 and "of task wnli" in said[0] and "not drawn as originals" in said[0], said
    unused = [int(t) for t in said[0].split("template(s) [")[1].split("]")[0].split(", ")]
    assert unused and not used & set(unused)
    with pytest.raises(DataError, match=r"template\(s\) \[.*\] of task wnli have no paraphrase .* lists them"):
        list(build_task_pairs(DATA, "wnli", _cfg(tasks=["wnli"], rows_per_task=30, paraphrase_source="rules",
                                                 templates={"wnli": sorted(used | set(unused))}), seed=0))


def test_rules_give_pairs_to_a_task_with_one_template():
    cfg = _cfg(tasks=["sst2", "rte"], templates={"sst2": [4]}, paraphrase_source="rules")
    rows = build_pairs(DATA, cfg, seed=1)
    sst2 = [r for r in rows if r["task"] == "sst2"]
    assert len(sst2) == 12 and {r["template_a"] for r in sst2} == {4}
    assert {r["task"] for r in rows} == {"sst2", "rte"}
    with pytest.raises(ConfigError, match="pairs.paraphrase_source 'flan' needs at least 2"):
        Settings.model_validate({"pairs": {"templates": {"sst2": [4]}}})
    # the data-level guard too (settings built without validation, e.g. by a library caller)
    unchecked = cfg.model_copy(update={"paraphrase_source": "flan"})
    with pytest.raises(DataError, match="sst2: 1 usable template"):
        list(build_task_pairs(DATA, "sst2", unchecked, seed=0))


def test_templates_per_task():
    rows = build_pairs(DATA, _cfg(templates={"sst2": [0, 4], "rte": [1, 2, 3]}, strategy="all"), seed=2)
    assert {(r["template_a"], r["template_b"]) for r in rows if r["task"] == "sst2"} == {(0, 4), (4, 0)}
    assert {r["template_a"] for r in rows if r["task"] == "rte"} == {1, 2, 3}


@pytest.mark.parametrize(("params", "message"), [
    ({"pairs": {"paraphrase_source": "gpt"}}, "pairs.paraphrase_source = 'gpt'"),
    ({"pairs": {"templates": {"sst2": [0, 0]}}}, "lists a template id twice (task sst2)"),
    ({"pairs": {"templates": {"sst2": [0, -1]}}}, "template ids are 0 or more (task sst2)"),
    ({"pairs": {"templates": {"stsb": [0, 1]}}}, "pairs.templates"),
    ({"validate": {"min_similarity": 0.9, "max_similarity": 0.5}},
     "validate.min_similarity (0.9) must be below validate.max_similarity"),
    ({"validate": {"leak_max_similarity": 1.5}}, "validate.leak_max_similarity = 1.5"),
])
def test_pairs_and_validate_settings_are_checked(params, message):
    with pytest.raises(ConfigError) as info:
        Settings.model_validate(params)
    assert message in str(info.value)


# --------------------------------------------------------------------------- malformed input files


def _data_copy(tmp_path: Path, tasks=("sst2",)) -> Path:
    (tmp_path / "glue").mkdir(parents=True)
    (tmp_path / "flan").mkdir()
    for t in tasks:
        (tmp_path / "glue" / f"{t}.train.jsonl").write_bytes((DATA / "glue" / f"{t}.train.jsonl").read_bytes())
    (tmp_path / "flan" / "flan_glue_templates.json").write_bytes(
        (DATA / "flan" / "flan_glue_templates.json").read_bytes())
    return tmp_path


def test_label_out_of_range_names_line(tmp_path):
    data = _data_copy(tmp_path)
    f = data / "glue" / "sst2.train.jsonl"
    f.write_text('{"sentence": "ok", "label": 1}\n\n{"sentence": "x", "label": 7}\n')
    with pytest.raises(DataError, match=r"sst2.train.jsonl:3: field 'label' = 7 is not a sst2 label id \(0..1\)"):
        build_pairs(data, _cfg(tasks=["sst2"]), seed=0)
    f.write_bytes(b'{"sentence": "ok", "label": 1}\n{"sentence": "caf\xe9", "label": 0}\n')
    with pytest.raises(DataError, match=r"sst2.train.jsonl:2: not UTF-8"):
        build_pairs(data, _cfg(tasks=["sst2"]), seed=0)
    f.write_text('{"sentence": "ok", "label": 1}\n[1, 2]\n')
    with pytest.raises(DataError, match=r"sst2.train.jsonl:2: expected a JSON object per line"):
        build_pairs(data, _cfg(tasks=["sst2"]), seed=0)
    f.write_text('{"sentence": "ok", "label": 1, "idx": 4}\n{"sentence": "ok", "label": 1, "idx": 4}\n')
    with pytest.raises(DataError, match=r"sst2.train.jsonl:2: field 'idx' = 4 repeats line 1; .*remove the copy"):
        build_pairs(data, _cfg(tasks=["sst2"]), seed=0)  # a copied row would be drawn as a second example


def test_an_empty_train_input_is_refused_by_line_not_drawn_as_other_rows_hard_negative(tmp_path):
    """An empty rte sentence in a train file passed `coin data` and `coin pairs`; drawn as the hard negative of five
    good examples, it cost their rows at the gate, whose error named a good example, not the bad line."""
    data = _data_copy(tmp_path, tasks=("rte",))
    f = data / "glue" / "rte.train.jsonl"
    head = f.read_text().splitlines()[:19]
    for bad in ('""', '"   "', '"\\n"'):
        f.write_text("\n".join(head) + f'\n{{"sentence1": {bad}, "sentence2": "b", "label": 1, "idx": 9000}}\n')
        with pytest.raises(DataError, match=r"rte\.train\.jsonl:20: field 'sentence1' is empty or whitespace only"):
            build_pairs(data, _cfg(tasks=["rte"], rows_per_task=20), seed=0)
    f.write_text("\n".join(head) + '\n{"sentence1": "a", "sentence2": " ", "label": 1, "idx": 9000}\n')
    with pytest.raises(DataError, match=r"rte\.train\.jsonl:20: field 'sentence2' is empty or whitespace only"):
        build_pairs(data, _cfg(tasks=["rte"], rows_per_task=20), seed=0)


def _edit_templates(data: Path, edit) -> None:
    path = data / "flan" / "flan_glue_templates.json"
    doc = json.loads(path.read_text())
    edit(doc["tasks"]["sst2"])
    path.write_text(json.dumps(doc, indent=1))


@pytest.mark.parametrize(("edit", "message"), [
    (lambda e: e.pop("label_to_answer"), r"tasks.sst2.label_to_answer: should be a JSON object, got NoneType"),
    (lambda e: e["label_to_answer"].pop("1"), r"tasks.sst2.label_to_answer: missing label '1'"),
    (lambda e: e["templates_v1"][3].update(input=7),
     r"tasks.sst2.templates_v1\[3\].input: should be a string, got int 7"),
    (lambda e: e["templates_v1"][2].update(template_id="2"),
     r"tasks.sst2.templates_v1\[2\].template_id: should be an integer"),
    (lambda e: e["templates_v1"][1].pop("target"), r"tasks.sst2.templates_v1\[1\]: missing field 'target'"),
    (lambda e: e["templates_v1"][0].update(input="Review: {sentense}\n{options_}"),
     r"tasks.sst2.templates_v1\[0\].input: unknown placeholder\(s\) \{sentense\} for task sst2"),
    (lambda e: e["templates_v1"][0].update(input="Review: {sentence\n{options_}"),
     r"tasks.sst2.templates_v1\[0\].input: not a valid template"),
    # fields rendering cannot fill passed `coin data` and stopped `coin pairs` with Python's bare IndexError/ValueError
    (lambda e: e["templates_v1"][0].update(input="Review (reply as {}): {sentence}\n{options_}"),
     r"tasks.sst2.templates_v1\[0\].input: '\{\}' is not a named placeholder"),
    (lambda e: e["templates_v1"][0].update(input="Review: {sentence!x}\n{options_}"),
     r"tasks.sst2.templates_v1\[0\].input: '\{sentence!x\}': a placeholder takes no conversion or format spec"),
    (lambda e: e["templates_v1"][0].update(target="{answer:d}"),
     r"tasks.sst2.templates_v1\[0\].target: '\{answer:d\}': a placeholder takes no conversion"),
    (lambda e: e["templates_v1"][5].update(template_id=4),
     r"tasks.sst2.templates_v1: template_id \[4\] used more than once"),
    (lambda e: e.update(templates_v1={}), r"tasks.sst2.templates_v1: should be a JSON list"),
])
def test_malformed_templates_file_names_field(tmp_path, edit, message):
    data = _data_copy(tmp_path)
    _edit_templates(data, edit)
    with pytest.raises(DataError, match=r"flan_glue_templates.json: " + message):
        build_pairs(data, _cfg(tasks=["sst2"]), seed=0)


def test_own_template_ids_past_9_are_selectable_and_a_wordy_target_is_named(tmp_path, caplog):
    """pairs.templates allowed ids 0..9 only (FLAN's ten), though a file of one's own may number its templates
    otherwise; and a template marked is_classification whose target is more than '{answer}' was dropped without a
    word (and, selected by id, refused without the reason)."""
    import logging

    data = _data_copy(tmp_path)

    def edit(e):
        e["templates_v1"][0].update(template_id=10)
        e["templates_v1"][1].update(template_id=11)
        e["templates_v1"][2].update(target="The answer is {answer}")
    _edit_templates(data, edit)
    rows = build_pairs(data, _cfg(tasks=["sst2"], templates={"sst2": [10, 11]}), seed=0)
    assert {r["template_a"] for r in rows} == {10, 11}
    caplog.set_level(logging.WARNING, logger="coin")
    kept = build_pairs(data, _cfg(tasks=["sst2"]), seed=0)
    assert 2 not in {r["template_a"] for r in kept} | {r["template_b"] for r in kept}
    said = " ".join(r.getMessage() for r in caplog.records)
    assert "task sst2: template(s) [2] are marked is_classification, but their target is not '{answer}'" in said
    with pytest.raises(DataError, match=r"template ids \[2\] of task sst2 .*template 2's target 'The answer is "
                                        r"\{answer\}' is not '\{answer\}'"):
        build_pairs(data, _cfg(tasks=["sst2"], templates={"sst2": [2, 10]}), seed=0)


def test_templates_file_bad_json_names_line(tmp_path):
    data = _data_copy(tmp_path)
    path = data / "flan" / "flan_glue_templates.json"
    path.write_text('{\n  "tasks": {\n    "sst2": {,}\n  }\n}\n')
    with pytest.raises(DataError, match=r"flan_glue_templates.json:3: bad JSON"):
        build_pairs(data, _cfg(tasks=["sst2"]), seed=0)


def test_coin_pairs_cli_stops_with_the_message(tmp_path):
    """`coin pairs` on a broken train file: exit code != 0, the message names file, line and field."""
    import shutil
    import subprocess
    import sys

    data = _data_copy(tmp_path / "proj", tasks=("sst2",))
    (data / "glue" / "sst2.train.jsonl").write_text('{"sentence": "ok", "label": 1}\n{"sentence": 3, "label": 0}\n')
    shutil.copy(ROOT / "params.yaml", tmp_path / "proj" / "params.yaml")
    proc = subprocess.run(
        [sys.executable, "-m", "coin.cli", "pairs", "--params", str(tmp_path / "proj" / "params.yaml"),
         "--set", f"paths.data_dir={data}", "--set", "pairs.tasks=[sst2]",
         "--set", f"paths.out_dir={tmp_path / 'out'}"],
        cwd=tmp_path / "proj", capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode != 0
    assert "sst2.train.jsonl:2: field 'sentence' should be str, got int 3" in proc.stdout + proc.stderr


def test_paraphrase_doctests():
    import doctest

    from coin.data import paraphrase

    result = doctest.testmod(paraphrase)
    assert result.failed == 0 and result.attempted > 0


def test_rows_per_task_can_differ_by_task():
    """A mapping gives each task its own number of rows (the others' draws are those of a plain number)."""
    rows = build_pairs(DATA, _cfg(rows_per_task={"rte": 4, "sst2": 10}, val_fraction=0.0), seed=1)
    by_task = {t: [r for r in rows if r["task"] == t] for t in ("rte", "sst2")}
    assert (len(by_task["rte"]), len(by_task["sst2"])) == (4, 10)
    same = build_pairs(DATA, _cfg(rows_per_task=10, val_fraction=0.0), seed=1)
    assert [r for r in same if r["task"] == "sst2"] == by_task["sst2"]


def test_label_counts_of_training_rows():
    from coin.stages import label_counts

    rows = build_pairs(DATA, _cfg(tasks=["rte", "mnli"], rows_per_task=12, val_fraction=0.25), seed=1)
    counts = label_counts(rows)
    assert set(counts) == {"rte", "mnli"} and len(counts["mnli"]) == 3
    for task, c in counts.items():
        train = [r["label"] for r in rows if r["task"] == task and r["split"] == "train"]
        assert c == [train.count(i) for i in range(len(c))] and sum(c) == 9  # the val rows are left out
    # the negatives' labels are not counted: each differs from its original's, so on a binary task they would make
    # the prior uniform (RESULTS §26)
    negatives = {t: [sum(r["negative_label"] == i for r in rows if r["task"] == t and r["split"] == "train")
                     for i in range(len(c))] for t, c in counts.items()}
    assert all(sum(n) == 9 for n in negatives.values())
    assert label_counts([{**r, "label": r["negative_label"]} for r in rows]) == negatives != counts


def _words(text: str) -> int:
    return len(text.split())


def test_min_words_keeps_short_rows_out_of_the_draw_and_the_negatives():
    """pairs.min_words: no drawn row and no hard negative has fewer input words; ids stay the train file's rows;
    0 draws every row, as before the setting existed."""
    from coin.data.pairs import load_examples

    pool = {ex.example_id: ex.row for ex in load_examples(DATA, TASKS["sst2"])}
    rows = build_pairs(DATA, _cfg(tasks=["sst2", "rte"], rows_per_task=60, min_words={"sst2": 9}), seed=2)
    sst2 = [r for r in rows if r["task"] == "sst2"]
    assert len(sst2) == 60
    for r in sst2:
        row = pool[r["example_id"]]
        assert (row["sentence"], row["label"]) == (r["inputs"]["sentence"], r["label"])
        assert _words(r["inputs"]["sentence"]) >= 9
        assert _words(pool[r["negative_example_id"]]["sentence"]) >= 9
    every = build_pairs(DATA, _cfg(tasks=["sst2", "rte"], rows_per_task=60, min_words=0), seed=2)
    assert any(_words(r["inputs"]["sentence"]) < 9 for r in every if r["task"] == "sst2")  # the draw had short ones
    # a task the mapping does not name draws every row: rte is the same either way
    assert [r for r in rows if r["task"] == "rte"] == [r for r in every if r["task"] == "rte"]


def test_min_words_draws_as_a_train_file_without_the_short_rows_would(tmp_path):
    """The same pairs as a data directory whose train file holds only the long rows (how RESULTS.md §19 measured
    it), but for the ids, which keep pointing at the shipped file's rows."""
    import shutil

    data = tmp_path / "data"
    shutil.copytree(DATA / "flan", data / "flan")
    (data / "glue").mkdir()
    lines = (DATA / "glue" / "sst2.train.jsonl").read_text().splitlines(keepends=True)
    (data / "glue" / "sst2.train.jsonl").write_text(
        "".join(line for line in lines if _words(json.loads(line)["sentence"]) >= 7))
    filtered = build_pairs(data, _cfg(tasks=["sst2"], rows_per_task=200, min_words=0), seed=5)
    built = build_pairs(DATA, _cfg(tasks=["sst2"], rows_per_task=200, min_words={"sst2": 7}), seed=5)
    ids = ("pair_id", "example_id", "negative_example_id")
    assert [{k: v for k, v in r.items() if k not in ids} for r in built] == \
        [{k: v for k, v in r.items() if k not in ids} for r in filtered]
    assert [r["example_id"] for r in built] != [r["example_id"] for r in filtered]  # shipped-file row numbers


def test_min_words_rows_left_out_are_kept_with_their_reason(tmp_path):
    """`coin pairs` writes every row min_words keeps out of the draw, with its word count, and counts them."""
    from coin.stages import stage_pairs

    (tmp_path / "data").symlink_to(DATA)
    s = Settings.model_validate({"pairs": {"tasks": ["sst2", "rte"], "rows_per_task": 10,
                                           "min_words": {"sst2": 4}}})
    stats = stage_pairs(s, tmp_path)
    short = read_jsonl(tmp_path / "outputs" / "pairs" / "short_rows.jsonl")
    lines = [json.loads(line) for line in (DATA / "glue" / "sst2.train.jsonl").read_text().splitlines()]
    expected = [i for i, row in enumerate(lines) if _words(row["sentence"]) < 4]
    assert [r["example_id"] for r in short] == [f"sst2:train:{i}" for i in expected] and expected
    assert all(r["task"] == "sst2" and r["words"] < 4 and "pairs.min_words 4" in r["reason"] for r in short)
    assert stats["short_rows_not_drawn"] == {"sst2": len(expected)}
    assert json.loads((tmp_path / "outputs" / "pairs" / "stats.json").read_text()) == stats


def test_min_words_that_leaves_one_label_blames_min_words(tmp_path):
    """When the rows long enough all share one label, the error names pairs.min_words, not the file."""
    data = tmp_path / "data"
    shutil.copytree(DATA / "flan", data / "flan")
    (data / "glue").mkdir()
    rows = [{"sentence": "a fine and moving film about love and loss", "label": 1, "idx": 0},
            {"sentence": "dull", "label": 0, "idx": 1}, {"sentence": "an absolute joy from start to end", "label": 1,
                                                          "idx": 2}]
    (data / "glue" / "sst2.train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(DataError, match=r"every train row with pairs.min_words = 3 or more input words has label 1 "
                                        r"\(1 shorter rows not drawn\); lower pairs.min_words for sst2"):
        build_pairs(data, _cfg(tasks=["sst2"], rows_per_task=2, val_fraction=0.0, min_words={"sst2": 3}), seed=0)
    with pytest.raises(DataError, match=r"task sst2: every train row has label 1; no hard negative"):
        (data / "glue" / "sst2.train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[::2]))
        build_pairs(data, _cfg(tasks=["sst2"], rows_per_task=2, val_fraction=0.0, min_words=0), seed=0)


def test_fewer_examples_than_requested_are_counted_and_warned_about(tmp_path, caplog):
    """stats.json records per task the examples asked for and drawn; a file that runs out is said, not hidden."""
    from coin.stages import stage_pairs

    (tmp_path / "data").symlink_to(DATA)
    wnli = len((DATA / "glue" / "wnli.train.jsonl").read_text().splitlines())
    s = Settings.model_validate({"pairs": {"tasks": ["sst2", "wnli"], "rows_per_task": {"sst2": 10, "wnli": 5000},
                                           "min_words": {"sst2": 4}}})
    with caplog.at_level("WARNING", logger="coin"):
        stats = stage_pairs(s, tmp_path)
    assert stats["examples_per_task"] == {
        "sst2": {"requested": 10, "drawn": 10, "short_not_drawn": stats["short_rows_not_drawn"]["sst2"]},
        "wnli": {"requested": 5000, "drawn": wnli, "short_not_drawn": 0}}
    assert f"wnli: {wnli} examples drawn where pairs.rows_per_task asks for 5000: every train row" in caplog.text
    assert "sst2:" not in caplog.text
    rows = [json.loads(line) for line in (tmp_path / "outputs" / "pairs" / "pairs.jsonl").read_text().splitlines()]
    assert stats["templates_per_task"] == {t: sorted({r["template_a"] for r in rows if r["task"] == t})
                                           for t in ("sst2", "wnli")}
    assert len(stats["templates_per_task"]["wnli"]) > 1


def test_min_words_bad_values_are_refused_with_the_fix():
    with pytest.raises(ValueError, match="unknown task"):
        PairsSettings(min_words={"sst3": 5})
    with pytest.raises(ValueError, match="0..1000"):
        PairsSettings(min_words=-1)
    with pytest.raises(DataError, match=r"lower pairs.min_words for rte"):
        build_pairs(DATA, _cfg(tasks=["rte"], min_words={"rte": 1000}), seed=0)


def test_pairs_seed_draws_other_rows_and_leaves_the_global_seed(tmp_path):
    """pairs.seed sets the row draw alone: with global seed 42 it writes the pairs global seed 7 writes, bytes and
    all, and other rows than global seed 42; null draws with the global seed. Negative seeds are refused."""
    from coin.stages import stage_pairs

    def pairs_bytes(name: str, seed: int, pairs_seed: int | None = None) -> bytes:
        root = tmp_path / name
        root.mkdir()
        (root / "data").symlink_to(DATA)
        pairs = {"tasks": ["sst2", "rte"], "rows_per_task": 20, "seed": pairs_seed}
        stage_pairs(Settings.model_validate({"seed": seed, "pairs": pairs}), root)
        return (root / "outputs" / "pairs" / "pairs.jsonl").read_bytes()

    drawn_7 = pairs_bytes("a", 42, pairs_seed=7)
    assert drawn_7 == pairs_bytes("b", 7)
    assert drawn_7 != pairs_bytes("c", 42)
    with pytest.raises(ValueError, match="greater than or equal to 0"):
        PairsSettings(seed=-1)


def _cola_rows(tmp_path, rows):
    data = _data_copy(tmp_path, tasks=("cola",))
    (data / "glue" / "cola.train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return data


def test_a_hard_negative_never_has_the_originals_input(tmp_path):
    """cola repeats sentences under both labels: the other label's copy was drawn as the negative, a prompt equal
    to the original's (the gate then dropped the row)."""
    from coin.data.io import DataError

    data = _cola_rows(tmp_path, [{"sentence": "A b c.", "label": 1}, {"sentence": "A b c.", "label": 0},
                                 {"sentence": "X y z.", "label": 1}, {"sentence": "Q r s.", "label": 0}])
    for seed in range(8):
        for r in build_task_pairs(data, "cola", _cfg(tasks=["cola"], rows_per_task=4, val_fraction=0.0), seed):
            assert r["negative_inputs"] != r["inputs"] and r["negative_prompt"] != r["original_prompt"], r
    only_twins = _cola_rows(tmp_path / "twins", [{"sentence": "A b c.", "label": 1},
                                                 {"sentence": "A b c.", "label": 0}])
    with pytest.raises(DataError, match="has its input; no hard negative is possible"):
        list(build_task_pairs(only_twins, "cola", _cfg(tasks=["cola"], rows_per_task=2, val_fraction=0.0), 0))


def test_inputs_that_differ_only_in_unicode_form_or_spaces_are_one_input(tmp_path):
    """"a café" composed (NFC) and decomposed (NFD), or GLUE's "a b c . " beside "a b c .", tokenize alike, but were
    two inputs: each was the other's hard negative (the same prompt, the other target), and one could be held out
    while its twin was trained on. Case and punctuation still tell rows apart (cola's rows differ by a comma)."""
    import unicodedata

    from coin.data.pairs import same_form
    from coin.validation.checks import negative_valid

    nfc, nfd = unicodedata.normalize("NFC", "A café I loved."), unicodedata.normalize("NFD", "A café I loved.")
    assert nfc != nfd and same_form(nfc) == same_form(nfd) == same_form(" A  café I loved. ")
    comma, none, lower = "The man, a ball kicked.", "The man a ball kicked.", "the man a ball kicked."
    assert same_form(comma) != same_form(none) != same_form(lower)
    data = _cola_rows(tmp_path, [{"sentence": nfc, "label": 1}, {"sentence": nfd, "label": 0},
                                 {"sentence": "X y z.", "label": 1}, {"sentence": "Q r s.", "label": 0}])
    for seed in range(8):
        for r in build_task_pairs(data, "cola", _cfg(tasks=["cola"], rows_per_task=4, val_fraction=0.0), seed):
            assert same_form(r["negative_inputs"]["sentence"]) != same_form(r["inputs"]["sentence"]), r
            assert not negative_valid(r)
    spaced = _cola_rows(tmp_path / "spaced", [{"sentence": "A b c . ", "label": 1},
                                              {"sentence": "A b c .", "label": 1},
                                              {"sentence": "X y z.", "label": 0}, {"sentence": "Q r s.", "label": 0}])
    for seed in range(8):
        rows = list(build_task_pairs(spaced, "cola", _cfg(tasks=["cola"], rows_per_task=4, val_fraction=0.25), seed))
        val = {same_form(r["inputs"]["sentence"]) for r in rows if r["split"] == "val"}
        train = {same_form(r["inputs"]["sentence"]) for r in rows if r["split"] == "train"}
        assert val and train and not val & train, (seed, val, train)
    # the gate's check reads the two prompts alike too
    row = next(iter(build_task_pairs(data, "cola", _cfg(tasks=["cola"], rows_per_task=4, val_fraction=0.0), 0)))
    twin = {**row, "negative_prompt": unicodedata.normalize("NFD", row["original_prompt"]).replace(" ", "  ")}
    assert [f.code for f in negative_valid(twin)][:1] == ["same_prompt"]


def test_the_val_split_is_disjoint_by_input(tmp_path):
    """Rows were held out by index: a repeated input could be held out and trained on."""
    data = _cola_rows(tmp_path, [{"sentence": "A b c.", "label": 1}, {"sentence": "A b c.", "label": 1},
                                 {"sentence": "X y z.", "label": 0}, {"sentence": "Q r s.", "label": 0}])
    for seed in range(8):
        rows = list(build_task_pairs(data, "cola", _cfg(tasks=["cola"], rows_per_task=4, val_fraction=0.25), seed))
        val = {r["inputs"]["sentence"] for r in rows if r["split"] == "val"}
        train = {r["inputs"]["sentence"] for r in rows if r["split"] == "train"}
        assert val and train and not val & train, (seed, val, train)
