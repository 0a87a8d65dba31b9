"""The implementations of `causal_attention` per platform: the Pallas kernels in interpret mode
(on the CPU) against the float64 reference, alone and under `shard_map` on meshes of the 8
simulated devices (and in a small Llama's loss gradient), and the selection / error / fallback rules."""

import warnings
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from recranker_jax import parallel
from recranker_jax.config import MeshConfig
from recranker_jax.errors import RecRankerError
from recranker_jax.llm import attention, attention_kernels
from recranker_jax.llm.attention import causal_attention, causal_mask, masked_attention, select_implementation
from recranker_jax.llm.attention_kernels import cudnn_attention, splash_attention
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


def test_the_platform_is_the_meshs_and_auto_picks_its_kernel_on_any_mesh():
    assert parallel.mesh_platform() == jax.default_backend() == "cpu"  # no mesh: this machine's backend
    with parallel.sharding_context(parallel.make_mesh(MeshConfig(shape=[2, 2, 2])), MeshConfig().rules):
        assert parallel.mesh_platform() == "cpu"
        assert jax.jit(lambda: jnp.float32(parallel.mesh_platform() == "cpu"))() == 1  # also while traced
    assert parallel.current_mesh() is None
    # no fallback to "xla" on several devices (the TPU topology's mesh: tests/test_attention_tpu_compile.py)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert select_implementation("auto", "gpu", True) == "pallas_gpu"
        assert select_implementation("auto", "tpu", True) == "splash"


# ----------------------------------------------------------------------------- under shard_map on a mesh

RULES = MeshConfig().rules  # batch: data, fsdp; heads and kv_heads: tensor


def mesh_inputs(length=200):
    """8 rows (`inputs` of four seeds): a batch that the 8 devices of a (1, 8, 1) mesh can split."""
    parts = [inputs(length, seed) for seed in range(4)]
    return [np.concatenate([part[i] for part in parts]) for i in range(4)]


@pytest.mark.parametrize("mesh_shape, q_shape, batch, heads", [
    ([2, 2, 2], (8, 200, 2, 2, 32), ("data", "fsdp"), "tensor"),
    ([1, 8, 1], (8, 200, 2, 2, 32), ("data", "fsdp"), "tensor"),
    ([2, 1, 4], (8, 200, 2, 2, 32), ("data", "fsdp"), None),  # 4 tensor shards do not divide 2 KV heads
    ([1, 8, 1], (2, 200, 2, 2, 32), "data", "tensor"),  # 8 fsdp shards do not divide 2 rows
])
def test_kernel_operands_split_the_batch_and_the_kv_heads_where_they_divide(mesh_shape, q_shape, batch, heads):
    mesh = parallel.make_mesh(MeshConfig(shape=mesh_shape))
    assert attention.kernel_specs(mesh.shape, q_shape, RULES) == (
        P(batch, None, heads, None, None), P(batch, None, heads, None), P(batch, None))


@pytest.mark.parametrize("implementation", ["pallas_gpu", "splash"])
@pytest.mark.parametrize("mesh_shape", [[2, 2, 2], [1, 8, 1], [2, 1, 4]])
def test_pallas_kernels_under_shard_map_equal_the_reference_forward_and_backward(implementation, mesh_shape):
    q, k, v, segments = map(jnp.asarray, mesh_inputs())
    weights = jax.random.normal(jax.random.PRNGKey(0), q.shape)

    def loss(attend):
        return lambda q, k, v: jnp.sum(attend(q, k, v) * weights)

    def kernel(q, k, v):
        return causal_attention(q, k, v, segments, implementation, interpret=True)

    want_out = masked_attention(q, k, v, causal_mask(segments))
    want = jax.jit(jax.grad(loss(lambda q, k, v: masked_attention(q, k, v, causal_mask(segments))),
                            argnums=(0, 1, 2)))(q, k, v)
    with parallel.sharding_context(parallel.make_mesh(MeshConfig(shape=mesh_shape)), RULES):
        assert "shard_map" in str(jax.make_jaxpr(kernel)(q, k, v))
        out = jax.jit(kernel)(q, k, v)
        got = jax.jit(jax.grad(loss(kernel), argnums=(0, 1, 2)))(q, k, v)
    np.testing.assert_allclose(np.asarray(out), np.asarray(want_out), atol=3e-6)
    for name, g, w in zip("qkv", got, want):
        np.testing.assert_allclose(np.asarray(g), np.asarray(w), atol=2e-5, err_msg=f"d{name}")


def test_pallas_kernels_without_segment_ids_under_shard_map():
    q, k, v, _ = map(jnp.asarray, mesh_inputs())
    with parallel.sharding_context(parallel.make_mesh(MeshConfig(shape=[2, 2, 2])), RULES):
        got = jax.jit(partial(causal_attention, implementation="splash", interpret=True))(q, k, v)
    np.testing.assert_allclose(np.asarray(got), np.asarray(masked_attention(q, k, v, causal_mask(jnp.zeros(q.shape[:2])))),
                               atol=3e-6)


def test_without_a_mesh_or_on_one_device_the_kernels_run_as_one_call():
    q, k, v, segments = map(jnp.asarray, inputs(128))

    def kernel(q, k, v):
        return causal_attention(q, k, v, segments, "splash", interpret=True)

    assert "shard_map" not in str(jax.make_jaxpr(kernel)(q, k, v))
    with parallel.sharding_context(parallel.make_mesh(MeshConfig(shape=[1, 1, 1]), jax.devices()[:1]), RULES):
        assert "shard_map" not in str(jax.make_jaxpr(kernel)(q, k, v))


def test_a_llama_with_splash_under_the_mesh_has_the_loss_gradient_of_xla(monkeypatch):
    from flax import nnx

    from recranker_jax.llm import llama
    from recranker_jax.train.step import answer_loss, shard_model

    monkeypatch.setattr(llama, "causal_attention", partial(causal_attention, interpret=True))
    blocks = []  # the q blocks the kernel sees: one device's

    def splash_block(q, *args, **kwargs):
        blocks.append(q.shape)
        return splash_attention(q, *args, **kwargs)

    monkeypatch.setattr(attention_kernels, "splash_attention", splash_block)
    cfg = llama.LlamaConfig(vocab_size=64, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                            num_attention_heads=4, num_key_value_heads=2)
    rng = np.random.default_rng(0)
    segments = np.sort(rng.integers(0, 4, (4, 128)), axis=1).astype(np.int32)  # packed rows, padding (0) first
    batch = {"tokens": rng.integers(3, 64, (4, 128)).astype(np.int32), "segment_ids": segments,
             "positions": np.broadcast_to(np.arange(128, dtype=np.int32), (4, 128)).copy(),
             "loss_mask": (segments > 0).astype(np.int32)}
    mesh = parallel.make_mesh(MeshConfig(shape=[2, 2, 2]))

    def loss_gradient(implementation):
        model = llama.Llama(cfg, nnx.Rngs(0), attention=implementation)
        shard_model(model, mesh, RULES)
        with parallel.sharding_context(mesh, RULES):
            loss, grads = nnx.jit(lambda m, b: nnx.value_and_grad(lambda m: answer_loss(m, b)[0])(m))(
                model, parallel.place_batch(batch, mesh, RULES))
        return float(loss), nnx.to_flat_state(grads)

    loss, grads = loss_gradient("splash")
    assert blocks and set(blocks) == {(1, 128, 1, 2, 16)}  # 4 rows over data x fsdp, 2 KV heads over tensor
    want_loss, want = loss_gradient("xla")
    assert loss == pytest.approx(want_loss, rel=1e-6)
    assert [path for path, _ in grads] == [path for path, _ in want]
    for (path, g), (_, w) in zip(grads, want):
        np.testing.assert_allclose(np.asarray(g.get_value()), np.asarray(w.get_value()), atol=1e-6, err_msg=str(path))


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
