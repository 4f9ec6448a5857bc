#!/usr/bin/env bash
# The main job's first epochs twice: the shapes reward in process, and served over HTTP by
# `dgpo reward-server` on the loopback interface (kind = "remote", JSON protocol). Checks that the
# two runs see the same rewards and losses, and prints the remote path's cost per epoch.
#
#   bash scripts/compare_remote_reward.sh [epochs=10] [threads=2]
set -euo pipefail
cd "$(dirname "$0")/.."
EPOCHS=${1:-10}
THREADS=${2:-2}
PORT=${PORT:-18097}
OUT=runs/remote-check
cargo build --release --quiet
BIN=target/release/dgpo
rm -rf "$OUT" && mkdir -p "$OUT"
COMMON=(--threads "$THREADS" train -c configs/shapes.toml --set run.num_epochs="$EPOCHS"
        --set run.max_minutes=0 --set run.eval_every=100000 --set run.save_every=100000)

"$BIN" reward-server --reward shapes_geneval --port "$PORT" --workers 1 >"$OUT/server.log" 2>&1 &
SERVER=$!
trap 'kill $SERVER 2>/dev/null || true' EXIT
sleep 1

"$BIN" "${COMMON[@]}" --out "$OUT/in_process" -q
"$BIN" "${COMMON[@]}" --out "$OUT/remote" -q \
  --set reward.0.kind=remote --set reward.0.url="http://127.0.0.1:$PORT"

python3 - "$OUT" <<'PY'
import json, sys
out = sys.argv[1]
def train(run):
    return [json.loads(l) for l in open(f"{out}/{run}/metrics.jsonl") if '"train"' in l]
a, b = train("in_process"), train("remote")
same = all(x["reward_mean"] == y["reward_mean"] and x["loss"] == y["loss"] for x, y in zip(a, b))
print(f"{len(a)} epochs; rewards and losses identical: {same}")
for name, rows in (("in process", a), ("remote", b)):
    k = len(rows)
    mean = lambda f: sum(r[f] for r in rows) / k
    total = sum(r["rollout_s"] + r["reward_s"] + r["update_s"] for r in rows) / k
    print(f"{name:>10}: epoch {total:.2f} s = rollout {mean('rollout_s'):.2f} + reward wait "
          f"{mean('reward_s'):.3f} + update {mean('update_s'):.2f}; scoring busy {mean('reward_busy_s'):.3f} s")
ta = sum(r["rollout_s"] + r["reward_s"] + r["update_s"] for r in a) / len(a)
tb = sum(r["rollout_s"] + r["reward_s"] + r["update_s"] for r in b) / len(b)
print(f"remote overhead per epoch: {tb - ta:+.3f} s ({100 * (tb - ta) / ta:+.1f} %)")
sys.exit(0 if same else 1)
PY
