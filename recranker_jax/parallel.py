"""Device meshes and logical-axis sharding, shared by retrieval and the LLM.

Model code names logical axes ("batch", "embed", "users", ...); the config's
`mesh.rules` maps them to mesh axes ("data", "fsdp", "tensor"). Nothing here
knows device counts: the mesh shape comes from the config, -1 taking the rest.
`place_array`, `place_tree` and `place_batch` put host values on a mesh;
`sharding_context(mesh, rules)` gives traced code (the attention kernels' `shard_map`) the
mesh, its devices' platform and the rules.

Runs over several processes (TPU pods, Slurm, local tests): `initialize_distributed` joins
them from the environment, `is_primary` says which one writes files, `to_host` gathers a
global array, and `on_primary` runs host-side work once while the others wait.
"""

from __future__ import annotations

import contextlib
import contextvars
import itertools
import math
import os
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import TypeVar

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import AbstractMesh, AxisType, Mesh, NamedSharding, PartitionSpec

from recranker_jax.config import MeshConfig
from recranker_jax.config_checks import check_mesh, resolve_mesh_shape, shards
from recranker_jax.errors import RecRankerError

T = TypeVar("T")


def make_mesh(cfg: MeshConfig, devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A mesh with `cfg.axes` names (all AxisType.Auto) over `devices` (default: all)."""
    devices = list(jax.devices() if devices is None else devices)
    check_mesh(cfg.shape, cfg.axes, cfg.rules)
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
    return shards(logical_name, rules, dict(mesh.shape))


# ----------------------------------------------------------------------------- XLA flags

# Set by the program on every run (XLA reads XLA_FLAGS once, when the first backend starts).
# The latency-hiding scheduler overlaps collectives and copies with compute on GPUs (the other
# backends ignore xla_gpu_* flags). A flag the user already set keeps the user's value;
# RECRANKER_XLA_FLAGS=off adds none.
ACCELERATOR_FLAGS = ("--xla_gpu_enable_latency_hiding_scheduler=true",)


def set_xla_flags(environ: dict | None = None) -> str:
    """Add `ACCELERATOR_FLAGS` to XLA_FLAGS in `environ` (default os.environ); returns XLA_FLAGS.
    Call it before any JAX computation."""
    environ = os.environ if environ is None else environ
    flags = environ.get("XLA_FLAGS", "")
    if environ.get("RECRANKER_XLA_FLAGS", "") == "off":
        return flags
    given = {part.split("=")[0] for part in flags.split()}
    added = [flag for flag in ACCELERATOR_FLAGS if flag.split("=")[0] not in given]
    if added:
        environ["XLA_FLAGS"] = " ".join([flags, *added]).strip()
    return environ.get("XLA_FLAGS", "")


def skip_absent_tpu(environ: dict | None = None) -> str | None:
    """With libtpu installed (the `tpu` extra, for `recranker compile`) on a machine without a
    TPU, JAX would try to start a TPU backend first: seconds of start-up and lines of libtpu
    warnings before it falls back to the CPU. There, unless JAX_PLATFORMS is set or a CUDA
    plugin is installed, use the CPU (JAX_PLATFORMS=cpu; the TPU compiler still describes
    slices). Returns the JAX_PLATFORMS it set, else None. Call it before any JAX computation."""
    import importlib.util
    from pathlib import Path

    environ = os.environ if environ is None else environ
    if "JAX_PLATFORMS" in environ or importlib.util.find_spec("libtpu") is None:
        return None
    has_tpu = any(Path("/dev").glob("accel*")) or Path("/dev/vfio").is_dir()
    has_cuda = any(importlib.util.find_spec(name) for name in ("jax_cuda12_plugin", "jax_cuda13_plugin"))
    if has_tpu or has_cuda:
        return None
    environ["JAX_PLATFORMS"] = "cpu"
    return "cpu"


# ----------------------------------------------------------------------------- several processes
#
# One process per host (TPU VM, Slurm task, or a local process in tests) runs the same
# program; `jax.distributed.initialize` joins them into one runtime whose devices form the
# global mesh. The environment says how: explicit RECRANKER_* variables (any machine), or
# Slurm / a TPU pod, where JAX's own cluster detection finds the coordinator.

EXPLICIT_VARIABLES = ("RECRANKER_COORDINATOR", "RECRANKER_NUM_PROCESSES", "RECRANKER_PROCESS_ID")
CPU_COLLECTIVES = ("gloo", "mpi")


def _positive_int(environ: Mapping[str, str], name: str, minimum: int) -> int:
    value = environ[name]
    try:
        number = int(value)
    except ValueError:
        number = minimum - 1
    if number < minimum:
        raise RecRankerError(f"{name}={value}: expected an integer >= {minimum}")
    return number


def distributed_settings(environ: Mapping[str, str]) -> dict | None:
    """How to join the processes of this run, read from `environ`; None for a single process.

    - RECRANKER_DISTRIBUTED=off: a single process whatever else is set; =auto: JAX's cluster
      detection (`jax.distributed.initialize()` without arguments).
    - RECRANKER_COORDINATOR (host:port), RECRANKER_NUM_PROCESSES, RECRANKER_PROCESS_ID: all
      three or none; RECRANKER_CPU_COLLECTIVES (gloo, the default with several processes, or mpi)
      is what the CPU backend uses between processes (the only backend that reads it, so gloo is
      also the default of the auto form).
    - Slurm inside an `srun` step with more than one task, or a TPU pod (several
      TPU_WORKER_HOSTNAMES, or MEGASCALE_COORDINATOR_ADDRESS): JAX's cluster detection.

    Returns {"coordinator_address", "num_processes", "process_id", "cpu_collectives"} for the
    explicit form, {"auto": True, "cpu_collectives"} for cluster detection.
    """
    collectives = environ.get("RECRANKER_CPU_COLLECTIVES")
    if collectives is not None and collectives not in CPU_COLLECTIVES:
        raise RecRankerError(f"RECRANKER_CPU_COLLECTIVES={collectives}: expected one of {', '.join(CPU_COLLECTIVES)}")
    mode = environ.get("RECRANKER_DISTRIBUTED", "")
    if mode not in ("", "off", "auto"):
        raise RecRankerError(f"RECRANKER_DISTRIBUTED={mode}: expected off or auto (or unset)")
    if mode == "off":
        return None
    given = [name for name in EXPLICIT_VARIABLES if environ.get(name)]
    if given:
        missing = [name for name in EXPLICIT_VARIABLES if name not in given]
        if missing:
            raise RecRankerError(f"{given[0]} is set but {missing[0]} is not: set all of {', '.join(EXPLICIT_VARIABLES)}")
        coordinator = environ["RECRANKER_COORDINATOR"]
        host, _, port = coordinator.rpartition(":")
        if not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise RecRankerError(f"RECRANKER_COORDINATOR={coordinator}: expected host:port, e.g. 10.0.0.2:8476")
        num_processes = _positive_int(environ, "RECRANKER_NUM_PROCESSES", 1)
        process_id = _positive_int(environ, "RECRANKER_PROCESS_ID", 0)
        if process_id >= num_processes:
            raise RecRankerError(
                f"RECRANKER_PROCESS_ID={process_id}: expected 0 to {num_processes - 1} "
                f"(RECRANKER_NUM_PROCESSES={num_processes})"
            )
        if num_processes == 1:
            return None
        return {"coordinator_address": coordinator, "num_processes": num_processes, "process_id": process_id,
                "cpu_collectives": collectives or "gloo"}
    slurm_tasks = environ.get("SLURM_NTASKS", "1")
    in_slurm_step = "SLURM_JOB_ID" in environ and "SLURM_STEP_NODELIST" in environ
    tpu_hosts = [h for h in environ.get("TPU_WORKER_HOSTNAMES", "").split(",") if h.strip()]
    if (mode == "auto" or (in_slurm_step and slurm_tasks.isdigit() and int(slurm_tasks) > 1)
            or len(tpu_hosts) > 1 or environ.get("MEGASCALE_COORDINATOR_ADDRESS")):
        return {"auto": True, "cpu_collectives": collectives or "gloo"}
    return None


def initialize_distributed(environ: Mapping[str, str] | None = None) -> dict | None:
    """Join this process to the others of its run (see `distributed_settings`); a no-op for a
    single process and when already initialised. Call it before any JAX computation."""
    settings = distributed_settings(os.environ if environ is None else environ)
    if settings is None or jax.distributed.is_initialized():
        return settings
    if settings["cpu_collectives"]:
        jax.config.update("jax_cpu_collectives_implementation", settings["cpu_collectives"])
    if settings.get("auto"):
        jax.distributed.initialize()
    else:
        jax.distributed.initialize(
            coordinator_address=settings["coordinator_address"], num_processes=settings["num_processes"],
            process_id=settings["process_id"],
        )
    return settings


def is_primary() -> bool:
    """True in the process that writes the run's files and logs (process 0)."""
    return jax.process_index() == 0


def to_host(value: jax.Array) -> np.ndarray:
    """The whole of `value` as a NumPy array in every process (a collective when other
    processes hold parts of it: every process must call it, in the same order)."""
    if isinstance(value, jax.Array) and not value.is_fully_addressable:
        return np.asarray(multihost_utils.process_allgather(value, tiled=True))
    return np.asarray(value)


_exchanges = itertools.count()


def on_primary(name: str, action: Callable[[], T], others: Callable[[], None] | None = None,
               timeout_s: float = 7 * 24 * 3600) -> T | None:
    """Run `action` in the primary process and `others` (if any) in the rest; the rest return
    only once the primary's action finished.

    Returns the action's result in the primary, None elsewhere. A failure in the primary is
    raised in every process (a RecRankerError in the others), so none waits forever. The wait
    uses the distributed runtime's key-value store, not a device collective, so it may last as
    long as the action does. Every process must make the same sequence of calls.
    """
    if jax.process_count() == 1:
        return action()
    # The runtime's key-value store (no public API yet; Orbax uses it the same way).
    from jax._src.distributed import global_state

    client = global_state.client
    key = f"recranker/{next(_exchanges)}/{name}"
    if not is_primary():
        if others is not None:
            others()
        status = client.blocking_key_value_get(key, int(timeout_s * 1000))
        if status != "ok":
            raise RecRankerError(f"process 0 failed in {name}: {status}")
        return None
    try:
        result = action()
    except RecRankerError as err:
        client.key_value_set(key, " ".join(str(err).split()))
        raise
    except BaseException as err:
        client.key_value_set(key, f"{type(err).__name__} (see the log of process 0)")
        raise
    client.key_value_set(key, "ok")
    return result


def broadcast_text(name: str, text: str | None) -> str:
    """The primary's `text` in every process (the others pass None); no device collective."""
    if jax.process_count() == 1:
        return text or ""
    from jax._src.distributed import global_state

    client = global_state.client
    key = f"recranker/{next(_exchanges)}/{name}"
    if is_primary():
        client.key_value_set(key, text or "")
        return text or ""
    return client.blocking_key_value_get(key, 3600 * 1000)


def gather_text(name: str, text: str, timeout_s: float = 3600) -> list[str]:
    """Every process's `text`, in process order, in every process; no device collective."""
    if jax.process_count() == 1:
        return [text]
    from jax._src.distributed import global_state

    client = global_state.client
    key = f"recranker/{next(_exchanges)}/{name}"
    client.key_value_set(f"{key}/{jax.process_index()}", text)
    return [client.blocking_key_value_get(f"{key}/{i}", int(timeout_s * 1000)) for i in range(jax.process_count())]


def array_spec(mesh_shape: Mapping[str, int], shape: Sequence[int], logical_axes: Sequence[str | None],
               rules: dict[str, list[str]]) -> PartitionSpec:
    """The PartitionSpec of an array of `shape` by its logical axes on a mesh of `mesh_shape`
    (axis name -> size), leaving a dimension unsharded along mesh axes that do not divide it
    (e.g. a vocabulary of 32,001 over 2 tensor shards)."""
    entries = []
    for size, entry in zip(shape, logical_spec(logical_axes, rules)):
        axes = [] if entry is None else [entry] if isinstance(entry, str) else list(entry)
        kept: list[str] = []
        for axis in axes:
            if size % (math.prod(mesh_shape[a] for a in kept) * mesh_shape[axis]) == 0:
                kept.append(axis)
        entries.append(None if not kept else kept[0] if len(kept) == 1 else tuple(kept))
    while entries and entries[-1] is None:  # P(None,) and P() are one sharding; jit sees the short form
        entries.pop()
    return PartitionSpec(*entries)


def array_sharding(mesh: Mesh, shape: Sequence[int], logical_axes: Sequence[str | None], rules: dict[str, list[str]]) -> NamedSharding:
    """The sharding of an array of `shape` by its logical axes (`array_spec`) on `mesh`."""
    return NamedSharding(mesh, array_spec(mesh.shape, shape, logical_axes, rules))


# ----------------------------------------------------------------------------- the mesh at trace time
#
# Most of the model is partitioned by XLA from its arrays' shardings. A Pallas kernel is not
# (XLA cannot partition a custom kernel): the attention kernels run under `jax.shard_map`, and
# need the mesh and the rules while they are traced. `sharding_context` provides both.

_RULES: contextvars.ContextVar[dict[str, list[str]] | None] = contextvars.ContextVar("recranker_rules", default=None)


@contextlib.contextmanager
def sharding_context(mesh: Mesh | None, rules: Mapping[str, list[str]]) -> Iterator[None]:
    """`jax.set_mesh(mesh)` and the config's logical-axis `rules`, for everything traced inside:
    the one call to make around a jitted step's call or `.lower(...)` when its arrays are on
    `mesh` (a mesh of real devices or of a topology's, for an ahead-of-time compile):

        with parallel.sharding_context(mesh, cfg.mesh.rules):
            compiled = jitted_step.lower(*abstract_inputs).compile()

    `current_mesh`, `current_rules` and `mesh_platform` read it (the attention kernels run under
    `shard_map` over this mesh, for its devices' platform). `mesh` None: a no-op. A jitted
    function's cache knows the mesh but not the rules: one process keeps one set of rules per mesh."""
    if mesh is None:
        yield
        return
    token = _RULES.set({name: list(axes) for name, axes in rules.items()})
    try:
        with jax.set_mesh(mesh):
            yield
    finally:
        _RULES.reset(token)


def current_mesh() -> AbstractMesh | None:
    """The mesh of the enclosing `sharding_context` (or `jax.set_mesh`), abstract (its axis
    names, sizes and device platform); None outside one."""
    mesh = jax.sharding.get_abstract_mesh()
    return None if mesh.empty else mesh


def current_rules() -> dict[str, list[str]]:
    """The rules of the enclosing `sharding_context`; the default rules (`MeshConfig`) under a
    bare `jax.set_mesh` or outside any mesh."""
    rules = _RULES.get()
    return MeshConfig().rules if rules is None else rules


def mesh_platform() -> str:
    """The platform of the current mesh's devices ("cpu", "gpu", "tpu"; a TPU topology's mesh
    on a CPU machine says "tpu"), else of this machine's default backend."""
    mesh = current_mesh()
    device = None if mesh is None else mesh.abstract_device
    return getattr(device, "platform", None) or jax.default_backend()


# ----------------------------------------------------------------------------- placing host values on a mesh
#
# Every process passes the same whole value; across processes each copies only its own
# devices' blocks (nothing is sent between processes, and the whole is not checked).

BATCH_AXES = ("batch", None)  # a packed batch's [rows, tokens] arrays


def place_array(value, sharding: NamedSharding) -> jax.Array:
    """`value` (the same on every process) in `sharding`."""
    if sharding.is_fully_addressable:
        return jax.device_put(value, sharding)
    host = np.asarray(value)
    return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])


def place_tree(tree: T, mesh: Mesh | None, specs) -> T:
    """Every leaf of `tree` on `mesh` by `specs`, a tree of PartitionSpecs that is a prefix of
    `tree` (one spec for a whole subtree); `tree` unchanged without a mesh."""
    if mesh is None:
        return tree

    def place_subtree(spec: PartitionSpec, subtree):
        sharding = NamedSharding(mesh, spec)
        return jax.tree.map(lambda value: place_array(value, sharding), subtree)

    return jax.tree.map(place_subtree, specs, tree, is_leaf=lambda x: isinstance(x, PartitionSpec))


def place_batch(batch: dict, mesh: Mesh | None, rules: dict[str, list[str]]) -> dict[str, jax.Array]:
    """A global batch of [rows, ...] arrays with its rows split along the logical "batch" axis;
    plain device arrays without a mesh."""
    if mesh is None:
        return {k: jnp.asarray(v) for k, v in batch.items()}
    sharding = NamedSharding(mesh, logical_spec(BATCH_AXES, rules))
    return {k: place_array(v, sharding) for k, v in batch.items()}
