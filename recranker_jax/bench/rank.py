"""`recranker bench rank`: seconds per scored candidate of the batched, prefix-cached scorers
against generate-and-parse (the reference's way), on the same tuned model and prompts.

Uses a run whose finetune stage has finished (it runs the missing stages first). Both modes
score the same users' pointwise, pairwise and listwise prompts; each is timed after one
warm-up pass on the same inputs (compilation), and an item is one (user, candidate).
"""

from __future__ import annotations

import dataclasses
import json
import statistics
import time

from recranker_jax.config import Config
from recranker_jax.errors import RecRankerError


def bench_rank(cfg: Config, users: int = 32, repeats: int = 1) -> dict:
    from recranker_jax.bench.hardware import environment
    from recranker_jax.data.split import load_split
    from recranker_jax.pipeline import finetune_stage
    from recranker_jax.prompts.render import quote
    from recranker_jax.prompts.stage import read_candidates
    from recranker_jax.rank.stage import Ranker, read_prompts

    if users < 1 or repeats < 1:
        raise RecRankerError(f"--users {users} / --repeats {repeats}: expected positive integers")
    finetune_dir, _ = finetune_stage(cfg)
    run_dir = cfg.run_dir
    data = load_split(run_dir / "data")
    candidates = read_candidates(run_dir / "retrieval" / "candidates.csv", data)
    prompts = read_prompts(run_dir / "instructions" / "test.jsonl", data, candidates)
    chosen = sorted(set.intersection(*(set(prompts[t]) for t in prompts)))[:users]
    items = sum(len(candidates[u]) for u in chosen)
    max_rating = int(json.loads((run_dir / "instructions" / "stats.json").read_text())["max_rating"])
    titles = [quote(str(t)) for t in data.items["title"]]
    results = {}
    for mode in ("scores", "generate"):
        ranker = Ranker(dataclasses.replace(cfg, rank=dataclasses.replace(cfg.rank, mode=mode)),
                        finetune_dir / "model", max_rating, titles)

        def score_all() -> None:
            for task in prompts:
                groups = [prompts[task][u] for u in chosen]
                if task == "pointwise":
                    ranker.pointwise(groups)
                elif task == "pairwise":
                    ranker.pairwise(groups)
                else:
                    ranker.listwise([g[0] for g in groups])

        score_all()  # warm-up: compilation
        seconds = []
        for _ in range(repeats):
            started = time.perf_counter()
            score_all()
            seconds.append(time.perf_counter() - started)
        median = statistics.median(seconds)
        results[mode] = {"seconds_per_item": median / items, "items_per_second": items / median}
    return {
        "environment": environment(),
        "settings": {"run": str(run_dir), "users": len(chosen), "items": items, "tasks": sorted(prompts),
                     "repeats": repeats, "batch_size": cfg.rank.batch_size, "generate_tokens": cfg.rank.generate_tokens,
                     "dtype": cfg.model.dtype},
        "results": {"rank": {
            "scores_seconds_per_item": results["scores"]["seconds_per_item"],
            "scores_items_per_second": results["scores"]["items_per_second"],
            "generate_seconds_per_item": results["generate"]["seconds_per_item"],
            "generate_items_per_second": results["generate"]["items_per_second"],
            "speedup": results["generate"]["seconds_per_item"] / results["scores"]["seconds_per_item"],
        }},
    }


def format_results(doc: dict) -> str:
    r, s = doc["results"]["rank"], doc["settings"]
    return "\n".join([
        f"{s['users']} users, {s['items']} candidates, tasks {', '.join(s['tasks'])}; median of {s['repeats']} after a warm-up",
        f"{'mode':<28}{'s / item':>12}{'items / s':>12}",
        f"{'scores (prefix-cached)':<28}{r['scores_seconds_per_item']:>12.5f}{r['scores_items_per_second']:>12.1f}",
        f"{'generate + parse':<28}{r['generate_seconds_per_item']:>12.5f}{r['generate_items_per_second']:>12.1f}",
        f"generate / scores: x{r['speedup']:.1f} seconds per item",
    ])
