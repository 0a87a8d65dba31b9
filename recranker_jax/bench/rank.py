"""`recranker bench rank`: seconds per scored candidate of the batched, prefix-cached scorers
against generate-and-parse (the reference's way), on the same tuned model and prompts.

Uses a run whose finetune stage has finished (it runs the missing stages first). Both modes
score the same users' pointwise, pairwise and listwise prompts; each task is timed after one
warm-up pass on the same inputs (compilation), and an item is one (user, candidate).

For pointwise and pairwise it also reports the prompt-token ratio: the tokens generate-and-parse
runs (every prompt whole) over those the scorers run (each user's prefix once, then every
question's suffix). With generation this short, it bounds the speed-up prefix caching can give.
"""

from __future__ import annotations

import dataclasses
import statistics
import time

from recranker_jax.config import Config
from recranker_jax.errors import RecRankerError


def bench_rank(cfg: Config, users: int = 32, repeats: int = 1) -> dict:
    from recranker_jax.bench.hardware import environment
    from recranker_jax.data.split import load_split
    from recranker_jax.pipeline import finetune_stage
    from recranker_jax.prompts.stage import read_candidates
    from recranker_jax.rank.scorers import token_counts
    from recranker_jax.rank.stage import load_ranker, read_prompts

    if users < 1 or repeats < 1:
        raise RecRankerError(f"--users {users} / --repeats {repeats}: expected positive integers")
    finetune_dir, _ = finetune_stage(cfg)
    run_dir = cfg.run_dir
    data = load_split(run_dir / "data")
    candidates = read_candidates(run_dir / "retrieval" / "candidates.csv", data)
    prompts = read_prompts(run_dir / "instructions" / "test.jsonl", data, candidates)
    chosen = sorted(set.intersection(*(set(prompts[t]) for t in prompts)))[:users]
    items = sum(len(candidates[u]) for u in chosen)
    results, bounds = {}, {}
    for mode in ("scores", "generate"):
        mode_cfg = dataclasses.replace(cfg, rank=dataclasses.replace(cfg.rank, mode=mode))
        ranker = load_ranker(mode_cfg, data, run_dir / "instructions", finetune_dir)

        def score(task: str) -> None:
            ranker.score(task, [prompts[task][u] for u in chosen])

        per_task = {}
        if mode == "scores":  # how many prompt tokens each mode runs: a bound on the ratio
            for task in ("pointwise", "pairwise"):
                if task in prompts:
                    cached, full = token_counts(ranker.prompt_groups([prompts[task][u] for u in chosen]))
                    bounds[f"{task}_prompt_token_ratio"] = full / cached
        for task in sorted(prompts):
            score(task)  # warm-up: compilation
            seconds = []
            for _ in range(repeats):
                started = time.perf_counter()
                score(task)
                seconds.append(time.perf_counter() - started)
            per_task[task] = statistics.median(seconds)
        total = sum(per_task.values())
        results[mode] = {"seconds_per_item": total / items, "items_per_second": items / total,
                         **{f"{task}_seconds_per_item": s / items for task, s in per_task.items()}}
    return {
        "environment": environment(),
        "settings": {"run": str(run_dir), "users": len(chosen), "items": items, "tasks": sorted(prompts),
                     "repeats": repeats, "batch_size": cfg.rank.batch_size, "generate_tokens": cfg.rank.generate_tokens,
                     "dtype": cfg.model.dtype},
        "results": {"rank": {
            **{f"{mode}_{key}": value for mode, r in results.items() for key, value in r.items()},
            "speedup": results["generate"]["seconds_per_item"] / results["scores"]["seconds_per_item"],
            **bounds,
        }},
    }


def format_results(doc: dict) -> str:
    r, s = doc["results"]["rank"], doc["settings"]
    rows = [f"{s['users']} users, {s['items']} candidates; per task, median of {s['repeats']} after a warm-up",
            f"{'seconds per candidate':<24}{'scores':>10}{'generate':>10}{'ratio':>8}{'token ratio':>13}"]
    for task in [*s["tasks"], None]:
        key = f"{task}_seconds_per_item" if task else "seconds_per_item"
        scored, generated = r[f"scores_{key}"], r[f"generate_{key}"]
        bound = r.get(f"{task}_prompt_token_ratio")
        rows.append(f"{task or 'all tasks':<24}{scored:>10.5f}{generated:>10.5f}{generated / scored:>7.1f}x"
                    + (f"{bound:>12.1f}x" if bound else ""))
    rows.append(f"generate / scores: x{r['speedup']:.1f} seconds per item (items/s: scores "
                f"{r['scores_items_per_second']:.1f}, generate {r['generate_items_per_second']:.1f})")
    rows.append("token ratio: prompt tokens run by one full prompt per question (generate) over one cached prefix "
                "per user plus each question's suffix (scores); prefix caching alone cannot save more")
    return "\n".join(rows)
