"""Library attention kernels behind `attention.causal_attention` (grouped-query layout:
q [B, T, KV, G, D], k / v [B, T, KV, D], segment_ids [B, T] or None; unscaled q).

Each wrapper pads the time axis to its kernel's tile (`pad_time`), reshapes to the kernel's
layout, applies the 1/sqrt(D) scale and slices the padding off again. The Pallas modules are
imported inside the functions, so importing this module needs no accelerator library.
"""

from __future__ import annotations

import concurrent.futures
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np

from recranker_jax.errors import RecRankerError

# Segment id of the rows added to reach a whole number of tiles: no real token has it, so
# padding attends only to padding (itself, causally), and no row is ever left empty.
PAD_SEGMENT = jnp.iinfo(jnp.int32).min

# Triton flash attention (jax.experimental.pallas.ops.gpu.attention.mha): query x key tile
# of the forward kernel, and the four tiles of its fused backward kernel. These are the
# library's defaults, not tuned for LLaMA shapes (no GPU to measure on when written).
# Powers of two (Triton); short sequences use smaller tiles, down to the backward tile.
PALLAS_GPU_BLOCK = 128
PALLAS_GPU_BACKWARD_BLOCK = 32

# TPU splash attention: the time axis is padded to a multiple of SPLASH_TILE (the TPU lane
# width); the kernel's blocks are the largest of SPLASH_BLOCKS dividing the padded length
# (512 is the usual best block on TPU v4/v5; not measured here).
SPLASH_TILE = 128
SPLASH_BLOCKS = (512, 256, 128)


def pad_time(q, k, v, segment_ids, multiple: int):
    """Pads the time axis of q, k, v and segment_ids to a multiple of `multiple`; the new rows
    get PAD_SEGMENT. segment_ids None stays None when nothing is padded (one segment)."""
    length = q.shape[1]
    padded = -(-length // multiple) * multiple
    if padded == length:
        return q, k, v, segment_ids
    if segment_ids is None:
        segment_ids = jnp.zeros(q.shape[:2], jnp.int32)
    pad = [(0, 0), (0, padded - length)]
    q, k, v = (jnp.pad(a, pad + [(0, 0)] * (a.ndim - 2)) for a in (q, k, v))
    return q, k, v, jnp.pad(segment_ids, pad, constant_values=PAD_SEGMENT)


def pallas_gpu_attention(q, k, v, segment_ids, interpret: bool = False) -> jax.Array:
    """Triton flash attention (GPU; `interpret` runs it on any platform). The kernel has no
    grouped-query heads: each KV head is repeated for its G query heads."""
    from jax.experimental.pallas.ops.gpu import attention as triton_attention

    batch, length, kv, groups, dim = q.shape
    tile = min(PALLAS_GPU_BLOCK, max(PALLAS_GPU_BACKWARD_BLOCK, 1 << (length - 1).bit_length()))
    q, k, v, segment_ids = pad_time(q, k.astype(q.dtype), v.astype(q.dtype), segment_ids, tile)
    padded = q.shape[1]
    backward = min(PALLAS_GPU_BACKWARD_BLOCK, tile)
    blocks = triton_attention.BlockSizes(
        block_q=tile, block_k=tile, block_q_dkv=backward, block_kv_dkv=backward,
        block_q_dq=backward, block_kv_dq=backward)
    out = triton_attention.mha(
        q.reshape(batch, padded, kv * groups, dim),  # head kv * G + g, as jnp.repeat orders them
        jnp.repeat(k, groups, axis=2), jnp.repeat(v, groups, axis=2), segment_ids,
        sm_scale=1.0 / math.sqrt(dim), causal=True, block_sizes=blocks, interpret=interpret)
    return out.reshape(batch, padded, kv, groups, dim)[:, :length]


def cudnn_attention(q, k, v) -> jax.Array:
    """cuDNN flash attention through `jax.nn.dot_product_attention` (GPU, float16 / bfloat16,
    one sequence per row: cuDNN's causal mask has no segment ids). GQA is native."""
    if q.dtype not in (jnp.float16, jnp.bfloat16):
        raise RecRankerError(f"attention 'cudnn' needs float16 or bfloat16 inputs, got {q.dtype}; "
                             "use 'pallas_gpu' or 'xla'")
    batch, length, kv, groups, dim = q.shape
    out = jax.nn.dot_product_attention(
        q.reshape(batch, length, kv * groups, dim), k.astype(q.dtype), v.astype(q.dtype),
        is_causal=True, implementation="cudnn")  # query head n uses key head n // G
    return out.reshape(q.shape)


@functools.lru_cache(maxsize=32)
def _splash_kernel(heads: int, length: int, block: int, interpret: bool):
    """The splash kernel for `heads` causal heads of `length`, once per shape. Its mask tables
    are built in NumPy and made device arrays by the library: that runs in a thread of its own,
    outside the caller's trace and mesh (JAX's trace and mesh contexts are per thread), so no
    tracer is cached and no array is placed on the mesh (a TPU topology's devices, in an
    ahead-of-time compile, run nothing); the tables are kept as NumPy arrays, which carry no
    mesh for another trace to refuse."""
    from jax.experimental.pallas.ops.tpu import splash_attention as splash

    mask = splash.MultiHeadMask([splash.CausalMask((length, length))] * heads)
    blocks = splash.BlockSizes(
        block_q=block, block_kv=block, block_kv_compute=block, block_q_dkv=block, block_kv_dkv=block,
        block_kv_dkv_compute=block, block_q_dq=block, block_kv_dq=block)
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        kernel = pool.submit(splash.make_splash_mha_single_device, mask, block_sizes=blocks,
                             interpret=interpret).result()
    return jax.tree.map(np.asarray, kernel)


def splash_attention(q, k, v, segment_ids, interpret: bool = False) -> jax.Array:
    """TPU splash attention (`interpret` runs it on any platform), vmapped over the batch. The
    kernel's MHA takes fewer KV heads than query heads: query head h uses KV head h // G."""
    from jax.experimental.pallas.ops.tpu.splash_attention import SegmentIds

    batch, length, kv, groups, dim = q.shape
    q = q * jnp.asarray(1.0 / math.sqrt(dim), q.dtype)  # the kernel does not scale
    q, k, v, segment_ids = pad_time(q, k.astype(q.dtype), v.astype(q.dtype), segment_ids, SPLASH_TILE)
    padded = q.shape[1]
    block = next(b for b in SPLASH_BLOCKS if padded % b == 0)
    kernel = _splash_kernel(kv * groups, padded, block, interpret)
    q_heads = q.transpose(0, 2, 3, 1, 4).reshape(batch, kv * groups, padded, dim)
    k_heads, v_heads = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)
    if segment_ids is None:
        out = jax.vmap(kernel)(q_heads, k_heads, v_heads)
    else:
        out = jax.vmap(lambda q, k, v, s: kernel(q, k, v, segment_ids=SegmentIds(q=s, kv=s)))(
            q_heads, k_heads, v_heads, segment_ids)
    return out.reshape(batch, kv, groups, padded, dim).transpose(0, 3, 1, 2, 4)[:, :length].astype(q.dtype)
