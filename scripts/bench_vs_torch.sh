#!/usr/bin/env bash
# Side-by-side CPU benchmark, dgpo vs PyTorch + diffusers + peft, on the shipped shapes model.
# Run by hand from the repository root (not in CI), on an otherwise idle machine:
#   bash scripts/bench_vs_torch.sh            # threads = all cores, 5 rounds
#   THREADS=1 ROUNDS=7 bash scripts/bench_vs_torch.sh
#   DGPO_ARGS=--plain bash scripts/bench_vs_torch.sh   # dgpo without its coarse ops (src/model/coarse/)
# The two sides alternate (dgpo, PyTorch, dgpo, PyTorch, …) so that a machine whose speed drifts
# affects both alike; each ratio is the median over rounds of dgpo/PyTorch, with its min–max.
# Uses $PYTHON (default /tmp/pt/bin/python); creates that venv with torch, diffusers and peft if missing.
set -euo pipefail
cd "$(dirname "$0")/.."
THREADS="${THREADS:-$(nproc)}"
ROUNDS="${ROUNDS:-5}"
PYTHON="${PYTHON:-/tmp/pt/bin/python}"
if [ ! -x "$PYTHON" ]; then
  echo "creating a PyTorch venv in /tmp/pt (about 3.5 GB)..." >&2
  python3 -m venv /tmp/pt
  /tmp/pt/bin/pip install -q torch diffusers transformers peft
  PYTHON=/tmp/pt/bin/python
fi
out=$(mktemp -d)
cargo build --release --bench vs_torch 2>/dev/null
for r in $(seq 1 "$ROUNDS"); do
  echo "round $r of $ROUNDS" >&2
  cargo bench --bench vs_torch -- --threads "$THREADS" ${DGPO_ARGS:-} 2>/dev/null | grep '^{' | sed "s/^{/{\"round\": $r, /" >> "$out/dgpo.jsonl"
  "$PYTHON" scripts/bench_vs_torch.py --threads "$THREADS" 2>/dev/null | grep '^{' | sed "s/^{/{\"round\": $r, /" >> "$out/torch.jsonl"
done
python3 - "$out" "$THREADS" "$ROUNDS" <<'PY'
import json, os, sys, platform, statistics
d, threads, rounds = sys.argv[1], sys.argv[2], int(sys.argv[3])
def load(f):
    rows = {}
    for r in map(json.loads, open(f)):
        rows.setdefault(r["bench"], {})[r["round"]] = r
    return rows
ours, theirs = load(f"{d}/dgpo.jsonl"), load(f"{d}/torch.jsonl")
cpu = next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")), platform.processor())
peaks = [r["gflops"] for r in theirs["matmul_peak"].values()]
peak = statistics.median(peaks)
print(f"machine: {cpu}, {threads} threads; dgpo args: {os.environ.get('DGPO_ARGS') or 'none'}; f32; shapes model (configs/shapes/transformer.json), LoRA r8, batch 32")
print(f"{rounds} alternating rounds; medians over rounds, ratio min–max in brackets")
print(f"matmul peak (PyTorch, 1024^3): {peak:.0f} GFLOP/s (rounds {min(peaks):.0f}–{max(peaks):.0f})")
print(f"{'bench':<14}{'dgpo ms':>10}{'torch ms':>10}{'dgpo/torch':>12}{'(min–max)':>14}{'dgpo GFLOP/s':>14}{'% of peak':>11}")
summary = {"threads": int(threads), "rounds": rounds, "matmul_peak_gflops": peak, "benches": {}}
for k in ["forward", "lora_fwd_bwd", "rollout", "dgpo_pass"]:
    a, b = ours[k], theirs[k]
    rs = sorted(set(a) & set(b))
    ratios = [a[r]["ms"] / b[r]["ms"] for r in rs]
    am = statistics.median(a[r]["ms"] for r in rs)
    bm = statistics.median(b[r]["ms"] for r in rs)
    gf = statistics.median(a[r]["gflops"] for r in rs)
    q = statistics.median(ratios)
    print(f"{k:<14}{am:>10.1f}{bm:>10.1f}{q:>12.2f}{f'({min(ratios):.2f}–{max(ratios):.2f})':>14}{gf:>14.1f}{100*gf/peak:>10.0f}%")
    summary["benches"][k] = {"dgpo_ms": am, "torch_ms": bm, "ratio": q, "ratio_min": min(ratios),
                             "ratio_max": max(ratios), "dgpo_gflops": gf}
print(json.dumps(summary))
PY
