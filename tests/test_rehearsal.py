"""The launchers rehearsed end to end on this machine: what launch/tpu_pod.sh, launch/gpu_slurm.sbatch
and launch/local_multiprocess.sh send is executed, by the stand-in gcloud / sbatch / srun of
launch/rehearse/ for the first two.

Each rehearsal runs a tiny `recranker pipeline` on 2 workers x 2 CPU devices (mesh 1 x 2 x 2) over
one shared run.root, and its finetuned model must equal what one process with the same 4 devices
trains from the same instructions. The pod's run is preempted mid-finetune (SIGTERM to one
worker) and resumed with --resume.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from tests.helpers import synthetic_ml100k

REPO = Path(__file__).resolve().parents[1]
LAUNCH = REPO / "launch"
STAGES = ("data", "retrieval", "instructions", "pretrain", "finetune", "ranking")
# A minute or two of the whole pipeline: 48 users, 2 retrieval epochs, 8 finetune steps on a 35k-parameter model.
TINY = ["data.source=ml-100k", "data.path=data/ml-100k", "retrieval.models=[lightgcn]", "retrieval.epochs=2",
        "retrieval.eval_every=1", "retrieval.dim=16", "retrieval.batch_size=64", "sampling.size=100",
        "sampling.clusters=4", "prompts.hints=false", "prompts.tokenizer_vocab_size=600", "prompts.history_items=10",
        "prompts.max_tokens=320", "train.steps=8", "train.save_every=2", "train.keep_checkpoint=true",
        "train.batch_size=8", "train.seq_len=384", "train.lr=1e-2", "train.warmup_steps=1", "model.hidden_size=32",
        "model.intermediate_size=64", "mesh.shape=[1,2,2]", "rank.methods=[pointwise]", "rank.splits=[test]",
        "rank.baselines=[]", "rank.bootstrap=20"]


def environment(**extra: str) -> dict[str, str]:
    """This machine's environment without any cluster's variables; the repository's code first."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("RECRANKER_", "SLURM_", "TPU_", "MEGASCALE_", "REHEARSE_", "XLA_FLAGS", "CONFIG"))}
    env.update(PYTHON=sys.executable, PATH=f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}",
               PYTHONPATH=str(REPO), JAX_PLATFORMS="cpu", TF_CPP_MIN_LOG_LEVEL="2")
    env.update(extra)
    return env


def laptop(folder: Path, data: str = "data/ml-100k") -> Path:
    """A working folder with the tiny dataset at `data`."""
    synthetic_ml100k(folder / data)
    return folder


def launch(args: list[str], cwd: Path, env: dict[str, str] | None = None, timeout: float = 400) -> subprocess.CompletedProcess:
    return subprocess.run(args, cwd=cwd, env=env or environment(), capture_output=True, text=True, timeout=timeout,
                          check=False)


def recranker() -> list[str]:
    script = Path(sys.executable).with_name("recranker")
    return [str(script)] if script.exists() else [sys.executable, "-m", "recranker_jax.cli"]


def assert_one_run(run: Path, logs: str) -> None:
    """Every stage finished once in the shared run folder, and both processes' shards of the
    kept finetune checkpoint are in it."""
    assert all((run / stage / "_stage.json").is_file() for stage in STAGES), logs
    assert (run / "report.md").is_file()
    assert not list(run.glob(".*")) and not list(run.parent.glob(".shared-*"))  # no scratch, partial or token left
    (step,) = [p for p in run.glob("checkpoints/finetune-*/*") if p.name.isdigit()]
    assert step.name == "8" and {p.name for p in (step / "default").glob("ocdbt.process_*")} == {
        "ocdbt.process_0", "ocdbt.process_1"}


def assert_same_model(run: Path, reference: Path) -> None:
    from safetensors.numpy import load_file

    ours, want = load_file(str(run / "finetune/model/model.safetensors")), load_file(str(reference))
    assert sorted(ours) == sorted(want)
    for name in want:
        np.testing.assert_allclose(ours[name], want[name], rtol=1e-5, atol=1e-6, err_msg=name)


@pytest.fixture(scope="module")
def local_run(tmp_path_factory) -> tuple[Path, Path]:
    """launch/local_multiprocess.sh -- recranker pipeline (2 processes x 2 devices, relative
    run.root: one host), and the model one process with 4 devices finetunes from its instructions."""
    home = laptop(tmp_path_factory.mktemp("local"))
    done = launch(["bash", str(LAUNCH / "local_multiprocess.sh"), "-n", "2", "--devices-per-process", "2", "--logs",
                   "logs", "--", *recranker(), "pipeline", "--config", "quickstart", *TINY], home)
    logs = done.stderr + "".join((home / "logs" / f"process-{i}.log").read_text()[-2000:] for i in (0, 1))
    assert done.returncode == 0, logs
    run = home / "runs" / "quickstart"
    assert_one_run(run, logs)
    assert "- 1\n  - 2\n  - 2\n" in (run / "config.yaml").read_text()  # the user's mesh, not process 0's child's

    single = tmp_path_factory.mktemp("single")
    for stage in ("data", "retrieval", "instructions", "pretrain"):
        shutil.copytree(run / stage, single / "runs" / "quickstart" / stage)
    env = environment(XLA_FLAGS="--xla_force_host_platform_device_count=4")
    done = launch([*recranker(), "finetune", "--config", "quickstart", *TINY], laptop(single), env)
    assert done.returncode == 0, done.stderr[-3000:]
    marker = "runs/quickstart/instructions/_stage.json"  # the manifest of its files, with their digests
    assert (single / marker).read_bytes() == (run / "instructions" / "_stage.json").read_bytes()  # not rebuilt
    return run, single / "runs" / "quickstart" / "finetune" / "model" / "model.safetensors"


def test_local_launcher_runs_the_pipeline_like_one_process(local_run):
    run, reference = local_run
    assert_same_model(run, reference)
    losses = [json.loads(line)["loss"] for line in (run / "finetune" / "train_log.jsonl").read_text().splitlines()]
    assert len(losses) == 8 and losses[-1] < losses[0]

    # Again: process 0 finds the stage cached, and process 1 reports what process 0 found.
    home = run.parents[1]
    done = launch(["bash", str(LAUNCH / "local_multiprocess.sh"), "-n", "2", "--devices-per-process", "2", "--logs",
                   "again", "--", *recranker(), "instructions", "--config", "quickstart", *TINY], home)
    logs = [(home / "again" / f"process-{i}.log").read_text() for i in (0, 1)]
    assert done.returncode == 0 and all("[instructions] cached" in log for log in logs), logs


def worker_pids(home: Path) -> list[int]:
    """The recranker processes whose HOME is `home` (a rehearsal worker's)."""
    found = []
    for proc in Path("/proc").iterdir():
        try:
            if b"recranker_jax.cli" in (proc / "cmdline").read_bytes() and \
                    f"HOME={home}".encode() in (proc / "environ").read_bytes().split(b"\0"):
                found.append(int(proc.name))
        except (OSError, ValueError):
            continue
    return found


def test_tpu_pod_rehearsal_is_preempted_resumes_and_trains_the_reference_model(local_run, tmp_path):
    _, reference = local_run
    here = laptop(tmp_path / "laptop", data="ml")  # copied to the workers' data/ml-100k, where data.path points
    shared, pod = tmp_path / "shared", tmp_path / "pod"
    pod_command = ["bash", str(LAUNCH / "tpu_pod.sh"), "--rehearse", "--rehearse-dir", str(pod), "--workers", "2",
                   "--devices", "4", "--copy", "ml:data/ml-100k", "--", "recranker", "pipeline", "--config",
                   "quickstart", f"run.root={shared}", *TINY]
    first = subprocess.Popen(pod_command, cwd=here, env=environment(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             text=True)
    try:  # preempt worker 1 once the finetune saved its first checkpoint
        deadline = time.monotonic() + 300
        while not list(shared.glob("quickstart/checkpoints/finetune-*/2/commit_success.txt")):
            assert first.poll() is None and time.monotonic() < deadline, first.communicate()
            time.sleep(0.1)
        for pid in worker_pids(pod / "worker-1"):
            os.kill(pid, signal.SIGTERM)
        _, stderr = first.communicate(timeout=120)
    finally:
        if first.poll() is None:
            first.kill()
    assert first.returncode == 130, stderr
    assert "error: this step failed with exit code 130" in stderr.splitlines()[-2]
    run = shared / "quickstart"
    assert (run / "instructions" / "_stage.json").is_file() and not (run / "finetune").exists()

    resumed = launch([*pod_command[:2], "--resume", *pod_command[2:]], here)
    worker_logs = [(pod / f"worker-{i}" / "recranker-logs").glob("*.log") for i in (0, 1)]
    logs = resumed.stderr + "".join(log.read_text()[-2000:] for found in worker_logs for log in found)
    assert resumed.returncode == 0, logs
    assert_one_run(run, logs)
    assert_same_model(run, reference)
    steps = [json.loads(line)["step"] for line in (run / "finetune" / "train_log.jsonl").read_text().splitlines()]
    assert steps[0] > 1 and steps[-1] == 8  # it went on from the checkpoint of the preemption

    for i in (0, 1):  # each worker: its own home, the source installed once, the run written only to run.root
        home = pod / f"worker-{i}"
        assert (home / ".rehearsal" / "pip.log").read_text() == "pip install -U jax[tpu] " + str(home / "recranker-src") + "\n"
        assert (home / "recranker" / "config.yaml").read_bytes() == (REPO / "configs" / "quickstart.yaml").read_bytes()
        assert (home / "recranker" / "data" / "ml-100k" / "u.data").is_file()
        assert not list(home.rglob("_stage.json"))
    calls = (pod / "gcloud.log").read_text().splitlines()
    assert [c.split()[4] for c in calls] == ["scp", "ssh", "scp", "scp", "ssh", "scp", "ssh"]  # the resume: config, run


def test_tpu_pod_rehearsal_installs_a_wheel_on_every_worker(tmp_path):
    """--wheel: the wheel is copied and installed on each worker, and what the workers import."""
    import zipfile

    wheel = tmp_path / "recranker_jax-0-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as archive:
        for path in (REPO / "recranker_jax").rglob("*.py"):
            archive.write(path, path.relative_to(REPO))
    pod = tmp_path / "pod"
    done = launch(["bash", str(LAUNCH / "tpu_pod.sh"), "--rehearse", "--rehearse-dir", str(pod), "--devices", "2",
                   "--wheel", str(wheel), "--", "python3", "-c", "import recranker_jax; print(recranker_jax.__file__)"],
                  tmp_path)
    assert done.returncode == 0, done.stderr
    for i in (0, 1):
        home = pod / f"worker-{i}"
        assert (home / ".rehearsal" / "pip.log").read_text() == f"pip install -U jax[tpu] {home / wheel.name}\n"
        (log,) = (home / "recranker-logs").glob("*.log")
        assert log.read_text() == f"{home / '.rehearsal' / 'site' / 'recranker_jax' / '__init__.py'}\n"


def test_slurm_rehearsal_runs_the_pipeline_like_one_process(local_run, tmp_path):
    _, reference = local_run
    here, shared = laptop(tmp_path / "submit"), tmp_path / "shared"
    env = environment(NODES="2", GPUS_PER_NODE="1", REHEARSE_DEVICES="2", CONFIG="quickstart",
                      RECRANKER=recranker()[0] if len(recranker()) == 1 else "recranker")
    done = launch(["bash", str(LAUNCH / "gpu_slurm.sbatch"), "--rehearse", f"run.root={shared}", *TINY], here, env)
    logs = sorted((here / "runs" / "logs").glob("slurm-*-task-*.log"))
    assert done.returncode == 0, done.stderr + "".join(log.read_text()[-2000:] for log in logs)
    assert len(logs) == 2 and all("[finetune] done" in log.read_text() for log in logs)
    assert "[report] written" in logs[0].read_text() and "[report] written" not in logs[1].read_text()
    assert_one_run(shared / "quickstart", done.stderr)
    assert_same_model(shared / "quickstart", reference)
    assert not (here / "runs" / "quickstart").exists()


# ----------------------------------------------------------------------------- refused before anything starts


def pod(args: list[str], tmp_path: Path, *command: str) -> subprocess.CompletedProcess:
    return launch(["bash", str(LAUNCH / "tpu_pod.sh"), "--rehearse", "--rehearse-dir", str(tmp_path / "pod"), *args,
                   "--", *(command or ("recranker", "pipeline", "--config", "quickstart"))], laptop(tmp_path))


@pytest.mark.parametrize("args, command, message", [
    (["--devices", "4"], ["run.root=runs"],
     "error: run.root=runs is relative, so each of the 2 hosts would write its own folder; give an absolute path"),
    (["--devices", "4"], ["run.root=/tmp/x", "data.source=ml-100k", "data.path=data/ml-100k"],
     "error: data.path=data/ml-100k is relative, but no --copy puts it on the workers"),
    (["--devices", "4", "--copy", "no-such-folder:data/ml-100k"], ["run.root=/tmp/x"],
     "error: --copy no-such-folder:data/ml-100k: no-such-folder: no such file or folder here"),
    (["--accelerator-type", "v4-32", "--workers", "2"], ["run.root=/tmp/x"],
     "error: --workers 2 but --accelerator-type v4-32 has 4 workers (hosts)"),
    (["--devices", "4", "--copy", "data:/mnt/data"], ["run.root=/tmp/x"],
     "error: --copy data:/mnt/data: a rehearsal copies into each worker's home; give a relative destination"),
    (["--devices", "3"], ["run.root=/tmp/x"],
     "error: --devices 3 over --workers 2: expected the same number of devices on every worker"),
])
def test_tpu_pod_refuses_bad_launches_before_any_worker_starts(tmp_path, args, command, message):
    done = pod(args, tmp_path, "recranker", "pipeline", "--config", "quickstart", *command)
    assert done.returncode == 2 and len(done.stderr.splitlines()) == 1 and done.stderr.startswith(message), done.stderr
    assert not (tmp_path / "pod").exists()


def test_tpu_pod_refuses_a_config_the_workers_would_not_have(tmp_path):
    done = pod(["--devices", "4"], tmp_path, "recranker", "pipeline", "--config", "configs/mine.yaml")
    assert done.returncode == 2 and done.stderr.startswith("error: config file configs/mine.yaml not found")
    assert len(done.stderr.splitlines()) == 1 and not (tmp_path / "pod").exists()


def test_slurm_refuses_a_relative_run_root_on_several_nodes(tmp_path):
    env = environment(NODES="2", GPUS_PER_NODE="1", REHEARSE_DEVICES="2", CONFIG="quickstart")
    done = launch(["bash", str(LAUNCH / "gpu_slurm.sbatch"), "--rehearse", "mesh.shape=[1,2,2]"], tmp_path, env)
    assert done.returncode == 2 and done.stderr.splitlines() == [
        "error: run.root=runs is relative, so each of the 2 hosts would write its own folder; give an absolute path "
        "every host mounts (NFS, Filestore, a gcsfuse-mounted bucket)"]
    assert not any(tmp_path.iterdir())


def test_processes_that_do_not_share_run_root_stop_before_any_stage(tmp_path):
    """Two processes in different folders with a relative run.root: each has its own folder, which
    the shared-folder check finds before any stage starts."""
    from tests.test_multiprocess import free_port

    port, procs = free_port(), []
    for i in (0, 1):
        folder = tmp_path / f"host-{i}"
        folder.mkdir()
        env = environment(RECRANKER_COORDINATOR=f"127.0.0.1:{port}", RECRANKER_NUM_PROCESSES="2",
                          RECRANKER_PROCESS_ID=str(i), RECRANKER_FS_WAIT_S="1")
        procs.append(subprocess.Popen([*recranker(), "retrieval", "--config", "quickstart", "run.root=runs"], cwd=folder,
                                      env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    results = [proc.communicate(timeout=120) for proc in procs]
    assert [proc.returncode for proc in procs] == [2, 2]
    for _, stderr in results:
        (line,) = stderr.splitlines()
        assert line.startswith("error: run.root=runs: process 1 of 2 does not see the file process 0 wrote there (.shared-")
    assert not (tmp_path / "host-0" / "runs" / "quickstart").exists()  # no stage started
    assert not list((tmp_path / "host-0" / "runs").iterdir())  # and the token is gone
