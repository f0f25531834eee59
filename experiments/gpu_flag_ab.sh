#!/usr/bin/env bash
# A/B of attention kernels, model options and XLA GPU flags on the SigLIP train
# step (experiments/train_throughput.py), one process per variant, all on the same
# machine in one call, so the step times are comparable.
#
# A variant is "name|XLA_FLAGS|train_throughput arguments", e.g.
#   "cudnn_lt|--xla_gpu_enable_cublaslt=true|--attention cudnn"
# Every variant also gets $COMMON (default: --variant B/16 --batch 256 --steps 10),
# and its own arguments come after, so they win. Logs go to $OUT/ab_<name>.log
# (default ./gpu_logs); the table of step time, images/s, analytic MFU and
# compile time is printed last. A variant stops after $STEP_TIMEOUT s (default
# 150); none starts past $BUDGET s from the start (default: no limit).
#
#   bash experiments/gpu_flag_ab.sh                       # the default variants below
#   BUDGET=300 bash experiments/gpu_flag_ab.sh "base||--attention cudnn" "bs512||--attention cudnn --batch 512"
set -u
cd "$(dirname "$0")/.."
out=${OUT:-gpu_logs}
mkdir -p "$out"
export PYTHONUNBUFFERED=1 TF_CPP_MIN_LOG_LEVEL=${TF_CPP_MIN_LOG_LEVEL:-2}
budget=${BUDGET:-1000000}
base_flags=${XLA_FLAGS:-}
common=${COMMON:---variant B/16 --batch 256 --steps 10}
variants=("$@")
if ((${#variants[@]} == 0)); then
  variants=("cudnn||--attention cudnn"
            "cudnn_dots||--attention cudnn --remat_policy dots_saveable"
            "cudnn_bs512||--attention cudnn --batch 512 --steps 6"
            "xla||--attention xla"
            "reference||--attention reference"
            "cudnn_cublaslt|--xla_gpu_enable_cublaslt=true|--attention cudnn")
fi
for v in "${variants[@]}"; do
  IFS='|' read -r name flags extra <<< "$v"
  rm -f "$out/ab_$name.log"
  left=$((budget - SECONDS)) limit=${STEP_TIMEOUT:-150}
  if ((left < 30)); then echo "== $name: skipped, ${left} s of the budget left"; continue; fi
  ((left < limit)) && limit=$left
  echo "== $name (at ${SECONDS} s): XLA_FLAGS=$flags; $common $extra"
  xf=$(echo "$base_flags $flags" | xargs)
  if [ -n "$xf" ]; then export XLA_FLAGS="$xf"; else unset XLA_FLAGS; fi
  # shellcheck disable=SC2086  # the argument strings are meant to split
  timeout "$limit" python3 experiments/train_throughput.py $common $extra > "$out/ab_$name.log" 2>&1
  echo "   exit $?"
done
printf "\n%-18s %10s %10s %8s %10s\n" variant "ms/step" "img/s" MFU "compile s"
for v in "${variants[@]}"; do
  IFS='|' read -r name _ _ <<< "$v"
  f="$out/ab_$name.log"
  ms=$(awk '/^step time/ {print $3}' "$f" 2>/dev/null)
  ips=$(awk '/^images\/s/ {print $2}' "$f" 2>/dev/null)
  mfu=$(awk '/^analytic 6N/ {print $NF}' "$f" 2>/dev/null)
  cs=$(awk '$1 == "compile" {print $2}' "$f" 2>/dev/null)
  printf "%-18s %10s %10s %8s %10s\n" "$name" "${ms:--}" "${ips:--}" "${mfu:--}" "${cs:--}"
done
grep -h '^device ' "$out"/ab_*.log 2>/dev/null | head -n 1
