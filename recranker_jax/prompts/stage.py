"""The instructions stage: sampled users -> training examples of the three tasks, and the
inference prompts over the backbone's retrieved candidates (the RecRanker protocol), written to
runs/<name>/instructions/. The planted and sampled sets' prompts are built the same way by the
rank stage (`candidate_set_records`), so `rank.candidates` leaves this stage and the tuned model.

Outputs: train.jsonl (task, user_id, item_ids, prompt, response, source, dropped_history),
test.jsonl and valid.jsonl (task, user_id, item_ids, prompt, prefix_chars (the shared
prefix is prompt[:prefix_chars]), suffix and the candidate / pair / candidates shown), tokenizer/ (when trained here) and stats.json.
"""

from __future__ import annotations

import collections
import itertools
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from recranker_jax.config import Config
from recranker_jax.data.split import SplitData, load_split
from recranker_jax.errors import RecRankerError
from recranker_jax.prompts.build import HintModels, PromptBuilder, PromptParts
from recranker_jax.prompts.tokenizer import count_tokens, load_tokenizer, train_bpe
from recranker_jax.run import (
    SPLITS,
    InstructionsFolder,
    RetrievalFolder,
    read_candidates,
    read_embeddings,
    read_explicit_mf,
    write_json,
    write_jsonl,
)
from recranker_jax.sampling import sample_users


def load_hints(retrieval_dir: Path, backbone: str) -> tuple[HintModels, np.ndarray]:
    """Hint models from the retrieval stage's files, and the backbone's user embeddings."""
    from recranker_jax.retrieval.models import explicit_mf_rating  # jax: imported only when used

    folder = RetrievalFolder(retrieval_dir)
    users, items = read_embeddings(folder.embeddings(backbone))
    mf = read_explicit_mf(folder.explicit_mf)

    def predict_rating(user: int, item_indices: np.ndarray) -> np.ndarray:
        return explicit_mf_rating(mf["mean_rating"], mf["user_bias"][user], mf["item_bias"][item_indices],
                                  mf["item_factors"][item_indices] @ mf["user_factors"][user])

    def backbone_score(user: int, item_indices: np.ndarray) -> np.ndarray:
        return items[item_indices] @ users[user]

    return HintModels(predict_rating, backbone_score), users


def apply_budget(builder: PromptBuilder, parts: list[PromptParts], tokenizer, max_tokens: int) -> None:
    """Drop the oldest history entries of over-long prompts until they fit; a prompt that does
    not fit even with no history left is a RecRankerError naming the budget it needs.

    Lengths are first estimated as tokens(prefix) + tokens(suffix + response), each distinct
    prefix tokenised once (a user's prompts of a task share it); prompts within a small
    margin of the budget are then measured exactly and binary-searched on the entries dropped.
    """
    def tail(p: PromptParts) -> str:
        return p.suffix + (" " + p.response if p.response is not None else "")

    def exact(p: PromptParts) -> int:
        return int(count_tokens(tokenizer, [builder.prefix(p) + tail(p)])[0])

    prefixes = [builder.prefix(p) for p in parts]
    distinct = list(dict.fromkeys(prefixes))
    prefix_length = dict(zip(distinct, count_tokens(tokenizer, distinct)))
    tail_length = count_tokens(tokenizer, [tail(p) for p in parts], add_special_tokens=False)
    estimate = np.array([prefix_length[text] for text in prefixes]) + tail_length
    too_long = []  # the length of each prompt that does not fit with no history
    for index in np.flatnonzero(estimate > max_tokens - 8):
        p = parts[index]
        if exact(p) <= max_tokens:
            continue
        p.dropped = len(p.entries)
        if exact(p) > max_tokens:
            too_long.append(exact(p))
            continue
        low, high = 1, len(p.entries)  # the fewest dropped entries that fit
        while low < high:
            p.dropped = (low + high) // 2
            if exact(p) <= max_tokens:
                high = p.dropped
            else:
                low = p.dropped + 1
        p.dropped = low
    if too_long:
        raise RecRankerError(
            f"prompts.max_tokens={max_tokens}: {len(too_long)} prompts do not fit even with no history (the longest "
            f"has {max(too_long)} tokens without it); set prompts.max_tokens to at least {max(too_long)}")


def inference_prompts(cfg: Config, builder: PromptBuilder, candidate_lists: list[list[int]]) -> tuple[list[PromptParts], int]:
    """Every task's inference prompts over each user's candidates (a user's own seeded order
    of pairs and listwise candidates), and how many users have no candidates."""
    prompts, empty = [], 0
    for user, candidates in enumerate(candidate_lists):
        if not candidates:
            empty += 1
            continue
        user_rng = np.random.default_rng([cfg.run.seed, 2, user])
        for task in cfg.prompts.tasks:
            prompts.extend(builder.inference_prompts(task, user, candidates, user_rng))
    return prompts, empty


def prompt_builder(cfg: Config, data: SplitData, retrieval_dir: Path) -> tuple[PromptBuilder, np.ndarray]:
    """The prompt builder with the retrieval stage's hints, and the backbone's user embeddings."""
    hints, user_embeddings = load_hints(retrieval_dir, cfg.retrieval.backbone)
    noun = cfg.prompts.item_noun or data.meta.get("item_noun", "item")
    return PromptBuilder(data, cfg.prompts, hints, noun), user_embeddings


def prompt_records(builder: PromptBuilder, parts: list[PromptParts], data: SplitData, training: bool) -> Iterator[dict]:
    """The prompts as JSON records (instructions/*.jsonl): training examples with their response,
    or inference prompts with their shared-prefix length and the candidate / pair / candidates shown."""
    item_ids, user_ids = data.items["item_id"].astype(str).to_numpy(), data.user_ids.astype(str)
    for p in parts:
        yield _record(builder, p, item_ids, user_ids, training)


def _record(builder: PromptBuilder, p: PromptParts, item_ids: np.ndarray, user_ids: np.ndarray, training: bool) -> dict:
    prefix = builder.prefix(p)
    row = {"task": p.task, "user_id": user_ids[p.user],
           "item_ids": sorted(set(item_ids[builder.item_ids(p)].tolist())), "prompt": prefix + p.suffix}
    if training:
        row.update(response=p.response, source=p.extra["source"])
    else:
        row.update(prefix_chars=len(prefix), suffix=p.suffix)
        for key, value in p.extra.items():
            row[key] = item_ids[value].tolist() if key in ("pair", "candidates") else (
                item_ids[value] if key == "candidate" else value)
    row["dropped_history"] = p.dropped
    return row


def candidate_set_records(cfg: Config, builder: PromptBuilder, data: SplitData, tokenizer,
                          candidate_lists: list[list[int]]) -> list[dict]:
    """The inference records over another candidate set (planted or sampled; an empty list skips
    a user), built exactly as `build_instructions` builds the protocol's (`builder` from
    `prompt_builder`): the rank stage makes them, so switching `rank.candidates` keeps the run's
    instructions and tuned model."""
    parts, _ = inference_prompts(cfg, builder, candidate_lists)
    apply_budget(builder, parts, tokenizer, cfg.prompts.max_tokens)
    return list(prompt_records(builder, parts, data, False))


def build_instructions(cfg: Config, data_dir: Path, retrieval_dir: Path, out: Path) -> dict:
    """The training instructions (sampled users, every task), the tokenizer, and the inference
    prompts over the backbone's retrieved candidates (the RecRanker protocol) of each split."""
    prompts_cfg, folder = cfg.prompts, InstructionsFolder(out)
    data = load_split(data_dir)
    builder, user_embeddings = prompt_builder(cfg, data, retrieval_dir)
    like_counts = np.bincount(data.train_user[data.train_is_like], minlength=data.n_users)
    sampled = sample_users(cfg.sampling, like_counts, user_embeddings, cfg.run.seed)

    rng = np.random.default_rng([cfg.run.seed, 1])
    train: list[PromptParts] = []
    skipped = collections.Counter()
    for user, source in zip(sampled.users.tolist(), sampled.source.tolist()):
        for task in prompts_cfg.tasks:
            parts = builder.train_example(task, user, rng)
            if parts is None:
                skipped[task] += 1
                continue
            parts.extra["source"] = source
            train.append(parts)
    if not train:
        raise RecRankerError("no training instruction could be built: every sampled user has too few ratings for the tasks")

    retrieval = RetrievalFolder(retrieval_dir)
    inference: dict[str, list[PromptParts]] = {}
    empty_candidates = collections.Counter()
    for split in SPLITS:
        inference[split], empty_candidates[split] = inference_prompts(
            cfg, builder, read_candidates(retrieval.candidates(split), data))

    if prompts_cfg.tokenizer:
        tokenizer = load_tokenizer(prompts_cfg.tokenizer)
    else:
        # Training prompts and the protocol's test questions; never the planted or sampled sets,
        # which hold every held-out item.
        corpus = (builder.prefix(p) + p.suffix + (" " + p.response if p.response else "") for p in train)
        corpus = itertools.chain(corpus, (p.suffix for p in inference["test"]))
        tokenizer = train_bpe(corpus, prompts_cfg.tokenizer_vocab_size, folder.tokenizer)
    for parts in (train, *inference.values()):
        apply_budget(builder, parts, tokenizer, prompts_cfg.max_tokens)

    write_jsonl(folder.train, prompt_records(builder, train, data, True))
    for split, parts in inference.items():
        write_jsonl(folder.prompts(split), prompt_records(builder, parts, data, False))

    def per_task(parts: list[PromptParts], predicate=lambda p: True) -> dict[str, int]:
        return dict(sorted(collections.Counter(p.task for p in parts if predicate(p)).items()))

    stats = {
        "sampling": {"strategy": cfg.sampling.strategy, "entries": int(len(sampled.users)),
                     "distinct_users": int(len(set(sampled.users.tolist()))),
                     "by_source": dict(sorted(collections.Counter(sampled.source.tolist()).items()))},
        "train": {"examples": len(train), "by_task": per_task(train),
                  "by_task_and_source": {t: dict(sorted(collections.Counter(p.extra["source"] for p in train if p.task == t).items()))
                                         for t in prompts_cfg.tasks},
                  "skipped_too_few_ratings": dict(sorted(skipped.items()))},
        **{name: {"prompts": len(parts), "by_task": per_task(parts), "users_without_candidates": empty_candidates[name]}
           for name, parts in inference.items()},
        "truncated_history": {name: per_task(parts, lambda p: p.dropped > 0) for name, parts in (("train", train), *inference.items())},
        "max_tokens": prompts_cfg.max_tokens,
        "tokenizer": prompts_cfg.tokenizer or "trained byte-level BPE (instructions/tokenizer)",
        "vocab_size": len(tokenizer),
        "position_shift": prompts_cfg.position_shift,
        "hints": prompts_cfg.hints,
        "rating_mode": prompts_cfg.rating_mode,
        "max_rating": builder.scale.max_rating,
    }
    write_json(folder.stats, stats)
    return stats
