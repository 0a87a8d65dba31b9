#!/usr/bin/env bash
# Run a recranker command on every worker of a Cloud TPU VM slice (single- or multi-host):
#
#   launch/tpu_pod.sh --name TPU --zone ZONE [--project P] [--workers H]
#                     (--devices N | --accelerator-type TYPE) [--install-from PATH | --wheel FILE]
#                     [--copy SRC:DST ...] [--resume] [--dry-run | --rehearse [--rehearse-dir DIR]]
#                     [--skip-compile-check | --compile-arch ARCH]
#                     -- recranker pipeline --config FILE key=value ...
#
# 1. Checks here, before anything starts (python -m recranker_jax.launch_check, with $PYTHON,
#    default python3, which must have the project installed here):
#    - the config's mesh fits the slice's devices (--accelerator-type v4-32 etc. gives the count
#      and the hosts; --workers H must agree with it);
#    - with more than one host, run.root is absolute (a folder every worker mounts);
#    - every relative path of the config (data.path, model.checkpoint, prompts.tokenizer) is a
#      --copy destination or inside one;
#    - every --copy source exists (unless --resume, which copies nothing);
#    - with --accelerator-type, for a command that trains (pipeline, quickstart, pretrain,
#      finetune): the finetune step compiled for that slice by the TPU compiler (`recranker
#      compile`; needs the tpu extra here, no TPU). A step that does not fit the chips is refused
#      with the compiler's figure. The model's shape comes from model.checkpoint's config.json
#      here (read at the --copy source that provides it) or --compile-arch llama2-7b|llama2-13b;
#      --skip-compile-check skips this check. Not in --rehearse (CPU devices stand in for chips).
# 2. Installs the TPU build of JAX and the project on every worker (--install-from PATH: a source
#    folder, default this repository, copied without runs/ and .git; or --wheel FILE).
# 3. Copies each --copy SRC:DST to every worker, replacing DST there. A relative DST lands in
#    the workers' working folder ~/recranker; an absolute (or ~/) one is taken as it is.
# 4. Ships the config file checked in step 1 to every worker (~/recranker/config.yaml; the
#    bundled config for a stage command without --config) and starts the command on all workers
#    at once from ~/recranker, so relative paths in the config mean what they mean in the source
#    folder here. `recranker` runs as `python3 -m recranker_jax.cli` (the python step 2 installed
#    into). Each worker logs to ~/recranker-logs/worker-<host>.log; RECRANKER_DISTRIBUTED=auto:
#    jax.distributed.initialize() finds the other workers.
#
# The run folder (run.root) must be on a filesystem every worker mounts (NFS, Filestore, a
# gcsfuse-mounted bucket; a gs:// URL itself is refused, since stages write plain files): process
# 0 writes the stages and all workers write their shards of each checkpoint there. Before the
# first stage every process checks it sees a file process 0 wrote there.
# Preemption / maintenance: the trainer checkpoints when it receives SIGTERM, and every stage is
# cached in the run folder, so `--resume` (the same command without steps 2-3) continues.
# --dry-run prints the commands (after the checks) instead of running them.
# --rehearse runs them here instead, before renting a pod: launch/rehearse/gcloud stands in for
# gcloud, each worker is a local process with its own home (DIR/worker-<i>, default a new
# temporary folder) and devices/hosts CPU devices; pip installs are recorded, not run (the
# shipped source or wheel is what the workers import). --workers defaults to 2 there.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# shellcheck source=launch/lib.sh
source "$here/lib.sh"  # fail, quote, join_quoted, require_project, read_command_args, ...
workdir="recranker"  # the workers' working folder, relative to their home

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
# Hosts (TPU VMs, workers) of a slice: v2/v3 hosts have 8 devices (4 chips x 2 cores), v4/v5p
# hosts 4 chips; v5e/v6e slices of up to 8 chips are one host, larger ones 4 chips per host.
hosts_for() {
  local generation="${1%-*}" devices="$2"
  case "$generation" in
    v2|v3) echo $(((devices + 7) / 8)) ;;
    v4|v5p) echo $(((devices + 3) / 4)) ;;
    *) if ((devices <= 8)); then echo 1; else echo $((devices / 4)); fi ;;
  esac
}

name="" zone="" project="" workers="" devices="" accelerator="" install_from="" wheel="" resume=0 dry_run=0
rehearse=0 rehearse_dir="" skip_compile=0 compile_arch=""
copies=()
while (($#)); do
  case "$1" in
    --name|--zone|--project|--worker|--workers|--devices|--accelerator-type|--install-from|--wheel|--copy|--rehearse-dir|--compile-arch)
      (($# >= 2)) || fail "$1 needs a value"
      case "$1" in
        --name) name="$2" ;; --zone) zone="$2" ;; --project) project="$2" ;;
        --worker) [[ "$2" == all ]] || fail "--worker=$2: a multi-host TPU program must start on every worker at once \
(each worker's process joins jax.distributed and holds part of the mesh; started alone it waits for the others), so only --worker=all is supported" ;;
        --workers) workers="$2" ;; --devices) devices="$2" ;; --accelerator-type) accelerator="$2" ;;
        --install-from) install_from="$2" ;; --wheel) wheel="$2" ;; --copy) copies+=("$2") ;;
        --rehearse-dir) rehearse_dir="$2" ;; --compile-arch) compile_arch="$2" ;;
      esac
      shift 2 ;;
    --resume) resume=1; shift ;;
    --dry-run) dry_run=1; shift ;;
    --rehearse) rehearse=1; shift ;;
    --skip-compile-check) skip_compile=1; shift ;;
    -h|--help) usage_text "${BASH_SOURCE[0]}"; exit 0 ;;
    --) shift; break ;;
    *) fail "unknown option $1 (put the recranker command after --; --help shows the usage)" ;;
  esac
done
command=("$@")
if ((rehearse)); then
  ((!dry_run)) || fail "--rehearse and --dry-run: give one of them"
  name="${name:-rehearsal}" zone="${zone:-local}" workers="${workers:-2}"
fi
[[ -n "$name" ]] || fail "--name TPU is required (the TPU VM's name)"
[[ -n "$zone" ]] || fail "--zone ZONE is required"
((${#command[@]})) || fail "no command given: put it after --, e.g. -- recranker pipeline --config X"
[[ -z "$install_from" || -z "$wheel" ]] || fail "--install-from and --wheel: give one of them"
[[ -z "$workers" || "$workers" =~ ^[1-9][0-9]*$ ]] || fail "--workers $workers: expected a positive number of hosts"
if [[ -n "$accelerator" ]]; then
  from_type=$(devices_for "$accelerator")
  [[ -z "$devices" || "$devices" == "$from_type" ]] || fail "--devices $devices but --accelerator-type $accelerator has $from_type devices"
  devices=$from_type
  hosts=$(hosts_for "$accelerator" "$devices")
  [[ -z "$workers" || "$workers" == "$hosts" ]] || fail "--workers $workers but --accelerator-type $accelerator has $hosts workers (hosts)"
  workers=$hosts
fi
workers="${workers:-1}"
[[ -n "$devices" ]] || fail "--devices N or --accelerator-type TYPE is required (to check the config's mesh before starting)"
[[ "$devices" =~ ^[1-9][0-9]*$ ]] || fail "--devices $devices: expected a positive number of devices"
((devices % workers == 0)) || fail "--devices $devices over --workers $workers: expected the same number of devices on every worker"

# Each --copy: its source here, and where it lands on the workers.
remote_paths=() workdir_copies=()
for copy in ${copies[@]+"${copies[@]}"}; do
  [[ "$copy" == ?*:?* ]] || fail "--copy $copy: expected SRC:DST (a local path, then the path on every worker)"
  source_path="${copy%%:*}" destination="${copy#*:}"
  [[ -e "$source_path" || $resume -eq 1 ]] || fail "--copy $copy: $source_path: no such file or folder here"
  case "$destination" in
    /*) ((!rehearse)) || fail "--copy $copy: a rehearsal copies into each worker's home; give a relative destination"
        remote_paths+=("$destination") ;;
    "~/"*) remote_paths+=("${destination#"~/"}") ;;
    *) remote_paths+=("$workdir/$destination"); workdir_copies+=(--workdir-copy "$destination") ;;
  esac
done

# The recranker command's config and overrides (for the checks), and the stage it runs.
recranker=0
[[ "${command[0]##*/}" == recranker ]] && recranker=1
read_command_args "${command[@]:1}"
((recranker)) && apply_cli_default_config
config=$command_config subcommand=$command_subcommand overrides=(${command_overrides[@]+"${command_overrides[@]}"})
python="${PYTHON:-python3}"
require_project "$python"
check=("$python" -m recranker_jax.launch_check --devices "$devices")
[[ -n "$config" ]] && check+=(--config "$config")
((recranker)) && check+=(--hosts "$workers" --workdir-copy "" ${workdir_copies[@]+"${workdir_copies[@]}"})
case "$subcommand" in  # the commands that train: their step compiled for the slice first
  pipeline|quickstart|pretrain|finetune)
    if ((recranker && !skip_compile && !rehearse)) && [[ -n "$accelerator" ]]; then
      check+=(--compile-for "$accelerator")
      for copy in ${copies[@]+"${copies[@]}"}; do check+=(--copy "$copy"); done
      [[ -z "$compile_arch" ]] || check+=(--arch "$compile_arch")
    fi ;;
esac
"${check[@]}" ${overrides[@]+"${overrides[@]}"} >&2 || exit 2  # its error line is already on stderr
if [[ -n "$config" ]] && ((recranker)); then  # the file the check read (a bundled name resolved) is the one shipped
  config_file=$("$python" -c 'import sys; from recranker_jax.config import resolve_config_path as r; print(r(sys.argv[1]).resolve())' "$config")
fi

gcloud_ssh=(gcloud compute tpus tpu-vm ssh "$name" "--zone=$zone")
gcloud_scp=(gcloud compute tpus tpu-vm scp "--zone=$zone")
if [[ -n "$project" ]]; then gcloud_ssh+=("--project=$project"); gcloud_scp+=("--project=$project"); fi
gcloud_ssh+=(--worker=all) gcloud_scp+=(--worker=all)
if ((rehearse)); then
  rehearse_dir="${rehearse_dir:-$(mktemp -d "${TMPDIR:-/tmp}/recranker-rehearsal.XXXXXX")}"
  mkdir -p "$rehearse_dir"
  archive="$rehearse_dir/recranker-src.tar.gz"
else
  archive="${TMPDIR:-/tmp}/recranker-src.tar.gz"
fi

steps=()  # each step one shell-quoted command line
if ((!resume)); then
  if [[ -n "$wheel" ]]; then
    [[ -f "$wheel" || $dry_run -eq 1 ]] || fail "--wheel $wheel: no such file"
    steps+=("$(join_quoted "${gcloud_scp[@]}" "$wheel" "$name:~/")")
    package="~/$(basename "$wheel")"
    prepare=""
  else
    source_dir="${install_from:-$(cd "$here/.." && pwd)}"
    [[ -d "$source_dir" || $dry_run -eq 1 ]] || fail "--install-from $source_dir: no such folder"
    steps+=("$(join_quoted tar -czf "$archive" --exclude=./runs --exclude=./.git --exclude=__pycache__ -C "$source_dir" .)")
    steps+=("$(join_quoted "${gcloud_scp[@]}" "$archive" "$name:~/recranker-src.tar.gz")")
    package="~/recranker-src"
    prepare="rm -rf ~/recranker-src && mkdir -p ~/recranker-src && tar -xzf ~/recranker-src.tar.gz -C ~/recranker-src && "
  fi
  prepare+="mkdir -p ~/$workdir"
  for remote in ${remote_paths[@]+"${remote_paths[@]}"}; do  # each copy replaces its destination
    target="$(quote "$remote")"
    [[ "$remote" == /* ]] || target="~/$target"
    prepare+=" && rm -rf $target && mkdir -p \"\$(dirname $target)\""
  done
  steps+=("$(join_quoted "${gcloud_ssh[@]}" --command "$prepare && python3 -m pip install -U 'jax[tpu]' $package")")
  for ((i = 0; i < ${#copies[@]}; i++)); do
    steps+=("$(join_quoted "${gcloud_scp[@]}" --recurse "${copies[$i]%%:*}" "$name:${remote_paths[$i]}")")
  done
fi
if ((recranker)); then  # the shipped config in place of --config, right after the subcommand
  [[ -n "${config_file:-}" ]] && steps+=("$(join_quoted "${gcloud_scp[@]}" "$config_file" "$name:$workdir/config.yaml")")
  remote_command="python3 -m recranker_jax.cli"
  for ((i = 1; i < ${#command[@]}; i++)); do
    case "${command[$i]}" in
      --config) i=$((i + 1)); continue ;;
      --config=*) continue ;;
    esac
    remote_command+=" $(quote "${command[$i]}")"
    if [[ -n "${config_file:-}" && "${command[$i]}" == "$subcommand" && -z "${placed:-}" ]]; then
      remote_command+=" --config ~/$workdir/config.yaml" placed=1
    fi
  done
else
  remote_command="$(join_quoted "${command[@]}")"
fi
remote="mkdir -p ~/$workdir ~/recranker-logs && cd ~/$workdir && RECRANKER_DISTRIBUTED=auto $remote_command > ~/recranker-logs/worker-\$(hostname).log 2>&1"
steps+=("$(join_quoted "${gcloud_ssh[@]}" --command "$remote")")

if ((rehearse)); then  # launch/rehearse/gcloud reads these
  export REHEARSE_DIR="$rehearse_dir" REHEARSE_WORKERS="$workers" REHEARSE_DEVICES=$((devices / workers))
  export REHEARSE_PYTHON="$(command -v "$python")" PATH="$here/rehearse:$PATH"
  echo "rehearsal: $workers workers x $REHEARSE_DEVICES CPU devices, homes $rehearse_dir/worker-<i>" >&2
fi
for step in "${steps[@]}"; do
  if ((dry_run)); then
    echo "$step"
  else
    echo "+ $step" >&2
    bash -c "$step" || {
      code=$?
      echo "error: this step failed with exit code $code: $step" >&2
      ((!rehearse)) || echo "the workers' logs: $rehearse_dir/worker-<i>/recranker-logs/" >&2
      exit "$code"
    }
  fi
done
((dry_run)) || echo "done on every worker of $name; logs: ~/recranker-logs/worker-<host>.log on each worker" >&2
