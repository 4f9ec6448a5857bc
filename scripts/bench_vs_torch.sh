#!/usr/bin/env bash
# Side-by-side CPU benchmark, dgpo vs PyTorch + diffusers + peft, on the shipped shapes model.
# Run by hand from the repository root (not in CI):
#   bash scripts/bench_vs_torch.sh            # threads = all cores
#   THREADS=1 bash scripts/bench_vs_torch.sh
# Uses $PYTHON (default /tmp/pt/bin/python); creates that venv with torch, diffusers and peft if missing.
set -euo pipefail
cd "$(dirname "$0")/.."
THREADS="${THREADS:-$(nproc)}"
PYTHON="${PYTHON:-/tmp/pt/bin/python}"
if [ ! -x "$PYTHON" ]; then
  echo "creating a PyTorch venv in /tmp/pt (about 3.5 GB)..." >&2
  python3 -m venv /tmp/pt
  /tmp/pt/bin/pip install -q torch diffusers transformers peft
  PYTHON=/tmp/pt/bin/python
fi
out=$(mktemp -d)
cargo bench --bench vs_torch -- --threads "$THREADS" 2>/dev/null | grep '^{' > "$out/dgpo.jsonl"
"$PYTHON" scripts/bench_vs_torch.py --threads "$THREADS" 2>/dev/null | grep '^{' > "$out/torch.jsonl"
python3 - "$out" "$THREADS" <<'PY'
import json, sys, platform, subprocess
d, threads = sys.argv[1], sys.argv[2]
ours = {r["bench"]: r for r in map(json.loads, open(f"{d}/dgpo.jsonl"))}
theirs = {r["bench"]: r for r in map(json.loads, open(f"{d}/torch.jsonl"))}
cpu = next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")), platform.processor())
peak = theirs["matmul_peak"]["gflops"]
print(f"machine: {cpu}, {threads} threads; f32; shapes model (configs/shapes/transformer.json), LoRA r8, batch 32")
print(f"matmul peak (PyTorch, 1024^3): {peak:.0f} GFLOP/s")
print(f"{'bench':<14}{'dgpo ms':>10}{'torch ms':>10}{'dgpo/torch':>12}{'dgpo GFLOP/s':>14}{'% of peak':>11}")
for k in ["forward", "lora_fwd_bwd", "rollout", "dgpo_pass"]:
    a, b = ours[k], theirs[k]
    print(f"{k:<14}{a['ms']:>10.1f}{b['ms']:>10.1f}{a['ms']/b['ms']:>12.2f}{a['gflops']:>14.1f}{100*a['gflops']/peak:>10.0f}%")
PY
