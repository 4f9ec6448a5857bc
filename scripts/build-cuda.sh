#!/usr/bin/env bash
# Build dgpo with Candle's CUDA backend on a machine without a CUDA toolkit: nvcc 13.0 and the CUDA
# headers and libraries come from NVIDIA's PyPI wheels, installed into a virtual environment outside
# the repository (about 1 GB).
#
#   bash scripts/build-cuda.sh          # cargo build --release --features cuda (links against the
#                                       # driver's libcuda.so: run it on the GPU machine)
#   bash scripts/build-cuda.sh check    # cargo check --features cuda: compiles everything, the CUDA
#                                       # kernels included, links nothing; needs no GPU or driver
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
export CUDA_HOME CUDA_PATH="$CUDA_HOME" CUDA_ROOT="$CUDA_HOME" PATH="$CUDA_HOME/bin:$PATH"
export LD_LIBRARY_PATH="$CUDA_HOME/lib:${LD_LIBRARY_PATH:-}"
export CUDA_COMPUTE_CAP=${CUDA_COMPUTE_CAP:-90}
nvcc --version | tail -2
echo "CUDA_HOME=$CUDA_HOME CUDA_COMPUTE_CAP=$CUDA_COMPUTE_CAP"
if [ "$MODE" = check ]; then
  cargo check --release --features cuda --all-targets
else
  cargo build --release --features cuda
  echo "built target/release/dgpo with CUDA; run with LD_LIBRARY_PATH=$CUDA_HOME/lib and --device cuda"
fi
