"""The KV-cache decoding engine the rank stage scores with (the model is llama.py): prompts
prefilled into a cache in batches, branches reading it in place, constrained and greedy steps."""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from tqdm.auto import tqdm

from recranker_jax.llm.llama import KVCache, Llama

MIN_WIDTH = 32


def round_up(length: int, step: int) -> int:
    """`length` rounded up to a multiple of `step` (at least `step`)."""
    return max(step, -(-length // step) * step)


def bucket_width(length: int) -> int:
    """Prompt widths: 32, 48, 64, 96, 128, 192, ... (at most ~1.5x padding; with batches taken
    shortest first, each jitted function compiles a handful of times per run)."""
    power = 1 << (max(length, 1) - 1).bit_length()
    return max(MIN_WIDTH, power * 3 // 4 if power * 3 // 4 >= length else power)


def batches_by_length(lengths: Sequence[int], size: int, desc: str, progress: bool):
    """Index batches of `size`, shortest first, with a progress bar."""
    order = np.argsort(np.asarray(lengths), kind="stable")
    chunks = [order[i : i + size].tolist() for i in range(0, len(order), size)]
    return tqdm(chunks, desc=desc, disable=not progress, leave=False)


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
def branch_logprobs(model: Llama, tokens, cache: KVCache, positions, cache_valid, branch_ids, last):
    """Log-probabilities [U, R, V] of the token after index `last` [U, R] of each row's packed
    branches (`pack_branches`; `Llama.extend_branches` reads the cache in place, not copied per
    branch)."""
    logits, _ = model.extend_branches(tokens, cache, positions, cache_valid, branch_ids, logits_at=last)
    return jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)


@nnx.jit(static_argnames="slots")
def constrained_step(model: Llama, cache: KVCache, key_valid, next_position, last_logprobs, start, tokens, branch_ids,
                     within, offsets, lengths, slots):
    """One constrained decoding step for U rows with up to k allowed continuations each.

    tokens / branch_ids / within [U, T]: each row's allowed continuations packed one after
    another (`pack_branches`), each a branch of its row's cache (read in place); offsets /
    lengths [U, k] locate continuation j in its row (length 0: not allowed). The continuation
    with the highest summed token log-probability (its first token scored by `last_logprobs`
    [U, V], the log-probs after the cached tokens) is appended to the cache (`slots` slots from
    `start`). Returns the new (cache, key_valid, next_position, last_logprobs), the pick [U]
    and the scores [U, k]."""
    users, k = lengths.shape
    logits, own = model.extend_branches(tokens, cache, next_position[:, None] + within, key_valid, branch_ids)
    logits = logits.astype(jnp.float32)
    normaliser = jax.nn.logsumexp(logits, axis=-1)  # [U, T]
    following = jnp.take_along_axis(logits[:, :-1], tokens[:, 1:, None], axis=2)[..., 0] - normaliser[:, :-1]
    first = jnp.take_along_axis(last_logprobs, tokens, axis=1)  # each token as the first of its branch
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


def prefill_batch(model: Llama, sequences: Sequence[Sequence[int]], rows: int, extra: int):
    """Prefill `sequences` padded to `rows` rows and their bucketed width, in a cache with
    `extra` more slots; returns (cache, key_valid, lengths, width, last log-probs). Rows are
    left-padded; rotary positions and masks follow each row's real tokens, so padded, cached
    log-probabilities equal full-sequence ones (tested).

    (Each batch's cache is as short as its prompts: one cache length per call instead would
    compile the passes after the prefill once per call, not once per width, but made them
    13-18% slower on the quickstart's mix of history lengths.)"""
    width = bucket_width(max(len(s) for s in sequences))
    tokens, valid, positions = _left_padded(sequences, width, rows)
    cache, last = _prefill(model, jnp.asarray(tokens), jnp.asarray(positions), jnp.asarray(valid))
    if extra:
        cache = _grow(cache, extra)
    key_valid = _capacity_valid(valid, width + extra)
    lengths = np.zeros(rows, np.int32)
    lengths[: len(sequences)] = [len(s) for s in sequences]
    return cache, key_valid, lengths, width, last


def pack_branches(rows: Sequence[Sequence[Sequence[int]]], width: int, batch: int, slots: int) -> dict[str, np.ndarray]:
    """Each row's branches (token id lists; empty: none) packed one after another into
    [batch, width], not padded to a common length: tokens, branch_ids (-1: padding), within
    (index in the branch), and offsets / lengths [batch, slots] of branch j."""
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


def next_token_logprobs(model: Llama, prefixes: Sequence[Sequence[int]], branches: Sequence[Sequence[Sequence[int]]],
                        rows_per_batch: int, desc: str = "score", progress: bool = True) -> list[np.ndarray]:
    """For every prefix and each of its branches (in order), log-probabilities [V] of the token
    after prefix + branch; each prefix is run once and its branches read its cache."""
    results: dict[int, list[np.ndarray]] = {}
    # one packed width (bucketed like prompts, so calls share it) and branch count per call
    width = bucket_width(max(sum(len(b) for b in row) for row in branches))
    slots = max(len(row) for row in branches)
    for indices in batches_by_length([len(p) for p in prefixes], rows_per_batch, desc, progress):
        cache, key_valid, lengths, _, _ = prefill_batch(model, [prefixes[i] for i in indices], rows_per_batch, 0)
        packed = pack_branches([branches[i] for i in indices], width, rows_per_batch, slots)
        last = np.maximum(packed["offsets"] + packed["lengths"] - 1, 0)
        logprobs = np.asarray(branch_logprobs(
            model, jnp.asarray(packed["tokens"]), cache, jnp.asarray(lengths[:, None] + packed["within"]),
            jnp.asarray(key_valid), jnp.asarray(packed["branch_ids"]), jnp.asarray(last),
        ))
        for u, i in enumerate(indices):
            results[i] = list(logprobs[u, : len(branches[i])])
    return [row for i in range(len(prefixes)) for row in results[i]]


def generate(model: Llama, prompts: Sequence[Sequence[int]], max_tokens: int, eos: int | None, batch_size: int,
             progress: bool = True) -> list[list[int]]:
    """Greedy free-text continuations (stopping at EOS; `eos` None: never, exactly `max_tokens`
    tokens each), in left-padded batches with a KV cache."""
    outputs: dict[int, list[int]] = {}
    for indices in batches_by_length([len(p) for p in prompts], batch_size, "generate", progress):
        batch = [prompts[i] for i in indices]
        cache, key_valid, lengths, width, last = prefill_batch(model, batch, batch_size, max_tokens)
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


@nnx.jit
def _extend(model: Llama, tokens: jax.Array, cache: KVCache, start: jax.Array) -> tuple[jax.Array, KVCache]:
    return model.extend(tokens, cache, start)


def greedy_generate(model: Llama, prompt: jax.Array, steps: int) -> jax.Array:
    """Greedy continuation [B, steps] of unpadded prompts [B, T], one jitted cached step per
    token (the plain reference `generate` is tested against)."""
    batch, length = prompt.shape
    cache = KVCache.zeros(model.config, batch, length + steps, model.dtype)
    logits, cache = _extend(model, prompt, cache, jnp.asarray(0))
    generated = [jnp.argmax(logits[:, -1], axis=-1)]
    for step in range(1, steps):
        logits, cache = _extend(model, generated[-1][:, None], cache, jnp.asarray(length + step - 1))
        generated.append(jnp.argmax(logits[:, -1], axis=-1))
    return jnp.stack(generated, axis=1)
