"""`train.remat: auto` on accelerators: ask the compiler. The policies are tried from the
fastest to the leanest (none, dots, minimal, full), each compiled ahead of time for the run's
mesh (`train.aot.compile_step`), and the first whose program fits the device's memory is kept.
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


def device_capacity(device) -> int | None:
    """Usable bytes of one device: what its runtime reports, else its chip's HBM."""
    from recranker_jax.hardware import device_memory_bytes

    try:
        stats = device.memory_stats() or {}
    except Exception:  # described (ahead-of-time) devices and some runtimes have no statistics
        stats = {}
    return stats.get("bytes_limit") or device_memory_bytes(device)


def auto_remat(cfg, llama, mesh, answers: int | None, folder: Path) -> str | None:
    """The policy `train.remat: auto` runs with on `mesh`'s accelerators: remembered in
    `folder`, else the first of `FASTEST_FIRST` that the compiler fits (printed, and remembered).
    None where the compiler is not asked: an explicit policy, or the CPU."""
    from recranker_jax.train.aot import StepShape, compile_step

    device = mesh.devices.flat[0]
    if cfg.train.remat != "auto" or device.platform == "cpu":
        return None
    shape = StepShape.of(cfg, llama, answers=answers)
    key = {"shape": repr(shape), "mesh": dict(mesh.shape), "device_kind": device.device_kind,
           "devices": int(mesh.devices.size)}
    chosen = remembered_choice(folder, key)
    if chosen is not None:
        return chosen
    capacity = device_capacity(device)
    tried = choose_remat(lambda policy: compile_step(dataclasses.replace(shape, remat=policy), mesh, cfg.mesh.rules,
                                                     capacity))
    print("train.remat=auto: " + ", ".join(
        f"{policy} {'fits' if result['fits'] else 'does not fit'}" for policy, result in tried)
        + f"; training with {tried[-1][0]}")
    remember_choice(folder, key, tried)
    return tried[-1][0]
