"""Pre-flight check the launch scripts run before starting a multi-host job: does the
config's mesh fit the machines about to be rented or started, will every host find the
config's paths and share its run folder, and does the finetune step fit the TPU slice?

    python -m recranker_jax.launch_check --config FILE --devices N [--hosts H]
        [--workdir-copy DST ...] [--compile-for TYPE [--copy SRC:DST ...] [--arch ARCH]] [key=value ...]

prints `ok: mesh (a, b, c) over (data, fsdp, tensor) on N devices` (exit 0) or the
problem as one `error: ...` line (exit 2). Nothing here touches a device.

- `--hosts H` > 1: run.root must be absolute (relative, each host would have its own folder).
- `--workdir-copy DST` (launch/tpu_pod.sh, once per --copy, also when there is none: pass
  `--workdir-copy ''`): the workers start the command in a working folder where the relative
  --copy destinations land and nothing else; each relative path of the config must be one of
  them or inside one. Absolute and ~ paths are the workers' own and are not checked.
- `--compile-for TYPE` (launch/tpu_pod.sh with --accelerator-type, for commands that train):
  the finetune step compiled for that slice by the TPU compiler (`recranker compile`; the tpu
  extra here); a step that does not fit is refused with the compiler's figure. The model's
  shape comes from model.checkpoint's config.json here: a --copy SRC:DST whose DST holds
  model.checkpoint is read at SRC; `--arch` names a bundled architecture instead.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import PurePosixPath

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


# The config keys that name files or folders a run reads (run.root, the one it writes, is checked apart).
READ_PATHS = ("data.path", "prompts.tokenizer", "model.checkpoint")


def _is_relative(path: str) -> bool:
    return not path.startswith(("/", "~", "package:"))


def check_hosts(config_path: str | None, overrides: Sequence[str], hosts: int,
                workdir_copies: Sequence[str] | None = None) -> None:
    """A RecRankerError when `hosts` > 1 hosts would not share run.root, or (with `workdir_copies`,
    the relative --copy destinations) a relative path of the config is not copied to the workers."""
    cfg = load_config(config_path, list(overrides))
    if hosts > 1 and _is_relative(cfg.run.root):
        raise RecRankerError(
            f"run.root={cfg.run.root} is relative, so each of the {hosts} hosts would write its own folder; give an "
            "absolute path every host mounts (NFS, Filestore, a gcsfuse-mounted bucket)")
    if workdir_copies is None:
        return
    copied = [PurePosixPath(d) for d in workdir_copies if d]
    for dotted in READ_PATHS:
        section, key = dotted.split(".")
        value = getattr(getattr(cfg, section), key)
        if value is None or not _is_relative(value):
            continue
        path = PurePosixPath(value)
        if not any(path == d or d in path.parents for d in copied):
            raise RecRankerError(
                f"{dotted}={value} is relative, but no --copy puts it on the workers (relative paths there are inside "
                f"the working folder ~/recranker, where only relative --copy destinations land): add --copy "
                f"LOCAL:{value} or give an absolute path on the workers")


def local_checkpoint(checkpoint: str | None, copies: Sequence[str]) -> str | None:
    """Where model.checkpoint is on this machine when a --copy SRC:DST puts it on the workers."""
    if not checkpoint:
        return None
    path = PurePosixPath(checkpoint)
    for copy in copies:
        source, _, destination = copy.partition(":")
        destination = PurePosixPath(destination.removeprefix("~/"))
        if path == destination or destination in path.parents:
            return str(PurePosixPath(source) / path.relative_to(destination))
    return None


def check_compiles(config_path: str | None, overrides: Sequence[str], accelerator: str, copies: Sequence[str] = (),
                   arch: str | None = None) -> str:
    """The ok line when the finetune step fits `accelerator` by the TPU compiler; a RecRankerError
    with the compiler's figure otherwise."""
    from recranker_jax.compile import compile_finetune

    cfg = load_config(config_path, list(overrides))
    local = None if arch else local_checkpoint(cfg.model.checkpoint, copies)
    if local is not None:
        cfg = load_config(config_path, [*overrides, f"model.checkpoint={local}"])
    try:
        doc = compile_finetune(cfg, accelerator, arch=arch)
    except RecRankerError as err:
        raise RecRankerError(f"{err} (the pre-flight compile for {accelerator}; --compile-arch ARCH names the "
                             "model's architecture, --skip-compile-check skips it)") from None
    gb = 2**30
    if not doc["fits"]:
        needed = doc["needed_bytes"] or 0
        raise RecRankerError(
            f"the finetune step does not fit {accelerator}: the TPU compiler needs {needed / gb:.2f} GB a chip of "
            f"{doc['hbm_bytes_per_chip'] / gb:.2f} GB (train.remat={doc['remat']}); change {doc['advice']}, or "
            "launch with --skip-compile-check")
    return (f"ok: the finetune step fits {accelerator}: {doc['memory']['total'] / gb:.2f} GB a chip of "
            f"{doc['hbm_bytes_per_chip'] / gb:.2f} GB (train.remat={doc['remat']}; compiled in "
            f"{doc['compile_seconds']:.0f} s)")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m recranker_jax.launch_check", description=__doc__.splitlines()[0])
    parser.add_argument("--config", help="YAML config file or bundled config name; default: built-in defaults")
    parser.add_argument("--devices", type=int, required=True, help="accelerator devices of the whole job")
    parser.add_argument("--hosts", type=int, default=1, help="hosts (processes joined over the network) of the job")
    parser.add_argument("--workdir-copy", action="append", metavar="DST",
                        help="a relative --copy destination in the workers' working folder (repeat; '' for none)")
    parser.add_argument("--compile-for", metavar="TYPE", help="also compile the finetune step for this TPU slice")
    parser.add_argument("--copy", action="append", default=[], metavar="SRC:DST", help="a launcher --copy (repeat)")
    parser.add_argument("--arch", help="bundled architecture for the compile (llama2-7b, llama2-13b)")
    parser.add_argument("overrides", nargs="*", metavar="key=value")
    args = parser.parse_args(argv)
    try:
        check_hosts(args.config, args.overrides, args.hosts, args.workdir_copy)
        print(check_mesh_fits(args.config, args.overrides, args.devices))
        if args.compile_for:
            print(check_compiles(args.config, args.overrides, args.compile_for, args.copy, args.arch))
    except RecRankerError as err:
        print(f"error: {' '.join(str(err).split())}", file=sys.stderr)
        return err.exit_code
    return 0


if __name__ == "__main__":
    sys.exit(main())
