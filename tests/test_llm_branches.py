"""Llama.extend_branches (continuations of any lengths, packed one after another by
decode.pack_branches, reading a shared cache in place) against extend on per-continuation
copies of the cache, and KVCache.commit against the copy's own cache."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from recranker_jax.llm import decode
from recranker_jax.llm.llama import KVCache, Llama, LlamaConfig


@pytest.mark.parametrize("scan_layers", [True, False])
def test_branches_equal_continuations_of_copied_caches(scan_layers):
    cfg = LlamaConfig(vocab_size=61, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2)
    model = Llama(cfg, nnx.Rngs(5), scan_layers=scan_layers)
    rng = np.random.default_rng(0)
    users, width, branches, capacity = 2, 4, 3, 16
    # left-padded prefixes of 7 and 9 tokens in a 9-slot prefill
    prefix = rng.integers(1, 61, (users, 9)).astype(np.int32)
    prefix_valid = np.ones((users, 9), bool)
    prefix_valid[0, :2] = False
    prefix_positions = np.maximum(np.arange(9)[None] - np.array([[2], [0]]), 0).astype(np.int32)
    cache_valid = np.zeros((users, capacity), bool)
    cache_valid[:, :9] = prefix_valid
    _, cache = model.extend(jnp.asarray(prefix), KVCache.zeros(cfg, users, capacity), 0, jnp.asarray(prefix_positions),
                            jnp.asarray(cache_valid))
    lengths = np.array([[4, 2, 3], [1, 4, 0]])  # user 1 has two branches; rows padded to 12 tokens
    tokens = rng.integers(1, 61, (users, branches, width)).astype(np.int32)
    valid = np.arange(width)[None, None] < lengths[..., None]
    positions = np.broadcast_to(np.array([7, 9])[:, None, None] + np.arange(width), (users, branches, width)).astype(np.int32)
    packed = decode.pack_branches([[tokens[u, b, : lengths[u, b]].tolist() for b in range(branches)]
                                   for u in range(users)], width=12, batch=users, slots=branches)
    offsets = packed["offsets"]
    assert (packed["lengths"] == lengths).all()
    packed_positions = np.array([[7], [9]]) + packed["within"]  # each row's prefix length, then the branch

    logits, own = model.extend_branches(
        jnp.asarray(packed["tokens"]), cache, jnp.asarray(packed_positions), jnp.asarray(cache_valid),
        jnp.asarray(packed["branch_ids"]))
    logits = np.asarray(logits)

    rows = np.repeat(np.arange(users), branches)
    row_valid = cache_valid[rows].copy()
    row_valid[:, 9 : 9 + width] = valid.reshape(-1, width)
    want, copied = model.extend(jnp.asarray(tokens.reshape(-1, width)), jax.tree.map(lambda a: a[:, rows], cache), 9,
                                jnp.asarray(positions.reshape(-1, width)), jnp.asarray(row_valid))
    want = np.asarray(want).reshape(users, branches, width, -1)
    for u in range(users):
        for b in range(branches):
            n, at = lengths[u, b], offsets[u, b]
            np.testing.assert_allclose(logits[u, at : at + n], want[u, b, :n], atol=2e-5)

    picks = np.array([2, 0])
    committed = cache.commit(own, jnp.asarray(offsets[np.arange(users), picks]), width, 9)
    for got_layers, full_layers in ((committed.keys, copied.keys), (committed.values, copied.values)):
        for got, full in zip(got_layers, full_layers):  # layer by layer
            got, full = np.asarray(got), np.asarray(full).reshape(users, branches, capacity, *got.shape[2:])
            for u, pick in enumerate(picks):
                end = 9 + lengths[u, pick]  # the picked branch's real tokens; the rest of its W slots stay invalid
                np.testing.assert_allclose(got[u, :end], full[u, pick, :end], atol=1e-6)
