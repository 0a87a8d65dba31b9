"""Launch scripts (dry runs and refusals), the mesh pre-flight check, and how the
environment selects single- or multi-process runs (parsed, never initialised here)."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from recranker_jax.cli import main
from recranker_jax.errors import RecRankerError
from recranker_jax.launch_check import check_mesh_fits
from recranker_jax.launch_check import main as check_main
from recranker_jax.parallel import distributed_settings, initialize_distributed

REPO = Path(__file__).resolve().parents[1]
EXPLICIT = {"RECRANKER_COORDINATOR": "10.0.0.2:8476", "RECRANKER_NUM_PROCESSES": "4", "RECRANKER_PROCESS_ID": "3"}
SLURM_STEP = {"SLURM_JOB_ID": "77", "SLURM_STEP_NODELIST": "gpu[01-02]", "SLURM_NTASKS": "16", "SLURM_PROCID": "5"}


# ----------------------------------------------------------------------------- environment


def test_explicit_variables_give_the_initialize_arguments():
    assert distributed_settings(EXPLICIT) == {"coordinator_address": "10.0.0.2:8476", "num_processes": 4,
                                              "process_id": 3, "cpu_collectives": "gloo"}
    assert distributed_settings({**EXPLICIT, "RECRANKER_CPU_COLLECTIVES": "mpi"})["cpu_collectives"] == "mpi"
    assert distributed_settings({**EXPLICIT, "RECRANKER_NUM_PROCESSES": "1", "RECRANKER_PROCESS_ID": "0"}) is None


def test_cluster_environments_use_jax_detection_and_others_are_single_process():
    auto = {"auto": True, "cpu_collectives": "gloo"}
    assert distributed_settings({}) is None
    assert distributed_settings(SLURM_STEP) == auto
    assert distributed_settings({**SLURM_STEP, "SLURM_NTASKS": "1"}) is None
    # The batch script itself (no srun step yet) is one process; so is RECRANKER_DISTRIBUTED=off.
    assert distributed_settings({k: v for k, v in SLURM_STEP.items() if k != "SLURM_STEP_NODELIST"}) is None
    assert distributed_settings({**SLURM_STEP, "RECRANKER_DISTRIBUTED": "off"}) is None
    assert distributed_settings({"TPU_WORKER_HOSTNAMES": "t1k-w-0,t1k-w-1"}) == auto
    assert distributed_settings({"TPU_WORKER_HOSTNAMES": "localhost"}) is None
    assert distributed_settings({"MEGASCALE_COORDINATOR_ADDRESS": "10.0.0.9"}) == auto
    assert distributed_settings({"RECRANKER_DISTRIBUTED": "auto"}) == auto


@pytest.mark.parametrize("environ, message", [
    ({"RECRANKER_COORDINATOR": "h:1", "RECRANKER_NUM_PROCESSES": "2"},
     ("RECRANKER_COORDINATOR is set but RECRANKER_PROCESS_ID is not: set all of RECRANKER_COORDINATOR, "
     "RECRANKER_NUM_PROCESSES, RECRANKER_PROCESS_ID")),
    ({"RECRANKER_PROCESS_ID": "0"}, "RECRANKER_PROCESS_ID is set but RECRANKER_COORDINATOR is not"),
    ({**EXPLICIT, "RECRANKER_PROCESS_ID": "4"}, "RECRANKER_PROCESS_ID=4: expected 0 to 3 (RECRANKER_NUM_PROCESSES=4)"),
    ({**EXPLICIT, "RECRANKER_PROCESS_ID": "-1"}, "RECRANKER_PROCESS_ID=-1: expected an integer >= 0"),
    ({**EXPLICIT, "RECRANKER_NUM_PROCESSES": "two"}, "RECRANKER_NUM_PROCESSES=two: expected an integer >= 1"),
    ({**EXPLICIT, "RECRANKER_COORDINATOR": "10.0.0.2"}, "RECRANKER_COORDINATOR=10.0.0.2: expected host:port"),
    ({**EXPLICIT, "RECRANKER_CPU_COLLECTIVES": "nccl"}, "RECRANKER_CPU_COLLECTIVES=nccl: expected one of gloo, mpi"),
    ({"RECRANKER_DISTRIBUTED": "yes"}, "RECRANKER_DISTRIBUTED=yes: expected off or auto (or unset)"),
])
def test_inconsistent_variables_are_one_line_errors(environ, message):
    with pytest.raises(RecRankerError) as info:
        distributed_settings(environ)
    assert str(info.value).startswith(message)


def test_single_process_initialisation_is_a_no_op():
    import jax

    assert initialize_distributed({}) is None and initialize_distributed({"RECRANKER_DISTRIBUTED": "off"}) is None
    assert not jax.distributed.is_initialized()


def test_the_cli_refuses_bad_variables_before_any_stage(tmp_path, monkeypatch, capsys):
    for name, value in {**EXPLICIT, "RECRANKER_PROCESS_ID": "9"}.items():
        monkeypatch.setenv(name, value)
    assert main(["data", "stats", f"run.root={tmp_path}"]) == 2
    assert capsys.readouterr().err == "error: RECRANKER_PROCESS_ID=9: expected 0 to 3 (RECRANKER_NUM_PROCESSES=4)\n"
    assert not any(tmp_path.iterdir())


# ----------------------------------------------------------------------------- mesh pre-flight check


def test_check_mesh_fits_resolves_the_mesh_and_the_batch(capsys):
    assert check_mesh_fits("quickstart", ["mesh.shape=[2,-1,1]", "train.batch_size=8"], 8) == (
        "ok: mesh (2, 4, 1) over (data, fsdp, tensor) on 8 devices")
    with pytest.raises(RecRankerError, match=r"^mesh.shape=\[4, 4, 1\] uses 16 devices, but a mesh must use all 8 available devices "
                                             r"\(one entry may be -1: the rest\)$"):
        check_mesh_fits("quickstart", ["mesh.shape=[4,4,1]"], 8)
    with pytest.raises(RecRankerError, match=r"^train.batch_size=4 must be a multiple of the 8 batch shards of the mesh "
                                             r"\(data=8, fsdp=1, tensor=1\)"):
        check_mesh_fits("quickstart", [], 8)
    with pytest.raises(RecRankerError, match=r"^--devices 0: expected a positive number"):
        check_mesh_fits("quickstart", [], 0)
    assert check_main(["--config", "quickstart", "--devices", "4", "mesh.shape=[-1,2,1]"]) == 0
    assert capsys.readouterr().out == "ok: mesh (2, 2, 1) over (data, fsdp, tensor) on 4 devices\n"
    assert check_main(["--config", "quickstart", "--devices", "6", "mesh.shape=[4,-1,1]"]) == 2
    assert capsys.readouterr().err == (
        "error: mesh.shape=[4, -1, 1]: the fixed axes (4 devices) do not divide the 6 available devices\n")


def test_check_hosts_wants_a_shared_run_root_and_copied_relative_paths():
    from recranker_jax.launch_check import check_hosts

    check_hosts("quickstart", [], 1)  # one host: a relative run.root is its own folder, fine
    with pytest.raises(RecRankerError, match=r"^run.root=runs is relative, so each of the 2 hosts would write its own"):
        check_hosts("quickstart", [], 2)
    pod = ["run.root=/shared/runs", "data.source=ml-100k", "data.path=data/ml-100k"]
    check_hosts("quickstart", pod, 2, ["", "data"])  # inside a copied folder
    check_hosts("quickstart", pod, 2, ["data/ml-100k"])  # the copied folder itself
    check_hosts("quickstart", [*pod[:2], "data.path=/mnt/ml-100k", "prompts.tokenizer=~/tok"], 2, [""])  # workers' own
    with pytest.raises(RecRankerError, match=r"^data.path=data/ml-100k is relative, but no --copy puts it on the workers"):
        check_hosts("quickstart", pod, 2, ["", "data/ml-1m"])
    with pytest.raises(RecRankerError, match=r"^prompts.tokenizer=tok is relative"):
        check_hosts("quickstart", [*pod, "prompts.tokenizer=tok"], 2, ["data"])


def test_a_bucket_url_is_not_a_run_root():
    from recranker_jax.config import load_config

    with pytest.raises(RecRankerError, match=r"^run.root=gs://b/runs: expected a folder path; a bucket is used through a "
                                             r"mount \(e.g. gcsfuse: run.root=/mnt/bucket/runs\)"):
        load_config("quickstart", ["run.root=gs://b/runs"])


# ----------------------------------------------------------------------------- scripts


def script(name: str, *args: str, cwd: Path, **env: str) -> subprocess.CompletedProcess:
    environ = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "RECRANKER_", "CONFIG", "DRY_RUN"))}
    environ.update({"PYTHON": sys.executable, "PYTHONPATH": str(REPO), "JAX_PLATFORMS": "cpu", **env})
    return subprocess.run(["bash", str(REPO / "launch" / name), *args], check=False, cwd=cwd, env=environ, capture_output=True,
                          text=True, timeout=120)


def test_local_dry_run_prints_each_process_with_its_environment(tmp_path):
    done = script("local_multiprocess.sh", "--dry-run", "-n", "3", "--port", "4567", "--devices-per-process", "2",
                  "--logs", "my logs", "--", "recranker", "finetune", "--config", "quickstart", "train.lora.targets=[q, v]",
                  "train.batch_size=6", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == [
        f"RECRANKER_COORDINATOR=127.0.0.1:4567 RECRANKER_NUM_PROCESSES=3 RECRANKER_PROCESS_ID={i} "
        "XLA_FLAGS=--xla_force_host_platform_device_count=2 recranker finetune --config quickstart "
        f"'train.lora.targets=[q, v]' train.batch_size=6 > 'my logs/process-{i}.log' 2>&1"
        for i in range(3)
    ]
    assert done.stderr == "ok: mesh (6, 1, 1) over (data, fsdp, tensor) on 6 devices\n"  # 3 processes x 2 devices
    assert not any(tmp_path.iterdir())  # a dry run starts and writes nothing


@pytest.mark.parametrize("args, message", [
    (["-n", "0", "--", "true"], "error: -n 0: expected a positive number of processes"),
    (["--port", "70000", "--", "true"], "error: --port 70000: expected a port number 1-65535"),
    (["--devices-per-process", "x", "--", "true"], "error: --devices-per-process x: expected a positive number"),
    (["-n", "2"], "error: no command given: put it after --"),
    (["--bogus", "--", "true"], "error: unknown option --bogus (put the command after --)"),
])
def test_local_launcher_refuses_bad_options(tmp_path, args, message):
    done = script("local_multiprocess.sh", *args, cwd=tmp_path)
    assert done.returncode == 2 and message in done.stderr


def test_local_launcher_stops_the_others_when_one_fails(tmp_path):
    started = time.monotonic()
    fail_one = 'if [ "$RECRANKER_PROCESS_ID" = 1 ]; then echo "broken $XLA_FLAGS"; exit 3; fi; sleep 60'
    done = script("local_multiprocess.sh", "-n", "3", "--logs", "logs", "--", "bash", "-c", fail_one, cwd=tmp_path)
    assert done.returncode == 3 and time.monotonic() - started < 30  # not the 60 s the others would sleep
    assert "error: process 1 exited with code 3; the others were stopped" in done.stderr
    assert (tmp_path / "logs" / "process-1.log").read_text() == "broken --xla_force_host_platform_device_count=1\n"
    ok = script("local_multiprocess.sh", "-n", "2", "--logs", "ok", "--", "bash", "-c", "echo $RECRANKER_PROCESS_ID",
                cwd=tmp_path)
    assert ok.returncode == 0 and [(tmp_path / "ok" / f"process-{i}.log").read_text() for i in (0, 1)] == ["0\n", "1\n"]


def test_tpu_pod_dry_run_installs_copies_ships_the_config_and_starts_on_every_worker(tmp_path):
    source = tmp_path / "src"
    (source).mkdir()
    (tmp_path / "data" / "ml-1m").mkdir(parents=True)
    (tmp_path / "llama").mkdir()
    done = script("tpu_pod.sh", "--name", "pod", "--zone", "us-central2-b", "--project", "proj",
                  "--accelerator-type", "v4-32", "--install-from", str(source), "--copy", "data/ml-1m:/mnt/data/ml-1m",
                  "--copy", "llama:checkpoints/llama", "--skip-compile-check", "--dry-run", "--", "recranker", "pipeline",
                  "--config", "quickstart",
                  "run.root=/mnt/shared/runs", "train.batch_size=16", "model.checkpoint=checkpoints/llama/7b",
                  "prompts.tokenizer=checkpoints/llama/7b", cwd=tmp_path, TMPDIR="/tmp")
    assert done.returncode == 0, done.stderr
    ssh = "gcloud compute tpus tpu-vm ssh pod --zone=us-central2-b --project=proj --worker=all --command"
    scp = "gcloud compute tpus tpu-vm scp --zone=us-central2-b --project=proj --worker=all"
    assert done.stdout.splitlines() == [
        f"tar -czf /tmp/recranker-src.tar.gz --exclude=./runs --exclude=./.git --exclude=__pycache__ -C {source} .",
        f"{scp} /tmp/recranker-src.tar.gz 'pod:~/recranker-src.tar.gz'",
        (f"{ssh} 'rm -rf ~/recranker-src && mkdir -p ~/recranker-src && tar -xzf ~/recranker-src.tar.gz -C ~/recranker-src"
         " && mkdir -p ~/recranker && rm -rf /mnt/data/ml-1m && mkdir -p \"$(dirname /mnt/data/ml-1m)\" && rm -rf "
         "~/recranker/checkpoints/llama && mkdir -p \"$(dirname ~/recranker/checkpoints/llama)\" && python3 -m pip "
         "install -U '\\''jax[tpu]'\\'' ~/recranker-src'"),
        f"{scp} --recurse data/ml-1m pod:/mnt/data/ml-1m",
        f"{scp} --recurse llama pod:recranker/checkpoints/llama",
        f"{scp} {REPO / 'configs' / 'quickstart.yaml'} pod:recranker/config.yaml",
        (f"{ssh} 'mkdir -p ~/recranker ~/recranker-logs && cd ~/recranker && RECRANKER_DISTRIBUTED=auto python3 -m "
         "recranker_jax.cli pipeline --config ~/recranker/config.yaml run.root=/mnt/shared/runs train.batch_size=16 "
         "model.checkpoint=checkpoints/llama/7b prompts.tokenizer=checkpoints/llama/7b > ~/recranker-logs/worker-$(hostname).log 2>&1'"),
    ]
    assert done.stderr == "ok: mesh (16, 1, 1) over (data, fsdp, tensor) on 16 devices\n"  # v4-32: 16 chips
    resumed = script("tpu_pod.sh", "--name", "pod", "--zone", "z", "--devices", "8", "--wheel", "r.whl", "--resume",
                     "--dry-run", "--", "recranker", "finetune", "train.batch_size=8", cwd=tmp_path)
    assert resumed.stdout.splitlines() == [  # --resume: the same command, nothing reinstalled; the stage's default config
        f"gcloud compute tpus tpu-vm scp --zone=z --worker=all {REPO / 'configs' / 'quickstart.yaml'} pod:recranker/config.yaml",
        ("gcloud compute tpus tpu-vm ssh pod --zone=z --worker=all --command 'mkdir -p ~/recranker ~/recranker-logs && "
         "cd ~/recranker && RECRANKER_DISTRIBUTED=auto python3 -m recranker_jax.cli finetune --config "
         "~/recranker/config.yaml train.batch_size=8 > ~/recranker-logs/worker-$(hostname).log 2>&1'")]


@pytest.mark.skipif(importlib.util.find_spec("libtpu") is None, reason='libtpu is not installed (pip install -e ".[tpu]")')
def test_tpu_pod_compiles_the_finetune_step_for_the_slice_before_any_gcloud_call(tmp_path):
    launch = ("tpu_pod.sh", "--name", "pod", "--zone", "z", "--wheel", "r.whl", "--dry-run")
    fits = script(*launch, "--accelerator-type", "v5litepod-8", "--", "recranker", "finetune", "mesh.shape=[1,8,1]",
                  "train.batch_size=8", cwd=tmp_path)
    assert fits.returncode == 0, fits.stderr
    mesh_line, compile_line = fits.stderr.splitlines()
    assert compile_line.startswith("ok: the finetune step fits v5litepod-8: ") and "GB a chip of 16.00 GB" in compile_line
    assert fits.stdout.count("gcloud compute tpus tpu-vm") == 4  # then the launch, as without the check
    # LLaMA-2 7B on one v5e chip: refused with the compiler's figure, nothing started
    refused = script(*launch, "--accelerator-type", "v5litepod-1", "--compile-arch", "llama2-7b", "--", "recranker",
                     "finetune", "--config", str(REPO / "configs/llama2-7b-lora.yaml"), "mesh.shape=[1,1,1]",
                     "train.batch_size=1", "train.remat=dots", "model.checkpoint=null", "prompts.tokenizer=null",
                     "data.path=/data/ml-100k", cwd=tmp_path)
    assert refused.returncode == 2 and refused.stdout == ""
    error = refused.stderr.splitlines()[-1]
    assert error.startswith("error: the finetune step does not fit v5litepod-1: the TPU compiler needs ")
    assert "GB a chip of 16.00 GB (train.remat=dots); change train.remat=minimal" in error
    assert error.endswith("or launch with --skip-compile-check")
    skipped = script(*launch, "--accelerator-type", "v5litepod-1", "--skip-compile-check", "--", "recranker",
                     "finetune", "--config", str(REPO / "configs/llama2-7b-lora.yaml"), "mesh.shape=[1,1,1]",
                     "train.batch_size=1", "data.path=/data/ml-100k", "model.checkpoint=/models/7b",
                     "prompts.tokenizer=/models/7b", cwd=tmp_path)
    assert skipped.returncode == 0 and skipped.stderr.splitlines() == ["ok: mesh (1, 1, 1) over (data, fsdp, tensor) on 1 devices"]


@pytest.mark.parametrize("name", ["tpu_pod.sh", "gpu_slurm.sbatch", "local_multiprocess.sh", "accelerator_check.sh"])
def test_every_launch_script_answers_help_with_its_usage(tmp_path, name):
    done = script(name, "--help", cwd=tmp_path)
    assert done.returncode == 0 and done.stderr == "", done.stderr
    assert f"launch/{name}" in done.stdout and "--dry-run" in done.stdout  # its usage, with the dry run
    assert not any(line.startswith("#") for line in done.stdout.splitlines())  # comment marks and #SBATCH dropped
    assert not any(tmp_path.iterdir())  # nothing started, nothing written


@pytest.mark.parametrize("args, message", [
    (["--worker", "0"], "error: --worker=0: a multi-host TPU program must start on every worker at once"),
    (["--accelerator-type", "v5litepod-16", "mesh.shape=[32,1,1]"],
     "error: mesh.shape=[32, 1, 1] uses 32 devices, but a mesh must use all 16 available devices"),
    (["--devices", "8", "mesh.shape=[-1,1,1]"], "error: train.batch_size=4 must be a multiple of the 8 batch shards"),
    (["--accelerator-type", "v9-8"], "error: --accelerator-type v9-8: unknown generation v9"),
    (["--wheel", "a.whl", "--install-from", "."], "error: --install-from and --wheel: give one of them"),
    (["--no-such-option"], "error: unknown option --no-such-option"),
])
def test_tpu_pod_refuses_before_starting(tmp_path, args, message):
    options = [a for a in args if "=" not in a or a.startswith("--")]
    overrides = [a for a in args if a not in options]
    if not any(a in options for a in ("--devices", "--accelerator-type")):
        options += ["--devices", "8"]
    done = script("tpu_pod.sh", "--name", "pod", "--zone", "z", "--dry-run", *options, "--", "recranker", "pipeline",
                  "--config", "quickstart", "train.batch_size=4", "run.root=/mnt/runs", *overrides, cwd=tmp_path)
    assert done.returncode == 2 and message in done.stderr and done.stdout == "", done.stderr


def test_tpu_pod_needs_its_name_zone_devices_and_command(tmp_path):
    cases = {("--zone", "z", "--devices", "8", "--", "recranker"): "error: --name TPU is required",
             ("--name", "p", "--devices", "8", "--", "recranker"): "error: --zone ZONE is required",
             ("--name", "p", "--zone", "z", "--", "recranker"): "error: --devices N or --accelerator-type TYPE is required",
             ("--name", "p", "--zone", "z", "--devices", "8"): "error: no command given"}
    for args, message in cases.items():
        done = script("tpu_pod.sh", *args, cwd=tmp_path)
        assert done.returncode == 2 and done.stderr.startswith(message), (args, done.stderr)


def test_slurm_dry_run_prints_srun_and_its_environment(tmp_path):
    done = script("gpu_slurm.sbatch", "train.batch_size=16", "train.lora.targets=[q, v]", "run.root=/shared/runs",
                  cwd=tmp_path, CONFIG="quickstart", DRY_RUN="1")
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == [
        "nodes=2 gpus_per_node=8 devices=16",  # the script's #SBATCH lines
        ("RECRANKER_DISTRIBUTED=auto srun --nodes=2 --ntasks-per-node=8 --gpus-per-task=1 --kill-on-bad-exit=1 "
        "--output=runs/logs/slurm-JOB-task-%t.log recranker pipeline --config quickstart train.batch_size=16 "
        "'train.lora.targets=[q, v]' run.root=/shared/runs"),
    ]
    inside = script("gpu_slurm.sbatch", "--dry-run", "mesh.shape=[2,-1,1]", "train.batch_size=8", cwd=tmp_path,
                    CONFIG="quickstart", SLURM_JOB_ID="991", SLURM_JOB_NUM_NODES="1", SLURM_NTASKS_PER_NODE="4",
                    STAGE="finetune")
    assert inside.stdout.splitlines()[1] == (
        "RECRANKER_DISTRIBUTED=auto srun --nodes=1 --ntasks-per-node=4 --gpus-per-task=1 --kill-on-bad-exit=1 "
        "--output=runs/logs/slurm-991-task-%t.log recranker finetune --config quickstart 'mesh.shape=[2,-1,1]' "
        "train.batch_size=8")
    assert inside.stderr == "ok: mesh (2, 2, 1) over (data, fsdp, tensor) on 4 devices\n"


def test_slurm_refuses_a_mesh_that_does_not_fit_and_a_missing_config(tmp_path):
    done = script("gpu_slurm.sbatch", "--dry-run", "mesh.shape=[4,-1,1]", cwd=tmp_path, CONFIG="quickstart",
                  NODES="1", GPUS_PER_NODE="6")
    assert done.returncode == 2 and done.stdout == ""
    assert done.stderr == "error: mesh.shape=[4, -1, 1]: the fixed axes (4 devices) do not divide the 6 available devices\n"
    missing = script("gpu_slurm.sbatch", "--dry-run", cwd=tmp_path)
    assert missing.returncode == 2 and missing.stderr.startswith("error: CONFIG is not set: run CONFIG=configs/x.yaml sbatch")
    stray = script("gpu_slurm.sbatch", "--dry-run", "finetune", cwd=tmp_path, CONFIG="quickstart")
    assert stray.returncode == 2 and stray.stderr == "error: finetune: expected a key=value override\n"


def test_accelerator_check_gives_each_part_what_is_left_of_the_budget(tmp_path):
    """A stand-in python: the 7B step fails, so its XLA-attention fallback runs; rank-7b fails,
    the next part takes 16 of the 45 seconds, so the last two are skipped; every part's log and
    a summary are written."""
    fake = tmp_path / "python"
    fake.write_text(
        "#!/usr/bin/env bash\n"
        '[[ "$1" == "-" ]] && { echo "jax 0.0 (stand-in)"; exit 0; }\n'
        'echo "$*" >> "$CALLS"\n'
        'case "$*" in\n'
        '  *train-7b-lora.json*) echo "error: triton failed here" >&2; exit 1 ;;\n'
        '  *rank-7b.json*) echo "error: rank failed here" >&2; exit 2 ;;\n'
        '  *remat-none*) sleep 16 ;;\n'
        "esac\n"
        'echo "table of $*"\n')
    fake.chmod(0o755)
    out = tmp_path / "out"
    done = script("accelerator_check.sh", "--out", str(out), "--budget", "45", cwd=tmp_path, PYTHON=str(fake),
                  CALLS=str(tmp_path / "calls"))
    assert done.returncode == 0, done.stderr
    calls = (tmp_path / "calls").read_text().splitlines()
    assert [call.split("--out ")[1] for call in calls] == [
        f"{out}/train-7b-lora.json", f"{out}/train-7b-lora-xla.json", f"{out}/rank-7b.json",
        f"{out}/train-7b-lora-remat-none.json"]
    assert calls[0].startswith("-m recranker_jax.cli bench train --preset 7b-lora")
    assert "model.attention=xla" in calls[1]
    summary = (out / "summary.txt").read_text().splitlines()
    assert summary[0] == "train-7b-lora: failed (exit 1): error: triton failed here"
    assert summary[1].startswith("train-7b-lora-xla: ok in ")
    assert summary[2] == "rank-7b: failed (exit 2): error: rank failed here"
    assert summary[3].startswith("train-7b-lora-remat-none: ok in 1")
    assert summary[4:] == ["train-7b-lora-remat-full: skipped (budget spent)", "rank-7b-torch: skipped (budget spent)"]
    assert (out / "environment.txt").read_text().count("stand-in") == 1
    assert (out / "train-7b-lora-xla.log").read_text().startswith("table of -m recranker_jax.cli bench train")


# ----------------------------------------------------------------------------- pre-flight checks of the launchers


def stand_in(folder: Path, name: str, body: str) -> Path:
    """An executable bash script `folder/name`."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    path.write_text("#!/usr/bin/env bash\n" + body + "\n")
    path.chmod(0o755)
    return path


@pytest.mark.parametrize("dry_run", [True, False])
@pytest.mark.parametrize("args, message", [
    (["-n", "2", "--devices-per-process", "4", "--", "recranker", "finetune", "train.batch_size=4"],  # default quickstart
     "error: train.batch_size=4 must be a multiple of the 8 batch shards of the mesh (data=8, fsdp=1, tensor=1)"),
    (["-n", "3", "--", "python", "-m", "recranker_jax.cli", "rank", "--config=quickstart", "mesh.shape=[4,-1,1]"],
     "error: mesh.shape=[4, -1, 1]: the fixed axes (4 devices) do not divide the 3 available devices"),
    (["--", "recranker", "finetune", "--config", "missing.yaml"],
     "error: config file missing.yaml not found; pass a YAML path or one of: "),
    (["--", "recranker", "pipeline", "run.root=runs"], "error: recranker pipeline needs --config FILE"),
])
def test_local_launcher_checks_a_recranker_command_before_starting(tmp_path, dry_run, args, message):
    """The same pre-flight check as tpu_pod.sh, on processes x devices-per-process devices, in dry
    and real runs: one error line, exit 2, no log folder, no process (the stand-in writes a file)."""
    bin_dir = tmp_path / "bin"
    stand_in(bin_dir, "recranker", 'echo started > "$MARKER"')
    work = tmp_path / "work"
    work.mkdir()
    done = script("local_multiprocess.sh", *(["--dry-run"] if dry_run else []), "--port", "4567", *args, cwd=work,
                  PATH=f"{bin_dir}:{os.environ['PATH']}", MARKER=str(tmp_path / "marker"))
    assert done.returncode == 2 and done.stdout == "", done.stderr
    assert done.stderr.startswith(message) and done.stderr.count("\n") == 1, done.stderr
    assert not any(work.iterdir()) and not (tmp_path / "marker").exists()


def test_local_launcher_checks_stage_commands_with_the_cli_default_config(tmp_path):
    """Without --config, every stage command is checked with quickstart, the config the CLI gives it;
    other commands (and commands that are not recranker's) start unchecked."""
    from recranker_jax.cli import build_parser
    from recranker_jax.pipeline import STAGES

    stages = [["data", "stats"] if name == "data" else [name] for name in STAGES] + [["quickstart"]]
    for words in stages:
        assert build_parser().parse_args(words).config == "quickstart", words  # what the script assumes
        options = ("--dry-run", "-n", "2", "--devices-per-process", "4", "--port", "4567", "--", "recranker", *words)
        refused = script("local_multiprocess.sh", *options, cwd=tmp_path)
        assert refused.returncode == 2 and refused.stdout == "", (words, refused.stderr)
        assert refused.stderr == ("error: train.batch_size=4 must be a multiple of the 8 batch shards of the mesh "
                                  "(data=8, fsdp=1, tensor=1)\n"), words
        fits = script("local_multiprocess.sh", *options, "train.batch_size=8", cwd=tmp_path)
        assert fits.returncode == 0 and len(fits.stdout.splitlines()) == 2, (words, fits.stderr)
        assert fits.stderr == "ok: mesh (8, 1, 1) over (data, fsdp, tensor) on 8 devices\n", words
    for command in (["recranker", "bench", "compare", "a.json"], ["recranker", "plan"], ["recranker", "--version"],
                    ["bash", "train.sh", "--config", "missing.yaml"], ["python", "-m", "other.cli", "--config", "missing.yaml"]):
        done = script("local_multiprocess.sh", "--dry-run", "-n", "8", "--port", "4567", "--", *command, cwd=tmp_path)
        assert done.returncode == 0 and done.stderr == "" and len(done.stdout.splitlines()) == 8, (command, done.stderr)
    assert not any(tmp_path.iterdir())


def test_local_launcher_starts_the_processes_after_a_passing_check(tmp_path):
    bin_dir = tmp_path / "bin"
    recranker = stand_in(bin_dir, "recranker", 'echo "$RECRANKER_PROCESS_ID $XLA_FLAGS $*"')
    done = script("local_multiprocess.sh", "-n", "2", "--devices-per-process", "4", "--logs", "logs", "--", str(recranker),
                  "finetune", "--config", "quickstart", "train.batch_size=8", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    lines = done.stderr.splitlines()
    assert lines[0] == "ok: mesh (8, 1, 1) over (data, fsdp, tensor) on 8 devices"  # before anything starts
    assert lines[1].startswith("started 2 processes (coordinator 127.0.0.1:")
    assert [(tmp_path / "logs" / f"process-{i}.log").read_text() for i in (0, 1)] == [
        f"{i} --xla_force_host_platform_device_count=4 finetune --config quickstart train.batch_size=8\n" for i in (0, 1)]


@pytest.fixture
def python_without_the_project(tmp_path) -> Path:
    """A real python that cannot import recranker_jax: -I ignores PYTHONPATH and the working folder,
    -S the site-packages where the project is installed."""
    return stand_in(tmp_path / "bin", "python3", f'exec {sys.executable} -I -S "$@"')


def launchers_checking() -> dict[str, tuple[list[str], dict[str, str]]]:
    """Each launcher's dry run that reaches the pre-flight check: arguments and environment."""
    return {
        "tpu_pod.sh": (["--name", "pod", "--zone", "z", "--devices", "8", "--dry-run", "--", "recranker", "pipeline",
                        "--config", "quickstart", "train.batch_size=8"], {}),
        "gpu_slurm.sbatch": (["--dry-run"], {"CONFIG": "quickstart", "NODES": "1", "GPUS_PER_NODE": "4"}),
        "local_multiprocess.sh": (["--dry-run", "--", "recranker", "finetune", "--config", "quickstart"], {}),
    }


@pytest.mark.parametrize("name", ["tpu_pod.sh", "gpu_slurm.sbatch", "local_multiprocess.sh"])
def test_launchers_refuse_a_python_without_the_project_in_one_line(tmp_path, python_without_the_project, name):
    args, env = launchers_checking()[name]
    done = script(name, *args, cwd=tmp_path, PYTHON=str(python_without_the_project), **env)
    assert done.returncode == 2 and done.stdout == ""
    assert done.stderr == (f"error: {python_without_the_project} cannot import recranker_jax: install the project first "
                           "(pip install -e . or pip install .)\n")  # no ModuleNotFoundError traceback
    missing = script(name, *args, cwd=tmp_path, PYTHON=str(tmp_path / "no-python"), **env)
    assert missing.returncode == 2 and missing.stdout == ""
    assert missing.stderr == (f"error: {tmp_path / 'no-python'}: command not found (set PYTHON to a python that has "
                              "recranker_jax installed)\n")
    works = script(name, *args, cwd=tmp_path, **env)  # the same run with the project's python: checked, printed
    assert works.returncode == 0 and works.stdout and works.stderr.startswith("ok: mesh "), works.stderr


def test_local_launcher_needs_the_project_only_for_recranker_commands(tmp_path, python_without_the_project):
    done = script("local_multiprocess.sh", "-n", "2", "--logs", "logs", "--", "bash", "-c", "echo $RECRANKER_PROCESS_ID",
                  cwd=tmp_path, PYTHON=str(python_without_the_project))  # it still picks the free port
    assert done.returncode == 0, done.stderr
    assert [(tmp_path / "logs" / f"process-{i}.log").read_text() for i in (0, 1)] == ["0\n", "1\n"]
