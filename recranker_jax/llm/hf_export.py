"""Export the NNX LLaMA back to a Hugging Face folder (config.json + model.safetensors)
that transformers' `LlamaForCausalLM.from_pretrained` loads with the same logits.

LoRA adapters must be merged first (`recranker_jax.llm.lora.merge_lora`); the
adapter alone goes out in PEFT format from there. Works on weights sharded across
processes: every process takes part in the gather, the primary writes.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
from flax import nnx
from ml_dtypes import bfloat16
from safetensors.numpy import save_file

from recranker_jax.errors import RecRankerError
from recranker_jax.llm.hf_import import hf_parameter_names
from recranker_jax.llm.llama import Llama
from recranker_jax.parallel import is_primary, to_host

EXPORT_DTYPES = {"float32": np.float32, "bfloat16": bfloat16}


def hf_config(model: Llama) -> dict:
    cfg = model.config
    values = {k: v for k, v in dataclasses.asdict(cfg).items()
              if v is not None and k not in ("rope_theta", "rope_scaling_factor")}
    rope = {"rope_theta": cfg.rope_theta, "rope_type": "default"}
    if cfg.rope_scaling_factor != 1.0:
        rope = {"rope_theta": cfg.rope_theta, "rope_type": "linear", "factor": cfg.rope_scaling_factor}
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_act": "silu",
        "attention_bias": False,
        "mlp_bias": False,
        "rope_theta": cfg.rope_theta,  # read by older transformers
        "rope_parameters": rope,
        "head_dim": cfg.head_size,
        "torch_dtype": "float32",
        **values,
    }


def export_hf(model: Llama, folder: str | Path, dtype: str = "float32") -> Path:
    """Write config.json and model.safetensors (`dtype`: float32 or bfloat16; Hugging Face names
    and [out, in] layout).

    With several processes, every process must call it (weights split across processes are
    gathered one at a time); only the primary process writes the folder.
    """
    if dtype not in EXPORT_DTYPES:
        raise RecRankerError(f"export dtype {dtype!r}: expected one of {', '.join(EXPORT_DTYPES)}")
    folder = Path(folder)
    primary = is_primary()
    flat = {path: variable.get_value() for path, variable in nnx.to_flat_state(nnx.state(model, nnx.Param))}
    gathered: dict[tuple, np.ndarray] = {}  # stacked layers: gathered once, written per layer
    tensors = {}
    for hf_name, (path, transpose) in hf_parameter_names(model.config).items():
        if path in flat:
            array = to_host(flat[path])
        else:
            stacked_path = ("layers", *path[2:])
            if stacked_path not in gathered:
                gathered[stacked_path] = to_host(flat[stacked_path])
            array = gathered[stacked_path][path[1]]
        if primary:
            array = array.astype(EXPORT_DTYPES[dtype])
            tensors[hf_name] = np.ascontiguousarray(array.T if transpose else array)
    if primary:
        folder.mkdir(parents=True, exist_ok=True)
        save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
        config = {**hf_config(model), "torch_dtype": dtype}
        (folder / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    return folder
