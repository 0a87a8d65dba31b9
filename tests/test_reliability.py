"""No command damages a finished run and no bad input gets a traceback: a table of corrupted
stage outputs, bad paths and options, each run through the CLI, asserting the exit code, one
`error:` line or a rebuild that says why, and the run folder's files (hashes before and after)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from recranker_jax.cli import main
from recranker_jax.pipeline import build_cached, stale
from recranker_jax.run import MARKER, RunFolder, damage, file_digest, read_marker

SMALL = ["retrieval.epochs=2", "retrieval.eval_every=1", "retrieval.dim=8", "retrieval.batch_size=256",
         "retrieval.models=[lightgcn, explicit_mf]", "retrieval.explicit_mf.epochs=1",
         "retrieval.explicit_mf.eval_every=1", "sampling.size=40", "sampling.clusters=3",
         "prompts.tokenizer_vocab_size=500"]


def hashes(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): file_digest(p) for p in sorted(folder.rglob("*")) if p.is_file()}


def one_error_line(err: str) -> str:
    """The one `error:` line of stderr (progress bars redraw with carriage returns before it)."""
    errors = ["error: " + line.split("error: ", 1)[1] for line in err.replace("\r", "\n").splitlines() if "error: " in line]
    assert "Traceback" not in err and len(errors) == 1, err
    return errors[0]


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """A run whose data, retrieval and instructions stages finished (the embedded MovieLens)."""
    root = tmp_path_factory.mktemp("finished")
    assert main(["instructions", f"run.root={root}", *SMALL]) == 0
    return root


def copy_run(finished: Path, tmp_path: Path) -> tuple[list[str], Path]:
    shutil.copytree(finished, tmp_path / "root")
    return [f"run.root={tmp_path / 'root'}", *SMALL], tmp_path / "root" / "quickstart"


def truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def empty(path: Path) -> None:
    path.write_bytes(b"")


def wrong_header(path: Path) -> None:
    lines = path.read_text().splitlines(keepends=True)
    path.write_text("these,are,not,the,columns\n" + "".join(lines[1:]))


def directory(path: Path) -> None:
    path.unlink()
    path.mkdir()


CORRUPTIONS = [  # (stage whose command runs, file in the run folder, corruption)
    ("data", "data/train.csv", truncate), ("data", "data/items.csv", wrong_header), ("data", "data/meta.json", empty),
    ("data", "data/test.csv", directory),
    ("retrieval", "retrieval/candidates.csv", truncate), ("retrieval", "retrieval/lightgcn/embeddings.npz", empty),
    ("instructions", "instructions/test.jsonl", truncate), ("instructions", "instructions/stats.json", directory),
    ("instructions", "instructions/tokenizer/tokenizer.json", wrong_header),
]


@pytest.mark.parametrize("stage, name, corrupt", CORRUPTIONS, ids=[f"{c[1]}-{c[2].__name__}" for c in CORRUPTIONS])
def test_a_damaged_stage_output_is_rebuilt_with_one_line_never_used(finished, tmp_path, capsys, stage, name, corrupt):
    overrides, run = copy_run(finished, tmp_path)
    before = hashes(run)
    corrupt(run / name)
    command = ["data", "split"] if stage == "data" else [stage]
    assert main([*command, *overrides]) == 0
    err = capsys.readouterr().err
    assert "Traceback" not in err and f"; rebuilding {RunFolder(run).stage(stage).name}" in err, err
    assert name.split("/", 1)[1] in err  # the line names the damaged file
    for folder in ("data", "retrieval", "instructions"):  # every stage is whole again and reusable
        marker = read_marker(run / folder)
        assert marker is not None and damage(run / folder, marker) is None, folder
    if stage == "data":  # a deterministic stage comes back byte for byte
        assert {k: v for k, v in hashes(run).items() if k.startswith("data/") and not k.endswith(MARKER)} == {
            k: v for k, v in before.items() if k.startswith("data/") and not k.endswith(MARKER)}
    assert not list(run.glob(".*.partial")) and not list(run.glob(".*.previous"))


def test_a_downstream_stage_is_rebuilt_when_its_upstream_output_changed(tmp_path, capsys):
    calls = []

    def build(value):
        def write(out):
            calls.append(value)
            (out / "value.txt").write_text(value)
        return write

    upstream, _ = build_cached(tmp_path / "up", "k", build("a"))
    down, _ = build_cached(tmp_path / "down", "k", build("b"), inputs={"up": "digest-1"})
    assert stale(down, "k", {"up": "digest-1"}) is None
    reason = stale(down, "k", {"up": "digest-2"})
    assert reason == f"{down}: the up stage's output changed since this stage was built from it"
    _, cached = build_cached(down, "k", build("b"), inputs={"up": "digest-2"})
    assert not cached and calls == ["a", "b", "b"]
    assert f"{reason}; rebuilding down" in capsys.readouterr().err


def test_a_failed_call_keeps_the_config_that_built_the_run_and_leaves_nothing_behind(finished, tmp_path, capsys):
    overrides, run = copy_run(finished, tmp_path)
    before = hashes(run)
    source = tmp_path / "ml-100k"
    source.mkdir()  # a folder without u.data: the data stage fails inside
    assert main(["data", "split", "--rebuild", *overrides, "data.source=ml-100k", f"data.path={source}"]) == 2
    assert "u.data" in one_error_line(capsys.readouterr().err)
    assert hashes(run) == before  # config.yaml included
    assert not [p.name for p in run.iterdir() if p.name.startswith(".")]


def test_a_stage_command_without_config_uses_the_quickstart_config_and_reuses_the_run(finished, tmp_path, capsys):
    overrides, run = copy_run(finished, tmp_path)
    before = hashes(run)
    assert main(["retrieval", *overrides]) == 0  # no --config: the bundled quickstart, as the run was built
    assert "[retrieval] cached" in capsys.readouterr().out
    assert hashes(run) == before


@pytest.mark.parametrize("args, message", [
    (["instructions", "prompts.tokenizer=/no/such/tokenizer"], "error: prompts.tokenizer=/no/such/tokenizer: no such file or folder"),
    (["data", "split", "run.name=../elsewhere"], "error: run.name='../elsewhere': expected a folder name inside run.root"),
    (["data", "split", "run.name="], "error: run.name='': expected a folder name inside run.root"),
    (["finetune", "model.checkpoint=/no/such/llama", "prompts.tokenizer=/no/such/llama"],
     "error: model.checkpoint=/no/such/llama: no such file or folder"),
])
def test_bad_paths_and_names_fail_before_any_stage_runs(finished, tmp_path, capsys, args, message):
    overrides, run = copy_run(finished, tmp_path)
    before = hashes(run.parent)
    words = 2 if args[0] == "data" else 1  # the command, then its overrides
    assert main([*args[:words], *overrides, *args[words:]]) == 2
    assert one_error_line(capsys.readouterr().err).startswith(message)
    assert hashes(run.parent) == before


def test_os_errors_on_a_given_path_are_one_line(finished, tmp_path, capsys):
    overrides, run = copy_run(finished, tmp_path)
    before = hashes(run)
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    assert main(["data", "split", *overrides, "--out", str(blocker / "sub")]) == 2
    assert one_error_line(capsys.readouterr().err).startswith(f"error: {blocker / 'sub'}: Not a directory")
    assert hashes(run) == before


def test_a_truncated_safetensors_file_is_one_line_naming_it(tmp_path):
    from flax import nnx

    from recranker_jax.errors import RecRankerError
    from recranker_jax.llm.hf_export import export_hf
    from recranker_jax.llm.hf_import import load_hf_llama
    from recranker_jax.llm.llama import Llama, LlamaConfig

    export_hf(Llama(LlamaConfig(50, 16, 32, 1, 2, 2), nnx.Rngs(0)), tmp_path)
    truncate(tmp_path / "model.safetensors")
    with pytest.raises(RecRankerError, match=rf"^{tmp_path / 'model.safetensors'}: not a readable safetensors file"):
        load_hf_llama(tmp_path)


def test_ctrl_c_during_a_stage_is_one_line_and_exit_130(tmp_path):
    """SIGINT in the middle of retrieval training: one line, 130, no traceback, nothing half-written."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    command = [sys.executable, "-m", "recranker_jax.cli", "retrieval", f"run.root={tmp_path}", *SMALL,
               "retrieval.epochs=400", "retrieval.patience=1000"]
    process = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 300
    while not (tmp_path / "quickstart" / "checkpoints").exists() and time.time() < deadline:  # training started
        time.sleep(0.5)
    time.sleep(2)
    process.send_signal(signal.SIGINT)
    _, err = process.communicate(timeout=120)
    assert process.returncode == 130, err[-2000:]
    assert one_error_line(err).startswith("error: interrupted; run the same command again to resume")
    run = tmp_path / "quickstart"
    assert (run / "data" / MARKER).is_file() and not (run / "retrieval").exists()
    assert not list(run.glob(".*.partial"))


# ----------------------------------------------------------------------------- finished work is never lost


def test_a_changed_setting_stops_before_replacing_a_finished_stage(finished, tmp_path, capsys):
    overrides, run = copy_run(finished, tmp_path)
    before = hashes(run)
    for command, setting, change, stage in (
            (["instructions"], "retrieval.dim=16", "retrieval.dim: 8 -> 16", "retrieval"),
            (["data", "split"], "data.min_likes=5", "data.min_likes: 4 -> 5", "data"),
            (["instructions"], "run.seed=3", "run.seed: 0 -> 3", "retrieval"),
            (["instructions"], "sampling.size=41", "sampling.size: 40 -> 41", "instructions")):
        assert main([*command, *overrides, setting]) == 2
        line = one_error_line(capsys.readouterr().err)
        assert line.startswith(f"error: run {run}: the {stage} stage finished with other settings"), line
        assert f"Settings that differ: {change}." in line
        assert line.endswith("To keep it, use another run.name; to replace it, add --rebuild (or run.rebuild=true)")
        assert hashes(run) == before, command
    assert "(and the finished instructions after it)" in (
        main(["instructions", *overrides, "retrieval.dim=16"]), one_error_line(capsys.readouterr().err))[1]

    assert main(["retrieval", "--rebuild", *overrides, "retrieval.dim=16"]) == 0  # asked for: replaced
    assert "[retrieval] done" in capsys.readouterr().out
    assert read_marker(run / "retrieval")["config"]["retrieval"]["dim"] == 16
    assert "rebuild" not in (run / "config.yaml").read_text()  # a command's setting, not the run's
    assert {k: v for k, v in hashes(run).items() if k.startswith(("data/", "instructions/"))} == {
        k: v for k, v in before.items() if k.startswith(("data/", "instructions/"))}


def test_commands_that_only_look_write_nothing_into_runs(finished, tmp_path, capsys):
    from tests.helpers import synthetic_ml100k

    overrides, run = copy_run(finished, tmp_path)
    before = hashes(run.parent)
    source = synthetic_ml100k(tmp_path / "ml-100k")
    assert main(["data", "stats", "--json", *overrides, "data.source=ml-100k", f"data.path={source}"]) == 0
    stats = json.loads(capsys.readouterr().out)
    assert stats["source"] == "ml-100k" and stats["users"] == 48  # the other data's numbers, from a temporary folder
    assert main(["data", "stats", *overrides, "data.min_likes=5"]) == 0
    assert "users_kept" in capsys.readouterr().out
    assert hashes(run.parent) == before and sorted(p.name for p in run.parent.iterdir()) == ["quickstart"]
    fresh = tmp_path / "fresh-root"
    assert main(["data", "stats", f"run.root={fresh}"]) == 0
    with pytest.raises(SystemExit) as done:
        main(["retrieval", "--help", f"run.root={fresh}"])
    assert done.value.code == 0 and not fresh.exists()


def test_an_empty_config_a_repeated_key_or_a_folder_is_refused_with_the_file_and_line(finished, tmp_path, capsys):
    overrides, run = copy_run(finished, tmp_path)
    before = hashes(run)
    empty, repeated = tmp_path / "empty.yaml", tmp_path / "repeated.yaml"
    empty.write_text("# nothing here\n")
    repeated.write_text("train:\n  steps: 5\n  lr: 1.0e-3\n  steps: 7\n")
    for config, message in ((empty, f"error: config file {empty} line 1: the file is empty (or only comments)"),
                            (repeated, f"error: config file {repeated} line 4: duplicate key 'steps' (first on line 2); "
                                       "keep one"),
                            (tmp_path, f"error: config file {tmp_path} is a folder; pass a YAML file")):
        assert main(["rank", "--config", str(config), *overrides]) == 2
        assert one_error_line(capsys.readouterr().err).startswith(message)
    assert hashes(run) == before


@pytest.mark.parametrize("setting, message", [
    ("train.lr=-1", "train.lr=-1.0: expected a positive learning rate"),
    ("train.lr=0", "train.lr=0.0: expected a positive learning rate"),
    ("train.lr=inf", "train.lr=inf: expected a finite number"),
    ("train.lr=nan", "train.lr=nan: expected a finite number"),
    ("retrieval.lr=-1", "retrieval.lr=-1.0: expected a positive learning rate"),
    ("retrieval.sequence.lr=0", "retrieval.sequence.lr=0.0: expected a positive learning rate"),
    ("pretrain.lr=-0.1", "pretrain.lr=-0.1: expected a positive learning rate"),
    ("train.warmup_steps=-5", "train.warmup_steps=-5: expected 0 or more"),
    ("train.clip_norm=0", "train.clip_norm=0.0: expected a positive gradient norm"),
    ("run.seed=-1", "run.seed=-1: expected an integer from 0 to 4294967295"),
    ("run.seed=4294967296", "run.seed=4294967296: expected an integer from 0 to 4294967295"),
    ("run.name=a\nb", "run.name='a\\nb': expected a folder name inside run.root (no '/', no control characters"),
    ("rank.alphas=[1, .nan, 1]", "rank.alphas[1]=nan: expected a finite number"),
    ("model.num_attention_heads=3", "model.num_attention_heads=3: expected a divisor of model.hidden_size=128"),
])
def test_impossible_values_stop_at_load(finished, tmp_path, capsys, setting, message):
    overrides, run = copy_run(finished, tmp_path)
    before = hashes(run.parent)
    assert main(["rank", *overrides, setting]) == 2
    assert one_error_line(capsys.readouterr().err).startswith(f"error: {message}")
    assert hashes(run.parent) == before


def test_a_diverging_retrieval_model_stops_the_stage_unfinished(finished, tmp_path, capsys):
    overrides, run = copy_run(finished, tmp_path)
    before = hashes(run)
    assert main(["retrieval", "--rebuild", *overrides, "retrieval.lr=1e30"]) == 2
    line = one_error_line(capsys.readouterr().err)
    assert line.startswith("error: lightgcn: the mean loss of epoch ") and ": training diverged and stopped, not marked " \
        "done;" in line and line.endswith("; lower the learning rate (retrieval.lr=1e+30)"), line
    assert hashes(run) == before  # the finished retrieval is as it was
    assert not list(run.glob(".*.partial"))


def test_weak_messages_are_precise(finished, tmp_path, capsys, monkeypatch):
    overrides, run = copy_run(finished, tmp_path)
    not_a_model = tmp_path / "llama-7b"
    not_a_model.mkdir()
    (not_a_model / "README.md").write_text("weights still downloading\n")
    before = hashes(run)
    assert main(["rank", *overrides, f"model.checkpoint={not_a_model}", f"prompts.tokenizer={not_a_model}"]) == 2
    assert one_error_line(capsys.readouterr().err) == (
        f"error: model.checkpoint={not_a_model}: the folder has no config.json and no *.safetensors; expected a Hugging "
        "Face LLaMA checkpoint folder (config.json and model*.safetensors) or a .gguf file")
    assert hashes(run) == before
    assert main(["bench", "compile", "--preset", "nosuch"]) == 2
    assert one_error_line(capsys.readouterr().err).startswith("error: bench compile: --preset 'nosuch': expected one of")
    monkeypatch.chdir(tmp_path)
    assert main(["report", "run.root=runs"]) == 2
    assert one_error_line(capsys.readouterr().err).startswith(
        f"error: no run folder {tmp_path / 'runs' / 'quickstart'}: run.root=runs is read from the current folder")


@pytest.mark.parametrize("command, setting, message", [
    (["retrieval", "--rebuild"], "retrieval.dim=10000000",
     "error: retrieval.dim=10000000: training lightgcn's embedding tables (9,730 rows, with Adam's state) needs at "
     "least 1.6 TB, more than this host's free memory (32.0 GB); the largest workable retrieval.dim is at most about "),
    (["finetune"], "train.batch_size=100000000",
     "error: train.batch_size=100000000: one training batch (train.batch_size=100,000,000 x train.seq_len=1,152 tokens) "
     "on the host needs at least 3.7 TB, more than this host's free memory (32.0 GB); the largest workable "
     "train.batch_size is at most about "),
    (["finetune", "train.batch_size=8"], "train.seq_len=100000000",  # the batch splits over the tests' 8 devices
     "error: train.seq_len=100000000: one finetune step (train.batch_size=8 x train.seq_len=100,000,000 tokens) needs "
     "at least 819.2 GB, more than this host's free memory (32.0 GB); the largest workable train.seq_len is at most "),
])
def test_sizes_that_cannot_fit_stop_before_allocating(finished, tmp_path, capsys, monkeypatch, command, setting, message):
    import recranker_jax.hardware as hardware

    monkeypatch.setattr(hardware, "host_memory_available", lambda: 32 * 10**9)  # the same verdict on any machine
    overrides, run = copy_run(finished, tmp_path)
    before = hashes(run)
    assert main([*command, *overrides, setting]) == 2
    assert one_error_line(capsys.readouterr().err).startswith(message)
    finished_stages = ("data/", "retrieval/", "instructions/")  # (the finetune builds the pretrain stage first)
    assert {k: v for k, v in hashes(run).items() if k.startswith(finished_stages)} == {
        k: v for k, v in before.items() if k.startswith(finished_stages)}
    assert not list(run.glob(".*.partial")) and not list((run / "checkpoints").glob("*"))


def test_a_rank_batch_that_cannot_fit_stops_before_scoring(monkeypatch):
    from flax import nnx

    import recranker_jax.hardware as hardware
    from recranker_jax.config import load_config
    from recranker_jax.errors import RecRankerError
    from recranker_jax.llm.llama import Llama, LlamaConfig
    from recranker_jax.rank.ranker import check_batches_fit

    monkeypatch.setattr(hardware, "host_memory_available", lambda: 8 * 10**9)
    model = Llama(LlamaConfig(64, 16, 32, 2, 2, 2), nnx.Rngs(0))
    check_batches_fit(load_config("quickstart"), model)  # rank.batch_size=16 fits
    with pytest.raises(RecRankerError, match=r"^rank.batch_size=100000000: one rank batch of prompts of up to 1,024 "
                                             r"tokens needs at least 921.6 GB, more than this host's free memory "
                                             r"\(8.0 GB\); the largest workable rank.batch_size is at most about 868,055$"):
        check_batches_fit(load_config("quickstart", ["rank.batch_size=100000000"]), model)
