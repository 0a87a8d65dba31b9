"""Device meshes and logical-axis sharding, shared by retrieval and the LLM.

Model code names logical axes ("batch", "embed", "users", ...); the config's
`mesh.rules` maps them to mesh axes ("data", "fsdp", "tensor"). Nothing here
knows device counts: the mesh shape comes from the config, -1 taking the rest.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import jax
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

from recranker_jax.config import MeshConfig
from recranker_jax.errors import RecRankerError


def resolve_mesh_shape(shape: Sequence[int], n_devices: int) -> tuple[int, ...]:
    """Replace one -1 by the devices left over; check the product equals n_devices."""
    if any(s == 0 or s < -1 for s in shape):
        raise RecRankerError(f"mesh.shape={list(shape)}: entries must be positive or -1")
    wildcards = [i for i, s in enumerate(shape) if s == -1]
    if len(wildcards) > 1:
        raise RecRankerError(f"mesh.shape={list(shape)}: at most one entry may be -1")
    fixed = math.prod(s for s in shape if s != -1)
    if wildcards:
        if n_devices % fixed:
            raise RecRankerError(
                f"mesh.shape={list(shape)}: the fixed axes ({fixed} devices) do not divide "
                f"the {n_devices} available devices"
            )
        shape = [n_devices // fixed if s == -1 else s for s in shape]
    if math.prod(shape) != n_devices:
        raise RecRankerError(
            f"mesh.shape={list(shape)} needs {math.prod(shape)} devices, but {n_devices} are available"
        )
    return tuple(shape)


def make_mesh(cfg: MeshConfig, devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A mesh with `cfg.axes` names (all AxisType.Auto) over `devices` (default: all)."""
    devices = list(jax.devices() if devices is None else devices)
    if len(cfg.shape) != len(cfg.axes):
        raise RecRankerError(f"mesh.shape={cfg.shape} and mesh.axes={cfg.axes}: expected equal lengths")
    unknown = sorted({a for axes in cfg.rules.values() for a in axes} - set(cfg.axes))
    if unknown:
        raise RecRankerError(f"mesh.rules name mesh axes {unknown} that are not in mesh.axes={cfg.axes}")
    shape = resolve_mesh_shape(cfg.shape, len(devices))
    return jax.make_mesh(
        shape, tuple(cfg.axes), axis_types=(AxisType.Auto,) * len(shape), devices=devices
    )


def logical_spec(logical_axes: Sequence[str | None], rules: dict[str, list[str]]) -> PartitionSpec:
    """PartitionSpec for an array whose dimensions carry these logical names.

    A mesh axis is used at most once per array: a later dimension that maps to
    an axis already taken stays unsharded along it.
    """
    used: set[str] = set()
    entries: list[str | tuple[str, ...] | None] = []
    for name in logical_axes:
        mesh_axes = [a for a in (rules.get(name, []) if name else []) if a not in used]
        used.update(mesh_axes)
        entries.append(None if not mesh_axes else mesh_axes[0] if len(mesh_axes) == 1 else tuple(mesh_axes))
    return PartitionSpec(*entries)


def logical_sharding(mesh: Mesh, logical_axes: Sequence[str | None], rules: dict[str, list[str]]) -> NamedSharding:
    return NamedSharding(mesh, logical_spec(logical_axes, rules))


def axis_size(mesh: Mesh, logical_name: str, rules: dict[str, list[str]]) -> int:
    """How many shards a dimension with this logical name is split into on `mesh`."""
    return math.prod(mesh.shape[a] for a in rules.get(logical_name, []))
