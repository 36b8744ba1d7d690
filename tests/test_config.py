"""params.yaml -> typed settings: the shipped file parses; bad keys/types/values are rejected with the fix."""

import re
from pathlib import Path

import pytest
import yaml

from coin.config import ConfigError, Settings, apply_overrides, load_settings

ROOT = Path(__file__).resolve().parents[1]


def test_shipped_params_parse_and_cover_every_field():
    s = load_settings(ROOT / "params.yaml")
    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    # every settings key is spelled out in the shipped file (so every key carries its comment)
    def keys(settings: Settings) -> set[str]:  # a mapping-valued key (rows per task, templates) counts once
        mappings = ("pairs.rows_per_task.", "pairs.templates.")
        return {next((m[:-1] for m in mappings if k.startswith(m)), k) for k in settings.to_flat_dict()}

    assert keys(Settings.model_validate(raw)) == keys(Settings.model_validate({}))
    assert s.model.backbone == "minilm"


def test_strong_params_file_parses_and_differs_only_where_it_says():
    """params-strong.yaml is params.yaml with the keys marked 'strong:' changed (and nothing else)."""
    default, strong = load_settings(ROOT / "params.yaml"), load_settings(ROOT / "params-strong.yaml")
    a, b = default.to_flat_dict(), strong.to_flat_dict()
    changed = {k.split(".rows_per_task.")[0] + (".rows_per_task" if ".rows_per_task." in k else "")
               for k in a.keys() | b.keys() if a.get(k) != b.get(k)}
    assert changed == {"pairs.rows_per_task", "train.max_steps", "evaluate.samples_per_task", "train.cl_weighting",
                       "train.backbone_dropout", "train.lora.dropout"}
    marked = [line for line in (ROOT / "params-strong.yaml").read_text().splitlines() if "# strong:" in line]
    assert len(marked) == len(changed)


def _key_blocks(text: str) -> list[tuple[str | None, list[str]]]:
    """A params file as ``(dotted key, its lines)``: a key's line with the comment lines indented under it."""
    out: list[tuple[str | None, list[str]]] = []
    stack: list[tuple[int, str]] = []
    for line in text.splitlines():
        m = re.match(r"^( *)([A-Za-z_]\w*):", line)
        if m:
            stack = [(i, k) for i, k in stack if i < len(m.group(1))] + [(len(m.group(1)), m.group(2))]
            out.append((".".join(k for _, k in stack), [line]))
        elif out and re.match(r"^ {20,}#", line):
            out[-1][1].append(line)
        else:
            out.append((None, [line]))
    return out


def test_strong_params_file_is_params_yaml_but_its_header_and_strong_keys():
    """params-strong.yaml lacked pairs.seed, pairs.min_words and study.dask_dashboard: coin filled them from the
    library defaults, but after the documented `cp params-strong.yaml params.yaml`, `dvc exp run -S pairs.seed=7`
    failed ("Key 'seed' is not in struct"). Every key of params.yaml is in it, with the same line and comments, in
    the same order, except the keys marked 'strong:'."""
    default = _key_blocks((ROOT / "params.yaml").read_text())
    strong = _key_blocks((ROOT / "params-strong.yaml").read_text())
    header = next(i for i, (_, lines) in enumerate(strong) if lines == default[0][1])
    assert all(k is None and lines[0].startswith("#") for k, lines in strong[:header])
    strong = strong[header:]
    assert [k for k, _ in strong] == [k for k, _ in default]
    differ = {k for (k, a), (_, b) in zip(default, strong, strict=True) if a != b}
    assert differ == {k for k, lines in strong if "# strong:" in lines[0]} == {
        "pairs.rows_per_task", "train.max_steps", "evaluate.samples_per_task", "train.cl_weighting",
        "train.backbone_dropout", "train.lora.dropout"}


def test_every_key_in_params_yaml_has_a_comment():
    for lineno, line in enumerate((ROOT / "params.yaml").read_text().splitlines(), 1):
        stripped = line.strip()
        if not stripped or stripped.startswith("#"):
            continue
        key_only = stripped.endswith(":")  # a section header
        assert key_only or "#" in line, f"params.yaml:{lineno} has no comment: {line!r}"


@pytest.mark.parametrize(
    "raw, expected",
    [
        ({"trian": {}}, ["trian: unknown key", "Did you mean 'train'"]),
        ({"train": {"lrr": 0.1}}, ["train.lrr: unknown key", "Did you mean 'lr'"]),
        ({"train": {"lr": -1}}, ["train.lr = -1", "greater than 0"]),
        ({"train": {"max_steps": "many"}}, ["train.max_steps = 'many'", "valid integer", "fix the type"]),
        ({"train": {"methods": ["dpo"]}}, ["train.methods.0 = 'dpo'", "'coin', 'cit' or 'sft'"]),
        ({"train": {"methods": ["coin", "coin"]}}, ["train.methods", "lists a method twice"]),
        ({"register": {"methods": ["sft"]}}, ["register.methods lists ['sft']", "add them to train.methods"]),
        ({"pairs": {"tasks": ["sst2", "imdb"]}}, ["pairs.tasks.1 = 'imdb'"]),
        ({"pairs": {"tasks": ["sst2", "sst2"]}}, ["pairs.tasks", "twice"]),
        ({"pairs": {"templates": [1]}}, ["pairs.templates", "at least 2"]),
        ({"validate": {"min_pass_rate": 1.5}}, ["validate.min_pass_rate = 1.5", "less than or equal to 1"]),
        ({"train": {"lora": {"rank": 8}}}, ["train.lora.rank: unknown key", "Known keys here: r, alpha"]),
        ({"train": {"batch_size": 1}}, ["train.batch_size = 1", "greater than or equal to 2"]),
        ({"pairs": {"tasks": ["sst2", "rte"], "rows_per_task": {"sst2": 10}}},
         ["pairs.rows_per_task names no row count for ['rte']", "add them to the mapping"]),
        ({"pairs": {"rows_per_task": {"sst2": 1}}}, ["pairs.rows_per_task", "1 rows for task sst2", "2..100000"]),
        ({"pairs": {"rows_per_task": {"imdb": 10}}}, ["pairs.rows_per_task", "imdb"]),
        ({"model": {"attention": "sideways"}}, ["model.attention = 'sideways'", "'auto', 'causal' or 'prefix'"]),
        ({"model": {"readout": "first"}}, ["model.readout = 'first'", "'auto', 'last' or 'mean'"]),
        ({"evaluate": {"calibration": "yes"}}, ["evaluate.calibration = 'yes'", "'none' or 'content_free'"]),
        # a union (count or mapping; list or word): one line per key, its value, each form's message
        ({"pairs": {"rows_per_task": "abc"}},
         ["pairs.rows_per_task = 'abc': fits none of the accepted forms", "valid integer", "valid dictionary"]),
        ({"pairs": {"templates": {"sst2": [0, "x"]}}}, ["pairs.templates.sst2.1 = 'x'", "valid integer"]),
        ({"train": {"lora": {"target_modules": 5}}},
         ["train.lora.target_modules = 5: fits none", "'auto' or 'all-linear'", "valid list"]),
        # YAML turns on/off/yes/no into booleans: the fix is to quote the value
        ({"register": {"model_name": True}}, ["register.model_name = True", "put the value in quotes"]),
        ({"register": {"model_name": 3}}, ["register.model_name = 3", "YAML read it as an int"]),
        # `--set 'pairs.min_words={sst2:7}'`: YAML reads one key 'sst2:7' with no value
        ({"pairs": {"min_words": {"sst2:7": None}}}, ["write a space after the colon, {sst2: 7}"]),
        # ... and inside a list, the item is quoted in the list (`--set 'k.1="on"'` is no override)
        ({"evaluate": {"instruction_sets": ["clean", True]}},
         ["evaluate.instruction_sets.1 = True", "YAML read item 1 as a bool",
          "'evaluate.instruction_sets=[..., \"...\"]'"]),
    ],
)
def test_bad_params_are_rejected_with_key_and_fix(raw, expected):
    with pytest.raises(ConfigError) as err:
        Settings.model_validate(raw)
    msg = str(err.value)
    assert msg.startswith("the settings have problems; nothing was run:")
    for part in expected:
        assert part in msg, msg
    assert not re.search(r"\.(int|str|bool|list\[|dict\[)", msg), msg  # no validator names as if they were keys
    assert len(msg.splitlines()) == 2, msg  # one line per bad key


def test_all_problems_reported_at_once():
    with pytest.raises(ConfigError) as err:
        Settings.model_validate({"train": {"lr": 0, "pooling": "cls"}, "seedd": 1})
    msg = str(err.value)
    assert "train.lr" in msg and "train.pooling" in msg and "seedd" in msg


def test_overrides_are_typed_and_validated(tmp_path):
    p = tmp_path / "params.yaml"
    p.write_text((ROOT / "params.yaml").read_text())
    s = load_settings(p, ["train.max_steps=7", "pairs.tasks=[rte, wnli]", "tracking.uri=null"])
    assert s.train.max_steps == 7 and s.pairs.tasks == ["rte", "wnli"] and s.tracking.uri is None
    with pytest.raises(ConfigError, match="train.max_stepz: unknown key"):
        load_settings(p, ["train.max_stepz=7"])
    with pytest.raises(ConfigError, match="expected KEY=VALUE"):
        load_settings(p, ["train.max_steps"])
    assert apply_overrides({"a": {"b": 1}}, ["a.b=2"]) == {"a": {"b": 2}}


def test_a_section_given_as_a_mapping_changes_only_the_keys_it_names(tmp_path):
    """--set 'train.lora={r: 4}' replaced the whole section: target_modules fell back to auto (peft's
    query/value only) and alpha to its default, with no warning. A section is merged; a value that is itself a
    mapping (pairs.rows_per_task) is replaced, as its dotted override would be."""
    p = tmp_path / "params.yaml"
    p.write_text((ROOT / "params.yaml").read_text())
    shipped = load_settings(p)
    s = load_settings(p, ["train.lora={r: 4}"])
    assert s.train.lora.r == 4 and s.train.lora.target_modules == shipped.train.lora.target_modules != "auto"
    assert s.train.lora.alpha == shipped.train.lora.alpha
    s = load_settings(p, ["train={max_steps: 3, lora: {dropout: 0.1}}"])
    assert (s.train.max_steps, s.train.lr, s.train.lora.dropout) == (3, shipped.train.lr, 0.1)
    assert s.train.lora.target_modules == shipped.train.lora.target_modules
    s = load_settings(p, ["pairs.tasks=[sst2]", "pairs.rows_per_task={sst2: 30}"])
    assert s.pairs.rows_per_task == {"sst2": 30} and s.pairs.cutoff_len == shipped.pairs.cutoff_len
    assert load_settings(p, ["pairs={tasks: [sst2], rows_per_task: {sst2: 30}}"]).pairs.rows_per_task == {"sst2": 30}


def test_missing_and_malformed_files(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_settings(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: [1, 2\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_settings(bad)
    lst = tmp_path / "list.yaml"
    lst.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="top level must be a mapping"):
        load_settings(lst)


@pytest.mark.parametrize("value, form", [("010", "octal"), ("0b11", "binary"), ("5:20", "base-60"),
                                         ("[42, 007]", "octal"), ("1:30.5", "base-60")])
def test_a_number_yaml_1_1_reads_otherwise_than_dvc_is_refused(tmp_path, value, form):
    """seed: 010 was 8 here (YAML 1.1 octal) while DVC (YAML 1.2) recorded 10 in dvc.lock; 5:20 was 320 (base 60)
    where DVC reads text. Refused in a params file and in --set alike, naming the value; 0x10, 1_000, 0 and -0 read
    as before."""
    key = "study.seeds" if value.startswith("[") else "train.lr" if "." in value else "seed"
    with pytest.raises(ConfigError, match=rf"at character \d+: a number written with .* is read as a .*{form}"):
        load_settings(ROOT / "params.yaml", [f"{key}={value}"])
    p = tmp_path / "params.yaml"
    p.write_text((ROOT / "params.yaml").read_text().replace("\nseed: 42", f"\nseed: {value}", 1))
    assert p.read_text() != (ROOT / "params.yaml").read_text()
    with pytest.raises(ConfigError, match=f"is read as a .*{form}.*DVC"):
        load_settings(p)
    for ok, want in (("0x10", 16), ("1_000", 1000), ("0", 0), ("-0", 0), ("+7", 7)):
        assert load_settings(ROOT / "params.yaml", [f"seed={ok}"]).seed == want
    # a secret override's value is shown as *** in the override, and not echoed by the YAML error either
    with pytest.raises(ConfigError) as err:
        load_settings(ROOT / "params.yaml", ["tracking.password=0123"])
    assert "0123" not in str(err.value) and "***" in str(err.value)


def test_the_error_names_the_params_file_and_the_overrides(tmp_path):
    """The first line names the file that was read (not always params.yaml), and the --set overrides when any."""
    strong = ROOT / "params-strong.yaml"
    with pytest.raises(ConfigError) as err:
        load_settings(strong, ["train.lrr=3"], check_project=False)
    assert str(err.value).startswith(f"{strong} and the --set overrides have problems; nothing was run:")
    bad = tmp_path / "mine.yaml"
    bad.write_text("train: 3\n")
    with pytest.raises(ConfigError) as err:
        load_settings(bad, check_project=False)
    assert str(err.value).startswith(f"{bad} has problems; nothing was run:"), err.value
    # the instruction file's sets and tasks are checked after the values: an override is named there too
    with pytest.raises(ConfigError) as err:
        load_settings(ROOT / "params.yaml", ["evaluate.instruction_sets=[foo]"])
    assert str(err.value).startswith(f"{ROOT / 'params.yaml'} and the --set overrides have problems;"), err.value
    # coin study's --sweep arrives as study.sweep_* overrides: named as such, even without a --set
    with pytest.raises(ConfigError) as err:
        load_settings(ROOT / "params.yaml", ["study.sweep_key=train.lr", "study.sweep_values=[x, 1e-3]"],
                      check_project=False)
    assert str(err.value).startswith(f"{ROOT / 'params.yaml'} and the --set/--sweep overrides have problems;")


def test_an_unquoted_off_is_off():
    """YAML reads `autocast: off` (file or --set) as false; for these keys it means 'off', as documented."""
    s = load_settings(ROOT / "params.yaml", ["train.autocast=off", "evaluate.autocast=off"], check_project=False)
    assert (s.train.autocast, s.evaluate.autocast) == ("off", "off")
    with pytest.raises(ConfigError, match="evaluate.autocast = True"):
        load_settings(ROOT / "params.yaml", ["evaluate.autocast=on"], check_project=False)


@pytest.mark.parametrize("name", ["coin/minilm", "a:b", "coin@x", "it's", 'say "hi"', " padded",
                                  # the runs:/ URI of a version's stored predictions ended at # or ?, and re-decoded %
                                  # (the interval gate refused every candidate); a final backslash broke the search
                                  # filter, and the same run was registered twice
                                  "x#y", "x?y", "x%2Fy", "coin\\"])
def test_a_registered_model_name_mlflow_or_a_models_uri_cannot_hold_is_refused(name):
    from coin.config import ConfigError, Settings

    with pytest.raises((ConfigError, ValueError), match="register.model_name|registered model name"):
        Settings.model_validate({"register": {"model_name": name}})
    assert Settings.model_validate({"register": {"model_name": "coin-minilm.v2 exp"}}).register_.model_name


@pytest.mark.parametrize("override, key", [("train.max_steps=yes", "train.max_steps"), ("train.lr=true", "train.lr"),
                                           ("seed=on", "seed"), ("pairs.rows_per_task=true", "pairs.rows_per_task")])
def test_a_bool_where_a_number_belongs_is_refused(tmp_path, override, key):
    """pydantic's lax mode read `yes` as 1: train.max_steps: yes trained one step with no word."""
    p = tmp_path / "params.yaml"
    p.write_text((ROOT / "params.yaml").read_text())
    with pytest.raises(ConfigError, match=rf"{key} = True: True is a bool .* not a number; change the value"):
        load_settings(p, [override])
    assert load_settings(p, ["train.append_eos=yes"]).train.append_eos is True  # a bool field takes it


def test_pydantic_value_error_prefix_never_reaches_the_message(tmp_path):
    p = tmp_path / "params.yaml"
    p.write_text((ROOT / "params.yaml").read_text())
    for override in ("pairs.rows_per_task=-3", "evaluate.scoring=[loglik,loglik]"):
        with pytest.raises(ConfigError) as err:
            load_settings(p, [override])
        assert "Value error" not in str(err.value)


def test_a_dotted_key_into_a_value_says_how_to_write_the_mapping(tmp_path):
    p = tmp_path / "params.yaml"
    p.write_text((ROOT / "params.yaml").read_text())
    with pytest.raises(ConfigError, match=r"'min_words' is not a section .* --set 'pairs.min_words=\{sst2: 7\}'"):
        load_settings(p, ["pairs.min_words.sst2=7"])


def test_a_dotted_index_into_a_list_says_how_to_write_the_list(tmp_path):
    """evaluate.tasks.0=rte: the list whole, with that item replaced (a mapping there is refused as the wrong type)."""
    p = tmp_path / "params.yaml"
    p.write_text((ROOT / "params.yaml").read_text())
    tasks = load_settings(p).evaluate.tasks
    with pytest.raises(ConfigError) as err:
        load_settings(p, ["evaluate.tasks.0=rte"])
    msg = str(err.value)
    assert "'tasks' is a list, not a section" in msg and "for a mapping" not in msg, msg
    assert f"--set 'evaluate.tasks=[{', '.join(['rte', *tasks[1:]])}]'" in msg, msg
    with pytest.raises(ConfigError, match=rf"evaluate.tasks=\[{', '.join(tasks)}, rte\]"):
        load_settings(p, ["evaluate.tasks.x=rte"])


def test_an_empty_mapping_stays_in_the_flat_params(tmp_path):
    """pairs.templates={} (ids per task, none given) is recorded as {}: the flat dict (coin params, MLflow params,
    cache keys) dropped the key."""
    p = tmp_path / "params.yaml"
    p.write_text((ROOT / "params.yaml").read_text())
    flat = load_settings(p, ["pairs.templates={}"]).to_flat_dict()
    assert flat["pairs.templates"] == {}
    assert load_settings(p).to_flat_dict()["pairs.templates"] == "classification"


def test_a_home_folder_in_a_path_setting_is_the_home_folder(tmp_path, monkeypatch):
    """paths.out_dir = ~/coin out: the folder checks looked in $HOME while every stage wrote to a folder named '~'
    inside the project, and printed '~/coin out/...', which reads as the home folder."""
    from coin.layout import Layout

    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    s = Settings.model_validate({"paths": {"out_dir": "~/coin out", "mlruns_dir": "~/mlr", "data_dir": "~/d"},
                                 "study": {"out_dir": "~/study"}})
    assert s.paths.out_dir == str(tmp_path / "home" / "coin out")
    assert s.paths.mlruns_dir == str(tmp_path / "home" / "mlr")
    assert s.paths.data_dir == str(tmp_path / "home" / "d") and s.study.out_dir == str(tmp_path / "home" / "study")
    assert Layout(tmp_path / "project", s).pairs_file == tmp_path / "home" / "coin out" / "pairs" / "pairs.jsonl"
    assert Settings.model_validate({}).paths.out_dir == "outputs"
    # and a backbone path
    assert Settings.model_validate({"model": {"backbone": "~/m"}}).model.backbone == str(tmp_path / "home" / "m")
    assert Settings.model_validate({"model": {"backbone": "Org/name~1"}}).model.backbone == "Org/name~1"


def test_an_instruction_file_in_the_home_folder_is_refused_with_its_full_path(tmp_path, monkeypatch):
    """evaluate.instruction_file = ~/ins.json was read as '<root>/~/ins.json', not there yet, so a misspelt set passed
    the load-time check. Expanded, coin would read $HOME/ins.json while `dvc repro` (dvc.yaml's
    ${evaluate.instruction_file}, which DVC does not expand) fails: so it is refused, naming the full path."""
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    full = re.escape(str(tmp_path / "home" / "ins.json"))
    with pytest.raises(ConfigError, match=rf"evaluate.instruction_file.*write the full path \({full}\); dvc.yaml"):
        load_settings(ROOT / "params.yaml", ["evaluate.instruction_file=~/ins.json"])


def test_a_params_file_linked_to_a_shared_config_stays_in_its_project(tmp_path):
    """params.yaml -> ../shared cfg/coin.yaml: the root followed the link, so data was looked for (with a `dvc
    pull` hint) and outputs written beside the shared file."""
    import os

    from coin.config import project_root

    (tmp_path / "shared cfg").mkdir()
    (tmp_path / "shared cfg" / "coin.yaml").write_text((ROOT / "params.yaml").read_text())
    (tmp_path / "project").mkdir()
    link = tmp_path / "project" / "params.yaml"
    os.symlink(tmp_path / "shared cfg" / "coin.yaml", link)
    assert project_root(link) == (tmp_path / "project").resolve()
    assert project_root(tmp_path / "shared cfg" / "coin.yaml") == (tmp_path / "shared cfg").resolve()
    from coin.cli import _settings

    assert _settings(link, None)[1] == (tmp_path / "project").resolve()


def test_the_pipeline_and_study_flows_keep_a_linked_params_file_in_its_project(tmp_path, monkeypatch):
    """coin pipeline / coin study (and their flows, as a deployment runs them) resolved the link before handing the
    path to their tasks: the pre-flight checked the link's project, then data, pairs, training and registration
    worked beside the shared file."""
    import logging
    import os

    from typer.testing import CliRunner

    import flows.pipeline as fp
    import flows.study as fs
    from coin.cli import app
    from coin.config import project_root

    (tmp_path / "shared").mkdir()
    (tmp_path / "shared" / "coin.yaml").write_text((ROOT / "params.yaml").read_text())
    (tmp_path / "project").mkdir()
    link = tmp_path / "project" / "params.yaml"
    os.symlink(tmp_path / "shared" / "coin.yaml", link)
    project = (tmp_path / "project").resolve()
    seen: list[str] = []

    class Stop(Exception):
        pass

    def first_task(params_path, *args, **kwargs):
        seen.append(params_path)
        raise Stop

    for mod in (fp, fs):
        monkeypatch.setattr(mod, "get_run_logger", lambda: logging.getLogger("test"))
    monkeypatch.setattr(fp, "data_task", first_task)
    monkeypatch.setattr(fs, "open_study_run_task", first_task)
    monkeypatch.setattr(fp.stages, "preflight_pipeline", lambda settings, root=None: None)
    monkeypatch.setattr(fs, "preflight_study", lambda settings, root=None: None)
    with pytest.raises(Stop):
        fp.coin_pipeline.fn(params_path=str(link), overrides=[])
    with pytest.raises(Stop):
        fs.coin_study.fn(params_path=str(link), overrides=[], workers=1, dask_processes=False)
    # the CLI hands the flows the path as given (made absolute), not the link's target
    monkeypatch.setattr(fp, "coin_pipeline", lambda params_path, overrides: first_task(params_path))
    monkeypatch.setattr(fs, "coin_study", lambda params_path, **kw: first_task(params_path))
    CliRunner().invoke(app, ["pipeline", "--params", str(link)])
    CliRunner().invoke(app, ["study", "--params", str(link)])
    assert len(seen) == 4, seen
    assert [project_root(p) for p in seen] == [project] * 4, seen


@pytest.mark.parametrize("flow", ["pipeline", "study"])
def test_a_cancelled_deployment_run_ends_its_mlflow_parent_killed(tmp_path, monkeypatch, flow):
    """Cancelling a deployment run (UI, `prefect flow-run cancel`): the worker's SIGTERM reaches the flow as Prefect's
    TerminationSignal, outside any `coin` interrupt guard, and the parent run ended FAILED, read as a crash."""
    import logging

    from prefect.exceptions import TerminationSignal

    import flows.pipeline as fp
    import flows.study as fs

    (tmp_path / "params.yaml").write_text((ROOT / "params.yaml").read_text())
    closed: list[str] = []

    def cancelled(*args, **kwargs):
        raise TerminationSignal(15)

    mod = fp if flow == "pipeline" else fs
    monkeypatch.setattr(mod, "get_run_logger", lambda: logging.getLogger("test"))
    if flow == "pipeline":
        monkeypatch.setattr(fp.stages, "preflight_pipeline", lambda settings, root=None: None)
        monkeypatch.setattr(fp, "data_task", lambda *a, **k: {"data_version": "v", "pulled": False,
                                                              "versioned": False, "pushed": False})
        monkeypatch.setattr(fp, "open_pipeline_run", lambda *a: "run-id")
        monkeypatch.setattr(fp, "_fresh", lambda task, *a: task)
        monkeypatch.setattr(fp, "pairs_task", cancelled)
        monkeypatch.setattr(fp, "close_pipeline_run", lambda p, o, run, status, tags=None: closed.append(status))
        call = lambda: fp.coin_pipeline.fn(params_path=str(tmp_path / "params.yaml"), overrides=[])  # noqa: E731
    else:
        monkeypatch.setattr(fs, "preflight_study", lambda settings, root=None: None)
        monkeypatch.setattr(fs, "open_study_run_task", lambda *a: "run-id")
        monkeypatch.setattr(fs, "prepare_task", cancelled)
        monkeypatch.setattr(fs, "close_study_run_task", lambda p, o, run, status: closed.append(status))
        call = lambda: fs.coin_study.fn(params_path=str(tmp_path / "params.yaml"), overrides=[],  # noqa: E731
                                        workers=1, dask_processes=False)
    with pytest.raises(TerminationSignal):
        call()
    assert closed == ["KILLED"]
