#!/usr/bin/env bash
# Start one recranker command as N cooperating processes on this machine, the way a TPU pod
# or a Slurm job would, for testing multi-host code paths on CPU:
#
#   launch/local_multiprocess.sh [--dry-run] [-n N] [--port P] [--devices-per-process D]
#                                [--logs DIR] -- recranker finetune --config X key=value ...
#
# Process i gets RECRANKER_COORDINATOR=127.0.0.1:P, RECRANKER_NUM_PROCESSES=N,
# RECRANKER_PROCESS_ID=i (read by recranker_jax.parallel.initialize_distributed; CPU
# collectives default to gloo) and XLA_FLAGS for D host CPU devices, and logs to
# DIR/process-<i>.log (default runs/logs/local-<timestamp>/). The script waits for all of
# them; when one fails it stops the others and exits with that process's exit code.
# A SIGINT/SIGTERM to the script is passed on to every process (the trainer checkpoints on
# SIGTERM; run the same command again to resume).
# Before anything starts (dry runs too), a recranker command (`recranker ...` or
# `PY -m recranker_jax.cli ...`) is checked the way launch/tpu_pod.sh checks it:
# python -m recranker_jax.launch_check --devices N*D with the command's --config and key=value
# overrides. Without --config, the stage commands (data, retrieval, instructions, finetune, rank,
# quickstart) are checked with quickstart, the CLI's default for them; pipeline needs --config
# (refused here, as the CLI would); other commands, and commands that are not recranker's, start
# unchecked. A failing check prints its one error: line and exits 2 with nothing started.
# The check runs with $PYTHON, else the command's own python (the -m form), else python3.
# --dry-run prints each process's command line with its environment and exits 0.
# Defaults: N=2, a free port, D=1.
set -euo pipefail

usage() {
  echo "usage: launch/local_multiprocess.sh [--dry-run] [-n N] [--port P] [--devices-per-process D] [--logs DIR] -- COMMAND ..." >&2
}
# shellcheck source=launch/lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"  # fail, quote, require_project, read_command_args, ...
is_count() { [[ "$1" =~ ^[1-9][0-9]*$ ]]; }

dry_run=0 processes=2 port="" devices=1 logs=""
while (($#)); do
  case "$1" in
    --dry-run) dry_run=1; shift ;;
    -n|--processes) (($# >= 2)) || fail "$1 needs a value"; processes="$2"; shift 2 ;;
    --port) (($# >= 2)) || fail "--port needs a value"; port="$2"; shift 2 ;;
    --devices-per-process) (($# >= 2)) || fail "--devices-per-process needs a value"; devices="$2"; shift 2 ;;
    --logs) (($# >= 2)) || fail "--logs needs a value"; logs="$2"; shift 2 ;;
    -h|--help) usage_text "${BASH_SOURCE[0]}"; exit 0 ;;
    --) shift; break ;;
    *) usage; fail "unknown option $1 (put the command after --)" ;;
  esac
done
(($#)) || { usage; fail "no command given: put it after --, e.g. -- recranker finetune --config X"; }
is_count "$processes" || fail "-n $processes: expected a positive number of processes"
is_count "$devices" || fail "--devices-per-process $devices: expected a positive number of devices"
if [[ -n "$port" ]]; then
  [[ "$port" =~ ^[0-9]+$ ]] && ((port > 0 && port < 65536)) || fail "--port $port: expected a port number 1-65535"
fi
logs="${logs:-runs/logs/local-$(date +%Y%m%d-%H%M%S)}"

# The pre-flight check of a recranker command: its config (or the CLI's default) and overrides.
python="${PYTHON:-python3}"
case "${1##*/}" in
  recranker) skip=1 ;;
  python*) if [[ "${2:-}" == -m && "${3:-}" == recranker_jax.cli ]]; then skip=3 python="${PYTHON:-$1}"; else skip=0; fi ;;
  *) skip=0 ;;
esac
check=0
if ((skip)); then
  read_command_args "${@:skip+1}"
  apply_cli_default_config
  check=$command_config_known
fi
if ((check)); then
  require_project "$python"
  "$python" -m recranker_jax.launch_check --config "$command_config" --devices $((processes * devices)) \
    ${command_overrides[@]+"${command_overrides[@]}"} >&2 || exit 2  # its error line is already on stderr
fi
if [[ -z "$port" ]]; then
  command -v "$python" >/dev/null || fail "$python: command not found (set PYTHON to a python, or pass --port P)"
  port=$("$python" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
fi

environment() {  # the variables of process $1, one NAME=value word each
  printf '%s\n' "RECRANKER_COORDINATOR=127.0.0.1:$port" "RECRANKER_NUM_PROCESSES=$processes" \
    "RECRANKER_PROCESS_ID=$1" "XLA_FLAGS=--xla_force_host_platform_device_count=$devices"
}

if ((dry_run)); then
  for ((i = 0; i < processes; i++)); do
    line=""
    while read -r word; do line+="$(quote "$word") "; done < <(environment "$i")
    for word in "$@"; do line+="$(quote "$word") "; done
    echo "${line}> $(quote "$logs/process-$i.log") 2>&1"
  done
  exit 0
fi

mkdir -p "$logs"
declare -A running=()  # pid -> process index, for those not yet reaped
stop_all() {
  for pid in "${!running[@]}"; do kill -TERM "$pid" 2>/dev/null || true; done
}
trap 'stop_all' INT TERM
for ((i = 0; i < processes; i++)); do
  mapfile -t variables < <(environment "$i")
  env "${variables[@]}" "$@" > "$logs/process-$i.log" 2>&1 &
  running[$!]=$i
done
echo "started $processes processes (coordinator 127.0.0.1:$port, $devices device(s) each); logs in $logs/" >&2

status=0 failed=""
while ((${#running[@]})); do  # poll: `wait -n` loses statuses of processes ending together
  sleep 0.2 || true
  for pid in "${!running[@]}"; do
    kill -0 "$pid" 2>/dev/null && continue  # still running (bash reaps ended ones after each sleep)
    code=0
    wait "$pid" || code=$?
    index=${running[$pid]}
    unset "running[$pid]"
    if ((code != 0 && status == 0)); then
      status=$code failed=$index
      stop_all  # the others would wait forever for the failed one
    fi
  done
done
if ((status)); then
  echo "error: process $failed exited with code $status; the others were stopped. Its log ($logs/process-$failed.log) ends:" >&2
  tail -n 20 "$logs/process-$failed.log" >&2 || true
  exit "$status"
fi
echo "all $processes processes finished; logs in $logs/" >&2
