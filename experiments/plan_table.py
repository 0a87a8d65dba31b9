"""`recranker plan` for the paper configs (ML-100K, 7B / 13B, LoRA / full) on three machines,
`train.remat: auto` (the first policy from the fastest that fits with 10% to spare): the plan
table of docs/scale-out.md.

    python experiments/plan_table.py
"""
import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")

from recranker_jax.config import load_config
from recranker_jax.plan import plan_memory
rows = []
machines = [("8x H100 80GB", 8, 80.0, {"lora": [8,1,1], "full": [1,8,1]}), ("TPU v5e-8", 8, 16*2**30/1e9, {"lora": [1,8,1], "full": [1,8,1]}), ("TPU v4-32 (16 chips)", 16, 32*2**30/1e9, {"lora": [1,8,2], "full": [1,8,2]})]
print("| model | tuning | machine | mesh.shape | remat (auto) | per device (GB, 1e9) | HBM | share |")
print("|---|---|---|---|---|---|---|---|")
for size in ("7b", "13b"):
    for tuning in ("lora", "full"):
        for name, devices, hbm, meshes in machines:
            cfg = load_config(f"configs/paper/ml-100k-llama2-{size}-{tuning}.yaml")
            p = plan_memory(cfg, devices, meshes[tuning], arch=f"llama2-{size}", device_memory_gb=hbm)
            t = p["bytes_per_device"]["total"]
            share = t / (hbm * 1e9)
            print(f"| LLaMA-2 {size.upper()} | {'LoRA q,v r8' if tuning=='lora' else 'full'} | {name} | {meshes[tuning]} | {p['remat']} | {t/1e9:.1f} | {hbm:.1f} | {'**' if share > 0.9 else ''}{share:.0%}{'**' if share > 0.9 else ''} |")
