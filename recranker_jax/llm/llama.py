"""LLaMA-2 architecture in Flax NNX, numerically matching Hugging Face's `LlamaForCausalLM`.

Token embedding, RMSNorm, rotary embeddings in the Hugging Face convention
(rotate-half, `rope_theta`), grouped-query attention, SwiGLU MLP, tied or
untied output head, and a KV cache (`Llama.extend`) for decoding and for
reusing a shared prompt prefix across a batch of continuations. The layers are
one stacked block run by `nnx.scan` (compile time and program size independent
of depth) or, with `scan_layers=False`, a Python loop over separate blocks.
Weights are stored [in, out] (Hugging Face stores [out, in]) and carry logical
axis names (`weight_axes`; stacked layers add a leading "layers" axis) that the
config's rules map onto the mesh. Parameters and computation each take float32
or bfloat16 (norms, softmax and rotary angles stay float32); `remat` names a
rematerialisation policy (`llm.remat`), `attention` a kernel (`llm.attention`).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx
from jax.ad_checkpoint import checkpoint_name

from recranker_jax.errors import RecRankerError
from recranker_jax.llm import remat as remat_policies
from recranker_jax.llm.attention import branch_attention, causal_attention, masked_attention


# Logical axes of each weight, by the name of the module holding it. Every kernel and embedding
# must be named here (`weight_axes` raises otherwise); norms and adapters are replicated.
WEIGHT_AXES = {
    "embed_tokens": ("vocab", "embed"),
    "q_proj": ("embed", "heads"),
    "k_proj": ("embed", "kv_heads"),
    "v_proj": ("embed", "kv_heads"),
    "o_proj": ("heads", "embed"),
    "gate_proj": ("embed", "mlp"),
    "up_proj": ("embed", "mlp"),
    "down_proj": ("mlp", "embed"),
    "lm_head": ("embed", "vocab"),
}


def weight_axes(path: tuple, ndim: int) -> tuple[str | None, ...]:
    """Logical axes of the parameter at `path`: a kernel or embedding takes its module's entry in
    `WEIGHT_AXES` (a RecRankerError when the module is not named there, rather than a weight
    silently replicated on every device); norm weights, LoRA adapters and random-stream state
    are replicated. Scanned layers' variables (a "layers" path without a layer number) lead
    with "layers"."""
    lead = ("layers",) if "layers" in path and not any(isinstance(p, int) for p in path) else ()
    replicated = lead + (None,) * (ndim - len(lead))
    if not path or path[-1] not in ("kernel", "embedding"):
        return replicated
    module = next((part for part in reversed(path) if isinstance(part, str) and part in WEIGHT_AXES), None)
    if module is None:
        raise RecRankerError(f"{'/'.join(map(str, path))}: no logical axes for this weight; add its module to "
                             "WEIGHT_AXES in recranker_jax/llm/llama.py")
    return lead + WEIGHT_AXES[module] if ndim == 2 + len(lead) else replicated


DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


@dataclasses.dataclass(frozen=True)
class LlamaConfig:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling_factor: float = 1.0  # Hugging Face "linear" rope scaling: positions / factor
    max_position_embeddings: int = 4096
    tie_word_embeddings: bool = False
    head_dim: int | None = None

    @property
    def head_size(self) -> int:
        return self.head_dim or self.hidden_size // self.num_attention_heads

    @classmethod
    def from_hf(cls, config: dict[str, Any], source: str = "config.json") -> LlamaConfig:
        """From a Hugging Face config.json dict; refuses other architectures and rope scaling
        other than "linear"."""
        model_type = config.get("model_type")
        if model_type != "llama":
            raise RecRankerError(f"{source}: model_type {model_type!r} is not supported; expected 'llama'")
        rope = dict(config.get("rope_parameters") or {})  # transformers >= 5 keeps rope_theta here
        scaling = config.get("rope_scaling") or (rope if rope.get("rope_type", "default") != "default" else None)
        kind = (scaling or {}).get("rope_type", (scaling or {}).get("type", "default"))
        if kind not in ("default", "linear"):
            raise RecRankerError(f"{source}: rope scaling {scaling} is not supported; expected none or rope_type 'linear'")
        for key, supported in (("hidden_act", "silu"), ("attention_bias", False), ("mlp_bias", False)):
            if config.get(key, supported) != supported:
                raise RecRankerError(f"{source}: {key}={config[key]!r} is not supported; expected {supported!r}")
        names = [f.name for f in dataclasses.fields(cls)]
        values = {k: config[k] for k in names if config.get(k) is not None}
        if "rope_theta" in rope and "rope_theta" not in values:
            values["rope_theta"] = float(rope["rope_theta"])
        if kind == "linear":
            values["rope_scaling_factor"] = float(scaling["factor"])
        values.setdefault("num_key_value_heads", config["num_attention_heads"])
        missing = [k for k in names[:6] if k not in values]
        if missing:
            raise RecRankerError(f"{source}: missing {', '.join(missing)}")
        return cls(**values)


def model_options(cfg: Any, training: bool = True) -> dict:
    """`Llama`'s keyword arguments from a run config (`model.*`, `train.remat`; no
    rematerialisation outside training)."""
    m = cfg.model
    return {"dtype": m.dtype, "param_dtype": m.param_dtype, "remat": cfg.train.remat if training else "none",
            "scan_layers": m.scan_layers, "attention": m.attention}


class RMSNorm(nnx.Module):
    def __init__(self, size: int, eps: float, param_dtype=jnp.float32):
        self.weight = nnx.Param(jnp.ones((size,), param_dtype))
        self.eps = eps

    def __call__(self, x: jax.Array) -> jax.Array:
        x32 = x.astype(jnp.float32)
        normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        return (self.weight[...].astype(x.dtype) * normed.astype(x.dtype)).astype(x.dtype)


def rotary(x: jax.Array, positions: jax.Array, theta: float, factor: float = 1.0) -> jax.Array:
    """Rotary embedding of x [B, T, H, D] at positions [B, T], Hugging Face's rotate-half layout."""
    half = x.shape[-1] // 2
    inv_freq = 1.0 / (theta ** (jnp.arange(0, half, dtype=jnp.float32) * 2 / x.shape[-1]))
    angles = positions[..., None].astype(jnp.float32) / factor * inv_freq  # [B, T, D/2]
    cos = jnp.cos(jnp.concatenate([angles, angles], -1))[:, :, None, :]
    sin = jnp.sin(jnp.concatenate([angles, angles], -1))[:, :, None, :]
    rotated = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
    return (x * cos + rotated * sin).astype(x.dtype)


@dataclasses.dataclass(frozen=True)
class Precision:
    """Parameter and compute dtypes."""

    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32


def _linear(in_size: int, out_size: int, rngs: nnx.Rngs, precision: Precision) -> nnx.Linear:
    return nnx.Linear(in_size, out_size, use_bias=False, rngs=rngs, dtype=precision.dtype,
                      param_dtype=precision.param_dtype, kernel_init=jax.nn.initializers.normal(0.02))


class Attention(nnx.Module):
    def __init__(self, cfg: LlamaConfig, rngs: nnx.Rngs, precision: Precision, implementation: str = "auto"):
        d, h, kv, hd = cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_size
        self.q_proj, self.k_proj = _linear(d, h * hd, rngs, precision), _linear(d, kv * hd, rngs, precision)
        self.v_proj, self.o_proj = _linear(d, kv * hd, rngs, precision), _linear(h * hd, d, rngs, precision)
        self.heads, self.kv_heads, self.head_size, self.theta = h, kv, hd, cfg.rope_theta
        self.rope_factor = cfg.rope_scaling_factor
        self.implementation = implementation

    def __call__(
        self, x: jax.Array, positions: jax.Array, segment_ids: jax.Array | None = None,
        cache: LayerCache | None = None, start: jax.Array | int = 0, mask: jax.Array | None = None,
        branch_ids: jax.Array | None = None,
    ) -> tuple[jax.Array, LayerCache | None]:
        """Without a cache: causal attention within `segment_ids` [B, T] (None: one segment).
        With a cache, this call's keys / values are written at `start` and the queries attend
        to the cached slots where `mask` [B, T, S_max] is true (no mask: a prefill, causal
        within `segment_ids` over this call's tokens only). With `branch_ids` [B, T], x holds
        continuations of each row packed one after another, which attend to the cached slots
        where `mask` [B, S_max] is true and to their own branch (`attention.branch_attention`);
        the cache is left as it is and the branches' own keys / values are returned instead."""
        batch, length, _ = x.shape
        q, k, v = (checkpoint_name(projection(x), name) for projection, name in
                   ((self.q_proj, "q_proj"), (self.k_proj, "k_proj"), (self.v_proj, "v_proj")))
        q = rotary(q.reshape(batch, length, self.heads, self.head_size), positions, self.theta, self.rope_factor)
        k = rotary(k.reshape(batch, length, self.kv_heads, self.head_size), positions, self.theta, self.rope_factor)
        v = v.reshape(batch, length, self.kv_heads, self.head_size)
        q = q.reshape(batch, length, self.kv_heads, self.heads // self.kv_heads, self.head_size)
        q, k, v = checkpoint_name(q, "query"), checkpoint_name(k, "key"), checkpoint_name(v, "value")
        if cache is None:
            out = causal_attention(q, k, v, segment_ids, self.implementation)
        elif branch_ids is not None:
            out = branch_attention(q, k, v, cache.keys, cache.values, mask, branch_ids)
            cache = LayerCache(k, v)
        else:
            keys = jax.lax.dynamic_update_slice(cache.keys, k.astype(cache.keys.dtype), (0, start, 0, 0))
            values = jax.lax.dynamic_update_slice(cache.values, v.astype(cache.values.dtype), (0, start, 0, 0))
            cache = LayerCache(keys, values)
            # no mask: a prefill, whose queries see only this call's tokens
            out = (causal_attention(q, k, v, segment_ids, self.implementation) if mask is None
                   else masked_attention(q, keys, values, mask))
        out = checkpoint_name(out, "attention")
        return checkpoint_name(self.o_proj(out.reshape(batch, length, self.heads * self.head_size)), "o_proj"), cache


class MLP(nnx.Module):
    def __init__(self, cfg: LlamaConfig, rngs: nnx.Rngs, precision: Precision):
        self.gate_proj = _linear(cfg.hidden_size, cfg.intermediate_size, rngs, precision)
        self.up_proj = _linear(cfg.hidden_size, cfg.intermediate_size, rngs, precision)
        self.down_proj = _linear(cfg.intermediate_size, cfg.hidden_size, rngs, precision)

    def __call__(self, x: jax.Array) -> jax.Array:
        gate, up = checkpoint_name(self.gate_proj(x), "gate_proj"), checkpoint_name(self.up_proj(x), "up_proj")
        return checkpoint_name(self.down_proj(jax.nn.silu(gate) * up), "down_proj")


class Block(nnx.Module):
    def __init__(self, cfg: LlamaConfig, rngs: nnx.Rngs, precision: Precision, attention: str = "auto"):
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, precision.param_dtype)
        self.self_attn = Attention(cfg, rngs, precision, attention)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, precision.param_dtype)
        self.mlp = MLP(cfg, rngs, precision)

    def __call__(self, x, positions, segment_ids=None, cache: LayerCache | None = None, start: jax.Array | int = 0,
                 mask=None, branch_ids=None):
        attended, cache = self.self_attn(self.input_layernorm(x), positions, segment_ids, cache, start, mask,
                                         branch_ids)
        x = x + attended
        return x + self.mlp(self.post_attention_layernorm(x)), cache


def layer_blocks(cfg: LlamaConfig, rngs: nnx.Rngs, precision: Precision, attention: str,
                 scan_layers: bool) -> Block | nnx.List:
    """All layers as one `Block` whose every variable has a leading layers axis (for `nnx.scan`),
    or, not `scan_layers`, that block's slices as separate blocks: the same initial weights
    from the same seed in either layout."""
    @nnx.split_rngs(splits=cfg.num_hidden_layers)
    @nnx.vmap(in_axes=0, out_axes=0)
    def create(rngs: nnx.Rngs) -> Block:
        return Block(cfg, rngs, precision, attention)

    stacked = create(rngs)
    if scan_layers:
        return stacked
    graphdef, state = nnx.split(stacked)
    return nnx.List([nnx.merge(graphdef, jax.tree.map(lambda a, i=i: a[i], state))
                     for i in range(cfg.num_hidden_layers)])


# The frozen weights of a LoRA model: every nnx.Param that is not an adapter.
_FROZEN = nnx.All(nnx.Param, nnx.Not(nnx.LoRAParam))


def _has_adapters(layers: nnx.Module) -> bool:
    return bool(jax.tree.leaves(nnx.state(layers, nnx.LoRAParam)))


def _layer(layer: Block, x: jax.Array, cache: LayerCache | None, attention: dict) -> tuple[jax.Array, LayerCache | None]:
    return layer(x, cache=cache, **attention)


class Llama(nnx.Module):
    """Causal LM: tokens [B, T] -> logits [B, T, V] (in the compute dtype).

    `scan_layers` stores the layers as one stacked `Block` (`model.layers`, every weight with a
    leading layers axis) run by `nnx.scan`, so the compiled program has one layer's code whatever
    the depth; otherwise `model.layers[i]` are separate blocks in a Python loop. `remat` is a
    `llm.remat` policy name, `attention` a `llm.attention.causal_attention` implementation.
    """

    def __init__(self, cfg: LlamaConfig, rngs: nnx.Rngs, dtype: str = "float32", param_dtype: str = "float32",
                 remat: str = "none", scan_layers: bool = True, attention: str = "auto"):
        self.config = cfg
        precision = Precision(DTYPES[dtype], DTYPES[param_dtype])
        self.dtype, self.remat, self.scan_layers = precision.dtype, remat_policies.resolve(remat), scan_layers
        self.embed_tokens = nnx.Embed(cfg.vocab_size, cfg.hidden_size, rngs=rngs, dtype=precision.dtype,
                                      param_dtype=precision.param_dtype,
                                      embedding_init=jax.nn.initializers.normal(0.02))
        self.layers = layer_blocks(cfg, rngs, precision, attention, scan_layers)
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, precision.param_dtype)
        self.lm_head = None if cfg.tie_word_embeddings else _linear(cfg.hidden_size, cfg.vocab_size, rngs, precision)

    def __call__(self, tokens: jax.Array, positions: jax.Array | None = None, segment_ids: jax.Array | None = None) -> jax.Array:
        """segment_ids [B, T] (optional): packed sequences attend only within their segment."""
        return self.head(self.hidden_states(tokens, positions, segment_ids))

    def hidden_states(self, tokens: jax.Array, positions: jax.Array | None = None,
                      segment_ids: jax.Array | None = None) -> jax.Array:
        """The last layer's output [B, T, hidden] (before the final norm and the output head)."""
        batch, length = tokens.shape
        if positions is None:
            positions = jnp.broadcast_to(jnp.arange(length), (batch, length))
        x, _ = self._run_layers(self.embed_tokens(tokens), None, self.remat,
                                {"positions": positions, "segment_ids": segment_ids})
        return x

    def _run_layers(self, x: jax.Array, cache: KVCache | None, remat: str,
                    attention: dict) -> tuple[jax.Array, KVCache | None]:
        """x through every layer, each with its slice of `cache` (None: cache-free), under the
        remat policy; returns x and the layers' returned caches, stacked."""
        if self.scan_layers and cache is None and remat != "none" and _has_adapters(self.layers):
            return self._scan_frozen_as_constants(x, remat, attention), None
        step = _layer
        if remat != "none":
            step = nnx.remat(_layer, policy=remat_policies.checkpoint_policy(remat), prevent_cse=not self.scan_layers)
        layer_caches = None if cache is None else LayerCache(cache.keys, cache.values)
        if self.scan_layers:
            scan = nnx.scan(step, in_axes=(0, nnx.Carry, 0, None), out_axes=(nnx.Carry, 0))
            x, layer_caches = scan(self.layers, x, layer_caches, attention)
        else:
            returned = []
            for index, layer in enumerate(self.layers):
                own = None if cache is None else LayerCache(cache.keys[index], cache.values[index])
                x, own = step(layer, x, own, attention)
                returned.append(own)
            if cache is not None:
                layer_caches = LayerCache(jnp.stack([c.keys for c in returned]), jnp.stack([c.values for c in returned]))
        return x, None if layer_caches is None else KVCache(layer_caches.keys, layer_caches.values)

    def _scan_frozen_as_constants(self, x: jax.Array, remat: str, attention: dict) -> jax.Array:
        """The scanned layers under remat when the base weights are frozen (LoRA): the stacked
        base weights enter the scan as constants and each layer's slice is taken inside the
        rematerialised function, so the backward pass reads the stacked weights again instead
        of the forward pass saving every layer's slice as a residual. (Scanned over as inputs,
        as `nnx.scan` does, the slices are saved: a second copy of the layers' weights; with
        it, the TPU compiler's temporaries for the 7B shapes on one v5e chip at 2048 tokens
        grew 0.54 GB a layer under remat dots, without it 0.16 GB.) Adapters and other state
        are scanned over as before; their updates (dropout's random counts) are written back."""
        graphdef, frozen, scanned = nnx.split(self.layers, _FROZEN, ...)

        def run(frozen, scanned, x, index):
            layer = nnx.merge(graphdef, jax.tree.map(lambda stacked: stacked[index], frozen), scanned)
            x, _ = layer(x, cache=None, **attention)
            return x, nnx.state(layer, nnx.Not(nnx.Param))

        run = jax.checkpoint(run, policy=remat_policies.checkpoint_policy(remat), prevent_cse=False)

        def body(x, slices):
            index, scanned = slices
            return run(frozen, scanned, x, index)

        x, updated = jax.lax.scan(body, x, (jnp.arange(self.config.num_hidden_layers), scanned))
        nnx.update(self.layers, updated)
        return x

    def head(self, x: jax.Array) -> jax.Array:
        """Logits of hidden states x [.., hidden]: the final norm, then the output head."""
        x = self.norm(x)
        if self.lm_head is None:
            return self.embed_tokens.attend(x)
        return self.lm_head(x)

    def head_weight(self) -> jax.Array:
        """The output head as a [hidden, vocab] matrix in the compute dtype (head(x) = norm(x) @ it)."""
        if self.lm_head is None:
            return self.embed_tokens.embedding[...].T.astype(self.dtype)
        return self.lm_head.kernel[...].astype(self.dtype)

    def extend(
        self, tokens: jax.Array, cache: KVCache, start: jax.Array | int,
        positions: jax.Array | None = None, key_valid: jax.Array | None = None, logits_at: jax.Array | None = None,
    ) -> tuple[jax.Array, KVCache]:
        """Logits of `tokens` [B, T] written into cache slots start..start+T-1, and the cache
        with their keys and values added. (Many continuations of one cached prefix:
        `extend_branches`, which does not copy the cache.)

        By default the rotary positions are the slots and every earlier slot is attended.
        Padded batches pass `positions` [B, T] (each row's own token positions) and
        `key_valid` [B, S_max] (the slots holding real tokens, these included): a query
        attends to valid slots at or before its own, so padding anywhere is ignored.
        `logits_at` [B] (optional): only that position's logits, [B, 1, V] (the output head
        over a long vocabulary is the costliest part of scoring one next token).
        """
        batch, length = tokens.shape
        slots = start + jnp.arange(length)
        if positions is None:
            positions = jnp.broadcast_to(slots, (batch, length))
        key_slots = jnp.arange(cache.max_length)
        mask = key_slots[None, None, :] <= slots[None, :, None]
        if key_valid is not None:
            mask = mask & key_valid[:, None, :]
        return self._cached_pass(tokens, cache, logits_at, positions=positions, start=start, mask=mask)

    def prefill(self, tokens: jax.Array, cache: KVCache, positions: jax.Array, valid: jax.Array,
                logits_at: jax.Array | None = None) -> tuple[jax.Array, KVCache]:
        """`extend` from slot 0 of an empty cache, with the cache-free causal attention (tiled on
        the CPU, no [T, T] scores): tokens / positions / valid [B, T], padding where `valid`
        is false (it attends to nothing real and nothing real attends to it)."""
        return self._cached_pass(tokens, cache, logits_at, positions=positions, segment_ids=valid.astype(jnp.int32))

    def extend_branches(
        self, tokens: jax.Array, cache: KVCache, positions: jax.Array, cache_valid: jax.Array,
        branch_ids: jax.Array, logits_at: jax.Array | None = None,
    ) -> tuple[jax.Array, KVCache]:
        """Logits of continuations ("branches") of every cache row, without copying the cache.

        tokens / positions / branch_ids [U, T]: each row's branches packed one after another
        (any lengths; `branch_ids` numbers each token's branch, -1 for padding); cache_valid
        [U, S_max]: the cached slots every branch attends to. Returns the logits [U, T, V]
        (or, with `logits_at` [U, R] indices, [U, R, V]) and the branches' own keys / values
        ([L, U, T, KV, D]; `KVCache.commit` appends a chosen branch to the cache).
        """
        return self._cached_pass(tokens, cache, logits_at, positions=positions, mask=cache_valid, branch_ids=branch_ids)

    def _cached_pass(self, tokens: jax.Array, cache: KVCache, logits_at: jax.Array | None,
                     **attention) -> tuple[jax.Array, KVCache]:
        """Every layer with its cache entry (`attention`: `Block`'s keyword arguments), then the
        logits, only at `logits_at` ([B] or [B, R] positions) when given; returns them and the
        layers' returned caches."""
        x, cache = self._run_layers(self.embed_tokens(tokens), cache, "none", attention)
        if logits_at is not None:
            x = jnp.take_along_axis(x, logits_at.reshape(logits_at.shape[0], -1, 1), axis=1)
        return self.head(x), cache


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class LayerCache:
    keys: jax.Array  # [B, S_max, KV, D]
    values: jax.Array


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class KVCache:
    """Every layer's keys and values, stacked: [L, B, S_max, KV, D] each (scanned or looped layers)."""

    keys: jax.Array
    values: jax.Array

    @property
    def max_length(self) -> int:
        return self.keys.shape[2]

    @classmethod
    def zeros(cls, cfg: LlamaConfig, batch: int, max_length: int, dtype: Any = jnp.float32) -> KVCache:
        shape = (cfg.num_hidden_layers, batch, max_length, cfg.num_key_value_heads, cfg.head_size)
        return cls(jnp.zeros(shape, dtype), jnp.zeros(shape, dtype))

    def repeat(self, batch: int) -> KVCache:
        """A batch-1 cache (a shared prefix) copied for `batch` continuations."""
        return jax.tree.map(lambda a: jnp.repeat(a, batch, axis=1), self)

    def grow(self, extra: int) -> KVCache:
        """The cache with `extra` empty slots appended."""
        return jax.tree.map(lambda a: jnp.pad(a, ((0, 0), (0, 0), (0, extra), (0, 0), (0, 0))), self)

    def commit(self, branches: KVCache, offsets: jax.Array, width: int, start: jax.Array | int) -> KVCache:
        """This cache with `width` tokens of `Llama.extend_branches`'s keys / values, from
        index `offsets[u]` of row u (a chosen branch), written into slots start..start+W-1."""
        def write(cached: jax.Array, own: jax.Array) -> jax.Array:
            index = jnp.minimum(offsets[:, None] + jnp.arange(width), own.shape[2] - 1)  # [U, W]
            picked = jnp.take_along_axis(own, index[None, :, :, None, None], axis=2)  # [L, U, W, KV, D]
            return jax.lax.dynamic_update_slice(cached, picked.astype(cached.dtype), (0, 0, start, 0, 0))
        return jax.tree.map(write, self, branches)
