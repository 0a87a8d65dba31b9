"""`python tests/slow_stage.py MODE recranker-arguments...`: the `recranker` command line, with the
data stage's build replaced by one that marks `started` in its partial folder, then blocks:
MODE stdin (in Python, reading stdin until it closes: a command that holds the run's lock) or
xla (inside one XLA computation that never returns: a step that will not finish). For the
tests of the run lock and of signals (test_run_lock.py, test_signals.py)."""

import dataclasses
import sys

import recranker_jax.pipeline as pipeline


def slow_build(cfg, run, out, progress):
    (out / "started").write_text("started")
    if MODE == "stdin":
        sys.stdin.read()
        return
    import jax
    import jax.numpy as jnp

    never = jax.jit(lambda x: jax.lax.while_loop(lambda v: v > -1.0, lambda v: v * 0.5 + 1.0, x))
    never(jnp.ones(())).block_until_ready()


MODE = sys.argv[1]
pipeline.STAGES["data"] = dataclasses.replace(pipeline.STAGES["data"], build=slow_build)

from recranker_jax.cli import entry_point  # noqa: E402 - after the stage is replaced

sys.argv = ["recranker", *sys.argv[2:]]
entry_point()
