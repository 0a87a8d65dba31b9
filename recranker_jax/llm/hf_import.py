"""Import a local Hugging Face LLaMA folder (config.json + safetensors shards) into the NNX model.

No hub access: the folder must hold the files. Each tensor is checked against
the model's shape and written into its parameter (transposed to [in, out]).
"""

from __future__ import annotations

import json
from pathlib import Path

import jax.numpy as jnp
import numpy as np
from flax import nnx
from safetensors import safe_open

from recranker_jax.errors import RecRankerError
from recranker_jax.llm.llama import Llama, LlamaConfig


def read_config(folder: Path) -> LlamaConfig:
    path = folder / "config.json"
    if not path.is_file():
        raise RecRankerError(f"{path} not found: expected a Hugging Face LLaMA checkpoint folder")
    return LlamaConfig.from_hf(json.loads(path.read_text()), str(path))


def _tensor_files(folder: Path) -> dict[str, Path]:
    """Tensor name -> shard file, from the index when there is one."""
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
        return {name: folder / shard for name, shard in weight_map.items()}
    shards = sorted(folder.glob("*.safetensors"))
    if not shards:
        raise RecRankerError(f"{folder}: no *.safetensors files; expected model.safetensors or sharded files with an index")
    names = {}
    for shard in shards:
        with safe_open(shard, framework="numpy") as handle:
            names.update({name: shard for name in handle.keys()})
    return names


def hf_parameter_names(cfg: LlamaConfig) -> dict[str, tuple[tuple, bool]]:
    """Hugging Face tensor name -> (path of the NNX parameter, transpose?)."""
    names = {"model.embed_tokens.weight": (("embed_tokens", "embedding"), False),
             "model.norm.weight": (("norm", "weight"), False)}
    if not cfg.tie_word_embeddings:
        names["lm_head.weight"] = (("lm_head", "kernel"), True)
    for i in range(cfg.num_hidden_layers):
        prefix = f"model.layers.{i}"
        for proj in ("q_proj", "k_proj", "v_proj", "o_proj"):
            names[f"{prefix}.self_attn.{proj}.weight"] = (("layers", i, "self_attn", proj, "kernel"), True)
        for proj in ("gate_proj", "up_proj", "down_proj"):
            names[f"{prefix}.mlp.{proj}.weight"] = (("layers", i, "mlp", proj, "kernel"), True)
        for norm in ("input_layernorm", "post_attention_layernorm"):
            names[f"{prefix}.{norm}.weight"] = (("layers", i, norm, "weight"), False)
    return names


def load_hf_llama(folder: str | Path, dtype: jnp.dtype = jnp.float32) -> Llama:
    """The NNX model with the folder's weights."""
    folder = Path(folder).expanduser()
    if not folder.is_dir():
        raise RecRankerError(f"checkpoint folder {folder} not found")
    cfg = read_config(folder)
    model = nnx.eval_shape(lambda: Llama(cfg, nnx.Rngs(0)))
    state = nnx.state(model, nnx.Param)
    flat = dict(nnx.to_flat_state(state))
    files = _tensor_files(folder)
    for hf_name, (path, transpose) in hf_parameter_names(cfg).items():
        if hf_name not in files:
            raise RecRankerError(f"{folder}: tensor {hf_name} is missing from the checkpoint")
        with safe_open(files[hf_name], framework="numpy") as handle:
            tensor = handle.get_tensor(hf_name)
        tensor = tensor.T if transpose else tensor
        expected = flat[path].shape
        if tensor.shape != tuple(expected):
            raise RecRankerError(
                f"{files[hf_name]}: tensor {hf_name} has shape {list(tensor.shape)}, expected {list(expected)} from config.json"
            )
        flat[path].set_value(jnp.asarray(np.asarray(tensor, np.float32), dtype))
    nnx.update(model, nnx.from_flat_state(flat))
    return model
