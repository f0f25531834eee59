#!/usr/bin/env bash
# The GPU rows of the README's Measurements, one run after another on one machine:
# SigLIP B/16 train throughput with cuDNN and reference attention, So400m/14 with
# cuDNN, then experiments/attention_check.py (each kernel against the float32
# reference). Each run's whole output goes to $OUT/<name>.log (default ./gpu_logs);
# the last lines of each are printed as it finishes. A run stops after
# $STEP_TIMEOUT seconds (default 300), so one hung run cannot eat the others' time.
#
#   bash experiments/gpu_measurements.sh
set -u
cd "$(dirname "$0")/.."
out=${OUT:-gpu_logs}
mkdir -p "$out"
export PYTHONUNBUFFERED=1 TF_CPP_MIN_LOG_LEVEL=${TF_CPP_MIN_LOG_LEVEL:-2}
T=experiments/train_throughput.py

run() {
  local name=$1; shift
  echo "== $name: python3 $*"
  timeout "${STEP_TIMEOUT:-300}" python3 "$@" > "$out/$name.log" 2>&1
  echo "   exit $?"
  grep -v -i "warn" "$out/$name.log" | tail -n 18
}

run b16_cudnn $T --variant B/16 --batch 256 --steps 10 --attention cudnn
run b16_reference $T --variant B/16 --batch 256 --steps 10 --attention reference
run so400m_cudnn $T --variant So400m/14 --batch 128 --steps 6 --attention cudnn
run attention_check experiments/attention_check.py --batch 32
