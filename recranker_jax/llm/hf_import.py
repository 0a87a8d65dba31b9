"""Import a local Hugging Face LLaMA folder (config.json + safetensors shards) into the NNX model.

No hub access: the folder must hold the files. Each tensor is checked against
the model's shape and written into its parameter (transposed to [in, out]),
straight into its sharding when a mesh is given (`place_weights`, which the GGUF
import `llm.gguf_import` shares; a `.gguf` path goes there).
"""

from __future__ import annotations

import json
from contextlib import ExitStack
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh
from safetensors import safe_open

from recranker_jax.errors import RecRankerError
from recranker_jax.llm.layout import is_scanned_path
from recranker_jax.llm.llama import Llama, LlamaConfig, weight_axes
from recranker_jax.parallel import array_sharding


def read_config(folder: Path) -> LlamaConfig:
    path = folder / "config.json"
    if not path.is_file():
        raise RecRankerError(f"{path} not found: expected a Hugging Face LLaMA checkpoint folder")
    return LlamaConfig.from_hf(_read_json(path), str(path))


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as err:
        raise RecRankerError(f"{path}: not valid JSON ({err})") from None


def _open_shard(shard: Path, stack: ExitStack | None = None):
    """A safetensors file opened for reading (in `stack`), or one line naming the broken file."""
    from safetensors import SafetensorError

    try:
        handle = safe_open(shard, framework="numpy")
    except SafetensorError as err:
        raise RecRankerError(f"{shard}: not a readable safetensors file ({err}); write or copy it again") from None
    return stack.enter_context(handle) if stack is not None else handle


def _tensor_files(folder: Path) -> dict[str, Path]:
    """Tensor name -> shard file, from the index when there is one."""
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        weight_map = _read_json(index).get("weight_map")
        if not isinstance(weight_map, dict):
            raise RecRankerError(f"{index}: expected a weight_map of tensor name -> shard file")
        return {name: folder / shard for name, shard in weight_map.items()}
    shards = sorted(folder.glob("*.safetensors"))
    if not shards:
        raise RecRankerError(f"{folder}: no *.safetensors files; expected model.safetensors or sharded files with an index")
    names = {}
    for shard in shards:
        with _open_shard(shard) as handle:
            names.update({name: shard for name in handle.keys()})
    return names


def hf_parameter_names(cfg: LlamaConfig) -> dict[str, tuple[tuple, bool]]:
    """Hugging Face tensor name -> (path of the NNX parameter in the looped layout, transpose?)
    (`llm.layout` maps a looped path onto a scanned model's stacked parameter)."""
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


def load_hf_llama(folder: str | Path, mesh: Mesh | None = None, rules: dict[str, list[str]] | None = None,
                  **options) -> Llama:
    """The NNX model with the folder's weights; `options` are `Llama`'s (dtype, param_dtype,
    remat, scan_layers, attention).

    With a mesh, every parameter is created directly in its sharding (the config's logical
    axis rules): each device reads only its own slice of the memory-mapped safetensors (of
    each layer, for the stacked weights of scanned layers), so no process ever holds a full
    copy per device. A `.gguf` file (llama.cpp's format; `package:<pkg>/<file>` for one an
    installed package ships) goes to `gguf_import.load_gguf_llama`.
    """
    from recranker_jax.llm.gguf_import import load_gguf_llama
    from recranker_jax.model_files import resolve_model_path

    folder = resolve_model_path(folder)
    if folder.suffix == ".gguf":
        return load_gguf_llama(folder, mesh, rules, **options)
    if not folder.is_dir():
        raise RecRankerError(f"checkpoint folder {folder} not found")
    cfg = read_config(folder)
    files = _tensor_files(folder)
    handles: dict[Path, object] = {}
    with ExitStack() as stack:
        return place_weights(
            cfg, lambda name, transpose, expected: _tensor_slice(folder, files, handles, stack, name, transpose, expected),
            mesh, rules, **options)


def place_weights(cfg: LlamaConfig, tensor_reader, mesh: Mesh | None = None,
                  rules: dict[str, list[str]] | None = None, **options) -> Llama:
    """The `Llama(cfg, **options)` whose every parameter is read from its Hugging Face tensor:
    `tensor_reader(hf_name, transpose, expected)` checks the tensor against `expected` (its
    shape in the NNX layout, one layer's for stacked parameters) and returns `read(index)`, the
    NNX-layout slice at `index` as a numpy array. With a mesh, each device reads only its slice."""
    model = nnx.eval_shape(lambda: Llama(cfg, nnx.Rngs(0), **options))
    flat = dict(nnx.to_flat_state(nnx.state(model, nnx.Param)))
    # parameter path -> its tensors: one per layer ([layer, ...]) for a stacked parameter
    sources: dict[tuple, list[tuple[str, bool]]] = {}
    for hf_name, (looped_path, transpose) in hf_parameter_names(cfg).items():
        path = looped_path if looped_path in flat else ("layers", *looped_path[2:])
        sources.setdefault(path, []).append((hf_name, transpose))
    for path, tensors in sources.items():
        expected = tuple(flat[path].shape)
        stacked = is_scanned_path(path)
        slices = [tensor_reader(name, transpose, expected[1:] if stacked else expected) for name, transpose in tensors]
        target = flat[path].dtype

        def read(index, slices=slices, stacked=stacked, rank=len(expected), target=target):
            index = tuple(index) + (slice(None),) * (rank - len(index))
            if not stacked:
                return slices[0](index).astype(target)
            return np.stack([read_layer(index[1:]) for read_layer in slices[index[0]]]).astype(target)

        if mesh is None:
            value = jnp.asarray(read((slice(None),) * len(expected)))
        else:
            sharding = array_sharding(mesh, expected, weight_axes(path, len(expected)), rules or {})
            value = jax.make_array_from_callback(expected, sharding, read)
        flat[path].set_value(value)
    nnx.update(model, nnx.from_flat_state(flat))
    return model


def _tensor_slice(folder: Path, files: dict[str, Path], handles: dict, stack: ExitStack, hf_name: str,
                  transpose: bool, expected: tuple[int, ...]):
    """A reader of slices (in the NNX layout) of tensor `hf_name`, checked against `expected`."""
    if hf_name not in files:
        raise RecRankerError(f"{folder}: tensor {hf_name} is missing from the checkpoint")
    shard = files[hf_name]
    if shard not in handles:
        if not shard.is_file():
            raise RecRankerError(f"{shard} not found (listed in {folder / 'model.safetensors.index.json'})")
        handles[shard] = _open_shard(shard, stack)
    tensor = handles[shard].get_slice(hf_name)
    stored = tuple(tensor.get_shape())
    if (stored[::-1] if transpose else stored) != expected:
        raise RecRankerError(
            f"{shard}: tensor {hf_name} has shape {list(stored)}, expected "
            f"{list(expected[::-1] if transpose else expected)} from config.json"
        )

    def read(index: tuple) -> np.ndarray:
        from safetensors import SafetensorError

        try:
            return np.asarray(tensor[index[::-1]].T if transpose else tensor[index])
        except SafetensorError as err:
            raise RecRankerError(f"{shard}: tensor {hf_name} cannot be read ({err}); write or copy the file again") from None

    return read
