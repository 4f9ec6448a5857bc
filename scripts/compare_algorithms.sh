#!/usr/bin/env bash
# DGPO against Flow-GRPO on the shapes testbed: same base model, seed, prompts, reward,
# threads and evaluation protocol (78 test prompts × 8 images every 50 epochs, DPM-Solver++ 14 steps,
# no CFG, fixed noise, slow-EMA weights), each algorithm with its own recommended settings and the same wall-clock
# budget. Writes runs/compare-seed<seed>/report.html (both runs' curves overlaid, grids, configs) and
# summary.json beside it, and prints when each algorithm first reaches each GenEval score.
#   bash scripts/compare_algorithms.sh [minutes per algorithm, default 15] [threads, default 2] [seed, default 0]
# Runs by hand (about 2 × minutes). No Python: the page and the table come from `dgpo report`.
set -euo pipefail
cd "$(dirname "$0")/.."
MIN="${1:-15}"
THREADS="${2:-2}"
SEED="${3:-0}"
OUT="runs/compare-seed$SEED"
cargo build --release -q
mkdir -p "$OUT"
for alg in dgpo flow_grpo; do
  cfg=configs/shapes.toml
  [ "$alg" = flow_grpo ] && cfg=configs/shapes-flow-grpo.toml
  rm -rf "${OUT:?}/$alg"
  ./target/release/dgpo --threads "$THREADS" train --config "$cfg" --out "$OUT/$alg" \
    --set run.num_epochs=100000 --set run.max_minutes="$MIN" --set run.seed="$SEED" \
    2>&1 | grep -v INFO | tee "$OUT/$alg.log"
done
./target/release/dgpo report "$OUT/dgpo" "$OUT/flow_grpo" --out "$OUT/report.html" --json "$OUT/summary.json"
