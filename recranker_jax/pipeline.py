"""Stages chained through the run folder, each cached and resumable.

A stage writes into a hidden partial folder and is swapped into
runs/<name>/<stage>/ only when it finished, together with a `_stage.json`
holding the key of the config it was built from. Re-running a finished stage
with the same key is a no-op; a failed stage leaves the earlier output intact.

Several processes (a TPU pod, a Slurm job, launch/local_multiprocess.sh) share one run
folder, which must be on a filesystem they all see (Orbax writes each process's shards of
a checkpoint into the same folder anyway). Only process 0 writes stage folders:

- data, retrieval, instructions are single-process programs (their meshes, checkpoints and
  files assume one process) and cannot run inside the multi-process runtime. Process 0 builds
  them in a child process of its own (`recranker <stage>`, RECRANKER_DISTRIBUTED=off, on the
  host CPU, mesh -1 over its CPU devices); the others wait for it, then read its folders.
- finetune (and any stage computing on the global mesh) runs in every process: process 0
  builds runs/<name>/<stage>/ as usual, the others build alongside it into a scratch folder
  runs/<name>/.process-<i>/<stage>/ (their builders write nothing; it is removed after) and
  return once process 0's folder is complete. Process 0 alone decides whether it is cached.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from recranker_jax import __version__
from recranker_jax.config import Config, dump_config, fingerprint
from recranker_jax.data.sources import default_thresholds, load_source
from recranker_jax.data.split import split_interactions, write_split
from recranker_jax.errors import RecRankerError

MARKER = "_stage.json"


def stage_key(run_dir: Path, stage: str) -> str | None:
    """The key a finished stage was built with, or None if it has not finished."""
    marker = run_dir / stage / MARKER
    if not marker.is_file():
        return None
    return json.loads(marker.read_text()).get("key")


def run_stage(run_dir: Path, stage: str, key: str, build: Callable[[Path], Any]) -> tuple[Path, bool]:
    """Build `stage` unless it already finished with `key`; returns (folder, was_cached)."""
    out = run_dir / stage
    if stage_key(run_dir, stage) == key:
        return out, True
    partial = run_dir / f".{stage}.partial"
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    started = time.time()
    build(partial)
    (partial / MARKER).write_text(
        json.dumps({"key": key, "seconds": round(time.time() - started, 3), "version": __version__}) + "\n"
    )
    previous = run_dir / f".{stage}.previous"
    shutil.rmtree(previous, ignore_errors=True)
    if out.exists():
        out.rename(previous)
    partial.rename(out)
    shutil.rmtree(previous, ignore_errors=True)
    return out, False


def several_processes() -> bool:
    """True when this process is one of several joined by recranker_jax.parallel.initialize_distributed."""
    import jax

    return jax.distributed.is_initialized() and jax.process_count() > 1


SINGLE_PROCESS_COMMANDS = {"data": ("data", "split"), "retrieval": ("retrieval",), "instructions": ("instructions",)}


def single_process_stage(cfg: Config, stage: str, key: str) -> tuple[Path, bool]:
    """data, retrieval or instructions when this process is one of several (module docstring)."""
    from recranker_jax.parallel import broadcast_text, is_primary, on_primary

    def build_in_child() -> bool:
        if stage_key(cfg.run_dir, stage) == key:
            return True
        run_dir = prepare_run_dir(cfg)
        host = dataclasses.replace(cfg, mesh=dataclasses.replace(cfg.mesh, shape=[-1] + [1] * (len(cfg.mesh.axes) - 1)))
        config_file = run_dir / f".{stage}-child.yaml"
        config_file.write_text(dump_config(host))
        command = [sys.executable, "-m", "recranker_jax.cli", *SINGLE_PROCESS_COMMANDS[stage], "--config", str(config_file)]
        env = {**os.environ, "RECRANKER_DISTRIBUTED": "off", "JAX_PLATFORMS": "cpu"}
        code = subprocess.run(command, check=False, env=env, stdout=subprocess.DEVNULL).returncode
        config_file.unlink()
        prepare_run_dir(cfg)  # the child recorded its own config.yaml
        if code:
            raise RecRankerError(f"the {stage} stage failed in the single-process child of process 0 (exit code {code}); "
                                 "its error is printed above in process 0's log")
        return False

    cached = on_primary(f"the {stage} stage", build_in_child)
    cached = broadcast_text(f"was the {stage} stage cached", str(cached) if is_primary() else None) == "True"
    for _ in range(30):  # a network filesystem may show another host's new files a little late
        if stage_key(cfg.run_dir, stage) == key:
            return cfg.run_dir / stage, cached
        time.sleep(1)
    raise RecRankerError(
        f"{cfg.run_dir / stage}: this process does not see the stage process 0 finished; with several processes "
        "run.root must be on a filesystem all of them share (NFS, Filestore, gcsfuse)"
    )


def run_collective_stage(cfg: Config, stage: str, key: str, build: Callable[[Path], Any]) -> tuple[Path, bool]:
    """`run_stage` for a stage every process takes part in (module docstring); one process: run_stage."""
    if not several_processes():
        return run_stage(cfg.run_dir, stage, key, build)
    import jax

    from recranker_jax.parallel import broadcast_text, is_primary, on_primary

    finished = stage_key(cfg.run_dir, stage) == key if is_primary() else None
    if broadcast_text(f"is the {stage} stage cached", str(finished)) == "True":
        return cfg.run_dir / stage, True

    def build_in_scratch() -> None:
        scratch = cfg.run_dir / f".process-{jax.process_index()}"
        shutil.rmtree(scratch, ignore_errors=True)
        (scratch / stage).mkdir(parents=True)
        try:
            build(scratch / stage)
        finally:
            shutil.rmtree(scratch, ignore_errors=True)

    on_primary(f"the {stage} stage", lambda: run_stage(cfg.run_dir, stage, key, build), others=build_in_scratch)
    return cfg.run_dir / stage, False


def prepare_run_dir(cfg: Config) -> Path:
    """Create runs/<name>/ and record the config the run was (last) invoked with."""
    run_dir = cfg.run_dir
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.yaml").write_text(dump_config(cfg))
    return run_dir


def data_key(cfg: Config) -> str:
    return fingerprint("data", cfg.data)


def build_data(cfg: Config, out_dir: Path) -> dict[str, Any]:
    """Load the source, split it, write the CSVs; returns the stats."""
    interactions = load_source(cfg.data)
    like_default, dislike_default = default_thresholds(interactions.scale)
    split = split_interactions(
        interactions,
        like_threshold=cfg.data.like_threshold if cfg.data.like_threshold is not None else like_default,
        dislike_threshold=(
            cfg.data.dislike_threshold if cfg.data.dislike_threshold is not None else dislike_default
        ),
        min_likes=cfg.data.min_likes,
    )
    return write_split(split, out_dir)


def data_stage(cfg: Config) -> tuple[Path, bool]:
    """The data stage of a run: runs/<name>/data/{train,valid,test,items}.csv + meta.json."""
    if several_processes():
        return single_process_stage(cfg, "data", data_key(cfg))
    run_dir = prepare_run_dir(cfg)
    return run_stage(run_dir, "data", data_key(cfg), lambda out: build_data(cfg, out))


def retrieval_key(cfg: Config) -> str:
    return fingerprint("retrieval", data_key(cfg), cfg.retrieval, cfg.run.seed)


def retrieval_stage(cfg: Config, progress: bool = True) -> tuple[Path, bool]:
    """The retrieval stage: runs/<name>/retrieval/ (needs the data stage, which it runs if missing)."""
    from recranker_jax.retrieval.stage import build_retrieval, check_config

    check_config(cfg)  # a config mistake fails before any earlier stage runs
    if several_processes():
        return single_process_stage(cfg, "retrieval", retrieval_key(cfg))
    data_dir, _ = data_stage(cfg)
    run_dir = cfg.run_dir
    key = retrieval_key(cfg)
    checkpoints = run_dir / "checkpoints" / f"retrieval-{key}"
    return run_stage(run_dir, "retrieval", key, lambda out: build_retrieval(cfg, data_dir, out, checkpoints, progress))


def instructions_key(cfg: Config) -> str:
    return fingerprint("instructions", retrieval_key(cfg), cfg.sampling, cfg.prompts, cfg.run.seed)


def instructions_stage(cfg: Config, progress: bool = True) -> tuple[Path, bool]:
    """The instructions stage: runs/<name>/instructions/ (runs retrieval first if needed)."""
    from recranker_jax.prompts.stage import build_instructions, check_config

    check_config(cfg)  # a config mistake fails before retrieval trains
    if several_processes():
        return single_process_stage(cfg, "instructions", instructions_key(cfg))
    retrieval_dir, _ = retrieval_stage(cfg, progress)
    data_dir = cfg.run_dir / "data"
    return run_stage(
        cfg.run_dir, "instructions", instructions_key(cfg), lambda out: build_instructions(cfg, data_dir, retrieval_dir, out)
    )


# How the model runs, not what it learns: changing these reuses a finished finetune and its checkpoints.
EXECUTION_SETTINGS = {"model": ("scan_layers", "attention"), "train": ("remat",)}


def finetune_key(cfg: Config) -> str:
    model, train = ({k: v for k, v in dataclasses.asdict(getattr(cfg, section)).items()
                     if k not in EXECUTION_SETTINGS[section]} for section in ("model", "train"))
    return fingerprint("finetune", instructions_key(cfg), model, train, cfg.run.seed)


def finetune_stage(cfg: Config, progress: bool = True) -> tuple[Path, bool]:
    """The finetune stage: runs/<name>/finetune/ (runs the instructions stage first if needed)."""
    from recranker_jax.train.stage import build_finetune, check_config

    check_config(cfg)
    instructions_dir, _ = instructions_stage(cfg, progress)
    key = finetune_key(cfg)
    checkpoints = cfg.run_dir / "checkpoints" / f"finetune-{key}"
    return run_collective_stage(
        cfg, "finetune", key, lambda out: build_finetune(cfg, instructions_dir, out, checkpoints, progress)
    )


def rank_key(cfg: Config) -> str:
    return fingerprint("rank", finetune_key(cfg), cfg.rank, cfg.run.seed)


def rank_stage(cfg: Config, progress: bool = True) -> tuple[Path, bool]:
    """The rank stage: runs/<name>/ranking/ (runs the finetune stage first if needed)."""
    from recranker_jax.rank.stage import build_ranking, check_config

    check_config(cfg)
    finetune_dir, _ = finetune_stage(cfg, progress)
    run_dir = cfg.run_dir
    # With several processes each ranks on its own first device (the model must fit one) and
    # process 0 writes the folder: simple and correct, not yet a sharded inference.
    return run_collective_stage(cfg, "ranking", rank_key(cfg), lambda out: build_ranking(
        cfg, run_dir / "data", run_dir / "retrieval", run_dir / "instructions", finetune_dir, out))
