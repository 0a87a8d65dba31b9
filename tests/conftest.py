"""Test session setup: 8 simulated CPU devices for the sharding tests (set before jax loads)."""

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
# The tests run on the CPU; with the tpu extra installed, JAX would first try to start a TPU backend
# (libtpu is loaded by the compile tests' own subprocesses instead).
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
