#!/usr/bin/env bash
# Crash safety of `dgpo train` on the shapes testbed, checked against an uninterrupted run:
#  1. kill -9 at several points (after the first epochs, mid-run, while a checkpoint is staged), each
#     time followed by `--resume`; the resumed run's metrics.jsonl (fields ending in `_s` ignored) and
#     its final checkpoint's train_state.safetensors (tensors and header, metadata aside) must equal the
#     uninterrupted run's.
#  2. (root only) a run whose out folder is a tmpfs too small for it must stop with an error naming the
#     file and the full disk, and, once space is freed, `--resume` must finish it to the same result.
#   cargo build --release && scripts/kill_resume_check.sh      (about a minute per run on 2 cores)
set -u
cd "$(dirname "$0")/.."
BIN=${DGPO:-./target/release/dgpo}
work=$(mktemp -d /tmp/dgpo-kill.XXXXXX)
mnt=""
cleanup() {
    [[ -n "$mnt" ]] && umount "$mnt" 2>/dev/null
    rm -rf "$work"
}
trap cleanup EXIT
ARGS=(train --config configs/shapes.toml --no-tensorboard
    --set run.num_epochs=6 --set run.eval_every=3 --set run.save_every=1 --set run.max_minutes=0.0
    --set sample.eval_images_per_prompt=1)
fail=0

# Same metrics rows (timings aside) and the same final train_state as the reference run.
compare() {
    python3 - "$work/ref" "$1" <<'PY'
import json, struct, sys, pathlib
ref, run = map(pathlib.Path, sys.argv[1:])
def rows(d):
    out = []
    for l in (d / "metrics.jsonl").read_text().splitlines():
        r = json.loads(l)
        out.append({k: v for k, v in r.items() if not k.endswith("_s")})
    return out
def state(d):
    ck = sorted((d / "checkpoints").glob("epoch-*"))[-1]
    b = (ck / "train_state.safetensors").read_bytes()
    n = struct.unpack("<Q", b[:8])[0]
    h = json.loads(b[8:8 + n]); h.pop("__metadata__", None)
    return ck.name, h, b[8 + n:]
a, b = rows(ref), rows(run)
ok = a == b
print(f"  metrics.jsonl: {len(a)} rows vs {len(b)} rows, {'identical' if ok else 'DIFFERENT'} (fields *_s ignored)")
if not ok:
    for i, (x, y) in enumerate(zip(a, b)):
        if x != y:
            print(f"    first difference at row {i}: {x} vs {y}"); break
(na, ha, da), (nb, hb, db) = state(ref), state(run)
same = na == nb and ha == hb and da == db
print(f"  final checkpoint: {na} vs {nb}, train_state.safetensors {len(ha)} tensors, "
      f"{'identical' if same else 'DIFFERENT'}")
sys.exit(0 if ok and same else 1)
PY
}

# Start a run in the background; its pid in $pid.
start() {
    "$BIN" "${ARGS[@]}" --out "$1" "${@:2}" >>"$work/log" 2>&1 &
    pid=$!
}

# Wait until $1 (a shell condition) holds or the run ends, then kill -9 it.
kill_when() {
    local cond=$1 waited=0
    until eval "$cond"; do
        if ! kill -0 "$pid" 2>/dev/null; then
            echo "  (the run ended before: $cond)"
            return
        fi
        # ${3:-0.05} s between looks; "tight" polls with builtins only, to catch a checkpoint being staged
        waited=$((waited + 1))
        if [[ ${3:-} != tight ]] || ((waited % 500 == 0)); then sleep 0.01; fi
    done
    kill -9 "$pid" 2>/dev/null
    wait "$pid" 2>/dev/null
    echo "  kill -9 when $cond: $(ls -A "$2/checkpoints" 2>/dev/null | tr '\n' ' ')"
}

rows() { [[ -f "$1/metrics.jsonl" ]] && wc -l <"$1/metrics.jsonl" || echo 0; }

echo "== reference: uninterrupted run"
t0=$(date +%s.%N)
"$BIN" "${ARGS[@]}" --out "$work/ref" >"$work/log" 2>&1 || { echo "reference run failed"; tail "$work/log"; exit 1; }
echo "  $(rows "$work/ref") metrics rows, $(ls "$work/ref/checkpoints" | tr '\n' ' ')in $(printf %.0f "$(echo "$(date +%s.%N) - $t0" | bc)") s, $(du -sk "$work/ref" | cut -f1) KiB"

echo "== kill -9 at several points, --resume after each"
r="$work/killed"
start "$r"
kill_when "[[ -d $r/checkpoints/epoch-00001 && \$(rows $r) -ge 3 ]]" "$r"
start "$r" --resume
kill_when "[[ -d $r/checkpoints/epoch-00003 ]]" "$r"
start "$r" --resume
kill_when "compgen -G '$r/checkpoints/.epoch-*' >/dev/null" "$r" tight
start "$r" --resume
kill_when "[[ \$(rows $r) -ge 8 ]]" "$r"
echo "  --resume to the end"
"$BIN" "${ARGS[@]}" --out "$r" --resume >>"$work/log" 2>&1 || { echo "  resume FAILED"; tail -5 "$work/log"; fail=1; }
compare "$r" || fail=1

echo "== disk full"
if [[ $(id -u) -ne 0 ]]; then
    echo "  skipped: mounting a tmpfs needs root"
else
    mnt="$work/disk"
    mkdir -p "$mnt"
    full=$(du -sk "$work/ref" | cut -f1)
    size=$((full * 3 / 5))
    mount -t tmpfs -o size=${size}k tmpfs "$mnt"
    echo "  out folder on a ${size} KiB tmpfs (an uninterrupted run takes ${full} KiB)"
    "$BIN" "${ARGS[@]}" --out "$mnt/run" >"$work/full.log" 2>&1
    rc=$?
    echo "  exit $rc: $(grep '^error' "$work/full.log" | cut -c1-300)"
    if [[ $rc -eq 0 ]] || grep -q panicked "$work/full.log"; then
        echo "  FAILED: a full disk must stop the run with an error"
        fail=1
    fi
    echo "  left behind: $(cd "$mnt/run" && find . -name '.*' | tr '\n' ' ')checkpoints: $(ls "$mnt/run/checkpoints" 2>/dev/null | tr '\n' ' ')"
    mount -o remount,size=$((full * 4))k "$mnt"
    echo "  space freed (tmpfs grown to $((full * 4)) KiB); --resume"
    if "$BIN" "${ARGS[@]}" --out "$mnt/run" --resume >"$work/resume.log" 2>&1; then
        compare "$mnt/run" || fail=1
    else
        echo "  resume FAILED: $(grep '^error' "$work/resume.log")"
        fail=1
    fi
fi
echo "---"
[[ $fail -eq 0 ]] && echo "all checks passed" || echo "SOME CHECKS FAILED"
exit $fail
