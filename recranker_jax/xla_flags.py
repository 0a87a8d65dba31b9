"""XLA:CPU options this package sets by default, measured to speed up training on the CPU.

XLA reads XLA_FLAGS once, when JAX initialises its first backend, so `configure()` must run
before any JAX computation (the CLI calls it first thing). A flag the user already set in
XLA_FLAGS is left as the user set it.
"""

from __future__ import annotations

import os

# name -> value; see `recranker bench train` and the bench's module docstring for the measurements.
CPU_FLAGS: dict[str, str] = {}


def with_cpu_flags(xla_flags: str) -> str:
    """`xla_flags` with each of CPU_FLAGS appended unless it already names that flag."""
    present = {part.split("=", 1)[0].lstrip("-") for part in xla_flags.split()}
    added = [f"--{name}={value}" for name, value in CPU_FLAGS.items() if name not in present]
    return " ".join([xla_flags.strip(), *added]).strip()


def configure() -> str:
    """Add CPU_FLAGS to this process's XLA_FLAGS (before JAX initialises); returns the result."""
    os.environ["XLA_FLAGS"] = with_cpu_flags(os.environ.get("XLA_FLAGS", ""))
    return os.environ["XLA_FLAGS"]
