"""The instruction-tuning loop: deterministic batches, per-step logs, and Orbax checkpoints
that make an interrupted run (preemption, SIGTERM, a crash) resume to the same result.

Batch b of the run is a fixed function of (seed, b), so a resumed run sees exactly the
batches the uninterrupted run would have. A checkpoint is written every `save_every`
steps, on SIGTERM, and at the end; the last few are kept. A latest checkpoint that cannot be
restored (corrupt, or cut short by a crash) is skipped with a warning for the one before it.
A checkpoint holds the trained weights, the optimizer and random state, in the model's layer
layout (a checkpoint of the other `model.scan_layers` layout is a one-line error saying which
to use), and not the frozen base weights of LoRA, which every start reads from model.checkpoint.
Each step logs its loss, tokens/s and, where the device's peak is known, the MFU. The step
runs in the mesh's `parallel.sharding_context` (so the attention kernels run under shard_map).
"""

from __future__ import annotations

import dataclasses
import logging
import math
import signal
import time
from collections.abc import Callable
from pathlib import Path

import jax
import numpy as np
import orbax.checkpoint as ocp
from flax import nnx
from jax.experimental import multihost_utils
from jax.sharding import Mesh
from tqdm.auto import tqdm

from recranker_jax import hardware, signals
from recranker_jax.errors import RecRankerError
from recranker_jax.instruments import Scalars, StepProfiler, memory_scalars
from recranker_jax.llm.layout import checkpoint_layout
from recranker_jax.parallel import place_batch, sharding_context
from recranker_jax.train.packing import PackedRows, answer_capacity, batch_arrays
from recranker_jax.train.step import train_step_stats


logger = logging.getLogger(__name__)


@dataclasses.dataclass
class StepLog:
    step: int
    loss: float
    tokens_per_second: float  # answer and prompt tokens, padding excluded
    learning_rate: float | None = None
    mfu: float | None = None  # model FLOPs (padding included) / the devices' peak
    grad_norm: float | None = None  # the gradients' global norm, before clipping


def check_layout(manager: ocp.CheckpointManager, step: int, target: dict) -> None:
    """A one-line error when checkpoint `step` holds the other layer layout (scanned / looped,
    `model.scan_layers`) than `target`; nothing when it cannot tell (an unreadable checkpoint is
    handled by the fallback of `restore_latest`)."""
    try:
        saved = manager.item_metadata(step).tree["model"]["layers"]
    except Exception:  # noqa: BLE001 - unreadable or another structure: the restore decides
        return
    saved_layout = checkpoint_layout(list(saved))
    wanted = checkpoint_layout(list(target["model"]["layers"]))
    if saved_layout != wanted:
        raise RecRankerError(
            f"{manager.directory}/{step}: the checkpoint holds {saved_layout} layers but the model's are {wanted}; "
            f"resume with model.scan_layers={str(saved_layout == 'scanned').lower()}, the layout it was written with"
        )


def restore_latest(manager: ocp.CheckpointManager, target: dict) -> tuple[int, dict | None]:
    """(step, state) of the newest checkpoint that restores (newer, unreadable ones are deleted);
    (0, None) when there is none."""
    steps = sorted(manager.all_steps(), reverse=True)
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, target)
    failed: list[int] = []
    for step in steps:
        check_layout(manager, step, target)
        try:
            state = manager.restore(step, args=ocp.args.StandardRestore(abstract))
        except Exception as err:  # noqa: BLE001 - any failure to read it means: use the one before
            first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            logger.warning("checkpoint step %d in %s cannot be restored (%s); falling back to the previous one",
                           step, manager.directory, first[:200])
            failed.append(step)
            continue
        for bad in failed:  # training goes on from `step` and will write these steps again
            manager.delete(bad)
        return step, state
    if steps:
        raise RecRankerError(f"{manager.directory}: none of the checkpoints {steps} can be restored; "
                             "delete the folder to start this training again")
    return 0, None


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
    flops_per_token: float | None = None,
    peak_flops: float | None = None,
    schedule: Callable[[int], float] | None = None,
    desc: str = "finetune",
    diverged_hint: str | None = None,
    scalars: Scalars | None = None,
    profiler: StepProfiler | None = None,
) -> tuple[list[StepLog], int]:
    """Run optimizer steps up to `steps` (continuing from the latest checkpoint if there is one).

    Returns this call's step logs and the step reached: less than `steps` when a SIGTERM or
    Ctrl-C (SIGINT; a second one stops at once) stopped the run (its checkpoint is saved; calling again resumes). `flops_per_token` (of
    the model, for training) and `peak_flops` (of all devices together) give the MFU;
    `schedule` (step -> learning rate) adds the learning rate to the logs; `desc` names the progress bar.
    A non-finite loss stops training with a RecRankerError naming the step (`diverged`; `diverged_hint`:
    the settings to lower, for the message); the checkpoints before it are kept.
    `scalars` receives each logged step (and its seconds and the device memory) for TensorBoard and
    is closed at the end; `profiler` traces its steps (instruments.py).
    """
    manager = None
    start = 0
    # what a checkpoint holds: everything but frozen base weights (LoRA's base comes back from
    # model.checkpoint at every start; 13.5 GB of LLaMA-2 7B not written every save_every steps)
    kept = nnx.Any(optimizer.wrt, nnx.Not(nnx.Param))

    def snapshot() -> dict:
        return {"model": nnx.state(model, kept), "optimizer": nnx.state(optimizer)}

    if checkpoint_dir is not None:
        manager = ocp.CheckpointManager(
            Path(checkpoint_dir).resolve(), options=ocp.CheckpointManagerOptions(max_to_keep=keep),
            item_handlers=ocp.StandardCheckpointHandler(),  # so a new process reads the metadata (check_layout)
        )
        start, restored = restore_latest(manager, snapshot())
        if restored is not None:
            nnx.update(model, restored["model"])
            nnx.update(optimizer, restored["optimizer"])

    def save(step: int) -> None:
        if manager is not None and manager.latest_step() != step:
            with signals.saving():  # a stop waits for a checkpoint being written (signals.py)
                manager.save(step, args=ocp.args.StandardSave(snapshot()))
                manager.wait_until_finished()

    stop = {"requested": False}

    def request_stop(number, frame) -> None:
        if number == signal.SIGINT and stop["requested"]:
            raise KeyboardInterrupt  # a second Ctrl-C: stop now, without the checkpoint
        stop["requested"] = True

    previous = {number: signal.signal(number, request_stop) for number in (signal.SIGTERM, signal.SIGINT)}

    def stop_agreed() -> bool:
        """Across processes, stop when any one was asked to (a pod's SIGTERMs arrive at different
        steps, and every process must reach the same collective checkpoint)."""
        if jax.process_count() == 1:
            return stop["requested"]
        return bool(multihost_utils.process_allgather(np.int32(stop["requested"])).max())

    capacity = answer_capacity(rows.loss_mask)  # one static batch shape for the whole run
    logs: list[StepLog] = []
    bar = tqdm(total=steps, initial=start, desc=desc, disable=not progress, leave=False)
    step = start
    try:
        while step < steps and not stop_agreed():
            index = batch_rows(len(rows), batch_size, seed, step)
            batch = place_batch(batch_arrays(rows.tokens[index], rows.loss_mask[index], rows.segment_ids[index],
                                             rows.positions[index], capacity), mesh, rules or {})
            if profiler is not None:
                profiler.before(step + 1)
            started = time.perf_counter()
            with sharding_context(mesh, rules or {}):  # the attention kernels' shard_map reads it
                loss, grad_norm = (float(value) for value in train_step_stats(model, optimizer, batch))
            seconds = time.perf_counter() - started
            step += 1
            if profiler is not None:
                profiler.after(step)
            if not math.isfinite(loss):
                raise diverged(manager, step, loss, desc, diverged_hint)
            mfu = None
            if flops_per_token and peak_flops:
                mfu = hardware.mfu(rows.tokens[index].size / seconds, flops_per_token, peak_flops)
            entry = StepLog(step, loss, float((rows.segment_ids[index] > 0).sum()) / seconds,
                            float(schedule(step - 1)) if schedule else None, mfu, grad_norm)
            logs.append(entry)
            if log is not None:
                log(entry)
            if scalars is not None:
                scalars.write(step, {**{k: v for k, v in dataclasses.asdict(entry).items() if k != "step"},
                                     "step_seconds": seconds, **memory_scalars()})
            bar.update(1)
            bar.set_postfix(loss=f"{loss:.4f}", tok_s=f"{entry.tokens_per_second:.0f}",
                            **({"mfu": f"{mfu:.1%}"} if mfu is not None else {}))
            if step % save_every == 0:
                save(step)
        save(step)  # the end of the run, or the checkpoint of a SIGTERM / Ctrl-C
    finally:
        for number, handler in previous.items():
            signal.signal(number, handler)
        bar.close()
        if profiler is not None:
            profiler.close()
        if scalars is not None:
            scalars.close()
        if manager is not None:
            manager.close()
    return logs, step


def diverged(manager: ocp.CheckpointManager | None, step: int, loss: float, desc: str, hint: str | None) -> RecRankerError:
    """The error of a non-finite loss at `step` (1-based): the checkpoints from step - 1 on hold
    the weights that gave it and are removed; the earlier ones are kept."""
    kept = None
    if manager is not None:
        for saved in sorted(manager.all_steps()):
            if saved >= step - 1:
                manager.delete(saved)
            else:
                kept = saved
    where = (f"; its checkpoint of step {kept} is kept" if kept is not None else "; it kept no checkpoint")
    return RecRankerError(f"{desc}: the loss is {loss} at step {step}: training diverged and stopped, not marked done"
                          f"{where}; lower the learning rate{f' ({hint})' if hint else ''}")
