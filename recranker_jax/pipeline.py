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

Before the first stage, `check_shared_root` proves the sharing: process 0 writes a token file
into run.root and every process must see it, else all stop with one line naming the folder.
How long a process waits for another host's files to appear (a network filesystem may show
them late) is RECRANKER_FS_WAIT_S seconds, default 30.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import secrets
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import yaml

from recranker_jax import __version__, run_lock, signals
from recranker_jax.config import COMMAND_SETTINGS, Config, dump_config, fingerprint
from recranker_jax.config_checks import check_paths
from recranker_jax.data.sources import default_thresholds, load_source
from recranker_jax.data.split import format_stats, split_interactions, write_split
from recranker_jax.errors import RecRankerError
from recranker_jax.run import (
    DataFolder,
    FinetuneFolder,
    InstructionsFolder,
    PretrainFolder,
    RankingFolder,
    RetrievalFolder,
    RunFolder,
    damage,
    marker_digest,
    read_json,
    read_marker,
    write_marker,
)

# How the model runs, not what it learns: changing these reuses a finished finetune and its checkpoints.
EXECUTION_SETTINGS = {"model": ("scan_layers", "attention"), "train": ("remat", "keep_checkpoint", "profile_steps")}


@dataclasses.dataclass(frozen=True)
class Stage:
    """One stage of the pipeline.

    name: the CLI command and the cache key's tag; its folder is `run.STAGE_FOLDERS[name]`.
    upstream: the stage it reads (run first when not finished); its key is part of this one's.
    key_sections: the config values (dotted paths) its cache key covers.
    build: (cfg, run folder, output folder, progress) -> anything; writes the stage's files.
    collective: every process runs it (it computes on the global mesh), or process 0 alone.
    summary: (cfg, folder, cached) -> what the CLI prints after it.
    checkpointed: it keeps training state in `RunFolder.checkpoints(name, key)` while unfinished,
      removed when it finishes (the finetune keeps its last checkpoint with train.keep_checkpoint).
    """

    name: str
    upstream: str | None
    key_sections: tuple[str, ...]
    build: Callable[[Config, RunFolder, Path, bool], Any]
    collective: bool
    summary: Callable[[Config, Path, bool], str]
    help: str
    checkpointed: bool = False


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


def _build_pretrain(cfg: Config, run: RunFolder, out: Path, progress: bool) -> dict:
    from recranker_jax.train.pretrain import build_pretrain

    return build_pretrain(cfg, run.data.path, run.instructions.path, out,
                          run.checkpoints("pretrain", cache_key(cfg, "pretrain")), progress)


def _build_finetune(cfg: Config, run: RunFolder, out: Path, progress: bool) -> dict:
    from recranker_jax.train.stage import build_finetune

    return build_finetune(cfg, run.instructions.path, out, run.checkpoints("finetune", cache_key(cfg, "finetune")),
                          progress, pretrain_dir=run.pretrain.path)


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


def _pretrain_summary(cfg: Config, out: Path, cached: bool) -> str:
    summary = read_json(PretrainFolder(out).summary)
    if not summary["enabled"]:
        return f"[pretrain] {_state(cached)}: off (pretrain.enabled=false)"
    return (f"[pretrain] {_state(cached)}: {out}\n{summary['documents']} history windows of {summary['users']} users, "
            f"{summary['tokens']:,} tokens in {summary['packed_rows']} packed rows, {summary['steps']} steps"
            + (f"; loss {summary['first_loss']:.3f} -> {summary['last_loss']:.3f} (this call)"
               if summary["first_loss"] is not None else ""))


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
          "train the retrieval.models (LightGCN, MF, explicit MF, popularity, SASRec); write candidates",
          checkpointed=True),
    Stage("instructions", "retrieval", ("sampling", "prompts", "run.seed"), _build_instructions, False,
          _instructions_summary, "sample users, build the prompts of the three tasks"),
    Stage("pretrain", "instructions", ("pretrain", "model", "train.seq_len", "train.lora", "run.seed"), _build_pretrain,
          True, _pretrain_summary, "domain pre-training: a causal LM on the users' training histories (pretrain.enabled)",
          checkpointed=True),
    Stage("finetune", "pretrain", ("model", "train", "run.seed"), _build_finetune, True, _finetune_summary,
          "instruction-tune the ranker LLM on the run's instructions", checkpointed=True),
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
    marker = read_marker(folder)
    return None if marker is None else marker.get("key")


def stale(folder: Path, key: str, inputs: dict[str, str]) -> str | None:
    """Why a stage folder cannot be reused for `key` and these upstream digests: "unfinished",
    "another key" (a changed config), or a line saying what changed since it finished; None
    when it can."""
    marker = read_marker(folder)
    if marker is None:
        return "unfinished"
    if marker.get("key") != key:
        return "another key"
    changed = [name for name, digest in inputs.items() if marker.get("inputs", {}).get(name, digest) != digest]
    if changed:
        return f"{folder}: the {', '.join(changed)} stage's output changed since this stage was built from it"
    return damage(folder, marker)


def build_cached(folder: Path, key: str, build: Callable[[Path], Any], config: dict | None = None,
                 inputs: dict[str, str] | None = None) -> tuple[Path, bool]:
    """Build a stage into `folder` unless it finished with `key` from the same upstream outputs
    (`inputs`: stage -> digest) and its files are as it left them; returns (folder, was_cached).

    The build writes into a hidden partial folder, removed if it fails; on success the marker
    records the key, `config` (the config that built it), the inputs and the files' manifest,
    and the folder replaces the old one."""
    inputs = inputs or {}
    reason = stale(folder, key, inputs)
    if reason is None:
        return folder, True
    if reason not in ("unfinished", "another key"):
        print(f"recranker: {reason}; rebuilding {folder.name}", file=sys.stderr)
    partial = folder.parent / f".{folder.name}.partial"
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    started = time.time()
    try:
        with signals.cleanup(lambda: shutil.rmtree(partial, ignore_errors=True)):  # a stop that cannot wait
            build(partial)
            write_marker(partial, key, time.time() - started, __version__, config or {}, inputs)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
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


def fs_wait_s() -> float:
    """Seconds to wait for files another process wrote to show up here (RECRANKER_FS_WAIT_S)."""
    value = os.environ.get("RECRANKER_FS_WAIT_S", "30")
    try:
        return max(float(value), 0.0)
    except ValueError:
        raise RecRankerError(f"RECRANKER_FS_WAIT_S={value}: expected a number of seconds") from None


def _eventually(condition: Callable[[], bool], wait_s: float) -> bool:
    """Whether `condition()` holds now or within `wait_s` seconds (checked every 0.2 s): a network
    filesystem may show another host's new files late."""
    deadline = time.monotonic() + wait_s
    while not condition():
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.2)
    return True


def _holds_text(path: Path, text: str) -> bool:
    try:
        return path.read_text() == text
    except OSError:
        return False


_shared_roots: set[str] = set()


def check_shared_root(cfg: Config) -> None:
    """With several processes: every one sees the files process 0 writes into run.root (each
    process resolves run.root itself, so a relative one is relative to its own directory),
    else a RecRankerError in all of them. Once per root and process."""
    from recranker_jax.parallel import broadcast_text, gather_text, is_primary

    root = Path(cfg.run.root)
    if not several_processes() or str(root) in _shared_roots:
        return
    token = None
    if is_primary():
        root.mkdir(parents=True, exist_ok=True)
        token = secrets.token_hex(8)
        (root / f".shared-{token}").write_text(token)
    token = broadcast_text("run.root token", token)
    probe = root / f".shared-{token}"
    try:
        seen = gather_text("run.root seen", str(is_primary() or _eventually(lambda: _holds_text(probe, token),
                                                                             fs_wait_s())))
    finally:
        if is_primary():
            probe.unlink(missing_ok=True)
    blind = [str(i) for i, answer in enumerate(seen) if answer != "True"]
    if blind:
        raise RecRankerError(
            f"run.root={cfg.run.root}: process {', '.join(blind)} of {len(seen)} does not see the file process 0 "
            f"wrote there ({probe.name}); with several hosts run.root must be one folder every host mounts "
            "(NFS, Filestore, a gcsfuse-mounted bucket), given as an absolute path"
        )
    _shared_roots.add(str(root))


def upstream_digests(cfg: Config, name: str) -> dict[str, str]:
    """The digests of every finished stage `name` reads, directly or through its upstream."""
    digests, upstream = {}, STAGES[name].upstream
    while upstream:
        marker = read_marker(RunFolder.of(cfg).stage(upstream))
        if marker is not None:
            digests[upstream] = marker_digest(marker)
        upstream = STAGES[upstream].upstream
    return digests


def _build_stage(cfg: Config, stage: Stage, progress: bool) -> tuple[Path, bool]:
    """`build_cached` for one stage of the run; a stage that finishes records the run's config.yaml."""
    run_folder = RunFolder.of(cfg)
    run_folder.path.mkdir(parents=True, exist_ok=True)
    folder, cached = build_cached(run_folder.stage(stage.name), cache_key(cfg, stage.name),
                                  lambda out: stage.build(cfg, run_folder, out, progress), cfg.recorded(),
                                  upstream_digests(cfg, stage.name))
    if not cached:  # the config in the run folder is the one that built what is there
        run_folder.config.write_text(dump_config(cfg))
        if stage.checkpointed:
            _drop_checkpoints(run_folder.checkpoints(stage.name, cache_key(cfg, stage.name)),
                              keep_last=stage.name == "finetune" and cfg.train.keep_checkpoint)
    return folder, cached


def _drop_checkpoints(folder: Path, keep_last: bool) -> None:
    """A finished stage's training checkpoints: all removed, or all but the newest step."""
    steps = sorted((p for p in folder.glob("*") if p.name.isdigit()), key=lambda p: int(p.name)) if folder.is_dir() else []
    if not keep_last:
        shutil.rmtree(folder, ignore_errors=True)
        return
    for step in steps[:-1]:
        shutil.rmtree(step, ignore_errors=True)


def chain_of(name: str) -> list[str]:
    """Stage `name` and every stage it reads, directly or not, in pipeline order."""
    chain = [name]
    while STAGES[chain[-1]].upstream:
        chain.append(STAGES[chain[-1]].upstream)
    return chain[::-1]


def _flat(value: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(value, dict):
        flat: dict[str, Any] = {}
        for key, item in value.items():
            flat.update(_flat(item, f"{prefix}.{key}" if prefix else str(key)))
        return flat
    return {prefix: value}


def _covered(dotted: str, sections: set[str]) -> bool:
    """Whether a dotted config key is one of these cache-key sections (or inside one), and not
    a setting of how the model runs or of one command."""
    section, _, rest = dotted.partition(".")
    field = rest.split(".", 1)[0]
    if field in EXECUTION_SETTINGS.get(section, ()) or field in COMMAND_SETTINGS.get(section, ()):
        return False
    return any(dotted == s or dotted.startswith(s + ".") for s in sections)


def setting_changes(recorded: dict, cfg: Config, name: str) -> list[str]:
    """`key: old -> new` for each setting of stage `name`'s cache key (its sections and every
    upstream stage's) where the config that built it (`recorded`) and `cfg` differ."""
    sections = {s for stage in chain_of(name) for s in STAGES[stage].key_sections}
    old, new = _flat(recorded), _flat(cfg.recorded())
    return [f"{key}: {old.get(key, '(unset)')} -> {new.get(key, '(unset)')}"
            for key in sorted(set(old) | set(new), key=lambda k: (list(new).index(k) if k in new else len(new), k))
            if _covered(key, sections) and old.get(key) != new.get(key)]


def replacement(cfg: Config, chain: list[str]) -> str | None:
    """The one line refusing a command that would replace a finished stage of the run built with
    other settings (None when it replaces none, or `run.rebuild` allows it). A damaged stage, or
    one whose upstream output changed, is repaired, not replaced: not refused."""
    if cfg.run.rebuild:
        return None
    run_folder = RunFolder.of(cfg)
    replaced = [s for s in chain if (marker := read_marker(run_folder.stage(s))) is not None
                and marker.get("key") != cache_key(cfg, s)]
    if not replaced:
        return None
    first = replaced[0]
    marker = read_marker(run_folder.stage(first)) or {}
    changes = setting_changes(marker.get("config", {}), cfg, first)
    shown = "; ".join(changes[:6]) + (f"; and {len(changes) - 6} more" if len(changes) > 6 else "")
    if not shown:
        shown = f"no recorded setting differs (it was built by recranker-jax {marker.get('version', 'unknown')})"
    more = f" (and the finished {', '.join(replaced[1:])} after it)" if len(replaced) > 1 else ""
    return (f"run {run_folder.path}: the {first} stage finished with other settings{more}; this command would replace "
            f"it. Settings that differ: {shown}. To keep it, use another run.name; to replace it, add --rebuild "
            "(or run.rebuild=true)")


def _primary() -> bool:
    """Whether this is the process that writes the run's files (the only one, or process 0),
    without starting a backend when there is only one."""
    import jax

    return not jax.distributed.is_initialized() or jax.process_index() == 0


@contextlib.contextmanager
def writing(cfg: Config) -> Iterator[None]:
    """The run's lock (run_lock.py) for a command that writes into it: process 0 takes it and
    the others follow its answer, so all stop with the same line when another command holds it."""
    with contextlib.ExitStack() as stack:
        problem = None
        if _primary():
            try:
                stack.enter_context(run_lock.hold(RunFolder.of(cfg).path))
            except RecRankerError as err:
                problem = err
        if several_processes():
            from recranker_jax.parallel import broadcast_text

            text = broadcast_text("the run lock", None if problem is None else str(problem))
            problem = problem or (RecRankerError(text) if text else None)
        if problem is not None:
            raise problem
        yield


def run(cfg: Config, name: str, progress: bool = True) -> tuple[Path, bool]:
    """Stage `name` of the run (and, first, every unfinished stage before it); returns
    (its folder, whether it was cached). Under the run's lock, before any stage runs: the
    config's paths of the stages still to run are checked, and a finished stage that the
    config would replace stops the command (`replacement`)."""
    chain = chain_of(name)
    check_shared_root(cfg)
    with writing(cfg):
        run_folder = RunFolder.of(cfg)  # the later stages' paths first: those are the costly ones to reach
        check_paths(cfg, [s for s in chain[::-1] if finished_key(run_folder.stage(s)) != cache_key(cfg, s)])
        refusal = replacement(cfg, chain) if _primary() else None
        if several_processes():
            from recranker_jax.parallel import broadcast_text

            refusal = broadcast_text("the replacement check", refusal) or None
        if refusal:
            raise RecRankerError(refusal)
        return _run(cfg, name, progress)


def reusable(cfg: Config, name: str) -> bool:
    """Whether stage `name` and every stage it reads are finished, whole, for this config."""
    run_folder = RunFolder.of(cfg)
    return all(stale(run_folder.stage(s), cache_key(cfg, s), upstream_digests(cfg, s)) is None for s in chain_of(name))


@contextlib.contextmanager
def look(cfg: Config, name: str, progress: bool = True, note: bool = False) -> Iterator[Config]:
    """For a command that only looks (`data stats`, `bench`): a config whose run folder holds
    stage `name` finished for it, and writes nothing into run.root. That is the run itself when
    the stage and those it reads are finished and whole for this config; else a temporary run
    folder elsewhere where they are built, removed after the block (`note`: say so on stderr)."""
    if reusable(cfg, name):
        yield cfg
        return
    if note:
        print(f"recranker: {RunFolder.of(cfg).path} has no finished {name} stage for this config; building the stages "
              f"it needs in a temporary folder (nothing is written into run.root={cfg.run.root}; run `recranker "
              f"{name}` first to keep them)", file=sys.stderr)
    with tempfile.TemporaryDirectory(prefix="recranker-look-") as scratch:
        scratch_cfg = dataclasses.replace(cfg, run=dataclasses.replace(cfg.run, root=scratch))
        run(scratch_cfg, name, progress)
        yield scratch_cfg


def _run(cfg: Config, name: str, progress: bool) -> tuple[Path, bool]:
    stage = STAGES[name]
    if several_processes() and not stage.collective:
        return _process_zero_stage(cfg, stage)
    if stage.upstream:
        _run(cfg, stage.upstream, progress)
    if not stage.collective or not several_processes():
        return _build_stage(cfg, stage, progress)
    return _collective_stage(cfg, stage, progress)


def _process_zero_stage(cfg: Config, stage: Stage) -> tuple[Path, bool]:
    """A single-process stage when this process is one of several (module docstring)."""
    from recranker_jax.parallel import broadcast_text, is_primary, on_primary

    folder = RunFolder.of(cfg).stage(stage.name)

    def build_in_child() -> bool:
        if stale(folder, cache_key(cfg, stage.name), upstream_digests(cfg, stage.name)) is None:
            return True
        folder.parent.mkdir(parents=True, exist_ok=True)
        host = dataclasses.replace(cfg, mesh=dataclasses.replace(cfg.mesh, shape=[-1] + [1] * (len(cfg.mesh.axes) - 1)))
        config_file = folder.parent / f".{stage.name}-child.yaml"
        config_file.write_text(yaml.safe_dump(host.to_dict(), sort_keys=False))  # run.rebuild included
        command = [sys.executable, "-m", "recranker_jax.pipeline", stage.name, str(config_file)]
        env = {**os.environ, "RECRANKER_DISTRIBUTED": "off", "JAX_PLATFORMS": "cpu",
               **run_lock.child_environment(RunFolder.of(cfg).path)}  # it works under this process's lock
        code = subprocess.run(command, check=False, env=env, stdout=subprocess.DEVNULL).returncode
        config_file.unlink()
        if code:
            raise RecRankerError(f"the {stage.name} stage failed in the single-process child of process 0 (exit code "
                                 f"{code}); its error is printed above in process 0's log")
        RunFolder.of(cfg).config.write_text(dump_config(cfg))  # the user's config, not the child's host mesh
        return False

    cached = on_primary(f"the {stage.name} stage", build_in_child)
    cached = broadcast_text(f"was the {stage.name} stage cached", str(cached) if is_primary() else None) == "True"
    key = cache_key(cfg, stage.name)
    if _eventually(lambda: finished_key(folder) == key, fs_wait_s()):
        return folder, cached
    raise RecRankerError(
        f"{folder}: this process does not see the stage process 0 finished; with several processes "
        "run.root must be on a filesystem all of them share (NFS, Filestore, gcsfuse)"
    )


def _collective_stage(cfg: Config, stage: Stage, progress: bool) -> tuple[Path, bool]:
    """A stage every process of several takes part in (module docstring)."""
    import jax

    from recranker_jax.parallel import broadcast_text, is_primary, on_primary

    run_folder = RunFolder.of(cfg)
    folder = run_folder.stage(stage.name)
    reusable = stale(folder, cache_key(cfg, stage.name), upstream_digests(cfg, stage.name)) is None if is_primary() else None
    if broadcast_text(f"is the {stage.name} stage cached", str(reusable)) == "True":
        return folder, True

    def build_in_scratch() -> None:
        scratch = run_folder.path / f".process-{jax.process_index()}"
        shutil.rmtree(scratch, ignore_errors=True)
        (scratch / folder.name).mkdir(parents=True)
        try:
            stage.build(cfg, run_folder, scratch / folder.name, progress)
        finally:
            shutil.rmtree(scratch, ignore_errors=True)

    on_primary(f"the {stage.name} stage", lambda: _build_stage(cfg, stage, progress), others=build_in_scratch)
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
