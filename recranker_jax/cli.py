"""`recranker <stage> [--config FILE] [key=value ...]`: a thin shell over the library.

Each subcommand loads the config, calls one library function and prints its
result. A `RecRankerError`, an OS error on a path or a file a library cannot read becomes one
line on stderr and exit code 2 (RECRANKER_DEBUG=1 shows the traceback); Ctrl-C one line and 130,
SIGTERM one line and 143 (signals.py: honoured even inside a long XLA call).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from collections.abc import Sequence
from pathlib import Path

from recranker_jax import __version__
from recranker_jax.config import load_config
from recranker_jax.config_checks import parse_profile_steps
from recranker_jax.errors import RecRankerError

def _add_common(parser: argparse.ArgumentParser, default_config: str | None = None, required: bool = False) -> None:
    parser.add_argument(
        "--config",
        default=default_config,
        required=required,
        help="YAML config file, or the name of a bundled config (e.g. quickstart)"
        + ("; required" if required else f"; default {default_config}" if default_config
           else "; default: built-in defaults"),
    )
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="dotted overrides, e.g. data.min_likes=5")


def _add_rebuild(parser: argparse.ArgumentParser) -> None:
    """--rebuild on the commands that write stages (run.rebuild=true)."""
    parser.add_argument("--rebuild", action="store_true",
                        help="replace finished stages built with other settings (run.rebuild=true); without it such "
                             "a command stops before any work and names the settings that differ")


def _add_profile(parser: argparse.ArgumentParser, where: str) -> None:
    """--profile START:STOP: a jax.profiler trace of those steps (counted from 1)."""
    parser.add_argument("--profile", metavar="START:STOP",
                        help=f"trace the steps START .. STOP-1 (counted from 1) with jax.profiler into {where}; "
                             "open it with TensorBoard's profile plugin or XProf")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="recranker", description="RecRanker in JAX. Start with `recranker quickstart`: the whole pipeline on "
        "the embedded MovieLens, on the CPU; every run lives in run.root/run.name (default ./runs/quickstart).")
    parser.add_argument("--version", action="version", version=f"recranker-jax {__version__}")
    stages = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    data = stages.add_parser("data", help="load, inspect and split the ratings",
                             description="Load the ratings of data.source, inspect them and write the leave-one-out split.")
    data_commands = data.add_subparsers(dest="data_command", required=True, metavar="ACTION")
    stats = data_commands.add_parser("stats", help="dataset and split statistics",
                                     description="Dataset and split statistics (runs the data stage if needed).")
    _add_common(stats, default_config="quickstart")
    stats.add_argument("--json", action="store_true", help="print the statistics as JSON")
    split = data_commands.add_parser("split", help="write train/valid/test/items CSVs",
                                     description="Write train/valid/test/items CSVs (raw ids) into the run's data/.")
    _add_common(split, default_config="quickstart")
    _add_rebuild(split)
    split.add_argument("--out", help="also copy the CSVs into this folder")

    from recranker_jax.pipeline import STAGES

    for stage in STAGES.values():
        if stage.name != "data":  # data has its own actions above
            text = f"{stage.help} (runs the unfinished stages before it first)"
            stage_parser = stages.add_parser(stage.name, help=text, description=text)
            _add_common(stage_parser, default_config="quickstart")
            _add_rebuild(stage_parser)
            if stage.name in ("pretrain", "finetune"):
                _add_profile(stage_parser, f"runs/<name>/{stage.name}/profile/ (train.profile_steps)")

    bench = stages.add_parser("bench", help="throughput benchmarks",
                              description="Throughput benchmarks, JAX against PyTorch where a counterpart exists.")
    bench_commands = bench.add_subparsers(dest="bench_command", required=True, metavar="BENCHMARK")
    bench_retrieval = bench_commands.add_parser(
        "retrieval", help="retrieval epoch and full-ranking time, JAX vs PyTorch: LightGCN (dense, edges vs "
                          "torch.sparse.mm) or SASRec (--model sasrec)"
    )
    _add_common(bench_retrieval, default_config="quickstart")
    bench_retrieval.add_argument("--model", default="lightgcn", choices=["lightgcn", "sasrec"],
                                 help="lightgcn (retrieval.* settings) or sasrec (retrieval.sequence.* settings)")
    bench_retrieval.add_argument("--repeats", type=int, default=3, help="timed repeats after one warm-up (median)")
    bench_retrieval.add_argument("--out", help="also write the results as JSON to this file")
    bench_all = bench_commands.add_parser(
        "all", help="retrieval, training and ranking benchmarks at fixed sizes, in one file for `bench compare`"
    )
    _add_common(bench_all, default_config="quickstart")
    bench_all.add_argument("--out", required=True, help="write the results as JSON to this file")
    bench_all.add_argument("--only", default="retrieval,train,rank", help="comma-separated parts (default: all three)")
    bench_all.add_argument("--train-preset", default="auto", choices=["auto", "quickstart", "7b-lora"],
                           help="training problem: auto = quickstart on the CPU, 7b-lora on accelerators")
    bench_all.add_argument("--repeats", type=int, default=3, help="timed repeats after a warm-up (median)")
    bench_rank = bench_commands.add_parser(
        "rank", help="seconds per scored candidate: prefix-cached scorers vs generate-and-parse, same model and prompts"
    )
    _add_common(bench_rank, default_config="quickstart")
    bench_rank.add_argument("--users", type=int, default=32, help="test users whose prompts are scored (default 32)")
    bench_rank.add_argument("--repeats", type=int, default=1, help="timed repeats after one warm-up (median)")
    bench_rank.add_argument("--preset", default="run",
                            help="the model: run (default; the run's tuned model), 7b (LLaMA-2 7B shapes, random "
                                 "bfloat16 weights; accelerators) or tiny (the same path, 2 small layers); the random "
                                 "presets need no finetune stage")
    bench_rank.add_argument("--layers", type=int, help="a random preset at this many layers")
    bench_rank.add_argument("--no-torch", action="store_true",
                            help="skip transformers' generate on the same device and weights")
    bench_rank.add_argument("--out", help="also write the results as JSON to this file")
    bench_rank.add_argument("--profile", action="store_true",
                            help="trace one more pass of each scorer with jax.profiler into runs/<name>/bench/rank/profile/")
    bench_train = bench_commands.add_parser(
        "train", help="training-step tokens/s, MFU and peak memory: JAX vs transformers' PyTorch LlamaForCausalLM "
                      "(+ peft LoRA) on the same device (CPU or CUDA GPU)"
    )
    _add_common(bench_train, default_config="quickstart")
    bench_train.add_argument("--preset", default="quickstart",
                             choices=["quickstart", "quickstart-answers", "tiny-lora", "7b-lora", "config"],
                             help="problem size: quickstart (default; the CPU model, loss on every position), "
                                  "quickstart-answers (the same, loss on answer tokens as in the finetune), "
                                  "tiny-lora (a small float32 LoRA problem, for tests), 7b-lora (accelerators; "
                                  "PyTorch + PEFT on CUDA), or config (the config's model and train sections)")
    bench_train.add_argument("--repeats", type=int, default=5, help="timed steps per side, interleaved (median)")
    bench_train.add_argument("--warmup", type=int, default=2, help="untimed steps first (the first compiles)")
    bench_train.add_argument("--no-torch", action="store_true", help="time JAX only")
    bench_train.add_argument("--cpus", help="pin both sides to these CPUs, e.g. 0 or 0,1 (PyTorch: that many threads)")
    bench_train.add_argument("--remat", metavar="POLICY",
                             help="the JAX side's remat policy, overriding the preset's (auto, none, minimal, dots, full); "
                                  "PyTorch uses gradient checkpointing unless it resolves to none")
    bench_train.add_argument("--out", help="also write the results as JSON to this file")
    _add_profile(bench_train, "runs/<name>/bench/train/profile/ (the JAX side; the untimed steps count first)")
    bench_compile = bench_commands.add_parser(
        "compile", help="the training step of a bench train preset lowered and compiled from abstract shapes: "
                        "program size, seconds, memory"
    )
    _add_common(bench_compile, default_config="quickstart")
    bench_compile.add_argument("--preset", default="7b-lora", help="a bench train preset (default 7b-lora) or config")
    bench_compile.add_argument("--layers", type=int, help="the preset at this many layers")
    bench_compile.add_argument("--loop", action="store_true", help="looped layers instead of scanned")
    bench_compile.add_argument("--remat", help="the remat policy (default: the preset's)")
    bench_compile.add_argument("--out", help="also write the results as JSON to this file")
    bench_compare = bench_commands.add_parser("compare", help="bench result files side by side, with ratios to the first")
    bench_compare.add_argument("files", nargs="+", metavar="RESULT.json", help="files written by recranker bench")
    bench_compare.add_argument("--plot", metavar="PNG",
                               help="where to write the plot (default: beside the first file, <stem>-compare.png)")

    plan = stages.add_parser("plan", help="bytes per device of a finetune config on a mesh (abstract shapes, no weights)")
    _add_common(plan)
    from recranker_jax.plan import add_plan_arguments

    add_plan_arguments(plan)

    compile_text = ("compile the finetune step for a TPU slice ahead of time (the tpu extra; no TPU, no weights): "
                    "per-chip memory against the chip's HBM")
    compile_parser = stages.add_parser("compile", help=compile_text, description=compile_text)
    _add_common(compile_parser)
    from recranker_jax.compile import add_compile_arguments

    add_compile_arguments(compile_parser)

    report = stages.add_parser("report", help="write the run's report.md and plots, or compare runs side by side",
                               description="Write the run's report (verdict first: report.md, report.html, plots/) "
                                           "and print its table and verdict; with --runs, compare finished runs.")
    _add_common(report, default_config="quickstart")
    report.add_argument("--runs", nargs="+", metavar="DIR", help="compare these run folders in one table instead")
    report.add_argument("--split", default="test", help="split shown in the printed table (test or valid); default test")

    quickstart = stages.add_parser("quickstart", help="the whole pipeline on the embedded MovieLens, on the CPU",
                                   description="Every stage on the embedded MovieLens with configs/quickstart.yaml, "
                                               "then the report and its verdict (about 2-3 minutes on a laptop CPU).")
    _add_common(quickstart, default_config="quickstart")
    _add_rebuild(quickstart)
    pipeline = stages.add_parser("pipeline", help="every stage for any config",
                                 description="Every stage of a config, then the report and its verdict.")
    _add_common(pipeline, required=True)
    _add_rebuild(pipeline)
    _add_config_commands(stages)
    _describe(parser)
    return parser


def _describe(parser: argparse.ArgumentParser) -> None:
    """Give every subcommand's help page a description line: its one-line help, where it has none."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for choice in action._choices_actions:
                sub = action.choices[choice.dest]
                if not sub.description and choice.help:
                    sub.description = choice.help[0].upper() + choice.help[1:] + "."
                _describe(sub)


def _add_config_commands(stages) -> None:
    config = stages.add_parser("config", help="show the resolved config or list the config keys",
                               description="The resolved config with each key's meaning, or every key.")
    actions = config.add_subparsers(dest="config_command", required=True, metavar="ACTION")
    show = actions.add_parser("show", help="the resolved config as YAML, each key's meaning as a comment",
                              description="The resolved config (file <- key=value overrides, checked) as YAML, each "
                                          "key's meaning as a comment; it loads back as a config file.")
    _add_common(show, default_config="quickstart")
    actions.add_parser("keys", help="every config key with its type, default and meaning",
                       description="Every config key with its type, default and one-line meaning.")


def cmd_data_stats(args: argparse.Namespace) -> int:
    """Only looks: the run's finished split, else one made in a temporary folder (nothing written into runs/)."""
    from recranker_jax.data.split import format_stats
    from recranker_jax.pipeline import look
    from recranker_jax.run import RunFolder, read_json

    with look(load_config(args.config, args.overrides), "data", progress=False) as cfg:
        stats = read_json(RunFolder.of(cfg).data.meta)
    print(json.dumps(stats, indent=2) if args.json else format_stats(stats))
    return 0


def cmd_data_split(args: argparse.Namespace) -> int:
    from recranker_jax.pipeline import run
    from recranker_jax.run import SPLIT_FILES, DataFolder

    out, cached = run(load_config(args.config, args.overrides), "data")
    target = out
    if args.out:
        target = Path(args.out)
        if target.exists() and not target.is_dir():
            raise RecRankerError(f"--out {target}: expected a folder, found a file")
        target.mkdir(parents=True, exist_ok=True)
        for source in (*(out / name for name in SPLIT_FILES), DataFolder(out).meta):
            shutil.copyfile(source, target / source.name)
    print(f"split {'reused from' if cached else 'written to'} {out}" + (f", copied to {target}" if args.out else ""))
    return 0


def _run_stage(cfg, name: str) -> None:
    from recranker_jax.pipeline import STAGES, run

    out, cached = run(cfg, name)
    print(STAGES[name].summary(cfg, out, cached))


def _write_report(cfg) -> None:
    from recranker_jax.parallel import is_primary
    from recranker_jax.report import verdict_lines, write_report

    if is_primary():  # with several processes, process 0 writes the report
        print(f"[report] written: {write_report(cfg.run_dir)}")
        print("\n".join(f"[verdict] {line}" for line in verdict_lines(cfg.run_dir)))


def cmd_stage(args: argparse.Namespace) -> int:
    """`recranker <stage>`: run one stage (and any unfinished stage before it)."""
    _run_stage(load_config(args.config, args.overrides), args.command)
    return 0


def cmd_pipeline(args: argparse.Namespace) -> int:
    """Every stage of the table, then the report."""
    from recranker_jax.pipeline import STAGES, writing

    cfg = load_config(args.config, args.overrides)
    with writing(cfg):  # one lock across every stage and the report
        for name in STAGES:
            _run_stage(cfg, name)
        _write_report(cfg)
    return 0


def _show_results(doc: dict, format_results, out: str | None) -> int:
    """Print a benchmark's table and, with --out, write its document as JSON."""
    print(format_results(doc))
    if out:
        Path(out).write_text(json.dumps(doc, indent=2) + "\n")
        print(f"results written to {out}")
    return 0


def cmd_bench_retrieval(args: argparse.Namespace) -> int:
    from recranker_jax.bench.retrieval import bench_retrieval, format_results

    if args.repeats < 1:
        raise RecRankerError(f"--repeats {args.repeats}: expected a positive integer")
    doc = bench_retrieval(load_config(args.config, args.overrides), repeats=args.repeats, model=args.model)
    return _show_results(doc, format_results, args.out)


def cmd_bench_all(args: argparse.Namespace) -> int:
    from recranker_jax.bench.all import bench_all
    from recranker_jax.bench.compare import format_comparison, plot_comparison

    doc = bench_all(load_config(args.config, args.overrides), [p.strip() for p in args.only.split(",") if p.strip()],
                    args.train_preset, args.repeats)
    Path(args.out).write_text(json.dumps(doc, indent=2) + "\n")
    print(format_comparison([args.out]))
    print(f"results written to {args.out}")
    plot = Path(args.out).with_suffix(".png")
    plot_comparison([args.out], plot)
    print(f"plot written to {plot}")
    return 0


def cmd_bench_rank(args: argparse.Namespace) -> int:
    from recranker_jax.bench.rank import bench_rank, format_results

    doc = bench_rank(load_config(args.config, args.overrides), users=args.users, repeats=args.repeats,
                     preset=args.preset, layers=args.layers, compare_torch=not args.no_torch, profile=args.profile)
    return _show_results(doc, format_results, args.out)


def cmd_bench_train(args: argparse.Namespace) -> int:
    from recranker_jax.bench.train import bench_train, format_results

    doc = bench_train(load_config(args.config, args.overrides), repeats=args.repeats, preset=args.preset,
                      warmup=args.warmup, compare_torch=not args.no_torch, cpus=args.cpus, remat=args.remat,
                      profile=parse_profile_steps(args.profile) if args.profile else None)
    return _show_results(doc, format_results, args.out)


def cmd_bench_compile(args: argparse.Namespace) -> int:
    from recranker_jax.bench.compile import bench_compile, format_results

    doc = bench_compile(load_config(args.config, args.overrides), preset=args.preset, scan_layers=not args.loop,
                        layers=args.layers, remat=args.remat)
    return _show_results(doc, format_results, args.out)


def cmd_config_show(args: argparse.Namespace) -> int:
    from recranker_jax.config_keys import format_config

    print(format_config(load_config(args.config, args.overrides)), end="")
    return 0


def cmd_config_keys(args: argparse.Namespace) -> int:
    from recranker_jax.config_keys import format_keys

    print(format_keys())
    return 0


def cmd_bench_compare(args: argparse.Namespace) -> int:
    from recranker_jax.bench.compare import default_plot_path, format_comparison, plot_comparison

    print(format_comparison(args.files))
    plot = Path(args.plot) if args.plot else default_plot_path(args.files)
    plot_comparison(args.files, plot)
    print(f"plot written to {plot}")
    return 0


def cmd_plan(args: argparse.Namespace) -> int:
    from recranker_jax.plan import run_plan

    return run_plan(args)


def cmd_compile(args: argparse.Namespace) -> int:
    from recranker_jax.compile import run_compile

    return run_compile(args)


def cmd_report(args: argparse.Namespace) -> int:
    from recranker_jax.report import compare_runs, format_table, verdict_lines, write_report
    from recranker_jax.run import RunFolder, read_json

    if args.runs:
        if args.overrides or args.config != "quickstart":
            raise RecRankerError("report --runs compares finished run folders; drop --config and key=value overrides")
        print(compare_runs([Path(d) for d in args.runs], args.split))
        return 0
    from recranker_jax.pipeline import writing

    cfg = load_config(args.config, args.overrides)
    if not cfg.run_dir.is_dir():
        raise RecRankerError(f"no run folder {cfg.run_dir.absolute()}: run.root={cfg.run.root} is read from the "
                             f"current folder ({Path.cwd()}); cd to the folder the run was started from, or pass "
                             f"run.root=<absolute path> (and run.name=...)")
    with writing(cfg):
        print(f"report written to {write_report(cfg.run_dir)}")
    print(format_table(read_json(RunFolder.of(cfg).metrics), args.split))
    print("\n".join(f"[verdict] {line}" for line in verdict_lines(cfg.run_dir)))
    return 0


COMMANDS = {
    ("data", "stats"): cmd_data_stats,
    ("data", "split"): cmd_data_split,
    # every other stage of pipeline.STAGES: cmd_stage
    ("bench", "retrieval"): cmd_bench_retrieval,
    ("bench", "compare"): cmd_bench_compare,
    ("bench", "rank"): cmd_bench_rank,
    ("bench", "train"): cmd_bench_train,
    ("bench", "compile"): cmd_bench_compile,
    ("bench", "all"): cmd_bench_all,
    ("plan", None): cmd_plan,
    ("compile", None): cmd_compile,
    ("quickstart", None): cmd_pipeline,
    ("pipeline", None): cmd_pipeline,
    ("report", None): cmd_report,
    ("config", "show"): cmd_config_show,
    ("config", "keys"): cmd_config_keys,
}


def _file_errors() -> tuple[type[BaseException], ...]:
    """Errors that mean a file or path the user gave (or a run folder holds) is bad, not a bug."""
    import zipfile

    import pandas.errors
    from safetensors import SafetensorError

    return (OSError, SafetensorError, zipfile.BadZipFile, pandas.errors.ParserError, pandas.errors.EmptyDataError,
            UnicodeDecodeError)


def _one_line(err: BaseException) -> str:
    if isinstance(err, OSError) and err.filename is not None:
        return f"{err.filename}: {err.strerror or err}"
    return " ".join(str(err).split()) or type(err).__name__


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if getattr(args, "rebuild", False):
        args.overrides = [*args.overrides, "run.rebuild=true"]
    if getattr(args, "profile", None) and args.command in ("pretrain", "finetune"):
        try:
            start, stop = parse_profile_steps(args.profile)
        except RecRankerError as err:
            print(f"error: {err}", file=sys.stderr)
            return err.exit_code
        args.overrides = [*args.overrides, f"train.profile_steps=[{start}, {stop}]"]
    action = (getattr(args, "data_command", None) or getattr(args, "bench_command", None)
              or getattr(args, "config_command", None))
    handler = COMMANDS.get((args.command, action), cmd_stage)  # the table's stages (parser choices)
    debug = os.environ.get("RECRANKER_DEBUG") == "1"
    try:
        from recranker_jax.parallel import initialize_distributed, set_xla_flags, skip_absent_tpu

        skip_absent_tpu()  # libtpu installed, no TPU here: the CPU, without libtpu's start-up
        set_xla_flags()  # before any backend starts (the bench workers inherit them)
        initialize_distributed()  # several processes (TPU pod, Slurm, RECRANKER_*): join them first
        return handler(args)
    except RecRankerError as err:
        if debug:
            raise
        print(f"error: {_one_line(err)}", file=sys.stderr)
        return err.exit_code
    except KeyboardInterrupt as err:  # Ctrl-C, or SIGTERM once signals.install ran (exit 143)
        if debug:
            raise
        from recranker_jax.signals import exit_code

        code = exit_code(err)
        print(f"error: {'terminated (SIGTERM)' if code == 143 else 'interrupted'}; run the same command again to "
              "resume (finished stages and training checkpoints are kept)", file=sys.stderr)
        return code
    except _file_errors() as err:
        if debug:
            raise
        print(f"error: {_one_line(err)} (RECRANKER_DEBUG=1 shows the traceback)", file=sys.stderr)
        return 2


def entry_point() -> None:
    from recranker_jax import signals

    signals.install()  # SIGTERM and Ctrl-C stop the command within seconds, whatever it is doing
    try:
        code = main()
        sys.stdout.flush()
    except BrokenPipeError:  # `recranker data stats --json | head` ends quietly
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        code = 0
    signals.finishing(code)
    sys.exit(code)


if __name__ == "__main__":
    entry_point()
