"""The two layouts of the LLaMA layers' variables and the conversion between them.

Scanned (`model.scan_layers`): one stacked block, paths ("layers", "mlp", "up_proj", "kernel")
holding [L, ...] arrays. Looped: separate blocks, paths ("layers", 3, "mlp", "up_proj",
"kernel") holding one layer's array. Hugging Face files, PEFT adapters and the finetune's
exported model are per layer whatever the layout; Orbax training checkpoints hold the layout
they were written with (`checkpoint_layout`).
"""

from __future__ import annotations

from collections.abc import Mapping

import jax.numpy as jnp
import numpy as np


def is_scanned_path(path: tuple) -> bool:
    return bool(path) and path[0] == "layers" and not (len(path) > 1 and isinstance(path[1], (int, np.integer)))


def value_in_layout(flat: Mapping[tuple, object], path: tuple):
    """The value for `path` (either layout) from `flat` (path -> array, either layout): a layer's
    slice of a stacked array, the stack of per-layer arrays, or the value itself."""
    if path in flat:
        return flat[path]
    if path and path[0] == "layers" and not is_scanned_path(path):
        return flat[("layers", *path[2:])][path[1]]
    if is_scanned_path(path) and ("layers", 0, *path[1:]) in flat:
        layers = []
        while ("layers", len(layers), *path[1:]) in flat:
            layers.append(flat[("layers", len(layers), *path[1:])])
        return jnp.stack(layers)
    raise KeyError(path)


def checkpoint_layout(layer_keys: list[str]) -> str:
    """"looped" when a checkpoint's `layers` entries are layer numbers, else "scanned"."""
    return "looped" if layer_keys and all(str(k).isdigit() for k in layer_keys) else "scanned"
