"""`recranker bench all`: the retrieval, training and ranking benchmarks at fixed, named problem
sizes on whatever devices are present, in one file that `recranker bench compare` reads.

Sizes (named so that files from different machines compare like with like):
- retrieval/quickstart: LightGCN on the embedded MovieLens (664 users, 9,066 items, dim 64,
  2 layers, batch 2048): seconds per training epoch and per full-ranking pass;
- train/<preset>: one training step of a LLaMA-architecture model on random tokens:
  `quickstart` (the CPU model, float32) or `7b-lora` (LLaMA-2 7B shapes, random weights,
  LoRA q,v r8, bfloat16, 2 x 2048 tokens, remat; for accelerators), with tokens/s and MFU
  where the device's peak is known; on the CPU also the PyTorch reference (when torch is
  installed, as in the test extra);
- rank/quickstart: seconds per scored candidate of the prefix-cached scorers and of
  generate-and-parse on the quickstart run's tuned model.
"""

from __future__ import annotations

from collections.abc import Sequence

from recranker_jax.config import Config
from recranker_jax.errors import RecRankerError

PARTS = ("retrieval", "train", "rank")


def bench_all(cfg: Config, parts: Sequence[str] = PARTS, train_preset: str = "auto", repeats: int = 3) -> dict:
    import importlib.util

    from recranker_jax.hardware import environment

    torch = importlib.util.find_spec("torch") is not None  # the PyTorch references only where installed
    unknown = [p for p in parts if p not in PARTS]
    if unknown:
        raise RecRankerError(f"--only {','.join(unknown)}: expected some of {', '.join(PARTS)}")
    results: dict[str, dict] = {}
    settings: dict[str, dict] = {}
    if "retrieval" in parts:
        from recranker_jax.bench.retrieval import bench_retrieval

        variants = ("jax-dense", "jax-edges", "torch-sparse") if torch else ("jax-dense", "jax-edges")
        doc = bench_retrieval(cfg, repeats=repeats, variants=variants)
        for variant, r in doc["results"].items():
            results[f"retrieval/quickstart/{variant}"] = {"epoch_seconds": r["epoch_seconds"],
                                                          "rank_seconds": r["rank_seconds"],
                                                          "peak_rss_mb": r["peak_rss_mb"]}
    if "train" in parts:
        from recranker_jax.bench.train import bench_train

        preset = train_preset
        if preset == "auto":
            import jax

            preset = "quickstart" if jax.default_backend() == "cpu" else "7b-lora"
        doc = bench_train(cfg, repeats=max(repeats, 5), preset=preset, compare_torch=torch)
        results[f"train/{preset}"] = {k: v for k, v in doc["results"]["train"].items() if isinstance(v, (int, float))}
        settings["train"] = doc["settings"]
    if "rank" in parts:
        from recranker_jax.bench.rank import bench_rank

        doc = bench_rank(cfg, users=32, repeats=1)
        results["rank/quickstart"] = doc["results"]["rank"]
        settings["rank"] = doc["settings"]
    return {"environment": environment(), "settings": settings, "results": results}
