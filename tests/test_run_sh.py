"""``run.sh`` answers --help and refuses an unknown option before it installs anything."""

import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_help_prints_the_usage_without_setting_up():
    res = subprocess.run(["bash", str(ROOT / "run.sh"), "--help"], capture_output=True, text=True, timeout=30)
    assert res.returncode == 0, res.stderr
    assert "./run.sh pipeline" in res.stdout and "./run.sh test" in res.stdout and "[setup]" not in res.stderr


def test_an_unknown_option_is_refused_with_the_usage():
    res = subprocess.run(["bash", str(ROOT / "run.sh"), "--pipeline"], capture_output=True, text=True, timeout=30)
    assert res.returncode == 2
    assert "unknown option '--pipeline'" in res.stderr and "./run.sh pipeline" in res.stderr
