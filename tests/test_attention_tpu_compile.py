"""The attention kernels on a TPU slice's mesh, compiled here by the TPU compiler (libtpu, no
TPU): `auto` picks splash from the mesh's devices, and the finetune step with splash under
`shard_map` lowers and compiles for a v5e-8 (`v5e:2x4`) on two meshes, at small shapes.

libtpu runs in a subprocess (it is loaded once per process, with JAX_PLATFORMS=cpu so this
machine's backend stays the CPU); ALLOW_MULTIPLE_LIBTPU_LOAD lets it run beside another
process that has libtpu loaded (its lock file is for processes that drive a TPU)."""

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.skipif(importlib.util.find_spec("libtpu") is None,
                                reason="libtpu is not installed (pip install 'jax[tpu]')")

ROOT = Path(__file__).resolve().parents[1]
MESHES = ([1, 8, 1], [2, 2, 2])

# The finetune step (`train.step._update`, donating, as on accelerators) of a small LoRA model in
# bfloat16 (2 layers, hidden 256, 4 heads of 64, batch 8 x 256 tokens, remat dots), its abstract
# inputs placed by the config's rules (`train.aot.abstract_step_inputs`), lowered in the mesh's
# sharding context and compiled by the TPU compiler.
SCRIPT = r"""
import json, sys, time
import jax
from recranker_jax import parallel
from recranker_jax.compile import parse_accelerator, slice_devices
from recranker_jax.config import MeshConfig
from recranker_jax.errors import RecRankerError
from recranker_jax.llm.attention import causal_attention, select_implementation
from recranker_jax.llm.llama import LlamaConfig
from recranker_jax.train.aot import StepShape, abstract_step_inputs
from recranker_jax.train.step import jitted_train_step

devices = slice_devices(parse_accelerator("v5litepod-8"))
rules = MeshConfig().rules
llama = LlamaConfig(vocab_size=512, hidden_size=256, intermediate_size=688, num_hidden_layers=2,
                    num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=256)
shape = StepShape(llama=llama, batch_size=8, seq_len=256, remat="dots", attention="splash", lora=(("q", "v"), 8, 16.0))
result = {"backend": jax.default_backend(), "meshes": {}}
for mesh_shape in json.loads(sys.argv[1]):
    mesh = parallel.make_mesh(MeshConfig(shape=mesh_shape), devices)
    model, optimizer, batch = abstract_step_inputs(shape, mesh, rules)
    with parallel.sharding_context(mesh, rules):
        entry = {"platform": parallel.mesh_platform(), "auto": select_implementation("auto", parallel.mesh_platform(), True)}
        try:
            jax.eval_shape(lambda q: causal_attention(q, q[..., 0, :], q[..., 0, :], None, "pallas_gpu"),
                           jax.ShapeDtypeStruct((8, 256, 4, 1, 64), "bfloat16"))
        except RecRankerError as error:
            entry["pallas_gpu"] = str(error)
        started = time.perf_counter()
        compiled = jitted_train_step("tpu").lower(model, optimizer, batch).compile()
        entry["compile_seconds"] = time.perf_counter() - started
    entry["tpu_custom_calls"] = compiled.as_text().count("tpu_custom_call")
    entry["temp_bytes"] = compiled.memory_analysis().temp_size_in_bytes
    result["meshes"][str(mesh_shape)] = entry
print(json.dumps(result))
"""


@pytest.fixture(scope="module")
def compiled():
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "TPU_ACCELERATOR_TYPE": "v5litepod-8",
           "TPU_WORKER_HOSTNAMES": "localhost", "ALLOW_MULTIPLE_LIBTPU_LOAD": "1",
           "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run([sys.executable, "-c", SCRIPT, json.dumps(MESHES)], env=env, capture_output=True,
                          text=True, timeout=600, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("shape", MESHES)
def test_auto_picks_splash_from_the_tpu_meshs_devices_on_a_cpu_machine(compiled, shape):
    entry = compiled["meshes"][str(shape)]
    assert compiled["backend"] == "cpu" and entry["platform"] == "tpu" and entry["auto"] == "splash"
    assert entry["pallas_gpu"] == ("attention 'pallas_gpu' runs on a GPU (or with interpret=True), not on tpu: "
                                   "use one of auto, tiled, xla, splash")


@pytest.mark.parametrize("shape", MESHES)
def test_the_finetune_step_with_splash_compiles_for_a_v5e_8_mesh(compiled, shape):
    entry = compiled["meshes"][str(shape)]
    # the splash kernels (forward, and the backward's) are in the program, under shard_map
    assert entry["tpu_custom_calls"] >= 2
    assert 0 < entry["temp_bytes"] < 2**30
