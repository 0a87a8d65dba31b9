"""Attention of the LLaMA model (grouped-query layout: q [B, T, KV, G, D], k / v [B, S, KV, D]).

- `masked_attention`: any boolean mask [B, T, S], the scores materialised (decoding with a
  KV cache, where T is small; `branch_attention`), the same on every platform: this layout was
  measured 2-3x faster on the CPU than the alternatives, and on a GPU `jax.nn.dot_product_attention`
  promises no gain (unmeasured: its XLA path materialises the same scores, and its cuDNN path
  turns the mask into a dense additive bias and needs 16-bit inputs).
- `causal_attention`: cache-free causal attention within packed segments (training, prefills),
  equal results from every implementation (`select_implementation` picks one):
  - "tiled" ("auto" on the CPU): flash attention in `block` x `block` tiles with an online
    softmax and a custom backward that recomputes each tile's probabilities from the saved
    log-sum-exp; no [T, T] array, tiles above the diagonal skipped. Quickstart shape (4 x 1152
    tokens, 4 heads of 32): forward + backward ~130 ms per layer against ~200 ms for "xla"
    and ~375 ms for full scores.
  - "xla" (any platform): each block of queries scores the keys up to the block's end (about
    half the work of the full [T, T] scores), left to XLA's fusions.
  - "pallas_gpu" ("auto" on GPUs): the Pallas Triton flash attention (forward and backward
    kernels, segment ids native, KV heads repeated to the query heads); any float dtype.
  - "cudnn" (GPU, asked for by name): cuDNN flash attention through `jax.nn.dot_product_attention`,
    native GQA, float16 / bfloat16 only. It has no segment ids, so a call with segment_ids falls
    back to "pallas_gpu" (a warning, once); "auto" does not pick it because the model passes
    segment ids on every call (packed training rows, left-padded prefills).
  - "splash" ("auto" on TPUs): the Pallas TPU splash attention, native GQA, vmapped over the batch.
  The Pallas kernels pad T to their tiles (padding in a segment of its own) and run on any
  platform with `interpret=True` (slow; for tests).
  The platform is that of the current mesh's devices (`parallel.sharding_context`; a TPU
  topology's mesh on a CPU machine is a TPU mesh), else this machine's default backend. XLA
  cannot partition a library kernel (Pallas, cuDNN) over a mesh, so on a mesh of several devices
  they run under `jax.shard_map` over it: the batch split along the mesh axes the rules give
  "batch" (data, fsdp), the KV heads along those of "kv_heads" (tensor) where they divide them
  (else whole), segment ids with the batch, time whole. "auto" picks them on meshes of any size.
  Outside a sharding context they run as one call, unpartitioned: arrays sharded over several
  devices need the context. Errors (`RecRankerError`, one line): an
  unknown name; "pallas_gpu" off a GPU or "splash" off a TPU without `interpret`; "cudnn" off
  a GPU or with 32-bit inputs. "tiled" and "xla" run everywhere.
"""

from __future__ import annotations

import functools
import math
import warnings

import jax
import jax.numpy as jnp
from jax import lax
from jax.sharding import PartitionSpec

from recranker_jax import parallel
from recranker_jax.errors import RecRankerError
from recranker_jax.llm import attention_kernels
from recranker_jax.llm.attention_kernels import pad_time

# Query (and key) rows per block of "tiled" and "xla" causal attention.
ATTENTION_BLOCK = 128
_MASKED = -1e30  # finite: a row with no visible key in a tile must not give inf - inf
IMPLEMENTATIONS = ("auto", "tiled", "xla", "pallas_gpu", "cudnn", "splash")
DEFAULT_IMPLEMENTATION = {"cpu": "tiled", "gpu": "pallas_gpu", "tpu": "splash"}  # other platforms: "xla"
_NATIVE_PLATFORM = {"pallas_gpu": "gpu", "cudnn": "gpu", "splash": "tpu"}
_warned: set[str] = set()


def masked_attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array) -> jax.Array:
    """q [B, T, KV, G, D], k / v [B, S, KV, D], mask [B, T, S] -> [B, T, KV, G, D]."""
    # As batched matmuls [B, KV, G*T, D] x [B, KV, S, D]: XLA:CPU's dots are 2-3x slower on the
    # [.., T, KV, G, ..] layout or with G as a separate dimension.
    batch, length, kv, groups, dim = q.shape
    q_h = q.transpose(0, 2, 3, 1, 4).reshape(batch, kv, groups * length, dim)
    k_h, v_h = k.astype(q.dtype).transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)
    scores = jnp.einsum("bkqd,bksd->bkqs", q_h, k_h, preferred_element_type=jnp.float32) / jnp.sqrt(jnp.float32(dim))
    mask = jnp.broadcast_to(mask[:, None], (batch, groups, *mask.shape[1:])).reshape(batch, 1, groups * length, -1)
    weights = jax.nn.softmax(jnp.where(mask, scores, jnp.finfo(jnp.float32).min), axis=-1).astype(v.dtype)
    out = jnp.einsum("bkqs,bksd->bkqd", weights, v_h)
    return out.reshape(batch, kv, groups, length, dim).transpose(0, 3, 1, 2, 4)


def causal_mask(segment_ids: jax.Array) -> jax.Array:
    """[B, T, T]: causal, and within equal segment ids."""
    length = segment_ids.shape[1]
    return jnp.tril(jnp.ones((length, length), bool))[None] & (segment_ids[:, :, None] == segment_ids[:, None, :])


def select_implementation(requested: str, platform: str, has_segments: bool, interpret: bool = False) -> str:
    """The implementation of `causal_attention` that runs for `requested` on `platform`
    ("cpu", "gpu" / "cuda" / "rocm", "tpu": the mesh's devices', `parallel.mesh_platform`), on
    a mesh of any size; see the module docstring."""
    platform = "gpu" if platform in ("cuda", "rocm") else platform
    if requested not in IMPLEMENTATIONS:
        raise RecRankerError(
            f"attention implementation {requested!r} is unknown; expected one of {', '.join(IMPLEMENTATIONS)}")
    if requested == "auto":
        return DEFAULT_IMPLEMENTATION.get(platform, "xla")
    native = _NATIVE_PLATFORM.get(requested)
    interpretable = requested != "cudnn"  # the Pallas kernels
    if native is not None and platform != native and not (interpret and interpretable):
        runs_here = ", ".join(["auto", "tiled", "xla"] + [name for name, p in _NATIVE_PLATFORM.items() if p == platform])
        where = f"a {native.upper()}{' (or with interpret=True)' * interpretable}"
        raise RecRankerError(f"attention {requested!r} runs on {where}, not on {platform}: use one of {runs_here}")
    if requested == "cudnn" and has_segments:
        _warn_once("attention 'cudnn' has no segment ids: calls with segment_ids use 'pallas_gpu'")
        return "pallas_gpu"
    return requested


def _warn_once(message: str) -> None:
    if message not in _warned:
        _warned.add(message)
        warnings.warn(message, stacklevel=3)


def causal_attention(
    q: jax.Array, k: jax.Array, v: jax.Array, segment_ids: jax.Array | None = None,
    implementation: str = "auto", block: int = ATTENTION_BLOCK, interpret: bool = False,
) -> jax.Array:
    """Causal attention within segments: q [B, T, KV, G, D] (unscaled), k / v [B, T, KV, D],
    segment_ids [B, T] (None: one segment) -> [B, T, KV, G, D] in q's dtype. `block`: the tile
    of "tiled" and "xla" (the Pallas kernels use their own); `interpret`: Pallas interpret mode."""
    implementation = select_implementation(implementation, parallel.mesh_platform(), segment_ids is not None, interpret)
    if implementation == "pallas_gpu":
        return on_mesh(functools.partial(attention_kernels.pallas_gpu_attention, interpret=interpret), q, k, v, segment_ids)
    if implementation == "splash":
        return on_mesh(functools.partial(attention_kernels.splash_attention, interpret=interpret), q, k, v, segment_ids)
    if implementation == "cudnn":
        return on_mesh(lambda q, k, v, _: attention_kernels.cudnn_attention(q, k, v), q, k, v, None)
    if segment_ids is None:
        segment_ids = jnp.zeros(q.shape[:2], jnp.int32)
    if implementation == "xla":
        return xla_attention(q, k, v, segment_ids, block)
    return tiled_attention(q, k, v, segment_ids, block)


# Logical axes of the kernels' operands: the batch and the KV heads may be split, not time.
QUERY_AXES = ("batch", None, "kv_heads", None, None)


def kernel_specs(mesh_shape, q_shape: tuple[int, ...], rules: dict[str, list[str]]) -> tuple[PartitionSpec, ...]:
    """(q, k / v, segment_ids) PartitionSpecs of a kernel's operands on a mesh of `mesh_shape`:
    the batch along the mesh axes of "batch", the KV heads along those of "kv_heads" (or, without
    that rule, "heads"), each kept only where it divides the dimension (`parallel.array_spec`)."""
    if "kv_heads" not in rules and "heads" in rules:
        rules = {**rules, "kv_heads": rules["heads"]}
    entries = tuple(parallel.array_spec(mesh_shape, q_shape, QUERY_AXES, rules)) + (None,) * 3
    batch, heads = entries[0], entries[2]
    return (PartitionSpec(batch, None, heads, None, None), PartitionSpec(batch, None, heads, None),
            PartitionSpec(batch, None))


def on_mesh(kernel, q: jax.Array, k: jax.Array, v: jax.Array, segment_ids: jax.Array | None) -> jax.Array:
    """`kernel(q, k, v, segment_ids)` on each device's block under `jax.shard_map` over the
    current mesh (`parallel.sharding_context`; `kernel_specs` with its rules); one plain call
    outside a mesh or on a mesh of one device. Axes already manual (inside another shard_map)
    are left alone. `check_vma=False`: the library kernels declare no varying-axes types; the
    cost is that the gradients of operands whole along a mesh axis (KV heads that the tensor
    axis does not divide) are summed over it, after their cotangent was divided by its size."""
    mesh = parallel.current_mesh()
    manual = set(mesh.manual_axes) if mesh is not None else set()
    free = [name for name in (mesh.axis_names if mesh is not None else ()) if name not in manual]
    if not free or math.prod(mesh.shape[name] for name in free) == 1:
        return kernel(q, k, v, segment_ids)
    rules = {name: [axis for axis in axes if axis in free] for name, axes in parallel.current_rules().items()}
    q_spec, kv_spec, segment_spec = kernel_specs(mesh.shape, q.shape, rules)
    operands, specs = (q, k, v), (q_spec, kv_spec, kv_spec)
    if segment_ids is None:
        def block(q, k, v):
            return kernel(q, k, v, None)
    else:
        operands, specs, block = (*operands, segment_ids), (*specs, segment_spec), kernel
    return jax.shard_map(block, mesh=mesh, in_specs=specs, out_specs=q_spec, axis_names=set(free),
                         check_vma=False)(*operands)


def xla_attention(q: jax.Array, k: jax.Array, v: jax.Array, segment_ids: jax.Array, block: int) -> jax.Array:
    mask = causal_mask(segment_ids)
    return jnp.concatenate([
        masked_attention(q[:, s:s + block], k[:, :s + block], v[:, :s + block], mask[:, s:s + block, :s + block])
        for s in range(0, q.shape[1], block)
    ], axis=1)


def tiled_attention(q: jax.Array, k: jax.Array, v: jax.Array, segment_ids: jax.Array, block: int) -> jax.Array:
    length = q.shape[1]
    q, k, v, segment_ids = pad_time(q, k, v, segment_ids, block)
    # heads before time, so a tile is a contiguous [.., block, D] slab
    out = _flash(q.transpose(0, 2, 3, 1, 4), k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3), segment_ids, block)
    return out.transpose(0, 3, 1, 2, 4)[:, :length]


def _tile_mask(segments_q: jax.Array, segments_k: jax.Array, i, j, block: int) -> jax.Array:
    """[B, 1, 1, block, block] for query tile i and key tile j."""
    rows = i * block + jnp.arange(block)
    cols = j * block + jnp.arange(block)
    visible = (cols[None, :] <= rows[:, None])[None] & (segments_q[:, :, None] == segments_k[:, None, :])
    return visible[:, None, None]


def _scores(q_tile: jax.Array, k_tile: jax.Array) -> jax.Array:
    """[B, KV, G, bq, D] x [B, KV, bk, D] -> float32 [B, KV, G, bq, bk], scaled."""
    scale = 1.0 / jnp.sqrt(jnp.float32(q_tile.shape[-1]))
    return jnp.einsum("bkgqd,bksd->bkgqs", q_tile, k_tile.astype(q_tile.dtype), preferred_element_type=jnp.float32) * scale


def _flash_forward(q, k, v, segment_ids, block):
    """q [B, KV, G, T, D], k / v [B, KV, T, D] -> (out [B, KV, G, T, D], log-sum-exp [B, KV, G, T])."""
    batch, kv, groups, length, dim = q.shape
    outs, lses = [], []
    for i in range(length // block):
        q_tile = q[:, :, :, i * block:(i + 1) * block]
        segments_q = segment_ids[:, i * block:(i + 1) * block]

        def key_tile(j, carry, q_tile=q_tile, segments_q=segments_q, i=i):
            running_max, total, acc = carry
            k_tile = lax.dynamic_slice_in_dim(k, j * block, block, 2)
            v_tile = lax.dynamic_slice_in_dim(v, j * block, block, 2)
            mask = _tile_mask(segments_q, lax.dynamic_slice_in_dim(segment_ids, j * block, block, 1), i, j, block)
            scores = _scores(q_tile, k_tile)
            new_max = jnp.maximum(running_max, jnp.where(mask, scores, _MASKED).max(-1))
            weights = jnp.where(mask, jnp.exp(scores - new_max[..., None]), 0.0)
            correction = jnp.exp(running_max - new_max)
            total = total * correction + weights.sum(-1)
            acc = acc * correction[..., None] + jnp.einsum(
                "bkgqs,bksd->bkgqd", weights.astype(v.dtype), v_tile, preferred_element_type=jnp.float32)
            return new_max, total, acc

        init = (jnp.full((batch, kv, groups, block), _MASKED), jnp.zeros((batch, kv, groups, block)),
                jnp.zeros((batch, kv, groups, block, dim)))
        running_max, total, acc = lax.fori_loop(0, i + 1, key_tile, init)  # key tiles up to the diagonal
        outs.append((acc / total[..., None]).astype(q.dtype))
        lses.append(running_max + jnp.log(total))
    return jnp.concatenate(outs, axis=3), jnp.concatenate(lses, axis=3)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _flash(q, k, v, segment_ids, block):
    return _flash_forward(q, k, v, segment_ids, block)[0]


def _flash_fwd(q, k, v, segment_ids, block):
    out, lse = _flash_forward(q, k, v, segment_ids, block)
    return out, (q, k, v, segment_ids, out, lse)


def _flash_bwd(block, residuals, d_out):
    q, k, v, segment_ids, out, lse = residuals
    length = q.shape[3]
    tiles = length // block
    scale = 1.0 / jnp.sqrt(jnp.float32(q.shape[-1]))
    delta = jnp.sum(d_out.astype(jnp.float32) * out.astype(jnp.float32), axis=-1)  # [B, KV, G, T]
    d_q = jnp.zeros(q.shape, jnp.float32)
    d_ks, d_vs = [], []
    for j in range(tiles):
        k_tile, v_tile = k[:, :, j * block:(j + 1) * block], v[:, :, j * block:(j + 1) * block]
        segments_k = segment_ids[:, j * block:(j + 1) * block]

        def query_tile(i, carry, k_tile=k_tile, v_tile=v_tile, segments_k=segments_k, j=j):
            d_k, d_v, d_q = carry
            q_tile = lax.dynamic_slice_in_dim(q, i * block, block, 3)
            d_out_tile = lax.dynamic_slice_in_dim(d_out, i * block, block, 3)
            mask = _tile_mask(lax.dynamic_slice_in_dim(segment_ids, i * block, block, 1), segments_k, i, j, block)
            lse_tile = lax.dynamic_slice_in_dim(lse, i * block, block, 3)
            weights = jnp.where(mask, jnp.exp(_scores(q_tile, k_tile) - lse_tile[..., None]), 0.0)
            d_v = d_v + jnp.einsum("bkgqs,bkgqd->bksd", weights.astype(d_out.dtype), d_out_tile,
                                   preferred_element_type=jnp.float32)
            d_weights = jnp.einsum("bkgqd,bksd->bkgqs", d_out_tile, v_tile.astype(d_out.dtype),
                                   preferred_element_type=jnp.float32)
            d_scores = (weights * (d_weights - lax.dynamic_slice_in_dim(delta, i * block, block, 3)[..., None]) * scale)
            d_k = d_k + jnp.einsum("bkgqs,bkgqd->bksd", d_scores.astype(q.dtype), q_tile, preferred_element_type=jnp.float32)
            d_q_tile = lax.dynamic_slice_in_dim(d_q, i * block, block, 3) + jnp.einsum(
                "bkgqs,bksd->bkgqd", d_scores.astype(k.dtype), k_tile, preferred_element_type=jnp.float32)
            return d_k, d_v, lax.dynamic_update_slice_in_dim(d_q, d_q_tile, i * block, 3)

        zeros = jnp.zeros(k_tile.shape, jnp.float32)
        d_k, d_v, d_q = lax.fori_loop(j, tiles, query_tile, (zeros, zeros, d_q))  # query tiles from the diagonal
        d_ks.append(d_k)
        d_vs.append(d_v)
    d_k, d_v = jnp.concatenate(d_ks, axis=2), jnp.concatenate(d_vs, axis=2)
    return d_q.astype(q.dtype), d_k.astype(k.dtype), d_v.astype(v.dtype), None


_flash.defvjp(_flash_fwd, _flash_bwd)


def branch_attention(
    q: jax.Array, k: jax.Array, v: jax.Array, cache_k: jax.Array, cache_v: jax.Array,
    cache_valid: jax.Array, branch_ids: jax.Array,
) -> jax.Array:
    """Attention of continuations ("branches") of each cache row that share the row's cache.

    q [U, T, KV, G, D] and k / v [U, T, KV, D]: each row's branches packed one after another,
    of any lengths, with branch_ids [U, T] naming each token's branch (-1: padding);
    cache_k / cache_v [U, S, KV, D] with cache_valid [U, S] (the slots every branch sees).
    A token attends to the valid cache slots and to the earlier tokens of its own branch: one
    attention over the S + T keys of the row, so the cache is read once per row, not copied
    once per branch, and no compute goes to padding each branch to a common width.
    -> [U, T, KV, G, D]."""
    rows, length = q.shape[:2]
    mask = jnp.concatenate([jnp.broadcast_to(cache_valid[:, None, :], (rows, length, cache_valid.shape[1])),
                            causal_mask(branch_ids)], axis=-1)  # padding (-1): a branch of its own
    keys = jnp.concatenate([cache_k.astype(k.dtype), k], axis=1)
    values = jnp.concatenate([cache_v.astype(v.dtype), v], axis=1)
    return masked_attention(q, keys, values, mask)
