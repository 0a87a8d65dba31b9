import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec

from recranker_jax.config import MeshConfig
from recranker_jax.errors import RecRankerError
from recranker_jax.config_checks import resolve_mesh_shape
from recranker_jax.parallel import axis_size, logical_sharding, logical_spec, make_mesh

RULES = MeshConfig().rules


def test_resolve_shape_fills_the_wildcard_and_refuses_mismatches():
    assert resolve_mesh_shape([-1, 1, 1], 8) == (8, 1, 1)
    assert resolve_mesh_shape([2, -1, 2], 8) == (2, 2, 2)
    with pytest.raises(RecRankerError, match=r"mesh.shape=\[2, 4, 1\] uses 8 devices, but a mesh must use all 2 available devices"):
        resolve_mesh_shape([2, 4, 1], 2)
    with pytest.raises(RecRankerError, match="do not divide the 8 available devices"):
        resolve_mesh_shape([3, -1, 1], 8)
    with pytest.raises(RecRankerError, match="at most one entry may be -1"):
        resolve_mesh_shape([-1, -1, 1], 8)


def test_logical_spec_uses_each_mesh_axis_once():
    assert logical_spec(["batch", "embed"], RULES) == PartitionSpec(("data", "fsdp"), None)
    assert logical_spec(["embed", "mlp"], RULES) == PartitionSpec("fsdp", "tensor")
    assert logical_spec([None, "unknown"], RULES) == PartitionSpec(None, None)


@pytest.mark.skipif(jax.device_count() < 8, reason="needs XLA_FLAGS=--xla_force_host_platform_device_count=8")
def test_sharded_array_on_2x2x2_mesh_splits_as_the_rules_say():
    mesh = make_mesh(MeshConfig(shape=[2, 2, 2]))
    assert dict(mesh.shape) == {"data": 2, "fsdp": 2, "tensor": 2}
    assert axis_size(mesh, "users", RULES) == 4 and axis_size(mesh, "mlp", RULES) == 2
    table = np.arange(16 * 6, dtype=np.float32).reshape(16, 6)
    sharded = jax.device_put(table, logical_sharding(mesh, ["users", "mlp"], RULES))
    shard_shapes = {s.data.shape for s in sharded.addressable_shards}
    assert shard_shapes == {(4, 3)}
    total = jax.jit(lambda x: jnp.sum(x * 2.0))(sharded)
    np.testing.assert_allclose(float(total), table.sum() * 2.0)


def test_make_mesh_checks_axes_and_rules():
    with pytest.raises(RecRankerError, match="expected equal lengths"):
        make_mesh(MeshConfig(shape=[-1, 1], axes=["data", "fsdp", "tensor"]))
    with pytest.raises(RecRankerError, match=r"mesh.rules name mesh axes \['model'\]"):
        make_mesh(MeshConfig(rules={"batch": ["model"]}))
