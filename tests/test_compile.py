"""`recranker compile`: accelerator types, the compiler's out-of-memory figures and the remat
choice (pure), then the command itself on TPU slices described by libtpu (no TPU): a small
config fits and its argument bytes equal the planner's state bytes, LLaMA-2 7B shapes on one
v5e chip are refused with the compiler's figure (exit 3), `--remat auto` keeps the first policy
that fits, and a mesh that does not use the slice's chips is one line before any compile.

The libtpu cases run in subprocesses (JAX_PLATFORMS=cpu is this test session's backend; libtpu
is loaded by one process at a time unless ALLOW_MULTIPLE_LIBTPU_LOAD is set)."""

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from recranker_jax.compile import known_accelerators, parse_accelerator
from recranker_jax.errors import RecRankerError
from recranker_jax.train.aot import out_of_memory_figures
from recranker_jax.train.remat_choice import FASTEST_FIRST, choose_remat, remember_choice, remembered_choice

ROOT = Path(__file__).resolve().parents[1]
needs_libtpu = pytest.mark.skipif(importlib.util.find_spec("libtpu") is None,
                                  reason='libtpu is not installed (pip install -e ".[tpu]")')


@pytest.mark.parametrize("name, topology, chips", [
    ("v5litepod-8", "v5e:2x4", 8), ("v5e-16", "v5e:4x4", 16), ("v5litepod-256", "v5e:16x16", 256),
    ("v4-8", "v4:2x2x1", 4), ("v4-32", "v4:2x4x2", 16), ("v5p-8", "v5p:2x2x1", 4), ("v6e-8", "v6e:2x4", 8),
])
def test_accelerator_types_name_their_topology_and_chips(name, topology, chips):
    tpu = parse_accelerator(name)
    # v4 and v5p count TensorCores (two a chip) in the name; v5e and v6e count chips
    assert (tpu.topology, tpu.chips) == (topology.replace("v4:2x4x2", "v4:2x2x4"), chips)
    generation, grid = tpu.topology.split(":")
    assert eval("*".join(grid.split("x"))) == chips
    assert tpu.accelerator in known_accelerators()


def test_an_unknown_accelerator_type_is_one_line_listing_the_known_ones():
    for name in ("v9-8", "v5litepod-3", "v4-6", "tpu"):
        with pytest.raises(RecRankerError, match=rf"accelerator type '{name}' is unknown; expected one of v4-8, "):
            parse_accelerator(name)


def test_the_compilers_out_of_memory_figures_are_read_from_its_message():
    message = ("RESOURCE_EXHAUSTED: Ran out of memory on HBM, the total memory required for HLO temporaries "
               "(29.16G) exceeds available HBM (15.75G).")
    assert out_of_memory_figures(message) == {"needed_bytes": int(29.16 * 2**30), "capacity_bytes": int(15.75 * 2**30)}
    assert out_of_memory_figures("Used 512.5M of 15.75G hbm.")["needed_bytes"] == int(512.5 * 2**20)
    assert out_of_memory_figures("INTERNAL: something else") is None


def test_auto_remat_keeps_the_first_policy_from_the_fastest_that_fits(tmp_path):
    asked = []

    def compile_policy(policy):
        asked.append(policy)
        return {"fits": policy in ("minimal", "full"), "needed_bytes": len(asked)}

    tried = choose_remat(compile_policy)
    assert asked == ["none", "dots", "minimal"] and tried[-1][0] == "minimal"
    assert [p for p, _ in choose_remat(lambda p: {"fits": False})] == list(FASTEST_FIRST)  # none fits: full, last
    key = {"mesh": {"data": 1, "fsdp": 8}}
    remember_choice(tmp_path, key, tried)
    assert remembered_choice(tmp_path, key) == "minimal"
    assert remembered_choice(tmp_path, {"mesh": {"data": 8, "fsdp": 1}}) is None  # another step: ask again


def run_compile(*arguments, tmp_path):
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "ALLOW_MULTIPLE_LIBTPU_LOAD": "1"}
    return subprocess.run([sys.executable, "-m", "recranker_jax.cli", "compile", *arguments], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=600)


SMALL = ["model.hidden_size=256", "model.intermediate_size=688", "model.num_attention_heads=4",
         "model.num_key_value_heads=4", "model.dtype=bfloat16", "model.param_dtype=bfloat16", "train.seq_len=256",
         "train.batch_size=8", "train.lora.enabled=true"]


@needs_libtpu
def test_a_small_config_fits_a_v5e_8_and_its_arguments_are_the_planned_state(tmp_path):
    from recranker_jax.config import load_config
    from recranker_jax.plan import plan_memory

    overrides = SMALL + ["mesh.shape=[1,8,1]"]
    out = tmp_path / "compile.json"
    done = run_compile("--accelerator", "v5litepod-8", "--remat", "dots", "--out", str(out), *overrides,
                       tmp_path=tmp_path)
    assert done.returncode == 0, done.stderr
    doc = json.loads(out.read_text())
    assert (doc["chips"], doc["device_kind"], doc["remat"], doc["fits"]) == (8, "TPU v5 lite", "dots", True)
    assert doc["mesh"] == {"data": 1, "fsdp": 8, "tensor": 1}
    assert doc["step"]["attention"] == "auto"
    assert "v5litepod-8 (TPU v5 lite, v5e:2x4): 8 chips" in done.stdout and "verdict: fits" in done.stdout
    # the compiler's argument bytes per chip: the weights' shards, the replicated adapters and their
    # AdamW moments (the plan's state) and the batch's rows (4 int32 arrays of 256 tokens a chip);
    # the TPU's tiled layouts pad small arrays (norm weights, rank-8 adapters) a little
    plan = plan_memory(load_config(None, overrides), 8, arch=None, remat="dots")
    state = sum(plan["bytes_per_device"][k] for k in ("parameters", "adapters", "optimizer"))
    batch = 4 * 256 * 4
    assert abs(doc["memory"]["argument"] - (state + batch)) <= 0.05 * (state + batch)


@needs_libtpu
def test_llama2_7b_on_one_v5e_chip_is_refused_with_the_compilers_figure(tmp_path):
    done = run_compile("--config", str(ROOT / "configs/llama2-7b-lora.yaml"), "--arch", "llama2-7b",
                       "--accelerator", "v5litepod-1", "--remat", "dots", "mesh.shape=[1,1,1]", "train.batch_size=1",
                       "--out", str(tmp_path / "7b.json"), tmp_path=tmp_path)
    assert done.returncode == 3, done.stderr  # does not fit
    doc = json.loads((tmp_path / "7b.json").read_text())
    (entry,) = doc["policies"]
    assert (entry["remat"], entry["fits"], entry["memory"]) == ("dots", False, None)  # refused by the compiler
    assert entry["needed_bytes"] > 15.75 * 2**30 and entry["capacity_bytes"] == int(15.75 * 2**30)
    assert "remat dots: does not fit: needs " in done.stdout and "verdict: does not fit; change train.remat=minimal" in done.stdout


@needs_libtpu
def test_auto_remat_on_a_tpu_chip_keeps_the_fastest_policy_the_compiler_fits(tmp_path):
    # 24 layers with a wide MLP, 32 x 512 tokens on one chip: without remat the saved activations
    # (~1.3 GB a layer) do not fit 16 GB; keeping the projections (or less) does
    wide = ["model.hidden_size=256", "model.intermediate_size=6144", "model.num_hidden_layers=24",
            "model.num_attention_heads=4", "model.num_key_value_heads=4", "model.dtype=bfloat16",
            "model.param_dtype=bfloat16", "train.seq_len=512", "train.batch_size=32", "mesh.shape=[1,1,1]",
            "model.attention=xla"]
    done = run_compile("--accelerator", "v5litepod-1", "--remat", "auto", "--out", str(tmp_path / "auto.json"), *wide,
                       tmp_path=tmp_path)
    doc = json.loads((tmp_path / "auto.json").read_text())
    tried = [(entry["remat"], entry["fits"]) for entry in doc["policies"]]
    assert tried[0] == ("none", False) and tried[-1][1] and all(not fits for _, fits in tried[:-1])
    assert [policy for policy, _ in tried] == list(FASTEST_FIRST[:len(tried)])
    assert doc["remat"] == tried[-1][0] and done.returncode == 0
    assert f"train.remat=auto chooses {doc['remat']} here" in done.stdout


@needs_libtpu
def test_a_mesh_that_does_not_use_the_slices_chips_is_one_line_before_any_compile(tmp_path):
    done = run_compile("--accelerator", "v5litepod-8", "mesh.shape=[1,4,1]", *SMALL[:-2], tmp_path=tmp_path)
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [
        "error: v5litepod-8 has 8 chips: mesh.shape=[1, 4, 1] uses 4 devices, but a mesh must use all 8 available devices (one entry may be "
        "-1: the rest)"]


def test_without_libtpu_compile_says_how_to_install_it(monkeypatch):
    from recranker_jax import compile as compile_module

    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "libtpu" else object())
    with pytest.raises(RecRankerError, match=r'the TPU compiler \(libtpu\) is not installed: pip install '
                                             r'"recranker-jax\[tpu\]"'):
        compile_module.slice_devices(parse_accelerator("v5litepod-8"))


@needs_libtpu
def test_plan_for_an_accelerator_shows_the_compilers_figure_beside_its_own(tmp_path):
    from recranker_jax.plan import GB, format_plan

    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    done = subprocess.run([sys.executable, "-m", "recranker_jax.cli", "plan", "--accelerator", "v5litepod-8", "--mesh",
                           "1,8,1", "--json", *SMALL, "train.remat=dots"], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    plan = json.loads(done.stdout)
    assert plan["devices"] == 8 and plan["device_memory_gb"] == 16 * 2**30 / 1e9  # a v5e chip's HBM
    compiler = plan["compiler"]
    assert (compiler["accelerator"], compiler["remat"], compiler["refused"], compiler["fits"]) == (
        "v5litepod-8", "dots", False, True)
    b = plan["bytes_per_device"]
    assert compiler["bytes_per_chip"] > b["parameters"] + b["adapters"] + b["optimizer"]  # the state, and more
    ratio = b["total"] / compiler["bytes_per_chip"]
    assert (f"the TPU compiler (v5litepod-8, remat dots): a total of {compiler['bytes_per_chip'] / GB:.2f} GB a chip "
            f"(fits; the plan is {ratio:.2f}x it)") in format_plan(plan)


@needs_libtpu
def test_the_finetune_on_an_accelerator_refuses_a_step_the_compiler_does_not_fit_before_it_runs(tmp_path):
    # train.remat_choice.compiled_remat, which the finetune calls on accelerators, on a TPU chip's mesh
    script = f"""
import json
from recranker_jax.compile import parse_accelerator, slice_devices, slice_mesh
from recranker_jax.config import load_config
from recranker_jax.errors import RecRankerError
from recranker_jax.plan import resolve_architecture
from recranker_jax.train.remat_choice import compiled_remat
cfg = load_config({str(ROOT / "configs/llama2-7b-lora.yaml")!r}, ["mesh.shape=[1,1,1]", "train.batch_size=1",
                  "train.remat=dots", "model.checkpoint=null", "prompts.tokenizer=null"])
mesh = slice_mesh(cfg, slice_devices(parse_accelerator("v5litepod-1")))
try:
    compiled_remat(cfg, resolve_architecture(cfg, "llama2-7b")[0], mesh, None, {str(tmp_path)!r})
except RecRankerError as error:
    print(json.dumps(str(error)))
"""
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "ALLOW_MULTIPLE_LIBTPU_LOAD": "1"}
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    message = json.loads(done.stdout.strip().splitlines()[-1])
    assert message.startswith("train.batch_size=1: the compiled training step needs ")
    assert "GB a device, more than 14.96 GB of TPU v5 lite (train.remat=dots); even train.batch_size=1 (one row a " \
           "batch shard) does not fit" in message
    assert not (tmp_path / "remat.json").exists()  # nothing remembered for a step that does not fit
