"""`train.remat` on accelerators: ask the compiler. With `auto` the policies are tried from the
fastest to the leanest (none, dots, minimal, full), each compiled ahead of time for the run's
mesh (`train.aot.compile_step`), and the first whose program fits the device's memory is kept;
an explicit policy is compiled once, and a step that fits under no policy tried stops first.
A compiler reports an over-size program before anything runs, on a real device as on a TPU
slice described from a CPU (`recranker compile`). The finetune stage records the choice in
its folder (`remat.json`), so a resumed run does not compile the candidates again.
On the CPU, `auto` stays `none` (host memory is plentiful; `llm.remat.resolve`).
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable, Sequence
from pathlib import Path

FASTEST_FIRST = ("none", "dots", "minimal", "full")
CHOICE_FILE = "remat.json"


def choose_remat(compile_policy: Callable[[str], dict], policies: Sequence[str] | None = None) -> list[tuple[str, dict]]:
    """[(policy, compile result)] of the policies tried, in order, until one fits (the last
    entry is the choice; it is `full`, not fitting, when none fits). `compile_policy(policy)`
    returns a dict with "fits"."""
    tried = []
    for policy in policies or FASTEST_FIRST:
        result = compile_policy(policy)
        tried.append((policy, result))
        if result["fits"]:
            break
    return tried


def remembered_choice(folder: Path, key: dict) -> str | None:
    """The policy chosen before for the same step (`key`: what the choice depends on), if any."""
    path = Path(folder) / CHOICE_FILE
    try:
        saved = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return saved.get("remat") if saved.get("key") == key else None


def remember_choice(folder: Path, key: dict, tried: list[tuple[str, dict]]) -> None:
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    summary = [{"remat": policy, "fits": result["fits"], "needed_bytes": result.get("needed_bytes")}
               for policy, result in tried]
    (folder / CHOICE_FILE).write_text(json.dumps({"key": key, "remat": tried[-1][0], "tried": summary}, indent=2) + "\n")


def compiled_remat(cfg, llama, mesh, answers: int | None, folder: Path, batch_key: str = "train.batch_size",
                   batch_size: int | None = None) -> str | None:
    """On accelerators, the step asks the compiler before it runs: `train.remat: auto` gets the
    first of `FASTEST_FIRST` that fits (printed, and remembered in `folder`), an explicit policy
    is compiled once. A step that does not fit is one line with the compiler's figure, naming
    the batch size and its largest workable value (an estimate from that figure), before
    anything is allocated. Returns the policy to train with; None on the CPU (nothing asked)."""
    from recranker_jax.config_checks import shards
    from recranker_jax.errors import RecRankerError
    from recranker_jax.hardware import memory_capacity
    from recranker_jax.train.aot import HEADROOM, StepShape, compile_step

    device = mesh.devices.flat[0]
    if device.platform == "cpu":
        return None
    shape = StepShape.of(cfg, llama, answers=answers, batch_size=batch_size or cfg.train.batch_size)
    key = {"shape": repr(shape), "mesh": dict(mesh.shape), "device_kind": device.device_kind,
           "devices": int(mesh.devices.size)}
    chosen = remembered_choice(folder, key)
    if chosen is not None:
        return chosen
    capacity, _ = memory_capacity(device)  # the allocator's limit, else the chip's HBM
    policies = None if cfg.train.remat == "auto" else [cfg.train.remat]
    tried = choose_remat(lambda policy: compile_step(dataclasses.replace(shape, remat=policy), mesh, cfg.mesh.rules,
                                                     capacity), policies)
    policy, result = tried[-1]
    if not result["fits"]:
        gb, batch = 2**30, shape.batch_size
        needed = result.get("needed_bytes") or 0
        usable = HEADROOM * (result.get("capacity_bytes") or capacity or 0)
        step = shards("batch", cfg.mesh.rules, dict(mesh.shape))
        largest = int(batch * usable / needed) // step * step if needed else 0
        advice = (f"the largest workable {batch_key} is about {largest}" if largest >= step else
                  f"even {batch_key}={step} (one row a batch shard) does not fit")
        raise RecRankerError(
            f"{batch_key}={batch}: the compiled training step needs {needed / gb:.2f} GB a device, more than "
            f"{usable / gb:.2f} GB of {device.device_kind} (train.remat={policy}); {advice}, or use a leaner "
            "train.remat or more fsdp (mesh.shape)")
    if cfg.train.remat == "auto":
        print("train.remat=auto: " + ", ".join(f"{p} {'fits' if r['fits'] else 'does not fit'}" for p, r in tried)
              + f"; training with {policy}")
    remember_choice(folder, key, tried)
    return policy
