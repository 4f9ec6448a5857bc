#!/usr/bin/env bash
# Checks and figures on a GPU machine that has an NVIDIA driver but no Rust toolchain. Build on any
# x86-64 Linux machine first (no GPU needed): `bash scripts/build-cuda.sh bundle` leaves dgpo and the
# sd35 benchmark in .gpu/ and packed as .gpu/dgpo-cuda.tar.xz; bring either to the GPU machine and
# run from the repository root there: `bash scripts/gpu-check.sh [OUT]`. It finds cuBLAS, cuRAND
# and the CUDA runtime 13 on the machine (a CUDA toolkit or PyTorch's nvidia wheels), then:
#   1. dgpo eval of the shipped shapes base on the GPU (compare with the CPU's figures in the README);
#   2. a short run of the main job on the GPU (epoch timings in OUT/metrics.jsonl);
#   3. benches/sd35.rs: an SD3.5-Medium-sized transformer, bf16 weights, LoRA r64 in f32 — a rollout
#      step (2×16 images, CFG) and a training chunk (4 images, forward + backward), with the peak GPU
#      memory that nvidia-smi saw; 3b. the same with `--single-stream` (cudarc's one-stream settings);
#      3c. the same with `--checkpointing` (gradient checkpointing in the training chunk);
#   4. the same work in PyTorch + diffusers + peft (scripts/bench_sd35_torch.py), when importable.
# Each step runs even if one before it failed; the log says which did.
set -uo pipefail
cd "$(dirname "$0")/.."
BIN=${BIN:-.gpu}
OUT=${1:-${OUT:-/tmp/gpu-check}}
TRAIN_MINUTES=${TRAIN_MINUTES:-1.5}
mkdir -p "$OUT"
if [ ! -x "$BIN/dgpo" ] && [ -f "$BIN/dgpo-cuda.tar.xz" ]; then
  tar -C "$BIN" -xJf "$BIN/dgpo-cuda.tar.xz"
fi
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
libdirs=$(find /usr /opt -xdev \( -name 'libcublas.so.13' -o -name 'libcurand.so.10' \
  -o -name 'libcudart.so.13' \) 2>/dev/null | xargs -r -n1 dirname | sort -u | paste -sd:)
export LD_LIBRARY_PATH="$libdirs${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
echo "LD_LIBRARY_PATH=$LD_LIBRARY_PATH"
if ldd "$BIN/dgpo" | grep 'not found'; then
  echo "error: $BIN/dgpo misses the libraries above" >&2
  exit 1
fi

step() { echo; echo "=== $1 ($(date -u +%T))"; }
peak_mem() { # peak_mem LOG CMD...: runs CMD while nvidia-smi samples the used memory every 100 ms
  local log=$1; shift
  nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits -lms 100 >"$log" &
  local smi=$!
  "$@"
  local rc=$?
  kill $smi 2>/dev/null; wait $smi 2>/dev/null
  echo "peak GPU memory (nvidia-smi, MiB): $(sort -n "$log" | tail -1)"
  return $rc
}

step "1. dgpo eval of the shipped shapes base, CUDA"
t0=$SECONDS
"$BIN/dgpo" --device cuda eval --config configs/shapes-pretrain.toml \
  --checkpoint configs/shapes/base --json "$OUT/eval-cuda.json" || echo "STEP 1 FAILED"
echo "wall $((SECONDS - t0)) s"

step "2. the main job on CUDA for $TRAIN_MINUTES min"
rm -rf /tmp/gpu-run
"$BIN/dgpo" --device cuda -q train --config configs/shapes.toml --out /tmp/gpu-run \
  --set run.max_minutes="$TRAIN_MINUTES" --set run.eval_every=1000 || echo "STEP 2 FAILED"
cp /tmp/gpu-run/metrics.jsonl "$OUT/train-metrics.jsonl" 2>/dev/null
python3 - "$OUT/train-metrics.jsonl" <<'PY' || true
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1])]
tr = [r for r in rows if r.get("kind") == "train"]
keys = [k for k in tr[-1] if k.endswith("_s") and k != "wall_s"]
print(f"{len(tr)} epochs; last wall_s {tr[-1]['wall_s']:.1f}")
for k in keys:
    v = [r[k] for r in tr[1:]] or [tr[0][k]]
    print(f"  {k}: mean {sum(v)/len(v):.3f} over epochs 1..")
PY

step "3. dgpo, SD3.5-Medium-sized transformer (bf16, LoRA r64), benches/sd35.rs"
peak_mem "$OUT/mem-dgpo.txt" "$BIN/sd35" --device cuda --dtype bf16 | tee "$OUT/sd35-dgpo.jsonl" \
  || echo "STEP 3 FAILED"

step "3b. the same with cudarc's single-stream settings (--single-stream: event tracking off, pool kept)"
peak_mem "$OUT/mem-dgpo-single.txt" "$BIN/sd35" --device cuda --dtype bf16 --single-stream \
  | tee "$OUT/sd35-dgpo-single.jsonl" || echo "STEP 3b FAILED"

step "3c. the same with gradient checkpointing (--checkpointing: one block's activations at a time)"
peak_mem "$OUT/mem-dgpo-ckpt.txt" "$BIN/sd35" --device cuda --dtype bf16 --checkpointing \
  | tee "$OUT/sd35-dgpo-ckpt.jsonl" || echo "STEP 3c FAILED"

step "4. PyTorch + diffusers + peft, the same work"
if python3 -c 'import diffusers, peft' 2>/dev/null; then
  peak_mem "$OUT/mem-torch.txt" python3 scripts/bench_sd35_torch.py --device cuda --dtype bf16 \
    | tee "$OUT/sd35-torch.jsonl" || echo "STEP 4 FAILED"
else
  echo "skipped: diffusers or peft not importable"
fi
step "done"
