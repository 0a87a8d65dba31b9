"""answer_loss (logsumexp - target logit, at all positions or only at the answer slots) equals
the plain log-softmax cross-entropy over the masked positions."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from recranker_jax.train.packing import answer_capacity, batch_arrays
from recranker_jax.train.step import answer_loss


class FixedLogits:
    """Stands in for the model: its hidden states are the given logits whatever the batch, and
    its head is the identity."""

    def __init__(self, logits):
        self.logits = logits

    def hidden_states(self, tokens, positions, segment_ids):
        return self.logits

    def head(self, hidden):
        return hidden

    def norm(self, hidden):
        return hidden

    def head_weight(self):
        return jnp.eye(self.logits.shape[-1], dtype=self.logits.dtype)


def reference_loss(logits, batch):
    targets = jnp.roll(batch["tokens"], -1, axis=1)
    log_probs = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    nll = -jnp.take_along_axis(log_probs, targets[..., None], axis=-1)[..., 0]
    mask = batch["loss_mask"].astype(jnp.float32)
    return jnp.sum(nll * mask) / jnp.maximum(jnp.sum(mask), 1.0)


@pytest.mark.parametrize("fused", [False, True])
@pytest.mark.parametrize("slots", [False, True])
@pytest.mark.parametrize("scale", [1.0, 30.0])
def test_answer_loss_and_its_gradient_equal_the_log_softmax_reference(scale, slots, fused):
    rng = np.random.default_rng(0)
    rows, length, vocab = 3, 17, 50
    logits = jnp.asarray(rng.normal(size=(rows, length, vocab)) * scale, jnp.float32)
    batch = {"tokens": jnp.asarray(rng.integers(0, vocab, (rows, length)), jnp.int32),
             "loss_mask": jnp.asarray(rng.integers(0, 2, (rows, length)), jnp.int32),
             "positions": jnp.zeros((rows, length), jnp.int32), "segment_ids": jnp.ones((rows, length), jnp.int32)}
    batch["loss_mask"] = batch["loss_mask"].at[0].set(0)  # a row without answers
    full = batch
    want = reference_loss(logits, full)
    if slots:  # the head only at the answer positions
        batch = {k: jnp.asarray(v) for k, v in batch_arrays(*(np.asarray(batch[k]) for k in (
            "tokens", "loss_mask", "segment_ids", "positions")), capacity=length - 4).items()}
        assert "loss_mask" not in batch and batch["answer_positions"].shape == (rows, length - 4)
    loss, count = answer_loss(FixedLogits(logits), batch, fused)
    assert float(count) == float(batch["answer_mask" if slots else "loss_mask"].sum())
    assert abs(float(loss) - float(want)) <= 1e-6 * max(1.0, abs(float(want)))
    grad = jax.grad(lambda x: answer_loss(FixedLogits(x), batch, fused)[0])(logits)
    want_grad = jax.grad(lambda x: reference_loss(x, full))(logits)
    np.testing.assert_allclose(np.asarray(grad), np.asarray(want_grad), atol=1e-6)


def test_answer_loss_of_an_empty_mask_is_zero():
    logits = jnp.zeros((1, 4, 8))
    batch = {"tokens": jnp.zeros((1, 4), jnp.int32), "loss_mask": jnp.zeros((1, 4), jnp.int32),
             "positions": jnp.zeros((1, 4), jnp.int32), "segment_ids": jnp.ones((1, 4), jnp.int32)}
    loss, count = answer_loss(FixedLogits(logits), batch)
    assert float(loss) == 0.0 and float(count) == 0.0


def test_answer_capacity_covers_the_fullest_row_in_whole_multiples():
    mask = np.zeros((3, 300), np.int32)
    mask[1, 10:80] = 1  # 70 answer positions
    mask[2, 5:9] = 1
    assert answer_capacity(mask) == 128
    assert answer_capacity(np.ones((2, 100), np.int32)) == 100  # never more than the row
    arrays = batch_arrays(np.zeros((3, 300), np.int32), mask, mask, mask, answer_capacity(mask))
    assert arrays["answer_mask"].sum(1).tolist() == [0, 70, 4]
    assert arrays["answer_positions"][2, :4].tolist() == [5, 6, 7, 8]


def test_linear_cross_entropy_over_several_chunks_equals_the_plain_head_and_loss():
    from recranker_jax.train.loss import linear_cross_entropy

    rng = np.random.default_rng(3)
    x = jnp.asarray(rng.normal(size=(2, 17, 6)), jnp.float32)
    w = jnp.asarray(rng.normal(size=(6, 11)), jnp.float32)
    targets = jnp.asarray(rng.integers(0, 11, (2, 17)), jnp.int32)
    weights = jnp.asarray(rng.random((2, 17)), jnp.float32)

    def plain(x, w):
        logits = x @ w
        nll = jax.nn.logsumexp(logits, -1) - jnp.take_along_axis(logits, targets[..., None], -1)[..., 0]
        return jnp.sum(nll * weights)

    def fused(x, w):
        return 3.0 * linear_cross_entropy(x, w, targets, weights, 4)  # 5 chunks of 4, the last padded

    np.testing.assert_allclose(float(fused(x, w)), 3.0 * float(plain(x, w)), rtol=1e-6)
    for got, want in zip(jax.grad(fused, argnums=(0, 1))(x, w), jax.grad(lambda x, w: 3.0 * plain(x, w), argnums=(0, 1))(x, w)):
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=1e-5)
