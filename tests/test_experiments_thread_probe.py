"""experiments/thread_probe.py: a --study-dir with no study in it says to run coin study, not dvc pull."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_a_study_dir_without_a_study_names_coin_study(tmp_path: Path) -> None:
    out = subprocess.run([sys.executable, str(ROOT / "experiments" / "thread_probe.py"), "--params",
                          str(ROOT / "params.yaml"), "--study-dir", str(tmp_path / "study")],
                         capture_output=True, text=True, check=False, cwd=ROOT)
    text = " ".join((out.stdout + out.stderr).split())
    assert out.returncode != 0 and "Traceback" not in text, text
    assert "Run `coin study` first, or pass the out_dir of a study" in text and "dvc pull" not in text
