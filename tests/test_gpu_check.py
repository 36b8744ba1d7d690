"""bench/gpu_check.py: ``--smoke`` writes the table with every row, also where only torch, transformers, peft,
accelerate and their own dependencies are installed (no pydantic, pandas, MiniLM, orchestration stack); its
stand-in settings agree with ``TrainSettings``; the cell row times the command it is given."""

from __future__ import annotations

import argparse
import importlib.metadata as md
import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from coin.config import LoraSettings, TrainSettings

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "bench" / "gpu_check.py"
# what a bare GPU machine is assumed to hold: these and what they install
BARE_ROOTS = ("torch", "transformers", "peft", "accelerate", "numpy", "safetensors")
# absent there although transformers 5 pulls pydantic in through typer (older versions do not)
BARE_ABSENT = ("pydantic", "pydantic-core", "annotated-types", "typing-inspection")

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _load():
    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    sys.modules["gpu_check"] = mod  # dataclasses resolve their module
    spec.loader.exec_module(mod)
    return mod


gpu_check = _load()


def _table_rows(text: str) -> list[list[str]]:
    return [[c.strip() for c in line.strip().strip("|").split("|")] for line in text.splitlines()
            if line.startswith("| ") and not line.startswith("| row ")]


def _check_table(text: str, *, bnb: bool) -> dict[str, list[list[str]]]:
    rows: dict[str, list[list[str]]] = {}
    for cells in _table_rows(text):
        rows.setdefault(cells[0], []).append(cells)
    assert set(rows) == set(gpu_check.ROW_NAMES)
    assert [r[2] for r in rows["1B bf16 LoRA coin"]] == ["2", "4"]
    for r in rows["1B bf16 LoRA coin"] + rows["1B bf16 LoRA reference-style"]:
        assert float(r[5]) > 0 and float(r[6]) > 0 and r[7].endswith("%"), r  # tokens/s, TFLOP/s, MFU
    q4 = rows["7B 4-bit LoRA coin"][0]
    if bnb:
        assert float(q4[5]) > 0, q4
    else:
        assert q4[-1].startswith("skipped: bitsandbytes not installed"), q4
    assert rows["MiniLM study cell"][0][-1].startswith("skipped: "), rows["MiniLM study cell"]
    assert "coin vs reference-style at batch 4" in text and "MFU >= 40%" in text
    return rows


def test_step_settings_agree_with_train_settings() -> None:
    train, lora = TrainSettings(), LoraSettings()
    step = gpu_check.StepSettings()
    for f in gpu_check.dataclasses.fields(step):
        if f.name == "lora":
            continue
        want = getattr(train, f.name)
        assert (list(want) if isinstance(want, list) else want) == (
            list(getattr(step, f.name)) if isinstance(getattr(step, f.name), tuple) else getattr(step, f.name)), f.name
    for f in gpu_check.dataclasses.fields(step.lora):
        assert getattr(lora, f.name) == getattr(step.lora, f.name), f"lora.{f.name}"
    assert step.method == train.method
    assert step.model_copy(update={"methods": ["cit"], "packing": False}).method == "cit"


def test_synthetic_rows_follow_the_default_lengths() -> None:
    tok = gpu_check.WordHashTokenizer(32000)
    rows = gpu_check.synthetic_rows(300, seed=0)
    collate = gpu_check.PairCollator(tok, "coin", cutoff_len=gpu_check.CUTOFF)
    lengths = (collate(rows).last_index + 1).tolist()
    assert 25 <= min(lengths) and max(lengths) <= 203
    assert 50 <= sum(lengths) / len(lengths) <= 67  # the default pairs: mean 58.5 tokens


def test_smoke_writes_the_table(tmp_path: Path) -> None:
    out = tmp_path / "gpu.md"
    gpu_check.main(["--smoke", "--out", str(out), "--pairs", str(tmp_path / "absent.jsonl")])
    text = out.read_text()
    assert text.startswith("# GPU check") and "--smoke" in text
    rows = _check_table(text, bnb=importlib.util.find_spec("bitsandbytes") is not None)
    assert "validated pairs" in rows["MiniLM study cell"][0][-1]


def _bare_site(dest: Path) -> None:
    """Symlinks to the distributions of BARE_ROOTS and their dependencies, less BARE_ABSENT."""
    seen: dict[str, md.Distribution] = {}
    todo = list(BARE_ROOTS)
    while todo:
        name = canonicalize_name(todo.pop())
        if name in seen or name in BARE_ABSENT:
            continue
        try:
            seen[name] = dist = md.distribution(name)
        except md.PackageNotFoundError:
            continue
        for r in dist.requires or []:
            req = Requirement(r)
            if req.marker is None or req.marker.evaluate({"extra": ""}):
                todo.append(req.name)
    dest.mkdir()
    for dist in seen.values():
        base = Path(dist.locate_file(""))
        for top in {f.parts[0] for f in dist.files or [] if f.parts[0] != ".."}:
            if (base / top).exists() and not (dest / top).exists():
                (dest / top).symlink_to(base / top)


def test_smoke_runs_without_pydantic_and_the_orchestration_stack(tmp_path: Path) -> None:
    site = tmp_path / "site"
    _bare_site(site)
    assert not (site / "pydantic").exists() and not (site / "pandas").exists() and (site / "peft").exists()
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(PYTHONPATH=str(site), OMP_NUM_THREADS="1")
    out = tmp_path / "gpu.md"
    # -S: no site-packages of this environment; only the stdlib and the bare site
    proc = subprocess.run([sys.executable, "-S", str(SCRIPT), "--smoke", "--out", str(out)], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = _check_table(out.read_text(), bnb=False)
    reason = rows["MiniLM study cell"][0][-1]
    assert "pydantic not installed" in reason and "pandas not installed" in reason, reason


def _args(**kw) -> argparse.Namespace:
    base = dict(no_cell=False, minilm=None, pairs=None, smoke=True, params="params.yaml", cell_timeout=60.0)
    return argparse.Namespace(**{**base, **kw})


def test_cell_row_times_the_command_or_says_why_not() -> None:
    device = gpu_check.torch.device("cpu")
    ok = gpu_check.bench_cell(_args(), device, command=[sys.executable, "-c", "pass"])
    assert ok["wall_s"] > 0 and "error" not in ok
    bad = gpu_check.bench_cell(_args(), device, command=[sys.executable, "-c", "import sys; sys.exit('boom')"])
    assert bad["error"].startswith("failed (exit 1)") and "boom" in bad["error"]
    assert gpu_check.bench_cell(_args(no_cell=True), device)["error"] == "skipped: --no-cell"
    missing = gpu_check.cell_missing(_args(minilm="/nonexistent", pairs="/nonexistent/valid.jsonl"))
    assert any("--minilm /nonexistent" in m for m in missing) and any("validated pairs" in m for m in missing)
    cmd = gpu_check.cell_command(_args(minilm="/m", pairs="/p.jsonl"), Path("/o"), device)
    assert cmd[1:3] == ["-m", "coin.study.cell"] and "model.backbone=/m" in cmd and "train.max_steps=2" in cmd



def test_the_cell_row_reads_the_pairs_where_its_params_put_the_study(tmp_path: Path) -> None:
    """The row looked for outputs/study/validated/valid.jsonl whatever --params said: with study.out_dir elsewhere
    it was skipped, advising `coin study`, which writes them where the cell (without --pairs) reads them."""
    import yaml

    params = tmp_path / "params.yaml"
    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    raw["paths"]["data_dir"] = str(ROOT / "data")
    raw["evaluate"]["instruction_file"] = str(ROOT / raw["evaluate"]["instruction_file"])
    raw["study"]["out_dir"] = "elsewhere/study2"
    params.write_text(yaml.safe_dump(raw))
    args = _args(params=str(params), pairs=None)
    pairs = tmp_path / "elsewhere" / "study2" / "validated" / "valid.jsonl"
    assert gpu_check.study_pairs(args) == pairs
    assert any(f"validated pairs ({pairs}" in m for m in gpu_check.cell_missing(args))
    pairs.parent.mkdir(parents=True)
    pairs.write_text("")
    assert not any("validated pairs" in m for m in gpu_check.cell_missing(args))
    cmd = gpu_check.cell_command(args, Path("/o"), gpu_check.torch.device("cpu"))
    assert cmd[cmd.index("--pairs") + 1] == str(pairs)


@pytest.mark.skipif(importlib.util.find_spec("bitsandbytes") is None, reason="bitsandbytes not installed")
def test_4bit_layers_get_lora() -> None:
    import torch

    from coin.modeling.lora import apply_lora

    bb = gpu_check.build_llama(gpu_check.SMOKE_7B, gpu_check.WordHashTokenizer(512), torch.device("cpu"),
                               torch.float32, 0)
    assert gpu_check.quantise_4bit(bb.model, torch.float32) == 2 * 7
    attn = apply_lora(bb, gpu_check.StepSettings().lora).base_model.model.model.layers[0].self_attn
    assert type(attn.q_proj).__module__ == "peft.tuners.lora.bnb" and hasattr(attn.q_proj, "lora_A")


def test_packing_selfcheck_passes_the_real_mask_and_refuses_a_leaky_one(capsys: pytest.CaptureFixture[str]) -> None:
    spec = importlib.util.spec_from_file_location("packing_selfcheck", ROOT / "bench" / "packing_selfcheck.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    mod.main(["--shape", "smoke", "--device", "cpu"])
    lines = [line for line in capsys.readouterr().out.splitlines() if "relative error" in line]
    assert len(lines) == 4, lines
    for line in lines:
        assert line.endswith("passes") == ("block-diagonal" in line), line
