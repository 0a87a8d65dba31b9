"""One command per run: a command writing into a run holds the OS lock of runs/<name>/.lock; a
second one stops at once with one line naming the holder; a killed holder never blocks the next
command; looking needs no lock."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from recranker_jax.cli import main
from recranker_jax.run import MARKER
from recranker_jax.run_lock import HELD_ENV, child_environment, hold, lock_path
from tests.test_signals import REPO, one_error_line, start_slow_stage


def test_a_second_command_on_a_run_in_use_stops_at_once_naming_the_holder(tmp_path, capsys):
    run = tmp_path / "quickstart"
    holder = start_slow_stage("stdin", tmp_path)  # inside its data stage, holding the lock
    try:
        for command in (["data", "split"], ["retrieval"], ["report"]):
            assert main([*command, f"run.root={tmp_path}"]) == 2
            line = one_error_line(capsys.readouterr().err)
            assert line.startswith(f"error: run {run} is in use by another command: process {holder.pid} (recranker "
                                   f"data split run.root={tmp_path}), since "), line
            assert line.endswith("; wait for it to end, or use another run.name")
        assert main(["data", "stats", f"run.root={tmp_path}", "--json"]) == 0  # looking takes no lock
        assert sorted(p.name for p in run.iterdir()) == [".data.partial", ".lock"]  # nothing of the refused ones
    finally:
        holder.kill()  # kill -9: no cleanup runs; the OS drops its lock
        holder.communicate()
    assert (run / ".lock").exists()
    assert main(["data", "split", f"run.root={tmp_path}"]) == 0  # the lock of a killed command never blocks
    assert (run / "data" / MARKER).is_file()
    assert not (run / ".lock").exists() and not list(run.glob(".*.partial"))


def child_takes_lock(run_dir: Path, env: dict[str, str]) -> subprocess.CompletedProcess:
    code = "import sys; from pathlib import Path; from recranker_jax.run_lock import hold\n" \
           "with hold(Path(sys.argv[1])): print('locked')"
    environment = {k: v for k, v in os.environ.items() if k != HELD_ENV}
    return subprocess.run([sys.executable, "-c", code, str(run_dir)], env={**environment, "PYTHONPATH": str(REPO), **env},
                          capture_output=True, text=True, timeout=120)


def test_the_lock_is_reentrant_and_a_child_working_for_its_holder_goes_under_it(tmp_path):
    run_dir = tmp_path / "runs" / "a"
    with hold(run_dir):
        with hold(run_dir):  # `recranker pipeline` holds it across stages that take it again
            assert lock_path(run_dir).is_file()
        assert lock_path(run_dir).is_file()
        refused = child_takes_lock(run_dir, {})
        assert refused.returncode == 1 and "RunInUse" in refused.stderr and f"process {os.getpid()}" in refused.stderr
        helper = child_takes_lock(run_dir, child_environment(run_dir))  # process 0's single-process child
        assert helper.returncode == 0 and helper.stdout == "locked\n", helper.stderr
    assert not run_dir.exists()  # it created the run folder only to lock it: removed with the lock
