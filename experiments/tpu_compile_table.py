"""The paper configs compiled for TPU slices by the TPU compiler (`recranker compile`'s library
calls), each remat policy, beside `recranker plan`'s estimate: the table in docs/scale-out.md.

    python experiments/tpu_compile_table.py compile docs/tpu_compile.json   # minutes; needs the tpu extra
    python experiments/tpu_compile_table.py table docs/tpu_compile.json     # the markdown table, with the plan

One process (libtpu is loaded by one process at a time). Every row has 2048 tokens per chip
(train.batch_size = chips, one row per chip), the weights over fsdp (mesh [1, chips, 1]) and
attention `auto` (splash on TPUs).
"""

from __future__ import annotations

import json
import sys
import time

from recranker_jax.config import load_config

ROWS = [  # (config, arch, accelerator, mesh shape)
    ("configs/llama2-7b-lora.yaml", "llama2-7b", "v5litepod-8", [1, 8, 1]),
    ("configs/llama2-7b-lora.yaml", "llama2-7b", "v4-8", [1, 4, 1]),
    ("configs/llama2-7b-lora.yaml", "llama2-7b", "v5p-8", [1, 4, 1]),
    ("configs/llama2-13b-lora.yaml", "llama2-13b", "v5litepod-8", [1, 8, 1]),
    ("configs/llama2-13b-lora.yaml", "llama2-13b", "v4-8", [1, 4, 1]),
    ("configs/llama2-13b-lora.yaml", "llama2-13b", "v5p-8", [1, 4, 1]),
]
POLICIES = ("none", "dots", "minimal", "full")
POD = ("configs/llama2-7b-lora.yaml", "llama2-7b", "v5litepod-256", [32, 8, 1])


def overrides(mesh: list[int], chips: int) -> list[str]:
    return [f"mesh.shape=[{','.join(map(str, mesh))}]", f"train.batch_size={chips}"]


def compile_all(out: str) -> None:
    from recranker_jax.compile import compile_finetune, parse_accelerator

    results = []
    for config, arch, accelerator, mesh in ROWS + [POD]:
        chips = parse_accelerator(accelerator).chips
        cfg = load_config(config, overrides(mesh, chips))
        policies = POLICIES if (config, arch, accelerator, mesh) != POD else ("auto",)
        for policy in policies:
            started = time.perf_counter()
            doc = compile_finetune(cfg, accelerator, arch=arch, remat=policy)
            entry = doc["policies"][-1]
            results.append({"config": config, "arch": arch, "accelerator": accelerator, "mesh": mesh,
                            "remat": doc["remat"], "requested": policy, "hosts": doc["hosts"], "chips": doc["chips"],
                            "hbm_bytes_per_chip": doc["hbm_bytes_per_chip"], "fits": doc["fits"],
                            "memory": entry["memory"], "needed_bytes": entry.get("needed_bytes"),
                            "compile_seconds": entry["compile_seconds"], "seconds": time.perf_counter() - started})
            print(json.dumps(results[-1]), flush=True)
    with open(out, "w") as handle:
        json.dump({"date": time.strftime("%Y-%m-%d"), "machine": "the project's 2-core x86_64 CPU machine, no TPU",
                   "libtpu": _libtpu_version(), "rows": results}, handle, indent=2)
        handle.write("\n")


def _libtpu_version() -> str:
    from importlib.metadata import version

    return version("libtpu")


def table(path: str) -> str:
    """The markdown table: the compiler's per-chip figure beside the plan's, per row."""
    from recranker_jax.plan import plan_memory

    doc = json.load(open(path))
    lines = ["| model | slice, mesh | remat | compiler: per chip | fits | plan: per chip | plan / compiler | compile s |",
             "|---|---|---|---|---|---|---|---|"]
    for row in doc["rows"]:
        cfg = load_config(row["config"], overrides(row["mesh"], row["chips"]))
        plan = plan_memory(cfg, row["chips"], row["mesh"], arch=row["arch"],
                           device_memory_gb=row["hbm_bytes_per_chip"] / 1e9, remat=row["remat"])
        planned = plan["bytes_per_device"]["total"]
        compiled = row["memory"]["total"] if row["memory"] else row["needed_bytes"]
        figure = f"{compiled / 2**30:.2f} GB" + ("" if row["memory"] else " (temporaries; refused)")
        remat = row["remat"] + (" (auto)" if row["requested"] == "auto" else "")
        lines.append(f"| {row['arch']} LoRA | {row['accelerator']} {row['mesh']} | {remat} | {figure} | "
                     f"{'yes' if row['fits'] else '**no**'} | {planned / 2**30:.2f} GB | {planned / compiled:.2f} | "
                     f"{row['compile_seconds']:.0f} |")
    return "\n".join(lines)


if __name__ == "__main__":
    if len(sys.argv) != 3 or sys.argv[1] not in ("compile", "table"):
        sys.exit(__doc__)
    if sys.argv[1] == "compile":
        compile_all(sys.argv[2])
    else:
        print(table(sys.argv[2]))
