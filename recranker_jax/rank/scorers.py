"""The LLM side of re-ranking: batched, prefix-cached scorers for the three RecRanker tasks.

All prompts of one user and task share a prefix (instruction + history). A batch of users'
prefixes is run once (left-padded) and every suffix (question, hint, "Answer:") is a branch of
its user's KV cache (`Llama.extend_branches`: the cache is read in place, not copied per
suffix, and a row's branches are packed one after another, not padded to a common width), so
a user's history is never recomputed. Rotary positions and attention
masks follow each row's real tokens, so padded, cached scores equal full-sequence scores
(tested).

- pointwise: the expected rating under the model's distribution over the answer tokens 1..H,
  from one forward pass of the suffix;
- pairwise: P(Yes) against P(No) for the question "would the user prefer A over B";
- listwise: the candidates ranked by constrained greedy decoding: each step scores the
  not-yet-chosen candidates' titles (one branch each) and appends the one with the highest
  log-probability, so the answer is always a valid ranking;
- generate: the reference's behaviour, free-text greedy decoding then parsing, for comparison.

Users are batched in order of prompt length and prompt widths rounded up to 2^n or 1.5 * 2^n
(continuations to one width per call, batches to a fixed size), so each jitted function
compiles a handful of times per run and little compute goes to padding.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from tqdm.auto import tqdm

from recranker_jax.errors import RecRankerError
from recranker_jax.llm.llama import KVCache, Llama

MIN_WIDTH = 32


def _bucket(length: int, step: int) -> int:
    return max(step, -(-length // step) * step)


def _width(length: int) -> int:
    """Prompt widths: 32, 48, 64, 96, 128, 192, ... (at most ~1.5x padding, few compilations)."""
    power = 1 << (max(length, 1) - 1).bit_length()
    return max(MIN_WIDTH, power * 3 // 4 if power * 3 // 4 >= length else power)


def _batches(lengths: Sequence[int], size: int, desc: str, progress: bool):
    """Index batches of `size`, shortest first, with a progress bar."""
    order = np.argsort(np.asarray(lengths), kind="stable")
    chunks = [order[i : i + size].tolist() for i in range(0, len(order), size)]
    return tqdm(chunks, desc=desc, disable=not progress, leave=False)


def common_prefix_length(a: Sequence[int], b: Sequence[int]) -> int:
    n = min(len(a), len(b))
    for i in range(n):
        if a[i] != b[i]:
            return i
    return n


@dataclasses.dataclass
class PromptGroup:
    """One user's prompts of one task: shared prefix ids and one suffix id list per prompt."""

    prefix: list[int]
    suffixes: list[list[int]]


def split_prompts(tokenizer, prompts: Sequence[str], prefix_chars: int) -> PromptGroup:
    """Token ids of prompts sharing their first `prefix_chars` characters, as a shared prefix
    and per-prompt suffixes whose concatenation is exactly each prompt's own tokenisation
    (the prefix is shortened where the tokeniser merges across the boundary)."""
    full = tokenizer(list(prompts))["input_ids"]
    prefix = tokenizer(prompts[0][:prefix_chars])["input_ids"]
    n = min(common_prefix_length(prefix, ids) for ids in full)
    n = min(n, min(len(ids) for ids in full) - 1)  # every suffix keeps at least one token
    return PromptGroup(list(full[0][:n]), [list(ids[n:]) for ids in full])


def token_counts(groups: Sequence[PromptGroup]) -> tuple[int, int]:
    """Prompt tokens run (cached: each prefix once plus every suffix; full: every prompt on its
    own, as generate-and-parse does). Their ratio bounds what prefix caching can save."""
    cached = sum(len(g.prefix) + sum(len(s) for s in g.suffixes) for g in groups)
    full = sum(len(g.prefix) * len(g.suffixes) + sum(len(s) for s in g.suffixes) for g in groups)
    return cached, full


def continuation_ids(tokenizer, context: str, piece: str) -> list[int]:
    """The token ids that `piece` adds after `context` (as the model sees it in training)."""
    before = tokenizer(context, add_special_tokens=False)["input_ids"]
    after = tokenizer(context + piece, add_special_tokens=False)["input_ids"]
    n = common_prefix_length(before, after)
    return list(after[n:]) if n == len(before) else list(tokenizer(piece, add_special_tokens=False)["input_ids"])


@dataclasses.dataclass(frozen=True)
class AnswerTokens:
    """Answers that differ in one token after a shared lead (e.g. '▁' then '1'..'5')."""

    lead: list[int]
    choices: np.ndarray  # [n_answers] the distinguishing token of each answer


def answer_tokens(tokenizer, answers: Sequence[str]) -> AnswerTokens:
    """How the answers (" 1".." H", " Yes"/" No") are tokenised, exactly as in training (the
    response on its own, see prompts.tokenizer.encode_example); refuses a tokenizer under
    which two answers start with the same token after their shared lead."""
    ids = [tokenizer(" " + a, add_special_tokens=False)["input_ids"] for a in answers]
    lead = min(common_prefix_length(ids[0], other) for other in ids)
    heads = [seq[lead] if len(seq) > lead else None for seq in ids]
    if None in heads or len(set(heads)) != len(heads):
        clash = [a for a, h in zip(answers, heads) if h is None or heads.count(h) > 1]
        raise RecRankerError(
            f"the tokenizer cannot tell the answers {', '.join(repr(a) for a in clash)} apart by one token "
            f"(token ids {ids}); use a tokenizer that encodes each answer distinctly or prompts.rating_mode=round"
        )
    return AnswerTokens(list(ids[0][:lead]), np.array(heads, np.int32))


# --------------------------------------------------------------------------------------------
# Jitted pieces
# --------------------------------------------------------------------------------------------


@nnx.jit
def _prefill(model: Llama, tokens, positions, valid):
    """Run left-padded prompts [B, T] into a new cache of T slots; returns (cache, log-probs
    after the last token). (The cache is grown by `_grow`, so each prompt width compiles once.)"""
    cache = KVCache.zeros(model.config, *tokens.shape, model.dtype)
    last = jnp.full((tokens.shape[0],), tokens.shape[1] - 1)
    logits, cache = model.prefill(tokens, cache, positions, valid, logits_at=last)
    return cache, jax.nn.log_softmax(logits[:, 0].astype(jnp.float32), axis=-1)


@jax.jit(static_argnames="extra")
def _grow(cache: KVCache, extra: int) -> KVCache:
    return cache.grow(extra)


@nnx.jit
def _branch_logprobs(model: Llama, tokens, cache: KVCache, positions, cache_valid, branch_ids, last):
    """Log-probabilities [U, R, V] of the token after index `last` [U, R] of each row's packed branches."""
    logits, _ = model.extend_branches(tokens, cache, positions, cache_valid, branch_ids, logits_at=last)
    return jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)


@nnx.jit(static_argnames="slots")
def _listwise_step(model: Llama, cache: KVCache, key_valid, next_position, last_logprobs, start, tokens, branch_ids,
                   within, offsets, lengths, slots):
    """One constrained decoding step for U users with up to k candidates each.

    tokens / branch_ids / within [U, T]: the titles of each user's not-yet-chosen candidates
    packed one after another (`_pack`), each a branch of its user's cache (read in place);
    offsets / lengths [U, k] locate candidate j's title in its row (length 0: chosen or
    absent). The title with the highest summed token log-probability is appended to the cache
    (`slots` slots from `start`). Returns the new state, the pick [U] and the scores [U, k]."""
    users, k = lengths.shape
    logits, own = model.extend_branches(tokens, cache, next_position[:, None] + within, key_valid, branch_ids)
    logits = logits.astype(jnp.float32)
    normaliser = jax.nn.logsumexp(logits, axis=-1)  # [U, T]
    following = jnp.take_along_axis(logits[:, :-1], tokens[:, 1:, None], axis=2)[..., 0] - normaliser[:, :-1]
    first = jnp.take_along_axis(last_logprobs, tokens, axis=1)  # each token as the first of its title
    per_token = jnp.where(within == 0, first, jnp.pad(following, ((0, 0), (1, 0))))
    score = jnp.einsum("ut,utk->uk", jnp.where(branch_ids >= 0, per_token, 0.0), jax.nn.one_hot(branch_ids, k))
    score = jnp.where(lengths == 0, -jnp.inf, score)
    pick = jnp.argmax(score, axis=1)
    user = jnp.arange(users)
    picked_length, offset = lengths[user, pick], offsets[user, pick]
    end = jnp.maximum(offset + picked_length - 1, 0)
    new_last = logits[user, end] - normaliser[user, end, None]
    key_valid = jax.lax.dynamic_update_slice(key_valid, jnp.arange(slots)[None] < picked_length[:, None], (0, start))
    return cache.commit(own, offset, slots, start), key_valid, next_position + picked_length, new_last, pick, score


@nnx.jit
def _greedy_step(model: Llama, token, cache: KVCache, start, positions, key_valid):
    logits, cache = model.extend(token, cache, start, positions, key_valid)
    return jnp.argmax(logits[:, -1], axis=-1).astype(jnp.int32), cache


# --------------------------------------------------------------------------------------------
# Host-side batching
# --------------------------------------------------------------------------------------------


def _left_padded(sequences: Sequence[Sequence[int]], width: int, rows: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(tokens, valid, positions) [rows, width] with each sequence at the right end."""
    tokens = np.zeros((rows, width), np.int32)
    valid = np.zeros((rows, width), bool)
    positions = np.zeros((rows, width), np.int32)
    for row, seq in enumerate(sequences):
        pad = width - len(seq)
        tokens[row, pad:] = seq
        valid[row, pad:] = True
        positions[row, pad:] = np.arange(len(seq))
    return tokens, valid, positions


def _capacity_valid(valid: np.ndarray, capacity: int) -> np.ndarray:
    out = np.zeros((valid.shape[0], capacity), bool)
    out[:, : valid.shape[1]] = valid
    return out


def _prefill_batch(model: Llama, sequences: Sequence[Sequence[int]], rows: int, extra: int):
    """Prefill `sequences` padded to `rows` rows and their bucketed width, in a cache with
    `extra` more slots; returns (cache, key_valid, lengths, width, last log-probs).

    (Each batch's cache is as short as its prompts: one cache length per call instead would
    compile the passes after the prefill once per call, not once per width, but made them
    13-18% slower on the quickstart's mix of history lengths.)"""
    width = _width(max(len(s) for s in sequences))
    tokens, valid, positions = _left_padded(sequences, width, rows)
    cache, last = _prefill(model, jnp.asarray(tokens), jnp.asarray(positions), jnp.asarray(valid))
    if extra:
        cache = _grow(cache, extra)
    key_valid = _capacity_valid(valid, width + extra)
    lengths = np.zeros(rows, np.int32)
    lengths[: len(sequences)] = [len(s) for s in sequences]
    return cache, key_valid, lengths, width, last


def _pack(rows: Sequence[Sequence[Sequence[int]]], width: int, batch: int, slots: int) -> dict[str, np.ndarray]:
    """Each row's branches (token id lists; empty: none) packed one after another into
    [batch, width]: tokens, branch_ids (-1: padding), within (index in the branch), and
    offsets / lengths [batch, slots] of branch j."""
    out = {"tokens": np.zeros((batch, width), np.int32), "branch_ids": np.full((batch, width), -1, np.int32),
           "within": np.zeros((batch, width), np.int32), "offsets": np.zeros((batch, slots), np.int32),
           "lengths": np.zeros((batch, slots), np.int32)}
    for u, branches in enumerate(rows):
        at = 0
        for j, ids in enumerate(branches):
            n = len(ids)
            out["tokens"][u, at : at + n] = ids
            out["branch_ids"][u, at : at + n] = j if n else -1
            out["within"][u, at : at + n] = np.arange(n)
            out["offsets"][u, j], out["lengths"][u, j] = at, n
            at += n
    return out


def next_token_logprobs(model: Llama, groups: Sequence[PromptGroup], lead: Sequence[int], users_per_batch: int,
                        desc: str = "score", progress: bool = True) -> list[np.ndarray]:
    """For every group and suffix (in order), log-probabilities [V] of the token after suffix + `lead`."""
    results: dict[int, list[np.ndarray]] = {}
    # one packed width (bucketed like prompts, so calls share it) and branch count per call
    width = _width(max(sum(len(s) + len(lead) for s in g.suffixes) for g in groups))
    branches = max(len(g.suffixes) for g in groups)
    for indices in _batches([len(g.prefix) for g in groups], users_per_batch, desc, progress):
        batch = [groups[i] for i in indices]
        cache, key_valid, lengths, _, _ = _prefill_batch(model, [g.prefix for g in batch], users_per_batch, 0)
        packed = _pack([[s + list(lead) for s in g.suffixes] for g in batch], width, users_per_batch, branches)
        last = np.maximum(packed["offsets"] + packed["lengths"] - 1, 0)
        logprobs = np.asarray(_branch_logprobs(
            model, jnp.asarray(packed["tokens"]), cache, jnp.asarray(lengths[:, None] + packed["within"]),
            jnp.asarray(key_valid), jnp.asarray(packed["branch_ids"]), jnp.asarray(last),
        ))
        for u, (i, g) in enumerate(zip(indices, batch)):
            results[i] = list(logprobs[u, : len(g.suffixes)])
    return [row for i in range(len(groups)) for row in results[i]]


def expected_ratings(logprobs: np.ndarray, answers: AnswerTokens) -> np.ndarray:
    """Expected rating (1..H) under the distribution renormalised over the H rating tokens."""
    chosen = logprobs[:, answers.choices]
    probabilities = np.exp(chosen - chosen.max(axis=1, keepdims=True))
    probabilities /= probabilities.sum(axis=1, keepdims=True)
    return probabilities @ np.arange(1, len(answers.choices) + 1, dtype=np.float64)


def prefers_first(logprobs: np.ndarray, answers: AnswerTokens) -> np.ndarray:
    """1 where P(Yes) > P(No) (answers = Yes, No), else 0."""
    return (logprobs[:, answers.choices[0]] > logprobs[:, answers.choices[1]]).astype(np.int8)


def listwise_rankings(
    model: Llama, contexts: Sequence[Sequence[int]], pieces: Sequence[Sequence[Sequence[Sequence[int]]]],
    top: int, users_per_batch: int, progress: bool = True,
) -> np.ndarray:
    """Constrained greedy rankings: positions [n, k] (1-based place among the first `top`, 0 beyond).

    contexts: each user's full prompt ids (+ the answer's lead); pieces[u][step == 0 ? 0 : 1][j]:
    candidate j's title ids as the first answer line and as a later line."""
    n, k = len(contexts), max(len(p[0]) for p in pieces)
    steps = min(top, k)
    positions = np.zeros((n, k), np.int32)
    piece_width = _bucket(max(len(p) for user in pieces for form in user for p in form), 8)  # cache slots per step
    # the packed titles of a step: one width per call, enough for every user's longest form
    width = _width(max(sum(len(p) for p in form) for user in pieces for form in user))
    for batch in _batches([len(c) for c in contexts], users_per_batch, "listwise", progress):
        cache, key_valid, lengths, prompt_width, last = _prefill_batch(
            model, [contexts[u] for u in batch], users_per_batch, steps * piece_width
        )
        chosen = np.zeros((len(batch), k), bool)
        key_valid, next_position = jnp.asarray(key_valid), jnp.asarray(lengths)
        for step in range(steps):
            form = 0 if step == 0 else 1  # the first answer line, or a later one
            packed = _pack([[[] if chosen[row, j] else ids for j, ids in enumerate(pieces[u][form])]
                            for row, u in enumerate(batch)], width, users_per_batch, k)
            cache, key_valid, next_position, last, pick, _ = _listwise_step(
                model, cache, key_valid, next_position, last, jnp.asarray(prompt_width + step * piece_width, jnp.int32),
                *(jnp.asarray(packed[key]) for key in ("tokens", "branch_ids", "within", "offsets", "lengths")),
                slots=piece_width,
            )
            pick = np.asarray(pick)
            for row, u in enumerate(batch):
                if packed["lengths"][row, pick[row]]:  # a user with fewer than `steps` candidates picks nothing more
                    chosen[row, pick[row]] = True
                    positions[u, pick[row]] = step + 1
    return positions


def generate(model: Llama, prompts: Sequence[Sequence[int]], max_tokens: int, eos: int | None, batch_size: int,
             progress: bool = True) -> list[list[int]]:
    """Greedy free-text continuations (stopping at EOS; `eos` None: never, exactly `max_tokens`
    tokens each), batched with a KV cache."""
    outputs: dict[int, list[int]] = {}
    for indices in _batches([len(p) for p in prompts], batch_size, "generate", progress):
        batch = [prompts[i] for i in indices]
        cache, key_valid, lengths, width, last = _prefill_batch(model, batch, batch_size, max_tokens)
        token = np.asarray(jnp.argmax(last, axis=-1)).astype(np.int32)
        generated = [[] for _ in batch]
        done = np.zeros(batch_size, bool)
        done[len(batch) :] = True
        key_valid = np.array(key_valid)
        for step in range(max_tokens):
            for row in range(len(batch)):
                if not done[row]:
                    if eos is not None and token[row] == eos:
                        done[row] = True
                    else:
                        generated[row].append(int(token[row]))
            if done.all() or step == max_tokens - 1:
                break
            key_valid[:, width + step] = True
            token, cache = _greedy_step(
                model, jnp.asarray(token)[:, None], cache, jnp.asarray(width + step, jnp.int32),
                jnp.asarray(lengths + step)[:, None], jnp.asarray(key_valid),
            )
            token = np.asarray(token)
        outputs.update(zip(indices, generated))
    return [outputs[i] for i in range(len(prompts))]


# --------------------------------------------------------------------------------------------
# Parsing generated text (the reference's behaviour)
# --------------------------------------------------------------------------------------------


def parse_rating(text: str, max_rating: int) -> float | None:
    """The first integer 1..H in the text, or None (unreadable: the reference then uses 3)."""
    match = re.search(r"\d+", text)
    if match and 1 <= int(match.group()) <= max_rating:
        return float(match.group())
    return None


def parse_yes_no(text: str) -> int:
    """1 for yes, 0 for no, -1 when unreadable."""
    word = re.match(r"\W*(\w+)", text)
    answer = word.group(1).lower() if word else ""
    return 1 if answer == "yes" else 0 if answer == "no" else -1


def parse_ranking(text: str, titles: Sequence[str], top: int) -> np.ndarray | None:
    """1-based positions of the candidates named on the answer's lines (first `top`), None if none."""
    positions = np.zeros(len(titles), np.int32)
    place = 0
    for line in text.splitlines():
        line = line.strip()
        for j, title in enumerate(titles):
            if line and positions[j] == 0 and (line == title or title in line):
                place += 1
                positions[j] = place
                break
        if place == top:
            break
    return positions if place else None
