"""Pair rendering on the real GLUE rows and FLAN templates shipped in data/."""

import json
from pathlib import Path

import pytest

from coin.config import PairsSettings
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
    assert [r["pair_id"] for r in c] != [json.loads(l)["pair_id"] for l in (tmp_path / "a.jsonl").open()]


def test_split_is_by_example_and_sized():
    rows = build_pairs(DATA, _cfg(tasks=["sst2"], rows_per_task=20, strategy="all", val_fraction=0.25), seed=0)
    val = {r["example_id"] for r in rows if r["split"] == "val"}
    train = {r["example_id"] for r in rows if r["split"] == "train"}
    assert len(val) == 5 and len(train) == 15 and not (val & train)
    # "all": every ordered pair of the 8 sst2 classification templates
    assert len(rows) == 20 * 8 * 7


def test_template_ids_are_checked():
    with pytest.raises(DataError, match="not classification templates"):
        list(build_task_pairs(DATA, "sst2", _cfg(templates=[0, 8]), seed=0))


def test_malformed_train_file_names_file_line_field(tmp_path):
    (tmp_path / "glue").mkdir()
    (tmp_path / "flan").mkdir()
    (tmp_path / "flan" / "flan_glue_templates.json").write_text((DATA / "flan" / "flan_glue_templates.json").read_text())
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
