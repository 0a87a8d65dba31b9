"""Several processes joined by `jax.distributed` (CPU devices, gloo collectives) train like one.

The test starts 2 local processes (this file run as a script) whose devices form one global
mesh, and compares what they compute with a single process holding the same number of devices
(the pytest process: 8 simulated CPU devices, tests/conftest.py). The whole pipeline through
the launchers is in tests/test_rehearsal.py.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
PROCESSES, DEVICES_PER_PROCESS = 2, 4
# fsdp spans both processes (weights and batch rows split between them), tensor within each
MESH_SHAPE = (1, 4, 2)
STEPS = 4


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def process_env(port: int, process_id: int, devices: int = DEVICES_PER_PROCESS) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RECRANKER_", "SLURM_", "TPU_", "MEGASCALE_"))}
    env.update(RECRANKER_COORDINATOR=f"127.0.0.1:{port}", RECRANKER_NUM_PROCESSES=str(PROCESSES),
               RECRANKER_PROCESS_ID=str(process_id), XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}",
               JAX_PLATFORMS="cpu", TF_CPP_MIN_LOG_LEVEL="2", HF_HUB_OFFLINE="1",
               PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])))
    return env


# ----------------------------------------------------------------------------- the computation both sides run


def tiny_model_and_rows():
    from flax import nnx

    from recranker_jax.llm.llama import Llama, LlamaConfig
    from recranker_jax.train.packing import pack

    config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2)
    rng = np.random.default_rng(7)
    examples = []
    for _ in range(48):
        prompt, answer = rng.integers(3, 64, rng.integers(5, 20)), rng.integers(3, 64, rng.integers(1, 4))
        ids = np.concatenate([prompt, answer, [2]]).astype(np.int32)
        mask = np.concatenate([np.zeros(len(prompt)), np.ones(len(answer) + 1)]).astype(np.int32)
        examples.append((ids, mask))
    return Llama(config, nnx.Rngs(0)), pack(examples, 32)


def train_tiny(mesh_shape, checkpoint_dir: Path | None):
    """STEPS AdamW steps of batch 8 through train/loop.py on a mesh of this shape over all devices."""
    from flax import nnx

    from recranker_jax.config import MeshConfig
    from recranker_jax.parallel import make_mesh
    from recranker_jax.train.loop import train
    from recranker_jax.train.step import make_optimizer, shard_model

    model, rows = tiny_model_and_rows()
    mesh_config = MeshConfig(shape=list(mesh_shape))
    mesh = make_mesh(mesh_config)
    shard_model(model, mesh, mesh_config.rules)
    optimizer = nnx.Optimizer(model, make_optimizer(1e-2, 2, STEPS), wrt=nnx.Param)
    logs, reached = train(model, optimizer, rows, batch_size=8, steps=STEPS, seed=3, checkpoint_dir=checkpoint_dir,
                          save_every=2, mesh=mesh, rules=mesh_config.rules, progress=False)
    assert reached == STEPS
    return [entry.loss for entry in logs], model


def worker(out: Path) -> None:
    """One of the processes (run as `python -m tests.test_multiprocess OUT`, RECRANKER_* set)."""
    from recranker_jax.parallel import initialize_distributed

    settings = initialize_distributed()
    import jax
    from flax import nnx

    from recranker_jax.config import MeshConfig
    from recranker_jax.llm.hf_export import export_hf
    from recranker_jax.llm.lora import apply_lora, export_peft
    from recranker_jax.parallel import make_mesh
    from recranker_jax.train.step import shard_model

    index = jax.process_index()
    losses, model = train_tiny(MESH_SHAPE, out / "checkpoints")
    kernel = model.layers.mlp.gate_proj.kernel.get_value()  # scanned layers: [layers, embed, mlp]
    rows_here = sorted({row for shard in kernel.addressable_shards for row in range(kernel.shape[1])[shard.index[1]]})
    export_hf(model, out / f"export-{index}")  # every process gathers; only process 0 writes
    adapted, _ = tiny_model_and_rows()
    apply_lora(adapted, ["q", "v"], 4, 8.0, 0.0, nnx.Rngs(1))
    shard_model(adapted, make_mesh(MeshConfig(shape=list(MESH_SHAPE))), MeshConfig().rules)
    if index == 0:  # adapters are replicated: process 0 reads them without the others
        export_peft(adapted, out / "adapter", "tiny", ["q", "v"], 4, 8.0, 0.0)
    result = {"settings": settings, "process_count": jax.process_count(), "devices": jax.device_count(),
              "losses": losses, "kernel_rows_here": rows_here}
    (out / f"result-{index}.json").write_text(json.dumps(result))


# ----------------------------------------------------------------------------- tests


def needs_the_same_device_count() -> None:
    # Checked inside the tests, not in a decorator: the workers import this module and must not
    # start JAX's backends before initialize_distributed.
    import jax

    if jax.device_count() != PROCESSES * DEVICES_PER_PROCESS:
        pytest.skip("the single-process reference needs 8 simulated devices (tests/conftest.py)")


def start_processes(command: list[str], out: Path, timeout: float = 600) -> None:
    port = free_port()
    procs = []
    try:
        for i in range(PROCESSES):
            with open(out / f"log-{i}.txt", "w") as log:
                procs.append(subprocess.Popen(command, env=process_env(port, i), cwd=REPO, stdout=log, stderr=subprocess.STDOUT))
        codes = [proc.wait(timeout=timeout) for proc in procs]
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
    logs = "\n".join((out / f"log-{i}.txt").read_text()[-3000:] for i in range(PROCESSES))
    assert codes == [0] * PROCESSES, logs


def test_two_processes_train_and_export_like_one(tmp_path):
    needs_the_same_device_count()
    import orbax.checkpoint as ocp
    from flax import nnx
    from safetensors.numpy import load_file

    from recranker_jax.llm.hf_export import export_hf
    from recranker_jax.llm.lora import apply_lora, export_peft

    start_processes([sys.executable, "-m", "tests.test_multiprocess", str(tmp_path)], tmp_path)
    results = [json.loads((tmp_path / f"result-{i}.json").read_text()) for i in range(PROCESSES)]
    assert results[0]["settings"] == {"coordinator_address": results[0]["settings"]["coordinator_address"],
                                      "num_processes": 2, "process_id": 0, "cpu_collectives": "gloo"}
    assert [r["process_count"] for r in results] == [2, 2] and [r["devices"] for r in results] == [8, 8]
    # Each process holds half of the first MLP kernel's rows: fsdp splits the weights between them.
    assert [len(r["kernel_rows_here"]) for r in results] == [16, 16]
    assert sorted(results[0]["kernel_rows_here"] + results[1]["kernel_rows_here"]) == list(range(32))

    reference, model = train_tiny(MESH_SHAPE, None)  # one process, the same 8 devices and mesh
    assert reference[-1] < reference[0]
    for r in results:
        np.testing.assert_allclose(r["losses"], reference, rtol=1e-5)
    assert ocp.CheckpointManager((tmp_path / "checkpoints").resolve()).latest_step() == STEPS

    export_hf(model, tmp_path / "reference")
    assert not (tmp_path / "export-1").exists()  # only process 0 writes
    ours, want = load_file(str(tmp_path / "export-0" / "model.safetensors")), load_file(str(tmp_path / "reference" / "model.safetensors"))
    assert sorted(ours) == sorted(want)
    for name in want:
        np.testing.assert_allclose(ours[name], want[name], rtol=1e-5, atol=1e-6, err_msg=name)
    adapted, _ = tiny_model_and_rows()
    apply_lora(adapted, ["q", "v"], 4, 8.0, 0.0, nnx.Rngs(1))
    export_peft(adapted, tmp_path / "reference-adapter", "tiny", ["q", "v"], 4, 8.0, 0.0)
    ours = load_file(str(tmp_path / "adapter" / "adapter_model.safetensors"))
    want = load_file(str(tmp_path / "reference-adapter" / "adapter_model.safetensors"))
    assert sorted(ours) == sorted(want) and all(np.array_equal(ours[k], want[k]) for k in want)


if __name__ == "__main__":
    worker(Path(sys.argv[1]))
