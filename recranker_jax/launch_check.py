"""Pre-flight check the launch scripts run before starting a multi-host job: does the
config's mesh fit the machines about to be rented or started?

    python -m recranker_jax.launch_check --config FILE --devices N [key=value ...]

prints `ok: mesh (a, b, c) over (data, fsdp, tensor) on N devices` (exit 0) or the
problem as one `error: ...` line (exit 2). Nothing here touches a device.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from recranker_jax.config import load_config
from recranker_jax.errors import RecRankerError
from recranker_jax.config_checks import check_batch, resolve_mesh_shape


def check_mesh_fits(config_path: str | None, overrides: Sequence[str], devices: int) -> str:
    """The ok line when `mesh.shape` resolves on `devices` devices and the training batch splits
    evenly over the mesh's batch shards; a RecRankerError otherwise."""
    if devices < 1:
        raise RecRankerError(f"--devices {devices}: expected a positive number of devices")
    cfg = load_config(config_path, list(overrides))  # validated: the mesh's static checks
    shape = resolve_mesh_shape(cfg.mesh.shape, devices)
    check_batch("train.batch_size", cfg.train.batch_size, cfg.mesh.rules, dict(zip(cfg.mesh.axes, shape)))
    return f"ok: mesh {tuple(shape)} over ({', '.join(cfg.mesh.axes)}) on {devices} devices"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m recranker_jax.launch_check", description=__doc__.splitlines()[0])
    parser.add_argument("--config", help="YAML config file or bundled config name; default: built-in defaults")
    parser.add_argument("--devices", type=int, required=True, help="accelerator devices of the whole job")
    parser.add_argument("overrides", nargs="*", metavar="key=value")
    args = parser.parse_args(argv)
    try:
        print(check_mesh_fits(args.config, args.overrides, args.devices))
    except RecRankerError as err:
        print(f"error: {' '.join(str(err).split())}", file=sys.stderr)
        return err.exit_code
    return 0


if __name__ == "__main__":
    sys.exit(main())
