"""Signals are honoured at all times: SIGTERM and the first Ctrl-C stop a command within seconds
even inside an XLA computation that never returns (tests/slow_stage.py), with one line and exit
code 143 (SIGTERM) or 130 (Ctrl-C); the stage is not marked finished and nothing half-written,
no lock and no empty run folder stays behind."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPT = Path(__file__).with_name("slow_stage.py")


def one_error_line(err: str) -> str:
    errors = ["error: " + line.split("error: ", 1)[1] for line in err.replace("\r", "\n").splitlines() if "error: " in line]
    assert "Traceback" not in err and len(errors) == 1, err
    return errors[0]


def start_slow_stage(mode: str, root: Path) -> subprocess.Popen:
    """`recranker data split` whose data stage blocks (`mode`: stdin or xla), once it is inside the stage."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "JAX_PLATFORMS": "cpu", "RECRANKER_STOP_GRACE_S": "1"}
    process = subprocess.Popen([sys.executable, str(SCRIPT), mode, "data", "split", f"run.root={root}"], env=env,
                               stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    started, deadline = root / "quickstart" / ".data.partial" / "started", time.monotonic() + 300
    while not started.exists():
        if process.poll() is not None or time.monotonic() > deadline:
            process.kill()
            pytest.fail(f"the slow stage did not start: {process.communicate()}")
        time.sleep(0.1)
    return process


def assert_nothing_left(root: Path) -> None:
    run = root / "quickstart"
    assert not (run / "data").exists()  # never marked finished
    assert not run.exists(), sorted(p.name for p in run.iterdir())  # no partial folder, no .lock, no empty run folder


@pytest.mark.parametrize("name, code", [("SIGTERM", 143), ("SIGINT", 130)])
def test_a_signal_stops_a_step_that_never_returns(tmp_path, name, code):
    process = start_slow_stage("xla", tmp_path)
    time.sleep(0.5)  # compiling or computing: either way the main thread is inside XLA
    process.send_signal(getattr(signal, name))
    _, err = process.communicate(timeout=120)
    assert process.returncode == code, err[-3000:]
    who = "SIGTERM" if name == "SIGTERM" else "Ctrl-C"
    assert one_error_line(err) == (f"error: stopped by {who} (it did not stop within 1 s); run the same command again "
                                   "to resume (finished stages and saved checkpoints are kept)")
    assert_nothing_left(tmp_path)


def test_sigterm_in_python_unwinds_like_ctrl_c_with_exit_143(tmp_path):
    process = start_slow_stage("stdin", tmp_path)  # blocked in Python: the handler raises at once
    process.send_signal(signal.SIGTERM)
    _, err = process.communicate(timeout=120)
    assert process.returncode == 143, err[-3000:]
    assert one_error_line(err).startswith("error: terminated (SIGTERM); run the same command again to resume")
    assert_nothing_left(tmp_path)
