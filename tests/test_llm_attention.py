import jax
import jax.numpy as jnp
import numpy as np
import pytest

from recranker_jax.llm.attention import causal_attention, causal_mask, masked_attention


def numpy_attention(q, k, v, segments):
    """Causal softmax attention within segments, one (row, head) at a time, in float64."""
    batch, length, kv, groups, dim = q.shape
    out = np.zeros(q.shape)
    for b in range(batch):
        for h in range(kv):
            for g in range(groups):
                scores = q[b, :, h, g].astype(np.float64) @ k[b, :, h].T.astype(np.float64) / np.sqrt(dim)
                visible = np.tril(np.ones((length, length), bool)) & (segments[b][:, None] == segments[b][None, :])
                scores = np.where(visible, scores, -np.inf)
                weights = np.exp(scores - scores.max(1, keepdims=True))
                out[b, :, h, g] = (weights / weights.sum(1, keepdims=True)) @ v[b, :, h]
    return out


def inputs(length, seed=0):
    rng = np.random.default_rng(seed)
    q = rng.normal(size=(2, length, 2, 3, 8)).astype(np.float32)
    k, v = (rng.normal(size=(2, length, 2, 8)).astype(np.float32) for _ in range(2))
    # packed rows: segments of random lengths, some crossing tile boundaries, padding (0) at the end
    segments = np.stack([np.repeat(np.arange(1, 40), rng.integers(3, 30, 39))[:length] for _ in range(2)])
    segments[0, -5:] = 0
    return q, k, v, segments


@pytest.mark.parametrize("implementation", ["tiled", "xla"])
@pytest.mark.parametrize("length", [64, 50])  # 50: not a whole number of 16-row tiles
def test_causal_attention_equals_softmax_attention_within_segments(implementation, length):
    q, k, v, segments = inputs(length)
    got = causal_attention(*map(jnp.asarray, (q, k, v, segments)), implementation=implementation, block=16)
    np.testing.assert_allclose(np.asarray(got), numpy_attention(q, k, v, segments), atol=2e-6)


@pytest.mark.parametrize("length", [64, 50])
def test_tiled_attention_gradients_equal_autodiff_of_the_full_scores(length):
    q, k, v, segments = map(jnp.asarray, inputs(length, seed=1))
    weights = jax.random.normal(jax.random.PRNGKey(0), q.shape)

    def loss(attend):
        return lambda q, k, v: jnp.sum(attend(q, k, v) * weights)

    tiled = jax.grad(loss(lambda q, k, v: causal_attention(q, k, v, segments, "tiled", block=16)), argnums=(0, 1, 2))(q, k, v)
    full = jax.grad(loss(lambda q, k, v: masked_attention(q, k, v, causal_mask(segments))), argnums=(0, 1, 2))(q, k, v)
    for got, want in zip(tiled, full):
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=2e-5)


def test_tiled_attention_in_bfloat16_stays_close_to_float32():
    q, k, v, segments = map(jnp.asarray, inputs(64, seed=2))
    want = causal_attention(q, k, v, segments, "tiled", block=16)
    got = causal_attention(q.astype(jnp.bfloat16), k.astype(jnp.bfloat16), v.astype(jnp.bfloat16), segments, "tiled", block=16)
    assert got.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(want), atol=5e-2)
