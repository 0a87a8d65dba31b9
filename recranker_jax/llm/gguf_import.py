"""Import a LLaMA-architecture GGUF file (llama.cpp's format) into the NNX model.

The file's `llama.*` metadata gives the LlamaConfig; each tensor is dequantised to float32
with the `gguf` package (F32, F16, BF16 and the block quantisations it implements: Q4_0 ..
Q8_0, the K- and IQ-quants), the q/k rows llama.cpp permuted for its rotary layout are put
back in Hugging Face's order, and `hf_import.place_weights` places them (in their sharding on
a mesh). The file is opened through `model_files` (package references, the gguf reader).
"""

from __future__ import annotations

import functools
from pathlib import Path

import numpy as np
from jax.sharding import Mesh

from recranker_jax.errors import RecRankerError
from recranker_jax.llm.hf_import import place_weights
from recranker_jax.llm.llama import Llama, LlamaConfig
from recranker_jax.model_files import metadata, open_gguf, require_gguf, resolve_model_path

def gguf_config(reader, path: Path) -> LlamaConfig:
    """The LlamaConfig from the file's metadata; refuses other architectures, experts and rope
    scalings other than linear."""
    arch = metadata(reader, "general.architecture")
    if arch != "llama":
        raise RecRankerError(f"{path}: a GGUF of architecture {arch!r}; expected llama")
    keys = {"hidden_size": "embedding_length", "intermediate_size": "feed_forward_length",
            "num_hidden_layers": "block_count", "num_attention_heads": "attention.head_count"}
    values = {name: metadata(reader, f"llama.{key}") for name, key in keys.items()}
    missing = [f"llama.{keys[name]}" for name, value in values.items() if value is None]
    if missing:
        raise RecRankerError(f"{path}: the GGUF metadata has no {', '.join(missing)}")
    if metadata(reader, "llama.expert_count"):
        raise RecRankerError(f"{path}: a mixture-of-experts LLaMA GGUF; expected a dense model")
    names = {tensor.name for tensor in reader.tensors}
    embed = next((t for t in reader.tensors if t.name == "token_embd.weight"), None)
    if embed is None:
        raise RecRankerError(f"{path}: the GGUF file has no token_embd.weight tensor; expected a LLaMA model's weights")
    vocab = metadata(reader, "llama.vocab_size") or int(embed.shape[-1])  # ggml lists dimensions innermost first
    head_size = metadata(reader, "llama.attention.key_length") or values["hidden_size"] // values["num_attention_heads"]
    rotary = metadata(reader, "llama.rope.dimension_count")
    if rotary is not None and rotary != head_size:
        raise RecRankerError(f"{path}: llama.rope.dimension_count={rotary} rotates part of each head "
                             f"(head size {head_size}); expected the whole head")
    scaling = metadata(reader, "llama.rope.scaling.type") or "none"
    if scaling not in ("none", "linear") or "rope_freqs.weight" in names:
        raise RecRankerError(f"{path}: rope scaling {scaling if scaling != 'none' else 'rope_freqs (llama 3)'} is "
                             "not supported; expected none or linear")
    optional = {"num_key_value_heads": metadata(reader, "llama.attention.head_count_kv") or values["num_attention_heads"],
                "rms_norm_eps": metadata(reader, "llama.attention.layer_norm_rms_epsilon"),
                "rope_theta": metadata(reader, "llama.rope.freq_base"),
                "max_position_embeddings": metadata(reader, "llama.context_length"),
                "rope_scaling_factor": metadata(reader, "llama.rope.scaling.factor") if scaling == "linear" else None,
                "head_dim": metadata(reader, "llama.attention.key_length")}
    return LlamaConfig(vocab_size=vocab, tie_word_embeddings="output.weight" not in names, **values,
                       **{k: v for k, v in optional.items() if v is not None})


def unpermute_rotary_rows(weight: np.ndarray, heads: int) -> np.ndarray:
    """Undo llama.cpp's `permute` of q_proj / k_proj rows ([heads * head_size, in], Hugging Face's
    [out, in] order): per head it interleaved the two rotate-half halves; this puts them back."""
    half = weight.shape[0] // heads // 2
    return weight.reshape(heads, half, 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)


def _check_quantisations(gguf, reader, path: Path) -> None:
    """One line naming the first tensor whose type the installed gguf cannot dequantise."""
    for tensor in reader.tensors:
        qtype = tensor.tensor_type
        size = gguf.GGML_QUANT_SIZES[qtype][1]  # bytes per block
        try:
            gguf.quants.dequantize(np.zeros((1, size), np.uint8), qtype)
        except NotImplementedError:
            raise RecRankerError(f"{path}: tensor {tensor.name} is stored as {qtype.name}, a quantisation type "
                                 "the gguf package cannot dequantise; expected F32, F16, BF16, Q4_0-Q8_0, "
                                 "a K-quant or an IQ-quant") from None


def load_gguf_llama(path: str | Path, mesh: Mesh | None = None, rules: dict[str, list[str]] | None = None,
                    **options) -> Llama:
    """The NNX model with the GGUF file's weights, dequantised to float32 and then cast to the
    model's `param_dtype`; the same contract as `hf_import.load_hf_llama` (`options` are
    `Llama`'s; with a mesh every parameter is created in its sharding)."""
    path = resolve_model_path(path)
    gguf = require_gguf(path)
    reader = open_gguf(path)
    cfg = gguf_config(reader, path)
    _check_quantisations(gguf, reader, path)
    tensors = {tensor.name: tensor for tensor in reader.tensors}
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, cfg.num_hidden_layers)
    heads = {"attn_q": cfg.num_attention_heads, "attn_k": cfg.num_key_value_heads}

    @functools.lru_cache(maxsize=cfg.num_hidden_layers + 1)  # one parameter's layers, read per device
    def dequantised(gguf_name: str) -> np.ndarray:
        tensor = tensors[gguf_name]
        weight = gguf.quants.dequantize(tensor.data, tensor.tensor_type).astype(np.float32, copy=False)
        kind = gguf_name.split(".")[-2]
        return unpermute_rotary_rows(weight, heads[kind]) if kind in heads else weight

    def tensor_reader(hf_name: str, transpose: bool, expected: tuple[int, ...]):
        gguf_name = names.get_name(hf_name, try_suffixes=(".weight",))
        if gguf_name not in tensors:
            raise RecRankerError(f"{path}: tensor {gguf_name} ({hf_name}) is missing from the GGUF file")
        stored = tuple(int(n) for n in reversed(tensors[gguf_name].shape))  # ggml lists dimensions innermost first
        if (stored[::-1] if transpose else stored) != expected:
            raise RecRankerError(f"{path}: tensor {gguf_name} has shape {list(stored)}, expected "
                                 f"{list(expected[::-1] if transpose else expected)} from the GGUF metadata")

        def read(index: tuple) -> np.ndarray:
            weight = dequantised(gguf_name)
            return weight[index[::-1]].T if transpose else weight[index]

        return read

    return place_weights(cfg, tensor_reader, mesh, rules, **options)
