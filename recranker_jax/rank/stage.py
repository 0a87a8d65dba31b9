"""The rank stage: the tuned LLM re-ranks the backbone's candidates with each task, the hybrid
combines them, and every order is evaluated under the RecRanker protocol; writes
runs/<name>/ranking/ (metrics.json, rankings.csv / rankings_valid.csv, scores_<split>.npz).

Only users whose held-out item is among the candidates change any metric, so by default
(`rank.users=hits`) only they are scored; everyone else keeps the retrieval order (a miss
either way) and the metrics still average over all test users.
"""

from __future__ import annotations

import collections
import json
import time
from pathlib import Path

import numpy as np

from recranker_jax.config import Config
from recranker_jax.data.split import SplitData, load_split
from recranker_jax.errors import RecRankerError
from recranker_jax.llm.hf_import import load_hf_llama
from recranker_jax.llm.llama import Llama, model_options
from recranker_jax.prompts.render import quote
from recranker_jax.prompts.stage import read_candidates
from recranker_jax.prompts.tokenizer import load_tokenizer
from recranker_jax.rank import hybrid, scorers
from recranker_jax.rank.evaluate import evaluate_orders, write_rankings_csv

TASKS = ("pointwise", "pairwise", "listwise")
METHODS = (*TASKS, "hybrid")
CANDIDATE_FILES = {"test": "candidates.csv", "valid": "candidates_valid.csv"}


def check_config(cfg: Config) -> None:
    r = cfg.rank
    unknown = [m for m in r.methods if m not in METHODS]
    if unknown or not r.methods:
        raise RecRankerError(f"rank.methods={r.methods}: expected a non-empty subset of {', '.join(METHODS)}")
    missing = [t for t in r.methods if t in TASKS and t not in cfg.prompts.tasks]
    if missing:
        raise RecRankerError(f"rank.methods includes {missing[0]} but prompts.tasks={cfg.prompts.tasks} builds no such prompts")
    if len(r.alphas) != 3:
        raise RecRankerError(f"rank.alphas={r.alphas}: expected 3 weights (pointwise, pairwise, listwise)")
    bad_splits = [s for s in r.splits if s not in CANDIDATE_FILES]
    if bad_splits or not r.splits:
        raise RecRankerError(f"rank.splits={r.splits}: expected a non-empty subset of test, valid")
    for key in ("batch_size", "list_positions", "generate_tokens"):
        if getattr(r, key) < 1:
            raise RecRankerError(f"rank.{key}={getattr(r, key)}: expected a positive integer")
    if not r.ks or min(r.ks) < 1 or max(r.ks) > cfg.retrieval.candidates:
        raise RecRankerError(f"rank.ks={r.ks}: expected cut-offs between 1 and retrieval.candidates={cfg.retrieval.candidates}")


def read_prompts(path: Path, data: SplitData, candidates: list[list[int]]) -> dict[str, dict[int, list[dict]]]:
    """Inference prompts by task and user index, checked against this run's candidates."""
    if not path.is_file():
        raise RecRankerError(f"{path} not found: run `recranker instructions` first")
    user_index = {str(u): i for i, u in enumerate(data.user_ids.astype(str))}
    item_index = {str(v): i for i, v in enumerate(data.items["item_id"].astype(str))}
    by_task: dict[str, dict[int, list[dict]]] = collections.defaultdict(lambda: collections.defaultdict(list))
    for line_number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        record = json.loads(line)
        user = user_index.get(str(record.get("user_id")))
        named = record.get("candidates") or record.get("pair") or [record.get("candidate")]
        items = [item_index.get(str(i), -1) for i in named]
        if user is None or any(i not in candidates[user] for i in items) or "prefix_chars" not in record:
            raise RecRankerError(
                f"{path}, line {line_number}: user {record.get('user_id')} or items {named} do not match this run's "
                f"retrieval candidates (an instruction file from another run?); rebuild with `recranker instructions`"
            )
        record["_items"] = items
        by_task[record["task"]][user].append(record)
    for user, records in by_task.get("listwise", {}).items():
        if sorted(records[0]["_items"]) != sorted(candidates[user]):
            raise RecRankerError(
                f"{path}: the listwise prompt of user {records[0]['user_id']} shows {len(records[0]['_items'])} "
                f"candidates, expected this run's {len(candidates[user])} retrieval candidates"
            )
    return by_task


class Ranker:
    """The tuned model and tokenizer, with the task scorers over groups of users.

    Generate mode answers a task with at most `generate_tokens[task]` tokens, stopping at token
    `eos` (None: never, so exactly that many, e.g. for random weights, which never emit it)."""

    def __init__(self, cfg: Config, tokenizer, model: Llama, max_rating: int, titles: list[str]):
        self.cfg, self.max_rating, self.titles = cfg, max_rating, titles
        self.tokenizer, self.model = tokenizer, model
        self.ratings = scorers.answer_tokens(self.tokenizer, [str(r) for r in range(1, max_rating + 1)])
        self.yes_no = scorers.answer_tokens(self.tokenizer, ["Yes", "No"])
        self.batch = cfg.rank.batch_size
        self.generate_mode = cfg.rank.mode == "generate"
        self.generate_tokens = {"pointwise": 8, "pairwise": 8, "listwise": cfg.rank.generate_tokens}
        self.eos = tokenizer.eos_token_id

    def _generate(self, task: str, records: list[dict]) -> list[str]:
        ids = [self.tokenizer(r["prompt"])["input_ids"] for r in records]
        outputs = scorers.generate(self.model, ids, self.generate_tokens[task], self.eos, self.batch * 4)
        return self.tokenizer.batch_decode(outputs, skip_special_tokens=True)

    def prompt_groups(self, groups: list[list[dict]]) -> list[scorers.PromptGroup]:
        """Each user's prompts of one task as token ids: the shared prefix and each suffix."""
        return [scorers.split_prompts(self.tokenizer, [r["prompt"] for r in g], g[0]["prefix_chars"]) for g in groups]

    def pointwise(self, groups: list[list[dict]]) -> tuple[list[np.ndarray], float]:
        """Per user, the predicted rating of each prompt's candidate; and the unreadable rate."""
        records = [r for g in groups for r in g]
        if self.generate_mode:
            parsed = [scorers.parse_rating(t, self.max_rating) for t in self._generate("pointwise", records)]
            values = np.array([3.0 if p is None else p for p in parsed])  # the reference's fallback
            unreadable = float(np.mean([p is None for p in parsed])) if parsed else 0.0
        else:
            split = self.prompt_groups(groups)
            logprobs = scorers.next_token_logprobs(self.model, split, self.ratings.lead, self.batch, "pointwise")
            values, unreadable = scorers.expected_ratings(np.stack(logprobs), self.ratings), 0.0
        return np.split(values, np.cumsum([len(g) for g in groups])[:-1]), unreadable

    def pairwise(self, groups: list[list[dict]]) -> tuple[list[np.ndarray], float]:
        """Per user, 1 / 0 / -1 (Yes / No / unreadable) for each prompt; and the unreadable rate."""
        records = [r for g in groups for r in g]
        if self.generate_mode:
            answers = np.array([scorers.parse_yes_no(t) for t in self._generate("pairwise", records)], np.int8)
        else:
            split = self.prompt_groups(groups)
            logprobs = scorers.next_token_logprobs(self.model, split, self.yes_no.lead, self.batch, "pairwise")
            answers = scorers.prefers_first(np.stack(logprobs), self.yes_no)
        unreadable = float(np.mean(answers < 0)) if len(answers) else 0.0
        return np.split(answers, np.cumsum([len(g) for g in groups])[:-1]), unreadable

    def score(self, task: str, groups: list[list[dict]]) -> tuple[list[np.ndarray], float]:
        """One task's per-user answers for these users' prompt groups, and its unreadable rate."""
        if task == "pointwise":
            return self.pointwise(groups)
        if task == "pairwise":
            return self.pairwise(groups)
        return self.listwise([g[0] for g in groups])

    def listwise(self, records: list[dict]) -> tuple[list[np.ndarray], float]:
        """Per user, the 1-based place of each shown candidate (0 = not in the answer)."""
        top = self.cfg.rank.list_positions
        if self.generate_mode:
            shown = [[self.titles[i] for i in r["_items"]] for r in records]
            parsed = [scorers.parse_ranking(t, s, top) for t, s in zip(self._generate("listwise", records), shown)]
            unreadable = float(np.mean([p is None for p in parsed])) if parsed else 0.0
            return [np.zeros(len(s), np.int32) if p is None else p for p, s in zip(parsed, shown)], unreadable
        tok = self.tokenizer
        contexts = [tok(r["prompt"])["input_ids"] for r in records]
        pieces = [[[tok(" " + self.titles[i], add_special_tokens=False)["input_ids"] for i in r["_items"]],
                   [scorers.continuation_ids(tok, " " + self.titles[r["_items"][0]], "\n" + self.titles[i]) for i in r["_items"]]]
                  for r in records]
        positions = scorers.listwise_rankings(self.model, contexts, pieces, top, self.batch)
        return [positions[u, : len(r["_items"])] for u, r in enumerate(records)], 0.0


def load_ranker(cfg: Config, data: SplitData, instructions_dir: Path, finetune_dir: Path | None,
                model: Llama | None = None, tokenizer=None) -> Ranker:
    """The run's tuned model (finetune_dir/model) with its rating scale and quoted titles; or,
    given them, an in-memory `model` and its `tokenizer` (e.g. random weights, for a benchmark)."""
    stats = json.loads((instructions_dir / "stats.json").read_text())
    titles = [quote(str(t)) for t in data.items["title"]]
    if model is None:
        tokenizer = load_tokenizer(finetune_dir / "model")
        model = load_hf_llama(finetune_dir / "model", **model_options(cfg, training=False))
    return Ranker(cfg, tokenizer, model, int(stats["max_rating"]), titles)


def rank_split(cfg: Config, ranker: Ranker, data: SplitData, candidates: list[list[int]], prompts: dict,
               target: np.ndarray) -> tuple[dict, dict, np.ndarray]:
    """Utilities, orders and metrics of one split; returns (result, utilities, candidates array)."""
    r = cfg.rank
    k = max(len(c) for c in candidates)
    cand = np.full((data.n_users, k), -1, np.int32)
    for u, c in enumerate(candidates):
        cand[u, : len(c)] = c
    hit = (cand == target[:, None]).any(axis=1)
    scored = np.flatnonzero(hit if r.users == "hits" else (cand >= 0).any(axis=1))
    position = {(u, int(item)): j for u in scored for j, item in enumerate(cand[u]) if item >= 0}
    tasks = [t for t in TASKS if t in r.methods or ("hybrid" in r.methods and t in cfg.prompts.tasks)]
    rating = np.zeros((data.n_users, k))
    pairs = np.full((data.n_users, cfg.prompts.pairs, 2), -1, np.int32)
    answers = np.full((data.n_users, cfg.prompts.pairs, 2), -1, np.int8)
    places = np.zeros((data.n_users, k), np.int32)
    rates, seconds = {}, {}
    for task in tasks:
        users = [u for u in scored if prompts.get(task, {}).get(u)]
        groups = [prompts[task][u] for u in users]
        started = time.perf_counter()
        values, unreadable = ranker.score(task, groups)
        if task == "pointwise":
            for u, g, v in zip(users, groups, values):
                for record, value in zip(g, v):
                    rating[u, position[(u, record["_items"][0])]] = value
            rates[task] = {"unreadable": unreadable, "inconsistent": None}
        elif task == "pairwise":
            inconsistent = []
            for u, g, v in zip(users, groups, values):
                for record, value in zip(g, v):
                    p, order = record["pair_index"], int(pairs[u, record["pair_index"], 0] >= 0)
                    if order == 0:
                        pairs[u, p] = [position[(u, i)] for i in record["_items"]]
                    answers[u, p, order] = value
                both = answers[u][pairs[u, :, 0] >= 0]
                inconsistent.extend(((both >= 0).all(axis=1) & (both[:, 0] == both[:, 1])).tolist())
            rates[task] = {"unreadable": unreadable, "inconsistent": float(np.mean(inconsistent)) if inconsistent else None}
        else:
            for u, record, v in zip(users, [g[0] for g in groups], values):
                for item, place in zip(record["_items"], v):
                    places[u, position[(u, item)]] = place
            rates[task] = {"unreadable": unreadable, "inconsistent": None}
        seconds[task] = (time.perf_counter() - started, len(users) * k)

    utilities = {}
    if "pointwise" in tasks:
        utilities["pointwise"] = np.asarray(hybrid.pointwise_utility(rating, r.retrieval_weight))
    if "pairwise" in tasks:
        utilities["pairwise"] = np.asarray(hybrid.pairwise_utility(pairs, answers, r.pair_credit, k))
    if "listwise" in tasks:
        utilities["listwise"] = np.asarray(hybrid.listwise_utility(places, r.list_credit, r.list_positions))
    if "hybrid" in r.methods:
        utilities["hybrid"] = np.asarray(hybrid.hybrid_utility(
            utilities.get("pointwise"), utilities.get("pairwise"), utilities.get("listwise"), r.alphas))
    shown = {m: u for m, u in utilities.items() if m in r.methods}
    orders = {"backbone": cand, **{m: np.asarray(o) for m, o in hybrid.rank_orders(cand, shown).items()}}
    result = evaluate_orders(orders, target, r.ks, r.bootstrap, cfg.run.seed)
    total_seconds = sum(s for s, _ in seconds.values())
    items = len(scored) * k
    result.update(
        scored_users=int(len(scored)),
        seconds_per_item=total_seconds / items if items else None,
        seconds_per_item_by_task={t: (s / n if n else None) for t, (s, n) in seconds.items()},
        rates=rates,
    )
    return result, {"orders": orders, "utilities": shown, "rating": rating, "pairs": pairs, "answers": answers,
                    "places": places}, cand


def build_ranking(cfg: Config, data_dir: Path, retrieval_dir: Path, instructions_dir: Path, finetune_dir: Path,
                  out: Path) -> dict:
    check_config(cfg)
    data = load_split(data_dir)
    ranker = load_ranker(cfg, data, instructions_dir, finetune_dir)
    item_ids = data.items["item_id"].astype(str).to_numpy()
    document = {"mode": cfg.rank.mode, "users": cfg.rank.users, "splits": {}}
    for split in cfg.rank.splits:
        candidates = read_candidates(retrieval_dir / CANDIDATE_FILES[split], data)
        prompts = read_prompts(instructions_dir / f"{split}.jsonl", data, candidates)
        target = data.test_item if split == "test" else data.valid_item
        result, arrays, cand = rank_split(cfg, ranker, data, candidates, prompts, np.asarray(target))
        document["splits"][split] = result
        name = "rankings.csv" if split == "test" else f"rankings_{split}.csv"
        write_rankings_csv(out / name, data.user_ids.astype(str), item_ids, arrays["orders"], arrays["utilities"], cand)
        np.savez_compressed(out / f"scores_{split}.npz", candidates=cand, expected_rating=arrays["rating"],
                            pairs=arrays["pairs"], prefers_first=arrays["answers"], list_positions=arrays["places"])
    document["config"] = dict(vars(cfg.rank))
    (out / "metrics.json").write_text(json.dumps(document, indent=2) + "\n")
    return document

