#!/usr/bin/env bash
# A/B of attention kernels and XLA GPU flags on the SigLIP B/16 train step, one
# process per variant, all on the same machine in one call, so the step times are
# comparable. Each variant is "name|attention|XLA_FLAGS"; the defaults are the
# cuDNN kernel with XLA's defaults, the same with cuBLASLt (whose epilogues take
# the bias add and GELU into the matmul), the reference attention, and jax.nn's
# xla attention. Logs go to $OUT/ab_<name>.log (default ./gpu_logs), the table of
# step time, images/s and analytic MFU is printed last. A variant stops after
# $STEP_TIMEOUT s (default 150); none starts past $BUDGET s (default: no limit).
#
#   bash experiments/gpu_flag_ab.sh
#   BATCH=256 BUDGET=300 bash experiments/gpu_flag_ab.sh "base|cudnn|" "lt|cudnn|--xla_gpu_enable_cublaslt=true"
set -u
cd "$(dirname "$0")/.."
out=${OUT:-gpu_logs}
mkdir -p "$out"
export PYTHONUNBUFFERED=1 TF_CPP_MIN_LOG_LEVEL=${TF_CPP_MIN_LOG_LEVEL:-2}
budget=${BUDGET:-1000000}
base_flags=${XLA_FLAGS:-}
variants=("$@")
if ((${#variants[@]} == 0)); then
  variants=("cudnn|cudnn|" "cudnn_cublaslt|cudnn|--xla_gpu_enable_cublaslt=true"
            "reference|reference|" "xla|xla|")
fi
for v in "${variants[@]}"; do
  IFS='|' read -r name att flags <<< "$v"
  rm -f "$out/ab_$name.log"
  left=$((budget - SECONDS)) limit=${STEP_TIMEOUT:-150}
  if ((left < 30)); then echo "== $name: skipped, ${left} s of the budget left"; continue; fi
  ((left < limit)) && limit=$left
  echo "== $name (at ${SECONDS} s): attention=$att XLA_FLAGS=$flags"
  xf=$(echo "$base_flags $flags" | xargs)
  if [ -n "$xf" ]; then export XLA_FLAGS="$xf"; else unset XLA_FLAGS; fi
  timeout "$limit" python3 experiments/train_throughput.py \
      --variant "${VARIANT:-B/16}" --batch "${BATCH:-256}" --steps "${STEPS:-10}" \
      --image_size "${IMAGE_SIZE:-224}" \
      --attention "$att" > "$out/ab_$name.log" 2>&1
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
