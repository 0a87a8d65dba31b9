"""The rank stage: the tuned LLM re-ranks the backbone's candidates with each task, the hybrid
combines them, and every order is evaluated under the RecRanker protocol; writes
runs/<name>/ranking/ (metrics.json, rankings.csv / rankings_valid.csv, scores_<split>.npz).

Only users whose held-out item is among the candidates change any metric, so by default
(`rank.users=hits`) only they are scored; everyone else keeps the retrieval order (a miss
either way) and the metrics still average over all test users. With `rank.candidates=planted`
or `sampled` every user's candidates hold the held-out item, so every user is scored, over
prompts built here as the instructions stage builds the protocol's. `rank.sample_users` keeps a
seeded sample of users for every split and method. The non-LLM re-rankers of `rank.baselines`
(rank/baselines.py) are methods beside the LLM's.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import time
from pathlib import Path

import numpy as np

from recranker_jax.config import Config
from recranker_jax.config_checks import RANDOM, TASKS, TRANSITION
from recranker_jax.data.split import SplitData, load_split
from recranker_jax.errors import RecRankerError
from recranker_jax.prompts.stage import candidate_set_records, prompt_builder
from recranker_jax.rank import answers, baselines, hybrid
from recranker_jax.rank.evaluate import evaluate_orders, write_rankings_csv
from recranker_jax.rank.ranker import Ranker, load_ranker
from recranker_jax.run import (
    InstructionsFolder,
    RankingFolder,
    RetrievalFolder,
    read_candidates,
    read_embeddings,
    read_explicit_mf,
    write_json,
)

def read_prompts(path: Path, data: SplitData, candidates: list[list[int]]) -> dict[str, dict[int, list[dict]]]:
    """Inference prompts by task and user index, checked against this run's candidates."""
    if not path.is_file():
        raise RecRankerError(f"{path} not found: run `recranker instructions` first")
    records = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]
    return group_prompts(records, data, candidates, str(path))


def group_prompts(records: list[dict], data: SplitData, candidates: list[list[int]],
                  source: str) -> dict[str, dict[int, list[dict]]]:
    """Inference prompt records by task and user index, checked against the candidates."""
    user_index = {str(u): i for i, u in enumerate(data.user_ids.astype(str))}
    item_index = {str(v): i for i, v in enumerate(data.items["item_id"].astype(str))}
    by_task: dict[str, dict[int, list[dict]]] = collections.defaultdict(lambda: collections.defaultdict(list))
    for line_number, record in enumerate(records, 1):
        user = user_index.get(str(record.get("user_id")))
        named = record.get("candidates") or record.get("pair") or [record.get("candidate")]
        items = [item_index.get(str(i), -1) for i in named]
        if user is None or any(i not in candidates[user] for i in items) or "prefix_chars" not in record:
            raise RecRankerError(
                f"{source}, line {line_number}: user {record.get('user_id')} or items {named} do not match this run's "
                f"retrieval candidates (an instruction file from another run?); rebuild with `recranker instructions`"
            )
        record["_items"] = items
        by_task[record["task"]][user].append(record)
    for user, records in by_task.get("listwise", {}).items():
        if sorted(records[0]["_items"]) != sorted(candidates[user]):
            raise RecRankerError(
                f"{source}: the listwise prompt of user {records[0]['user_id']} shows {len(records[0]['_items'])} "
                f"candidates, expected this run's {len(candidates[user])} retrieval candidates"
            )
    return by_task


def baseline_utilities(names: list[str], data: SplitData, retrieval: RetrievalFolder, cand: np.ndarray,
                       seed: int = 0) -> dict:
    """Each non-LLM baseline's utility [users, k] over the candidate matrix: the transition
    re-ranker, a random order, or a retrieval model's scores from the factors the retrieval
    stage saved."""
    utilities = {}
    for name in names:
        if name == RANDOM:
            utilities[name] = baselines.random_utility(cand.shape, seed)
        elif name == TRANSITION:
            utilities[name] = baselines.transition_baseline(data.train_user, data.train_item, data.train_is_like,
                                                            data.n_users, data.n_items, cand)
        elif name == "explicit_mf":  # mean + b_u + b_i + p_u . q_i as one dot product
            mf = read_explicit_mf(retrieval.explicit_mf)
            if mf is None:
                raise RecRankerError(f"{retrieval.explicit_mf} not found: rank.baselines names explicit_mf; "
                                     "rerun `recranker retrieval` with explicit_mf in retrieval.models")
            ones = np.ones((len(mf["user_bias"]), 1)), np.ones((len(mf["item_bias"]), 1))
            users = np.hstack([mf["user_factors"], ones[0], (mf["user_bias"] + mf["mean_rating"])[:, None]])
            items = np.hstack([mf["item_factors"], mf["item_bias"][:, None], ones[1]])
            utilities[name] = baselines.factor_utility(users, items, cand)
        else:
            utilities[name] = baselines.factor_utility(*read_embeddings(retrieval.embeddings(name)), cand)
    return utilities


def evaluated_users(n_users: int, sample: int | None, seed: int) -> np.ndarray:
    """[n_users] bool: the users evaluated, all of them or a seeded sample of `sample` (the same
    users for every split, method and the backbone)."""
    kept = np.ones(n_users, bool)
    if sample is not None and sample < n_users:
        kept[:] = False
        kept[np.random.default_rng([seed, 4]).choice(n_users, sample, replace=False)] = True
    return kept


@dataclasses.dataclass
class ScoredSplit:
    """What the LLM said about one split's candidates: the candidate matrix, the users scored,
    the per-candidate answer arrays, each task's utility [users, k], and rates and timings."""

    cand: np.ndarray
    scored: list[int]
    arrays: dict
    tasks: dict[str, np.ndarray]
    rates: dict
    seconds: dict


def score_split(cfg: Config, ranker: Ranker, data: SplitData, candidates: list[list[int]], prompts: dict,
                target: np.ndarray) -> ScoredSplit:
    """Every task's answers and utilities over one split's candidates (the expensive part)."""
    r = cfg.rank
    cand = answers.candidate_matrix(candidates, data.n_users)
    k = cand.shape[1]
    scored = answers.scored_users(cand, target, r.users == "hits")
    column = answers.candidate_columns(cand, scored)
    tasks = [t for t in TASKS if t in r.methods or ("hybrid" in r.methods and t in cfg.prompts.tasks)]
    scored_answers, rates, seconds = {}, {}, {}
    for task in tasks:
        users = [u for u in scored if prompts.get(task, {}).get(u)]
        groups = [prompts[task][u] for u in users]
        started = time.perf_counter()
        values, unreadable = ranker.score(task, groups)
        seconds[task] = (time.perf_counter() - started, len(users) * k)
        scored_answers[task] = (users, groups, values)
        rates[task] = {"unreadable": unreadable, "inconsistent": None}
    arrays = answers.answer_arrays(scored_answers, column, data.n_users, k, cfg.prompts.pairs)
    if "pairwise" in tasks:
        rates["pairwise"]["inconsistent"] = answers.inconsistent_rate(arrays["pairs"], arrays["prefers_first"])

    utilities = {}
    if "pointwise" in tasks:
        utilities["pointwise"] = np.asarray(hybrid.pointwise_utility(arrays["expected_rating"], r.retrieval_weight))
    if "pairwise" in tasks:
        utilities["pairwise"] = np.asarray(hybrid.pairwise_utility(arrays["pairs"], arrays["prefers_first"], r.pair_credit, k))
    if "listwise" in tasks:
        utilities["listwise"] = np.asarray(hybrid.listwise_utility(arrays["list_positions"], r.list_credit, r.list_positions))
    return ScoredSplit(cand, list(scored), arrays, utilities, rates, seconds)


def evaluate_split(cfg: Config, split: ScoredSplit, target: np.ndarray, alphas, controls=None) -> tuple[dict, dict]:
    """Orders and metrics of one scored split with the hybrid weights `alphas`; returns (result,
    {orders, utilities, answers}). `controls`: a function of the candidate matrix giving the
    non-LLM baselines' utilities (methods beside the LLM's)."""
    r, cand, utilities = cfg.rank, split.cand, dict(split.tasks)
    if "hybrid" in r.methods:
        utilities["hybrid"] = np.asarray(hybrid.hybrid_utility(
            utilities.get("pointwise"), utilities.get("pairwise"), utilities.get("listwise"), alphas))
    shown = {**(controls(cand) if controls else {}), **{m: u for m, u in utilities.items() if m in r.methods}}
    orders = {"backbone": cand, **{m: np.asarray(o) for m, o in hybrid.rank_orders(cand, shown).items()}}
    result = evaluate_orders(orders, target, r.ks, r.bootstrap, cfg.run.seed)
    total_seconds = sum(s for s, _ in split.seconds.values())
    items = len(split.scored) * cand.shape[1]
    filled = np.maximum((cand >= 0).sum(axis=1) - 1, 0)
    result.update(
        held_out_last=int(((cand[np.arange(len(cand)), filled] == target) & (target >= 0)).sum()),
        scored_users=int(len(split.scored)),
        seconds_per_item=total_seconds / items if items else None,
        seconds_per_item_by_task={t: (s / n if n else None) for t, (s, n) in split.seconds.items()},
        rates=split.rates,
        alphas=[float(a) for a in alphas],
    )
    return result, {"orders": orders, "utilities": shown, "answers": split.arrays}


def build_ranking(cfg: Config, data_dir: Path, retrieval_dir: Path, instructions_dir: Path, finetune_dir: Path,
                  out: Path) -> dict:
    data = load_split(data_dir)
    ranker = load_ranker(cfg, data, instructions_dir, finetune_dir)
    item_ids = data.items["item_id"].astype(str).to_numpy()
    retrieval, instructions, ranking = RetrievalFolder(retrieval_dir), InstructionsFolder(instructions_dir), RankingFolder(out)
    document = {"mode": cfg.rank.mode, "users": cfg.rank.users, "candidates": cfg.rank.candidates,
                "baselines": list(cfg.rank.baselines), "sample_users": cfg.rank.sample_users, "splits": {}}
    kept = evaluated_users(data.n_users, cfg.rank.sample_users, cfg.run.seed)
    # planted / sampled: their prompts are built here, as the instructions stage builds the protocol's
    builder = prompt_builder(cfg, data, retrieval_dir)[0] if cfg.rank.candidates != "retrieved" else None
    scored, targets = {}, {}
    for split in cfg.rank.splits:
        candidates = read_candidates(retrieval.candidate_set(cfg.rank.candidates, split), data)
        if cfg.rank.candidates == "retrieved":  # the protocol's prompts, written by the instructions stage
            prompts = read_prompts(instructions.prompts(split), data, candidates)
        else:  # only the users evaluated
            evaluated = [c if kept[u] else [] for u, c in enumerate(candidates)]
            records = candidate_set_records(cfg, builder, data, ranker.tokenizer, evaluated)
            prompts = group_prompts(records, data, candidates, f"{cfg.rank.candidates} prompts ({split})")
        target = np.asarray(data.test_item if split == "test" else data.valid_item)
        targets[split] = np.where(kept, target, -1)  # a user left out has no held-out item: no metric counts them
        scored[split] = score_split(cfg, ranker, data, candidates, prompts, targets[split])
    alphas = list(cfg.rank.alphas)
    if cfg.rank.tune_alphas:  # on the validation item; the test item never decides
        valid = scored["valid"]
        alphas = hybrid.tune_alphas(valid.tasks, valid.cand, targets["valid"], cfg.rank.ks[0], cfg.rank.alphas)
        document["tuned_alphas"] = {"alphas": alphas, "on": "valid", "metric": f"ndcg@{cfg.rank.ks[0]}",
                                    "grid": list(hybrid.ALPHA_GRID)}

    def controls(cand: np.ndarray) -> dict:
        return baseline_utilities(cfg.rank.baselines, data, retrieval, cand, cfg.run.seed)

    for split, split_scores in scored.items():
        result, arrays = evaluate_split(cfg, split_scores, targets[split], alphas, controls)
        document["splits"][split] = result
        write_rankings_csv(ranking.rankings(split), data.user_ids.astype(str), item_ids, arrays["orders"],
                           arrays["utilities"], split_scores.cand)
        np.savez_compressed(ranking.scores(split), candidates=split_scores.cand, **arrays["answers"])
    document["config"] = dict(vars(cfg.rank))
    write_json(ranking.metrics, document)
    return document

