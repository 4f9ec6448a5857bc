#!/usr/bin/env bash
# Where the GPU rollout step's time goes, by scaling: benches/sd35.rs's rollout step (SD3.5-M config,
# bf16, CFG batch of 2·B) with and without LoRA, at 512 and 256 px and two batch sizes, beside
# PyTorch's at 256 px. Time that grows with the square of the tokens is attention's; time that does
# not change without LoRA is not the adapters'. Run on a GPU machine after `bash scripts/build-cuda.sh
# bundle`, like scripts/gpu-check.sh: `bash scripts/gpu-rollout-scaling.sh [OUT]`.
set -uo pipefail
cd "$(dirname "$0")/.."
BIN=${BIN:-.gpu}
OUT=${1:-${OUT:-/tmp/gpu-scaling}}
mkdir -p "$OUT"
if [ ! -x "$BIN/sd35" ] && [ -f "$BIN/dgpo-cuda.tar.xz" ]; then
  tar -C "$BIN" -xJf "$BIN/dgpo-cuda.tar.xz"
fi
libdirs=$(find /usr /opt -xdev \( -name 'libcublas.so.13' -o -name 'libcurand.so.10' \
  -o -name 'libcudart.so.13' \) 2>/dev/null | xargs -r -n1 dirname | sort -u | paste -sd:)
export LD_LIBRARY_PATH="$libdirs${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
run() { # run NAME ARGS...: one line per bench, tagged with NAME
  "$BIN/sd35" --device cuda --dtype bf16 --reps 5 "${@:2}" 2>&1 | sed "s/^{/{\"probe\": \"$1\", /" \
    | tee -a "$OUT/scaling.jsonl" || echo "$1 FAILED"
}
run lora-512-b16
run nolora-512-b16 --rank 0
run lora-512-b8 --batch 8 --chunk 4
run lora-256-b16 --resolution 256
run nolora-256-b16 --resolution 256 --rank 0
run lora-1024-b4 --resolution 1024 --batch 4 --chunk 1
if python3 -c 'import diffusers, peft' 2>/dev/null; then
  for res in 256 512 1024; do
    b=16; [ $res = 1024 ] && b=4
    python3 scripts/bench_sd35_torch.py --device cuda --dtype bf16 --resolution $res --batch $b \
      --chunk 1 2>&1 | grep '^{' | sed "s/^{/{\"probe\": \"torch-$res-b$b\", /" | tee -a "$OUT/scaling.jsonl"
  done
fi
