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
from safetensors.numpy import save_file

from recranker_jax.llm.hf_import import hf_parameter_names
from recranker_jax.llm.llama import Llama
from recranker_jax.parallel import is_primary, to_host


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


def export_hf(model: Llama, folder: str | Path) -> Path:
    """Write config.json and model.safetensors (float32, Hugging Face names and [out, in] layout).

    With several processes, every process must call it (weights split across processes are
    gathered one at a time); only the primary process writes the folder.
    """
    folder = Path(folder)
    primary = is_primary()
    flat = dict(nnx.to_flat_state(nnx.state(model, nnx.Param)))
    tensors = {}
    for hf_name, (path, transpose) in hf_parameter_names(model.config).items():
        array = to_host(flat[path].get_value())
        if primary:
            array = array.astype(np.float32)
            tensors[hf_name] = np.ascontiguousarray(array.T if transpose else array)
    if primary:
        folder.mkdir(parents=True, exist_ok=True)
        save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
        (folder / "config.json").write_text(json.dumps(hf_config(model), indent=2) + "\n")
    return folder
