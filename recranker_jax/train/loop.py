"""The instruction-tuning loop: deterministic batches, per-step logs, and Orbax checkpoints
that make an interrupted run (preemption, SIGTERM, a crash) resume to the same result.

Batch b of the run is a fixed function of (seed, b), so a resumed run sees exactly the
batches the uninterrupted run would have. A checkpoint is written every `save_every`
steps, on SIGTERM, and at the end; the last few are kept.
"""

from __future__ import annotations

import dataclasses
import signal
import time
from collections.abc import Callable
from pathlib import Path

import jax
import numpy as np
import orbax.checkpoint as ocp
from flax import nnx
from jax.sharding import Mesh
from tqdm.auto import tqdm

from recranker_jax.train.packing import PackedRows
from recranker_jax.train.step import place_batch, train_step


@dataclasses.dataclass
class StepLog:
    step: int
    loss: float
    tokens_per_second: float


def batch_rows(n_rows: int, batch_size: int, seed: int, batch_index: int) -> np.ndarray:
    """Row indices of global batch `batch_index`: epochs are seeded permutations of the rows."""
    per_epoch = max(n_rows // batch_size, 1)
    epoch, offset = divmod(batch_index, per_epoch)
    order = np.random.default_rng([seed, epoch]).permutation(n_rows)
    return np.resize(order, per_epoch * batch_size)[offset * batch_size : (offset + 1) * batch_size]


def train(
    model: nnx.Module,
    optimizer: nnx.Optimizer,
    rows: PackedRows,
    *,
    batch_size: int,
    steps: int,
    seed: int,
    checkpoint_dir: Path | None = None,
    save_every: int = 100,
    keep: int = 3,
    mesh: Mesh | None = None,
    rules: dict[str, list[str]] | None = None,
    log: Callable[[StepLog], None] | None = None,
    progress: bool = True,
) -> tuple[list[StepLog], int]:
    """Run optimizer steps up to `steps` (continuing from the latest checkpoint if there is one).

    Returns this call's step logs and the step reached: less than `steps` when a SIGTERM
    stopped the run (its checkpoint is saved; calling again resumes).
    """
    manager = None
    start = 0
    if checkpoint_dir is not None:
        manager = ocp.CheckpointManager(
            Path(checkpoint_dir).resolve(), options=ocp.CheckpointManagerOptions(max_to_keep=keep)
        )
        if manager.latest_step() is not None:
            start = manager.latest_step()
            target = {"model": nnx.state(model), "optimizer": nnx.state(optimizer)}
            abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, target)
            restored = manager.restore(start, args=ocp.args.StandardRestore(abstract))
            nnx.update(model, restored["model"])
            nnx.update(optimizer, restored["optimizer"])

    def save(step: int) -> None:
        if manager is not None and manager.latest_step() != step:
            manager.save(step, args=ocp.args.StandardSave({"model": nnx.state(model), "optimizer": nnx.state(optimizer)}))
            manager.wait_until_finished()

    stop = {"requested": False}
    previous = signal.getsignal(signal.SIGTERM)
    signal.signal(signal.SIGTERM, lambda *_: stop.update(requested=True))
    logs: list[StepLog] = []
    bar = tqdm(total=steps, initial=start, desc="finetune", disable=not progress, leave=False)
    step = start
    try:
        while step < steps and not stop["requested"]:
            index = batch_rows(len(rows), batch_size, seed, step)
            batch = place_batch({"tokens": rows.tokens[index], "loss_mask": rows.loss_mask[index],
                                 "segment_ids": rows.segment_ids[index], "positions": rows.positions[index]},
                                mesh, rules or {})
            started = time.perf_counter()
            loss = float(train_step(model, optimizer, batch))
            seconds = time.perf_counter() - started
            step += 1
            entry = StepLog(step, loss, float((rows.segment_ids[index] > 0).sum()) / seconds)
            logs.append(entry)
            if log is not None:
                log(entry)
            bar.update(1)
            bar.set_postfix(loss=f"{loss:.4f}", tok_s=f"{entry.tokens_per_second:.0f}")
            if step % save_every == 0:
                save(step)
        save(step)  # the end of the run, or the SIGTERM checkpoint
    finally:
        signal.signal(signal.SIGTERM, previous)
        bar.close()
        if manager is not None:
            manager.close()
    return logs, step
