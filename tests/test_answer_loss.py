"""answer_loss (logsumexp - target logit) equals the plain log-softmax cross-entropy."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from recranker_jax.train.step import answer_loss


class FixedLogits:
    """Stands in for the model: returns the given logits whatever the batch."""

    def __init__(self, logits):
        self.logits = logits

    def __call__(self, tokens, positions, segment_ids):
        return self.logits


def reference_loss(logits, batch):
    targets = jnp.roll(batch["tokens"], -1, axis=1)
    log_probs = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    nll = -jnp.take_along_axis(log_probs, targets[..., None], axis=-1)[..., 0]
    mask = batch["loss_mask"].astype(jnp.float32)
    return jnp.sum(nll * mask) / jnp.maximum(jnp.sum(mask), 1.0)


@pytest.mark.parametrize("scale", [1.0, 30.0])
def test_answer_loss_and_its_gradient_equal_the_log_softmax_reference(scale):
    rng = np.random.default_rng(0)
    rows, length, vocab = 3, 17, 50
    logits = jnp.asarray(rng.normal(size=(rows, length, vocab)) * scale, jnp.float32)
    batch = {"tokens": jnp.asarray(rng.integers(0, vocab, (rows, length)), jnp.int32),
             "loss_mask": jnp.asarray(rng.integers(0, 2, (rows, length)), jnp.int32),
             "positions": jnp.zeros((rows, length), jnp.int32), "segment_ids": jnp.ones((rows, length), jnp.int32)}
    loss, count = answer_loss(FixedLogits(logits), batch)
    want = reference_loss(logits, batch)
    assert float(count) == float(batch["loss_mask"].sum())
    assert abs(float(loss) - float(want)) <= 1e-6 * max(1.0, abs(float(want)))
    grad = jax.grad(lambda x: answer_loss(FixedLogits(x), batch)[0])(logits)
    want_grad = jax.grad(lambda x: reference_loss(x, batch))(logits)
    np.testing.assert_allclose(np.asarray(grad), np.asarray(want_grad), atol=1e-6)


def test_answer_loss_of_an_empty_mask_is_zero():
    logits = jnp.zeros((1, 4, 8))
    batch = {"tokens": jnp.zeros((1, 4), jnp.int32), "loss_mask": jnp.zeros((1, 4), jnp.int32),
             "positions": jnp.zeros((1, 4), jnp.int32), "segment_ids": jnp.ones((1, 4), jnp.int32)}
    loss, count = answer_loss(FixedLogits(logits), batch)
    assert float(loss) == 0.0 and float(count) == 0.0
