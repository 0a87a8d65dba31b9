# Shared by launch/tpu_pod.sh and launch/local_multiprocess.sh (sourced). launch/gpu_slurm.sbatch
# keeps its own copies of fail and quote: sbatch runs a copy of the script from Slurm's spool
# folder, where this file is not next to it.

fail() {  # one line on stderr, exit 2 (a usage mistake)
  echo "error: $1" >&2
  exit 2
}

usage_text() {  # $1: a script; prints its leading comment (its usage), for --help
  awk 'NR == 1 {next} /^#/ {sub(/^# ?/, ""); print; next} {exit}' "$1"
}

quote() {  # shell-quote one word only where needed, so printed lines can be pasted
  if [[ "$1" =~ ^[A-Za-z0-9_./:=@%+,-]+$ ]]; then printf '%s' "$1"; else printf "'%s'" "${1//\'/\'\\\'\'}"; fi
}

join_quoted() { local out="" word; for word in "$@"; do out+="$(quote "$word") "; done; printf '%s' "${out% }"; }

require_project() {  # $1: a python that must import recranker_jax (the pre-flight check runs with it)
  command -v "$1" >/dev/null || fail "$1: command not found (set PYTHON to a python that has recranker_jax installed)"
  "$1" -c "import recranker_jax" >/dev/null 2>&1 ||
    fail "$1 cannot import recranker_jax: install the project first (pip install -e . or pip install .)"
}

# The words after a program: sets command_config (its --config value), command_config_known (1
# when --config was given), command_subcommand (the first other word) and command_overrides (its
# key=value words).
read_command_args() {
  command_config="" command_config_known=0 command_subcommand="" command_overrides=()
  local words=("$@") i
  for ((i = 0; i < ${#words[@]}; i++)); do
    case "${words[$i]}" in
      --config) command_config_known=1 command_config="${words[$((i + 1))]:-}"; i=$((i + 1)) ;;
      --config=*) command_config_known=1 command_config="${words[$i]#--config=}" ;;
      -*) ;;
      *=*) command_overrides+=("${words[$i]}") ;;
      *) [[ -n "$command_subcommand" ]] || command_subcommand="${words[$i]}" ;;
    esac
  done
}

# After read_command_args of a recranker command: without --config, its stage commands use the
# bundled quickstart (the CLI's default) and `pipeline` fails as the CLI does.
apply_cli_default_config() {
  ((!command_config_known)) || return 0
  case "$command_subcommand" in
    data|retrieval|instructions|pretrain|finetune|rank|quickstart) command_config_known=1 command_config=quickstart ;;
    pipeline) fail "recranker pipeline needs --config FILE" ;;
  esac
}
