"""Ctrl-C during a flow (coin.interrupt): Prefect's temporary server dies with it, so what the flow raises next
(a ConnectError from the dead API) is the interruption, exit 130 and "interrupted", not a bug; a flow stuck in
retries ends after the grace period; SIGTERM is 143."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

SCRIPT = """
import os, signal, sys, time
from flows.pipeline import run_main

def run():
    try:
        os.kill(os.getpid(), getattr(signal, sys.argv[2]))
        time.sleep(5)
    except KeyboardInterrupt:
        if sys.argv[1] == "connect":   # the engine's next call to the dead API server
            raise ConnectionRefusedError(111, "Connection refused")
        while True:                    # the engine retrying it
            time.sleep(0.05)

run_main(lambda: None, run)
"""


def _run(mode: str, sig: str) -> tuple[subprocess.CompletedProcess, float]:
    env = {**os.environ, "COIN_INTERRUPT_GRACE_S": "1", "PYTHONPATH": f"{ROOT / 'src'}{os.pathsep}{ROOT}"}
    env.pop("COIN_DEBUG", None)
    t0 = time.monotonic()
    res = subprocess.run([sys.executable, "-c", SCRIPT, mode, sig], capture_output=True, text=True, env=env,
                         timeout=120)
    return res, time.monotonic() - t0


@pytest.mark.parametrize(("sig", "code"), [("SIGINT", 130), ("SIGTERM", 143)])
def test_an_error_after_the_interrupt_is_the_interrupt(sig, code):
    res, _ = _run("connect", sig)
    assert res.returncode == code, res.stderr
    assert "interrupted" in res.stderr and "bug" not in res.stderr and "Traceback" not in res.stderr, res.stderr


def test_a_flow_stuck_after_the_interrupt_ends_after_the_grace_period():
    res, took = _run("hang", "SIGINT")
    assert res.returncode == 130, res.stderr
    assert "interrupted (still shutting down after 1 s: stopped)" in res.stderr
    assert took < 60


PLAIN = """
import os, signal, sys, time
import coin.cli as cli

SIG = getattr(signal, sys.argv[1])

def settings(*args, **kwargs):  # `coin params` loads its settings first: the signal lands there
    try:
        os.kill(os.getpid(), SIG)
        time.sleep(5)
    except KeyboardInterrupt:  # as when it lands inside an MLflow write, whose cleanup then fails
        raise RuntimeError("(sqlite3.OperationalError) database is locked")

cli._settings = settings
sys.argv = ["coin", "params"]
cli.main()
"""


@pytest.mark.parametrize(("sig", "code"), [("SIGINT", 130), ("SIGTERM", 143)])
def test_a_plain_command_interrupted_inside_a_library_call_ends_interrupted(sig, code):
    """Every coin command runs under interrupt_guard: SIGTERM had no handler (no message, MLflow runs left
    RUNNING), and an error raised while a Ctrl-C unwound an MLflow write was reported as an MLflow error, exit 4."""
    env = {**os.environ, "COIN_INTERRUPT_GRACE_S": "5", "PYTHONPATH": f"{ROOT / 'src'}{os.pathsep}{ROOT}"}
    env.pop("COIN_DEBUG", None)
    res = subprocess.run([sys.executable, "-c", PLAIN, sig], capture_output=True, text=True, env=env, timeout=120)
    assert res.returncode == code, res.stderr
    assert "interrupted" in res.stderr and "database is locked" not in res.stderr, res.stderr
