#!/usr/bin/env bash
# Build dgpo with Candle's CUDA backend on a machine without a CUDA toolkit: nvcc 13.0 and the CUDA
# headers and libraries come from NVIDIA's PyPI wheels, installed into a virtual environment outside
# the repository (about 1 GB).
#
#   bash scripts/build-cuda.sh          # cargo build --release --features cuda
#   bash scripts/build-cuda.sh check    # cargo check --features cuda: compiles everything, the CUDA
#                                       # kernels included, links nothing; needs no GPU or driver
#   bash scripts/build-cuda.sh bundle   # the build, plus the sd35 benchmark, stripped into .gpu/ and
#                                       # packed as .gpu/dgpo-cuda.tar.xz for scripts/gpu-check.sh on
#                                       # a GPU machine without Rust
# Without a driver on this machine, the build links against a stub libcuda.so.1 (see below).
#
# Environment: CUDA_COMPUTE_CAP (default 90: H100 / H200), DGPO_CUDA_VENV (default
# ~/.cache/dgpo/cuda-13.0). CUDA 13.0 is chosen to be no newer than the drivers of the GPU machines
# this project is lent (13.0); pick older wheels for older drivers.
set -euo pipefail
cd "$(dirname "$0")/.."
MODE=${1:-build}
VENV=${DGPO_CUDA_VENV:-$HOME/.cache/dgpo/cuda-13.0}
PKGS=(
  "nvidia-cuda-nvcc==13.0.88"
  # nvcc's compiler back end and headers are separate wheels; unpinned, pip takes the newest (13.5),
  # whose PTX (9.5) the 13.0 ptxas refuses
  "nvidia-nvvm==13.0.88"
  "nvidia-cuda-crt==13.0.88"
  "nvidia-cuda-runtime==13.0.96"
  "nvidia-cuda-cccl==13.0.85"
  "nvidia-cuda-nvrtc==13.0.88"
  "nvidia-cublas>=13.0,<13.1"
  "nvidia-curand>=10.4.0,<10.4.1"
)
[ -x "$VENV/bin/python" ] || python3 -m venv "$VENV"
"$VENV/bin/pip" install -q "${PKGS[@]}"
CUDA_HOME=$("$VENV/bin/python" -c 'import nvidia, os; print(os.path.join(list(nvidia.__path__)[0], "cu13"))')
[ -x "$CUDA_HOME/bin/nvcc" ] || { echo "error: no nvcc in $CUDA_HOME/bin" >&2; exit 1; }
# The wheels ship versioned shared libraries only; the linker wants the plain names too.
for f in "$CUDA_HOME"/lib/*.so.*; do
  b=$(basename "$f"); plain=${b%%.so.*}.so
  [ -e "$CUDA_HOME/lib/$plain" ] || ln -s "$b" "$CUDA_HOME/lib/$plain"
done
[ -e "$CUDA_HOME/lib64" ] || ln -s lib "$CUDA_HOME/lib64"
# No driver here (a build machine without a GPU): link against a stub libcuda.so.1 that defines every
# driver function cudarc declares; the binary then loads the driver's real libcuda.so.1 where it runs.
if [ "$MODE" != check ] && ! ldconfig -p 2>/dev/null | grep -q 'libcuda\.so\.1 '; then
  CUDARC=$(cargo metadata --format-version 1 --locked --features cuda 2>/dev/null | "$VENV/bin/python" -c '
import json, os, sys
m = json.load(sys.stdin)
print(next(os.path.dirname(p["manifest_path"]) for p in m["packages"] if p["name"] == "cudarc"))')
  mkdir -p "$CUDA_HOME/lib/stubs"
  grep -ohE 'pub unsafe fn cu[A-Za-z0-9_]+' "$CUDARC/src/driver/sys/mod.rs" | sed 's/pub unsafe fn //' \
    | sort -u | sed 's/.*/int &(void) { return 999; }/' >"$CUDA_HOME/lib/stubs/cuda_stub.c"
  cc -shared -fPIC -Wl,-soname,libcuda.so.1 -o "$CUDA_HOME/lib/stubs/libcuda.so" \
    "$CUDA_HOME/lib/stubs/cuda_stub.c"
  echo "no libcuda.so.1 on this machine: linking against a stub (the GPU machine's driver provides the real one)"
fi
export CUDA_HOME CUDA_PATH="$CUDA_HOME" CUDA_ROOT="$CUDA_HOME" PATH="$CUDA_HOME/bin:$PATH"
export LD_LIBRARY_PATH="$CUDA_HOME/lib:${LD_LIBRARY_PATH:-}"
export CUDA_COMPUTE_CAP=${CUDA_COMPUTE_CAP:-90}
nvcc --version | tail -2
echo "CUDA_HOME=$CUDA_HOME CUDA_COMPUTE_CAP=$CUDA_COMPUTE_CAP"
if [ "$MODE" = check ]; then
  cargo check --release --features cuda --all-targets
elif [ "$MODE" = bundle ]; then
  # what scripts/gpu-check.sh runs on a GPU machine without a Rust toolchain: stripped copies of
  # dgpo and of the sd35 benchmark in .gpu/ (ignored by git)
  cargo build --release --features cuda
  exe=$(cargo bench --features cuda --bench sd35 --no-run 2>&1 | tee /dev/stderr \
    | sed -n 's/.*Executable .*(\(.*\)).*/\1/p' | tail -1)
  mkdir -p .gpu
  strip -o .gpu/dgpo target/release/dgpo
  strip -o .gpu/sd35 "$exe"
  # the PTX of Candle's kernels makes the binaries large (about 120 MB); xz makes them about 16 MB
  tar -C .gpu -cf - dgpo sd35 | xz -T0 -6 >.gpu/dgpo-cuda.tar.xz
  ls -la .gpu
else
  cargo build --release --features cuda
  echo "built target/release/dgpo with CUDA; run with LD_LIBRARY_PATH=$CUDA_HOME/lib and --device cuda"
fi
