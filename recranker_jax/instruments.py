"""What accelerator users look at beside the run's own files: TensorBoard event files of every
training stage (runs/<name>/<stage>/tensorboard/, `run.tensorboard`), profiler traces of chosen
steps (runs/<name>/<stage>/profile/, `train.profile_steps` / `--profile START:STOP`), and the
device memory as a scalar. Neither folder is part of a stage's manifest (`run.INSTRUMENT_FOLDERS`):
they change with every run and say nothing about what the stage computed.

Event files are written by tensorboardX at the steps `train_log.jsonl` logs, from process 0 only,
and flushed when the stage's training ends. Traces are `jax.profiler` traces: an .xplane.pb under
profile/plugins/profile/<time>/, the layout TensorBoard's profile plugin and XProf open.
"""

from __future__ import annotations

import logging
import resource
from collections.abc import Mapping
from pathlib import Path

import jax


logger = logging.getLogger(__name__)

TENSORBOARD = "tensorboard"  # the event files' folder inside a stage folder
PROFILE = "profile"  # the profiler traces' folder inside a stage folder


class Scalars:
    """TensorBoard scalars of one training stage (a no-op when off or not process 0).

    `write(step, values)` adds each number of `values` under `prefix/name` (TensorBoard's tag
    characters: `valid_ndcg@10` is written `valid_ndcg_10`); the writer
    (and its event file) is created at the first write, flushed by `close`."""

    def __init__(self, folder: Path | None, prefix: str = "", enabled: bool = True):
        self.folder = Path(folder) if folder is not None else None
        self.prefix = prefix
        self.enabled = enabled and folder is not None and jax.process_index() == 0
        self._writer = None

    def write(self, step: int, values: Mapping[str, float | None]) -> None:
        if not self.enabled:
            return
        if self._writer is None:
            from tensorboardX import SummaryWriter

            # flush_secs: written at close (the end of training), not in the middle of steps
            self._writer = SummaryWriter(str(self.folder), flush_secs=3600, max_queue=100_000)
        for name, value in values.items():
            if value is not None:
                self._writer.add_scalar(f"{self.prefix}/{name}" if self.prefix else name, float(value), int(step))

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None

    def __enter__(self) -> Scalars:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def memory_scalars() -> dict[str, float]:
    """The first local device's memory in bytes where the platform reports it (GPU / TPU:
    `memory_bytes_in_use`, `memory_peak_bytes`), else the process's peak RSS (`host_peak_rss_bytes`)."""
    try:
        stats = jax.local_devices()[0].memory_stats()
    except Exception:  # noqa: BLE001 - a platform without memory statistics
        stats = None
    if stats and "bytes_in_use" in stats:
        out = {"memory_bytes_in_use": float(stats["bytes_in_use"])}
        if "peak_bytes_in_use" in stats:
            out["memory_peak_bytes"] = float(stats["peak_bytes_in_use"])
        return out
    return {"host_peak_rss_bytes": float(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024}  # KiB on Linux


class StepProfiler:
    """A `jax.profiler` trace of the steps [start, stop) (counted from 1) into `folder`; nothing
    when `steps` is empty or this is not process 0. Call `before(step)` before step `step` runs
    and `after(step)` once its result is on the host; `close` ends a trace a short run left open."""

    def __init__(self, folder: Path | None, steps: list[int] | None):
        self.folder = Path(folder) if folder is not None else None
        self.steps = list(steps or [])
        self.active = False
        if self.folder is None or jax.process_index() != 0:
            self.steps = []

    def before(self, step: int) -> None:
        if self.steps and step == self.steps[0] and not self.active:
            self.folder.mkdir(parents=True, exist_ok=True)
            jax.profiler.start_trace(str(self.folder))
            self.active = True

    def after(self, step: int) -> None:
        if self.active and step >= self.steps[1] - 1:
            self.close()

    def close(self) -> None:
        if self.active:
            jax.profiler.stop_trace()
            self.active = False
            logger.info("profile of steps %d..%d written to %s (open: tensorboard --logdir %s, or xprof %s)",
                        self.steps[0], self.steps[1] - 1, self.folder, self.folder, self.folder)


def bench_profile_dir(cfg, benchmark: str) -> Path:
    """Where `recranker bench BENCHMARK --profile` writes its trace: runs/<name>/bench/BENCHMARK/profile/."""
    return Path(cfg.run.root) / cfg.run.name / "bench" / benchmark / PROFILE
