#!/usr/bin/env bash
# DGPO against Flow-GRPO on the shapes testbed: same base model, seed, prompts, reward,
# threads and evaluation protocol (78 test prompts × 2 images, DPM-Solver++ 14 steps, CFG 4.5, fixed
# noise, slow-EMA weights), each algorithm with its own recommended settings and the same wall-clock
# budget. Writes runs/compare/{curves.csv,curves.png,summary.json} and prints time-to-target.
#   bash scripts/compare_algorithms.sh [minutes per algorithm, default 15] [threads, default 2]
# Runs by hand (about 2 × minutes); the plot needs matplotlib (installed into the venv if missing).
set -euo pipefail
cd "$(dirname "$0")/.."
MIN="${1:-15}"
THREADS="${2:-2}"
OUT=runs/compare
VENV="${DGPO_PLOT_VENV:-/tmp/pt}"
cargo build --release -q
mkdir -p "$OUT"
for alg in dgpo flow_grpo; do
  cfg=configs/shapes.toml
  [ "$alg" = flow_grpo ] && cfg=configs/shapes-flow-grpo.toml
  rm -rf "$OUT/$alg"
  ./target/release/dgpo --threads "$THREADS" train --config "$cfg" --out "$OUT/$alg" \
    --set run.num_epochs=100000 --set run.max_minutes="$MIN" \
    2>&1 | grep -v INFO | tee "$OUT/$alg.log"
done
if ! "$VENV/bin/python" -c "import matplotlib" 2>/dev/null; then
  [ -x "$VENV/bin/python" ] || python3 -m venv "$VENV"
  "$VENV/bin/pip" install -q matplotlib
fi
"$VENV/bin/python" scripts/compare_algorithms.py "$OUT" --threads "$THREADS" --minutes "$MIN"
