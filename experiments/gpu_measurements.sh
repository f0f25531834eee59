#!/usr/bin/env bash
# The GPU rows of the README's Measurements, one run after another on one machine,
# most wanted first:
#   1. SigLIP B/16 train throughput with cuDNN attention, then 3 traced steps and
#      the table of where the kernel time went (trace and compiled HLO, gzipped,
#      go to $OUT as b16_cudnn.xplane.pb.gz / b16_cudnn.hlo.txt.gz);
#   2. So400m/14 with cuDNN attention, its blocks scanned (model.*.scan: the
#      unrolled 27-layer towers spend minutes compiling their initialiser alone);
#   3. experiments/attention_check.py (each kernel against the float32 reference);
#   4. experiments/gpu_flag_ab.sh with its default variants (B/16: cuDNN with a
#      remat policy, batch 512, the xla and reference kernels, cuBLASLt), in
#      whatever budget is left; its logs together in $OUT/ab_all.log.
# Each run's whole output goes to $OUT/<name>.log (default ./gpu_logs); the last
# lines of each are printed as it finishes. A run stops after $STEP_TIMEOUT seconds
# (default 300), and no run starts or goes on past $BUDGET seconds from the
# script's start (default: no limit), so one slow run cannot eat the others' time.
#
#   bash experiments/gpu_measurements.sh
#   BUDGET=420 STEP_TIMEOUT=150 OUT=/tmp/logs bash experiments/gpu_measurements.sh
set -u
cd "$(dirname "$0")/.."
out=${OUT:-gpu_logs}
mkdir -p "$out"
export PYTHONUNBUFFERED=1 TF_CPP_MIN_LOG_LEVEL=${TF_CPP_MIN_LOG_LEVEL:-2}
T=experiments/train_throughput.py
budget=${BUDGET:-1000000}

run() {
  local name=$1; shift
  local left=$((budget - SECONDS)) limit=${STEP_TIMEOUT:-300}
  if ((left < 30)); then echo "== $name: skipped, ${left} s of the budget left"; return; fi
  ((left < limit)) && limit=$left
  echo "== $name (at ${SECONDS} s, limit ${limit} s): python3 $*"
  timeout "$limit" python3 "$@" > "$out/$name.log" 2>&1
  echo "   exit $?"
  grep -v -i "warn" "$out/$name.log" | tail -n 22
}

prof=${TMPDIR:-/tmp}/vlm_jax_prof_b16
rm -rf "$prof"
run b16_cudnn $T --variant B/16 --batch 256 --steps 10 --attention cudnn --profile "$prof"
xp=$(find "$prof" -name '*.xplane.pb' 2>/dev/null | head -n 1)
[ -n "$xp" ] && gzip -c "$xp" > "$out/b16_cudnn.xplane.pb.gz"
[ -f "$prof/train_step.hlo.txt" ] && gzip -c "$prof/train_step.hlo.txt" > "$out/b16_cudnn.hlo.txt.gz"
run so400m_cudnn $T --variant So400m/14 --batch 128 --steps 6 --attention cudnn --scan
run attention_check experiments/attention_check.py --batch 32
left=$((budget - SECONDS))
if ((left >= 60)); then
  ab=${TMPDIR:-/tmp}/vlm_jax_ab
  rm -rf "$ab"
  BUDGET=$left OUT=$ab bash experiments/gpu_flag_ab.sh
  cat "$ab"/ab_*.log > "$out/ab_all.log" 2>/dev/null  # one file: $OUT brings back few
fi
echo "== done at ${SECONDS} s"
