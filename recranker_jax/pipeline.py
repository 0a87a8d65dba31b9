"""Stages chained through the run folder, each cached and resumable.

A stage writes into a hidden partial folder and is swapped into
runs/<name>/<stage>/ only when it finished, together with a `_stage.json`
holding the key of the config it was built from. Re-running a finished stage
with the same key is a no-op; a failed stage leaves the earlier output intact.
"""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from recranker_jax import __version__
from recranker_jax.config import Config, dump_config, fingerprint
from recranker_jax.data.sources import default_thresholds, load_source
from recranker_jax.data.split import split_interactions, write_split

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
    run_dir = prepare_run_dir(cfg)
    return run_stage(run_dir, "data", data_key(cfg), lambda out: build_data(cfg, out))


def retrieval_key(cfg: Config) -> str:
    return fingerprint("retrieval", data_key(cfg), cfg.retrieval, cfg.run.seed)


def retrieval_stage(cfg: Config, progress: bool = True) -> tuple[Path, bool]:
    """The retrieval stage: runs/<name>/retrieval/ (needs the data stage, which it runs if missing)."""
    from recranker_jax.retrieval.stage import build_retrieval, check_config

    check_config(cfg)  # a config mistake fails before any earlier stage runs
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
    retrieval_dir, _ = retrieval_stage(cfg, progress)
    data_dir = cfg.run_dir / "data"
    return run_stage(
        cfg.run_dir, "instructions", instructions_key(cfg), lambda out: build_instructions(cfg, data_dir, retrieval_dir, out)
    )


def finetune_key(cfg: Config) -> str:
    return fingerprint("finetune", instructions_key(cfg), cfg.model, cfg.train, cfg.run.seed)


def finetune_stage(cfg: Config, progress: bool = True) -> tuple[Path, bool]:
    """The finetune stage: runs/<name>/finetune/ (runs the instructions stage first if needed)."""
    from recranker_jax.train.stage import build_finetune, check_config

    check_config(cfg)
    instructions_dir, _ = instructions_stage(cfg, progress)
    key = finetune_key(cfg)
    checkpoints = cfg.run_dir / "checkpoints" / f"finetune-{key}"
    return run_stage(cfg.run_dir, "finetune", key, lambda out: build_finetune(cfg, instructions_dir, out, checkpoints, progress))
