"""The pipeline as data: one table of stages (`STAGES`), chained through the run folder, each
cached and resumable. The CLI's stage commands, `pipeline` and `quickstart` all follow it;
adding a stage is one entry here plus its module.

A stage writes into a hidden partial folder and is swapped into its folder under
runs/<name>/ only when it finished, together with a `_stage.json` holding its cache key: a
hash of its upstream stage's key and the config sections it depends on (not the settings
that only say how the model runs, `EXECUTION_SETTINGS`). Re-running a finished stage with the
same key is a no-op; a failed stage leaves the earlier output intact.

Several processes (a TPU pod, a Slurm job, launch/local_multiprocess.sh) share one run
folder, which must be on a filesystem they all see (Orbax writes each process's shards of
a checkpoint into the same folder anyway). Only process 0 writes stage folders:

- data, retrieval, instructions are single-process programs (their meshes, checkpoints and
  files assume one process) and cannot run inside the multi-process runtime. Process 0 builds
  them in a child process of its own (`python -m recranker_jax.pipeline STAGE CONFIG`,
  RECRANKER_DISTRIBUTED=off, on the host CPU, mesh -1 over its CPU devices); the others wait
  for it, then read its folders.
- finetune and rank (the stages computing on the global mesh) run in every process: process 0
  builds the stage's folder as usual, the others build alongside it into a scratch folder
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
from recranker_jax.data.split import format_stats, split_interactions, write_split
from recranker_jax.errors import RecRankerError
from recranker_jax.run import (
    MARKER,
    DataFolder,
    FinetuneFolder,
    InstructionsFolder,
    RankingFolder,
    RetrievalFolder,
    RunFolder,
    read_json,
)

# How the model runs, not what it learns: changing these reuses a finished finetune and its checkpoints.
EXECUTION_SETTINGS = {"model": ("scan_layers", "attention"), "train": ("remat",)}


@dataclasses.dataclass(frozen=True)
class Stage:
    """One stage of the pipeline.

    name: the CLI command and the cache key's tag; its folder is `run.STAGE_FOLDERS[name]`.
    upstream: the stage it reads (run first when not finished); its key is part of this one's.
    key_sections: the config values (dotted paths) its cache key covers.
    build: (cfg, run folder, output folder, progress) -> anything; writes the stage's files.
    collective: every process runs it (it computes on the global mesh), or process 0 alone.
    summary: (cfg, folder, cached) -> what the CLI prints after it.
    """

    name: str
    upstream: str | None
    key_sections: tuple[str, ...]
    build: Callable[[Config, RunFolder, Path, bool], Any]
    collective: bool
    summary: Callable[[Config, Path, bool], str]
    help: str


def _build_data(cfg: Config, run: RunFolder, out: Path, progress: bool) -> dict[str, Any]:
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
    return write_split(split, out)


def _build_retrieval(cfg: Config, run: RunFolder, out: Path, progress: bool) -> dict:
    from recranker_jax.retrieval.stage import build_retrieval

    return build_retrieval(cfg, run.data.path, out, run.checkpoints("retrieval", cache_key(cfg, "retrieval")), progress)


def _build_instructions(cfg: Config, run: RunFolder, out: Path, progress: bool) -> dict:
    from recranker_jax.prompts.stage import build_instructions

    return build_instructions(cfg, run.data.path, run.retrieval.path, out)


def _build_finetune(cfg: Config, run: RunFolder, out: Path, progress: bool) -> dict:
    from recranker_jax.train.stage import build_finetune

    return build_finetune(cfg, run.instructions.path, out, run.checkpoints("finetune", cache_key(cfg, "finetune")),
                          progress)


def _build_ranking(cfg: Config, run: RunFolder, out: Path, progress: bool) -> dict:
    # With several processes each ranks on its own first device (the model must fit one) and
    # process 0 writes the folder: simple and correct, not yet a sharded inference.
    from recranker_jax.rank.stage import build_ranking

    return build_ranking(cfg, run.data.path, run.retrieval.path, run.instructions.path, run.finetune.path, out)


def _state(cached: bool) -> str:
    return "cached" if cached else "done"


def _data_summary(cfg: Config, out: Path, cached: bool) -> str:
    return f"[data] {_state(cached)}: {out}\n" + format_stats(read_json(DataFolder(out).meta))


def _retrieval_summary(cfg: Config, out: Path, cached: bool) -> str:
    from recranker_jax.retrieval.stage import format_table

    result = read_json(RetrievalFolder(out).metrics)
    return (f"[retrieval] {_state(cached)}: {out}\n"
            f"test split, full-catalogue ranking with training items masked; candidates: top-{result['candidates']} "
            f"of {result['backbone']}\n" + format_table(result, "test"))


def _instructions_summary(cfg: Config, out: Path, cached: bool) -> str:
    stats = read_json(InstructionsFolder(out).stats)
    return (f"[instructions] {_state(cached)}: {out}\n"
            f"train examples by task: {stats['train']['by_task']} (sampling: {stats['sampling']['strategy']}, "
            f"{stats['sampling']['distinct_users']} distinct users); skipped: {stats['train']['skipped_too_few_ratings']}\n"
            f"test prompts by task: {stats['test']['by_task']}; truncated history: {stats['truncated_history']}")


def _finetune_summary(cfg: Config, out: Path, cached: bool) -> str:
    summary = read_json(FinetuneFolder(out).summary)
    line = (f"{summary['examples']} examples in {summary['packed_rows']} packed rows, {summary['steps']} steps, "
            f"{summary['parameters']:,} parameters")
    if summary["first_loss"] is not None and summary["median_tokens_per_second"] is not None:
        line += (f"; loss {summary['first_loss']:.3f} -> {summary['last_loss']:.3f} (this call); "
                 f"median {summary['median_tokens_per_second']:.0f} tokens/s")
    return f"[finetune] {_state(cached)}: {out}\n{line}"


def _ranking_summary(cfg: Config, out: Path, cached: bool) -> str:
    from recranker_jax.report import format_table

    document = read_json(RankingFolder(out).metrics)
    split = "test" if "test" in document["splits"] else next(iter(document["splits"]))
    return (f"[rank] {_state(cached)}: {out} ({document['mode']} mode, {document['splits'][split]['scored_users']} "
            f"users with the held-out item among the candidates scored by the LLM)\n" + format_table(document, split))


STAGES: dict[str, Stage] = {stage.name: stage for stage in (
    Stage("data", None, ("data",), _build_data, False, _data_summary,
          "load and split the ratings"),
    Stage("retrieval", "data", ("retrieval", "run.seed"), _build_retrieval, False, _retrieval_summary,
          "train LightGCN, MF, explicit MF, popularity; write candidates"),
    Stage("instructions", "retrieval", ("sampling", "prompts", "run.seed"), _build_instructions, False,
          _instructions_summary, "sample users, build the prompts of the three tasks"),
    Stage("finetune", "instructions", ("model", "train", "run.seed"), _build_finetune, True, _finetune_summary,
          "instruction-tune the ranker LLM on the run's instructions"),
    Stage("rank", "finetune", ("rank", "run.seed"), _build_ranking, True, _ranking_summary,
          "re-rank the candidates with the tuned LLM (each task and the hybrid); evaluate"),
)}


def _section(cfg: Config, dotted: str) -> Any:
    """A config value by dotted path; a section without its `EXECUTION_SETTINGS`."""
    value: Any = cfg
    for part in dotted.split("."):
        value = getattr(value, part)
    if dataclasses.is_dataclass(value) and dotted in EXECUTION_SETTINGS:
        return {k: v for k, v in dataclasses.asdict(value).items() if k not in EXECUTION_SETTINGS[dotted]}
    return value


def cache_key(cfg: Config, name: str) -> str:
    """The key a stage's output is cached under: its upstream's key and its config sections."""
    stage = STAGES[name]
    upstream = [cache_key(cfg, stage.upstream)] if stage.upstream else []
    return fingerprint(name, *upstream, *(_section(cfg, s) for s in stage.key_sections))


def finished_key(folder: Path) -> str | None:
    """The key a stage folder was finished with, or None if it has not finished."""
    marker = folder / MARKER
    if not marker.is_file():
        return None
    return json.loads(marker.read_text()).get("key")


def build_cached(folder: Path, key: str, build: Callable[[Path], Any]) -> tuple[Path, bool]:
    """Build a stage into `folder` unless it already finished with `key`; returns (folder, was_cached)."""
    if finished_key(folder) == key:
        return folder, True
    partial = folder.parent / f".{folder.name}.partial"
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    started = time.time()
    build(partial)
    (partial / MARKER).write_text(
        json.dumps({"key": key, "seconds": round(time.time() - started, 3), "version": __version__}) + "\n"
    )
    previous = folder.parent / f".{folder.name}.previous"
    shutil.rmtree(previous, ignore_errors=True)
    if folder.exists():
        folder.rename(previous)
    partial.rename(folder)
    shutil.rmtree(previous, ignore_errors=True)
    return folder, False


def several_processes() -> bool:
    """True when this process is one of several joined by recranker_jax.parallel.initialize_distributed."""
    import jax

    return jax.distributed.is_initialized() and jax.process_count() > 1


def prepare_run_dir(cfg: Config) -> RunFolder:
    """Create runs/<name>/ and record the config the run was (last) invoked with."""
    run = RunFolder.of(cfg)
    run.path.mkdir(parents=True, exist_ok=True)
    run.config.write_text(dump_config(cfg))
    return run


def run(cfg: Config, name: str, progress: bool = True) -> tuple[Path, bool]:
    """Stage `name` of the run (and, first, every unfinished stage before it); returns
    (its folder, whether it was cached)."""
    stage = STAGES[name]
    if several_processes() and not stage.collective:
        return _process_zero_stage(cfg, stage)
    if stage.upstream:
        run(cfg, stage.upstream, progress)
    folder, key = RunFolder.of(cfg).stage(name), cache_key(cfg, name)
    if not stage.collective:
        prepared = prepare_run_dir(cfg)
        return build_cached(folder, key, lambda out: stage.build(cfg, prepared, out, progress))
    return _collective_stage(cfg, stage, folder, key, progress)


def _process_zero_stage(cfg: Config, stage: Stage) -> tuple[Path, bool]:
    """A single-process stage when this process is one of several (module docstring)."""
    from recranker_jax.parallel import broadcast_text, is_primary, on_primary

    folder, key = RunFolder.of(cfg).stage(stage.name), cache_key(cfg, stage.name)

    def build_in_child() -> bool:
        if finished_key(folder) == key:
            return True
        prepared = prepare_run_dir(cfg)
        host = dataclasses.replace(cfg, mesh=dataclasses.replace(cfg.mesh, shape=[-1] + [1] * (len(cfg.mesh.axes) - 1)))
        config_file = prepared.path / f".{stage.name}-child.yaml"
        config_file.write_text(dump_config(host))
        command = [sys.executable, "-m", "recranker_jax.pipeline", stage.name, str(config_file)]
        env = {**os.environ, "RECRANKER_DISTRIBUTED": "off", "JAX_PLATFORMS": "cpu"}
        code = subprocess.run(command, check=False, env=env, stdout=subprocess.DEVNULL).returncode
        config_file.unlink()
        prepare_run_dir(cfg)  # the child recorded its own config.yaml
        if code:
            raise RecRankerError(f"the {stage.name} stage failed in the single-process child of process 0 (exit code "
                                 f"{code}); its error is printed above in process 0's log")
        return False

    cached = on_primary(f"the {stage.name} stage", build_in_child)
    cached = broadcast_text(f"was the {stage.name} stage cached", str(cached) if is_primary() else None) == "True"
    for _ in range(30):  # a network filesystem may show another host's new files a little late
        if finished_key(folder) == key:
            return folder, cached
        time.sleep(1)
    raise RecRankerError(
        f"{folder}: this process does not see the stage process 0 finished; with several processes "
        "run.root must be on a filesystem all of them share (NFS, Filestore, gcsfuse)"
    )


def _collective_stage(cfg: Config, stage: Stage, folder: Path, key: str, progress: bool) -> tuple[Path, bool]:
    """A stage every process takes part in (module docstring); one process: `build_cached`."""
    if not several_processes():
        prepared = prepare_run_dir(cfg)
        return build_cached(folder, key, lambda out: stage.build(cfg, prepared, out, progress))
    import jax

    from recranker_jax.parallel import broadcast_text, is_primary, on_primary

    run_folder = RunFolder.of(cfg)
    finished = finished_key(folder) == key if is_primary() else None
    if broadcast_text(f"is the {stage.name} stage cached", str(finished)) == "True":
        return folder, True

    def build_in_scratch() -> None:
        scratch = run_folder.path / f".process-{jax.process_index()}"
        shutil.rmtree(scratch, ignore_errors=True)
        (scratch / folder.name).mkdir(parents=True)
        try:
            stage.build(cfg, run_folder, scratch / folder.name, progress)
        finally:
            shutil.rmtree(scratch, ignore_errors=True)

    on_primary(f"the {stage.name} stage", lambda: build_cached(
        folder, key, lambda out: stage.build(cfg, prepare_run_dir(cfg), out, progress)), others=build_in_scratch)
    return folder, False


def main(argv: list[str]) -> int:
    """`python -m recranker_jax.pipeline STAGE CONFIG`: one stage in this process alone (process
    0's child for the single-process stages of a multi-process run)."""
    from recranker_jax.config import load_config

    name, config_file = argv
    try:
        run(load_config(config_file), name)
    except RecRankerError as err:
        print(f"error: {' '.join(str(err).split())}", file=sys.stderr)
        return err.exit_code
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
