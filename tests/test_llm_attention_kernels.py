"""The implementations of `causal_attention` per platform: the Pallas kernels in interpret mode
(on the CPU) against the float64 reference, and the selection / error / fallback rules."""

import warnings
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from recranker_jax.errors import RecRankerError
from recranker_jax.llm import attention
from recranker_jax.llm.attention import causal_attention, causal_mask, masked_attention, select_implementation
from recranker_jax.llm.attention_kernels import cudnn_attention
from tests.test_llm_attention import numpy_attention


def inputs(length, seed=0):
    """GQA (2 KV heads of 2 query heads, D 32). Row 0: packed examples 1, 2, ... with trailing
    padding 0 (training); row 1: left padding 0, then the prompt 1 (a scorer's prefill)."""
    rng = np.random.default_rng(seed)
    q = rng.normal(size=(2, length, 2, 2, 32)).astype(np.float32)
    k, v = (rng.normal(size=(2, length, 2, 32)).astype(np.float32) for _ in range(2))
    packed = np.repeat(np.arange(1, 40), rng.integers(5, 70, 39))[:length]  # crosses the 128-row tiles
    packed[-9:] = 0
    prefill = (np.arange(length) >= 37).astype(np.int32)
    return q, k, v, np.stack([packed, prefill]).astype(np.int32)


@pytest.mark.parametrize("implementation", ["tiled", "xla", "pallas_gpu", "splash"])
@pytest.mark.parametrize("length", [256, 200])  # 200: padded to the kernels' tiles
def test_every_implementation_equals_softmax_attention_within_segments(implementation, length):
    q, k, v, segments = inputs(length)
    # jitted: both lengths build the same cached splash kernel, so a leaked tracer would fail here
    attend = jax.jit(partial(causal_attention, implementation=implementation, interpret=True))
    got = attend(*map(jnp.asarray, (q, k, v, segments)))
    assert got.dtype == jnp.float32 and got.shape == q.shape
    np.testing.assert_allclose(np.asarray(got), numpy_attention(q, k, v, segments), atol=3e-6)


@pytest.mark.parametrize("implementation", ["pallas_gpu", "splash"])
def test_pallas_kernels_without_segment_ids_attend_to_the_whole_causal_prefix(implementation):
    q, k, v, _ = inputs(200, seed=1)
    got = causal_attention(*map(jnp.asarray, (q, k, v)), implementation=implementation, interpret=True)
    np.testing.assert_allclose(np.asarray(got), numpy_attention(q, k, v, np.zeros((2, 200))), atol=3e-6)


@pytest.mark.parametrize("implementation", ["pallas_gpu", "splash"])
def test_pallas_kernel_gradients_equal_autodiff_of_the_full_scores(implementation):
    q, k, v, segments = map(jnp.asarray, inputs(200, seed=2))
    weights = jax.random.normal(jax.random.PRNGKey(0), q.shape)

    def grads(attend):
        return jax.jit(jax.grad(lambda q, k, v: jnp.sum(attend(q, k, v) * weights), argnums=(0, 1, 2)))(q, k, v)

    got = grads(lambda q, k, v: causal_attention(q, k, v, segments, implementation, interpret=True))
    want = grads(lambda q, k, v: masked_attention(q, k, v, causal_mask(segments)))
    for name, g, w in zip("qkv", got, want):
        np.testing.assert_allclose(np.asarray(g), np.asarray(w), atol=2e-5, err_msg=f"d{name}")


@pytest.mark.parametrize("implementation", ["pallas_gpu", "splash"])
def test_pallas_kernels_keep_bfloat16(implementation):
    q, k, v, segments = map(jnp.asarray, inputs(128, seed=3))
    want = causal_attention(q, k, v, segments, "tiled")
    got = causal_attention(q.astype(jnp.bfloat16), k.astype(jnp.bfloat16), v.astype(jnp.bfloat16), segments,
                           implementation, interpret=True)
    assert got.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(want), atol=5e-2)


@pytest.mark.parametrize("platform, implementation", [("cpu", "tiled"), ("gpu", "pallas_gpu"), ("cuda", "pallas_gpu"),
                                                      ("tpu", "splash"), ("METAL", "xla")])
@pytest.mark.parametrize("has_segments", [True, False])
def test_auto_picks_the_platforms_kernel(platform, implementation, has_segments):
    assert select_implementation("auto", platform, has_segments) == implementation


def test_auto_on_several_accelerators_uses_xla_until_the_kernels_are_partitioned(monkeypatch):
    monkeypatch.setattr(attention, "_warned", set())
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert select_implementation("auto", "gpu", True, devices=8) == "xla"
        assert select_implementation("auto", "tpu", True, devices=4) == "xla"
        assert select_implementation("auto", "cpu", True, devices=8) == "tiled"
        assert select_implementation("pallas_gpu", "gpu", True, devices=8) == "pallas_gpu"  # by name: as asked
    assert len(caught) == 2 and "runs on one device" in str(caught[0].message)


def test_an_unknown_implementation_is_an_error_listing_the_valid_names():
    valid = "auto, tiled, xla, pallas_gpu, cudnn, splash"
    with pytest.raises(RecRankerError, match=f"'blocked' is unknown; expected one of {valid}$"):
        causal_attention(*map(jnp.asarray, inputs(8)[:3]), implementation="blocked")


@pytest.mark.parametrize("implementation, needs", [("pallas_gpu", "GPU"), ("splash", "TPU"), ("cudnn", "GPU")])
def test_an_accelerator_kernel_on_the_cpu_is_an_error_naming_what_runs_here(implementation, needs):
    message = rf"'{implementation}' runs on a {needs}.*, not on cpu: use one of auto, tiled, xla$"
    with pytest.raises(RecRankerError, match=message):
        causal_attention(*map(jnp.asarray, inputs(8)[:3]), implementation=implementation)


def test_interpret_mode_runs_the_pallas_kernels_anywhere_but_not_cudnn():
    assert select_implementation("splash", "gpu", True, interpret=True) == "splash"
    assert select_implementation("pallas_gpu", "tpu", True, interpret=True) == "pallas_gpu"
    with pytest.raises(RecRankerError, match="'cudnn' runs on a GPU, not on cpu"):
        select_implementation("cudnn", "cpu", False, interpret=True)
    message = r"'splash' runs on a TPU \(or with interpret=True\), not on gpu: use one of auto, tiled, xla, pallas_gpu, cudnn$"
    with pytest.raises(RecRankerError, match=message):
        select_implementation("splash", "gpu", True)


def test_cudnn_with_segment_ids_falls_back_to_pallas_gpu_with_one_warning(monkeypatch):
    monkeypatch.setattr(attention, "_warned", set())
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert select_implementation("cudnn", "gpu", has_segments=False) == "cudnn"
        assert not caught
        assert [select_implementation("cudnn", "gpu", has_segments=True) for _ in range(3)] == ["pallas_gpu"] * 3
    fallback = "attention 'cudnn' has no segment ids: calls with segment_ids use 'pallas_gpu'"
    assert [str(w.message) for w in caught] == [fallback]


def test_cudnn_rejects_32_bit_inputs():
    with pytest.raises(RecRankerError, match="'cudnn' needs float16 or bfloat16 inputs, got float32"):
        cudnn_attention(*map(jnp.asarray, inputs(8)[:3]))
