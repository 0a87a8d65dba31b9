#!/usr/bin/env bash
# Run a recranker command on every worker of a Cloud TPU VM slice (single- or multi-host):
#
#   launch/tpu_pod.sh --name TPU --zone ZONE [--project P] [--worker all]
#                     (--devices N | --accelerator-type TYPE) [--install-from PATH | --wheel FILE]
#                     [--copy SRC:DST ...] [--resume] [--dry-run] -- recranker pipeline --config X key=value ...
#
# 1. Checks here, before anything starts, that the config's mesh fits the slice's devices
#    (python -m recranker_jax.launch_check; --accelerator-type v4-32 etc. gives the count).
#    The check runs with $PYTHON (default python3), which must have the project installed here.
# 2. Installs the TPU build of JAX and the project on every worker (--install-from PATH: a source
#    folder, default this repository, copied without runs/ and .git; or --wheel FILE).
# 3. Copies each --copy SRC:DST (data, a Hugging Face checkpoint) to every worker.
# 4. Starts the command on all workers at once, each logging to ~/recranker-logs/worker-<host>.log,
#    with RECRANKER_DISTRIBUTED=auto: jax.distributed.initialize() finds the other workers.
#
# The run folder (run.root) must be on a filesystem every worker mounts (Filestore, gcsfuse):
# process 0 writes the stages and all workers write their shards of each checkpoint there.
# Config paths and data paths in the command are paths on the workers (see --copy).
# Preemption / maintenance: the trainer checkpoints when it receives SIGTERM, and every stage
# is cached in the run folder, so `--resume` (the same command without steps 2-3) continues.
# --dry-run prints the gcloud commands (after the mesh check) instead of running them.
set -euo pipefail

fail() { echo "error: $1" >&2; exit 2; }
quote() {
  if [[ "$1" =~ ^[A-Za-z0-9_./:=@%+,-]+$ ]]; then printf '%s' "$1"; else printf "'%s'" "${1//\'/\'\\\'\'}"; fi
}
join_quoted() { local out="" word; for word in "$@"; do out+="$(quote "$word") "; done; printf '%s' "${out% }"; }

# Devices JAX sees per unit of the accelerator type's suffix: v2/v3/v5e/v6e count cores = chips
# = devices; v4 and v5p count TensorCores, two per chip, and JAX sees one device per chip.
devices_for() {
  local type="$1" generation="${1%-*}" count="${1##*-}"
  [[ "$type" == *-* && "$count" =~ ^[1-9][0-9]*$ ]] || fail "--accelerator-type $type: expected GENERATION-SIZE, e.g. v4-32"
  case "$generation" in
    v2|v3|v5litepod|v5e|v6e) echo "$count" ;;
    v4|v5p) echo $((count / 2)) ;;
    *) fail "--accelerator-type $type: unknown generation $generation (known: v2, v3, v4, v5p, v5litepod, v6e); pass --devices N instead" ;;
  esac
}

name="" zone="" project="" worker="all" devices="" accelerator="" install_from="" wheel="" resume=0 dry_run=0
copies=()
while (($#)); do
  case "$1" in
    --name|--zone|--project|--worker|--workers|--devices|--accelerator-type|--install-from|--wheel|--copy)
      (($# >= 2)) || fail "$1 needs a value"
      case "$1" in
        --name) name="$2" ;; --zone) zone="$2" ;; --project) project="$2" ;;
        --worker|--workers) worker="$2" ;; --devices) devices="$2" ;; --accelerator-type) accelerator="$2" ;;
        --install-from) install_from="$2" ;; --wheel) wheel="$2" ;; --copy) copies+=("$2") ;;
      esac
      shift 2 ;;
    --resume) resume=1; shift ;;
    --dry-run) dry_run=1; shift ;;
    --) shift; break ;;
    *) fail "unknown option $1 (put the recranker command after --)" ;;
  esac
done
command=("$@")
[[ -n "$name" ]] || fail "--name TPU is required (the TPU VM's name)"
[[ -n "$zone" ]] || fail "--zone ZONE is required"
[[ "$worker" == all ]] || fail "--worker=$worker: a multi-host TPU program must start on every worker at once (each \
worker's process joins jax.distributed and holds part of the mesh; started alone it waits for the others), so only --worker=all is supported"
((${#command[@]})) || fail "no command given: put it after --, e.g. -- recranker pipeline --config X"
[[ -z "$install_from" || -z "$wheel" ]] || fail "--install-from and --wheel: give one of them"
if [[ -n "$accelerator" ]]; then
  from_type=$(devices_for "$accelerator")
  [[ -z "$devices" || "$devices" == "$from_type" ]] || fail "--devices $devices but --accelerator-type $accelerator has $from_type devices"
  devices=$from_type
fi
[[ -n "$devices" ]] || fail "--devices N or --accelerator-type TYPE is required (to check the config's mesh before starting)"
[[ "$devices" =~ ^[1-9][0-9]*$ ]] || fail "--devices $devices: expected a positive number of devices"

# The config and overrides of the recranker command, for the mesh check.
config="" overrides=()
for ((i = 0; i < ${#command[@]}; i++)); do
  case "${command[$i]}" in
    --config) config="${command[$((i + 1))]:-}"; i=$((i + 1)) ;;
    --config=*) config="${command[$i]#--config=}" ;;
    -*) ;;
    *=*) overrides+=("${command[$i]}") ;;
  esac
done
python="${PYTHON:-python3}"
command -v "$python" >/dev/null || fail "$python: command not found (set PYTHON to a python that has recranker_jax installed)"
"$python" -c "import recranker_jax" >/dev/null 2>&1 ||
  fail "$python cannot import recranker_jax: install the project first (pip install -e . or pip install .)"
check=("$python" -m recranker_jax.launch_check --devices "$devices")
[[ -n "$config" ]] && check+=(--config "$config")
"${check[@]}" ${overrides[@]+"${overrides[@]}"} >&2 || exit 2  # its error line is already on stderr

gcloud_ssh=(gcloud compute tpus tpu-vm ssh "$name" "--zone=$zone")
gcloud_scp=(gcloud compute tpus tpu-vm scp "--zone=$zone")
if [[ -n "$project" ]]; then gcloud_ssh+=("--project=$project"); gcloud_scp+=("--project=$project"); fi
gcloud_ssh+=(--worker=all) gcloud_scp+=(--worker=all)

steps=()  # each step one shell-quoted command line
if ((!resume)); then
  if [[ -n "$wheel" ]]; then
    [[ -f "$wheel" || $dry_run -eq 1 ]] || fail "--wheel $wheel: no such file"
    steps+=("$(join_quoted "${gcloud_scp[@]}" "$wheel" "$name:~/")")
    package="~/$(basename "$wheel")"
  else
    source_dir="${install_from:-$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)}"
    [[ -d "$source_dir" || $dry_run -eq 1 ]] || fail "--install-from $source_dir: no such folder"
    archive="${TMPDIR:-/tmp}/recranker-src.tar.gz"
    steps+=("$(join_quoted tar -czf "$archive" --exclude=./runs --exclude=./.git --exclude=__pycache__ -C "$source_dir" .)")
    steps+=("$(join_quoted "${gcloud_scp[@]}" "$archive" "$name:~/recranker-src.tar.gz")")
    package="~/recranker-src"
  fi
  unpack=""
  [[ -z "$wheel" ]] && unpack="rm -rf ~/recranker-src && mkdir -p ~/recranker-src && tar -xzf ~/recranker-src.tar.gz -C ~/recranker-src && "
  steps+=("$(join_quoted "${gcloud_ssh[@]}" --command "${unpack}python3 -m pip install -U 'jax[tpu]' $package")")
  for copy in ${copies[@]+"${copies[@]}"}; do
    [[ "$copy" == ?*:?* ]] || fail "--copy $copy: expected SRC:DST (a local path, then the path on every worker)"
    steps+=("$(join_quoted "${gcloud_scp[@]}" --recurse "${copy%%:*}" "$name:${copy#*:}")")
  done
fi
remote="mkdir -p ~/recranker-logs && RECRANKER_DISTRIBUTED=auto $(join_quoted "${command[@]}") > ~/recranker-logs/worker-\$(hostname).log 2>&1"
steps+=("$(join_quoted "${gcloud_ssh[@]}" --command "$remote")")

for step in "${steps[@]}"; do
  if ((dry_run)); then
    echo "$step"
  else
    echo "+ $step" >&2
    bash -c "$step" || { code=$?; echo "error: this step failed with exit code $code: $step" >&2; exit "$code"; }
  fi
done
((dry_run)) || echo "done on every worker of $name; logs: ~/recranker-logs/worker-<host>.log on each worker" >&2
