#!/usr/bin/env bash
# Broken configs against `dgpo train`: every one should be refused with a message naming what is wrong,
# before any file is written. Each case is configs/shapes.toml with `--set` overrides or an edited copy,
# run with a fresh --out folder and a timeout. Per case it prints one of
#   refused   exit 1, the out folder untouched, the message names the expected key or file
#   unclear   refused, but files were written or the message does not name what is wrong
#   panicked  exit 101, killed by a signal, or "panicked" in stderr
#   accepted  exit 0, or still running at the timeout
# and the totals at the end.
#   cargo build --release && scripts/fuzz_configs.sh            (TIMEOUT=20 s per case by default)
set -u
cd "$(dirname "$0")/.."
BIN=${DGPO:-./target/release/dgpo}
TIMEOUT=${TIMEOUT:-20}
CONFIG=configs/shapes.toml
work=$(mktemp -d /tmp/dgpo-fuzz.XXXXXX)
trap 'rm -rf "$work"' EXIT
declare -A total=([refused]=0 [unclear]=0 [panicked]=0 [accepted]=0)
n=0

# run_case NAME EXPECTED-SUBSTRING ARGS… (ARGS go to `dgpo train`; --config defaults to the shapes config)
run_case() {
    local name=$1 want=$2
    shift 2
    n=$((n + 1))
    local out="$work/out-$n" err="$work/err-$n"
    local args=("$@")
    [[ " ${args[*]} " == *" --config "* ]] || args=(--config "$CONFIG" "${args[@]}")
    timeout "$TIMEOUT" "$BIN" train "${args[@]}" --out "$out" >/dev/null 2>"$err"
    local rc=$? verdict
    local written=0
    [[ -e "$out" ]] && [[ -n "$(ls -A "$out" 2>/dev/null)" ]] && written=1
    if [[ $rc -eq 101 || ($rc -gt 128 && $rc -ne 124) ]] || grep -q panicked "$err"; then
        verdict=panicked
    elif [[ $rc -eq 0 || $rc -eq 124 ]]; then
        verdict=accepted
    elif [[ $written -eq 0 ]] && grep -qF -- "$want" "$err" && ! grep -qi backtrace "$err"; then
        verdict=refused
    else
        verdict=unclear
    fi
    total[$verdict]=$((total[$verdict] + 1))
    local msg
    msg=$(grep -v '^\s*$' "$err" | grep -v ' INFO \| WARN ' | tail -n 1 | cut -c1-150)
    printf '%2d %-9s rc=%-3s files=%s %-48s %s\n' "$n" "$verdict" "$rc" "$written" "$name" "$msg"
}


# ---- non-finite floats ----
run_case "learning_rate = inf" train.learning_rate --set train.learning_rate=inf
run_case "learning_rate = nan" train.learning_rate --set train.learning_rate=nan
run_case "beta_dpo = inf" train.beta_dpo --set train.beta_dpo=inf
run_case "beta_kl = -inf" train.beta_kl --set train.beta_kl=-inf
run_case "guidance_scale = inf" sample.guidance_scale --set sample.guidance_scale=inf
run_case "flow_shift = nan" sample.flow_shift --set sample.flow_shift=nan
run_case "max_minutes = nan" run.max_minutes --set run.max_minutes=nan
run_case "reward weight = nan" reward.0.weight --set reward.0.weight=nan
# ---- negative / zero ----
run_case "learning_rate = -1e-3" train.learning_rate --set train.learning_rate=-1e-3
run_case "learning_rate = 0" train.learning_rate --set train.learning_rate=0.0
run_case "lora.alpha = 0" lora.alpha --set lora.alpha=0.0
run_case "lora.rank = 0" lora.rank --set lora.rank=0
run_case "group_size = 0" sample.group_size --set sample.group_size=0
run_case "group_size = 1" sample.group_size --set sample.group_size=1
run_case "sample.batch_size = 0" sample.batch_size --set sample.batch_size=0
run_case "sample.batch_size = -8" batch_size --set sample.batch_size=-8
run_case "num_batches_per_epoch = 0" sample.num_batches_per_epoch --set sample.num_batches_per_epoch=0
run_case "num_steps = 0" sample.num_steps --set sample.num_steps=0
run_case "eval_num_steps = 0" sample.eval_num_steps --set sample.eval_num_steps=0
run_case "eval_batch_size = 0" sample.eval_batch_size --set sample.eval_batch_size=0
run_case "train.batch_size = 0" train.batch_size --set train.batch_size=0
run_case "num_train_timesteps = 0" train.num_train_timesteps --set train.num_train_timesteps=0
run_case "num_epochs = 0" run.num_epochs --set run.num_epochs=0
run_case "save_every = 0" run.save_every --set run.save_every=0
run_case "max_minutes = -1" run.max_minutes --set run.max_minutes=-1.0
run_case "resolution = 0" model.resolution --set model.resolution=0
run_case "max_sequence_length = 0" model.max_sequence_length --set model.max_sequence_length=0
# ---- huge / out of range ----
run_case "lora.rank = 100000000" lora.rank --set lora.rank=100000000
run_case "lora.rank = 97 (> width 96)" lora.rank --set lora.rank=97
run_case "group_size = 100000000" sample.group_size --set sample.group_size=100000000
run_case "sample.batch_size = 100000000" sample.batch_size --set sample.batch_size=100000000
run_case "num_batches = i64 max" sample.num_batches_per_epoch --set sample.num_batches_per_epoch=9223372036854775807
run_case "num_steps = 100000000" sample.num_steps --set sample.num_steps=100000000
run_case "eval_images_per_prompt = 1e8" sample.eval_images_per_prompt --set sample.eval_images_per_prompt=100000000
run_case "train.batch_size = 100000000" train.batch_size --set train.batch_size=100000000
run_case "trunc_steps = 10 (= num_steps)" train.trunc_steps --set train.trunc_steps=10
run_case "clip_range = 2" train.clip_range --set train.clip_range=2.0
run_case "adam_beta1 = 1" train.adam_beta1 --set train.adam_beta1=1.0
run_case "ema_decay = 1.5" train.ema_decay --set train.ema_decay=1.5
run_case "backward_chunk = 64 (> batch)" train.backward_chunk --set train.backward_chunk=64
run_case "resolution = 64 (model: 48)" model.resolution --set model.resolution=64
run_case "resolution = 100000000" model.resolution --set model.resolution=100000000
run_case "max_sequence_length = 1000000" model.max_sequence_length --set model.max_sequence_length=1000000
run_case "max_sequence_length = 64 (model: 16)" model.max_sequence_length --set model.max_sequence_length=64
# ---- wrong types, unknown keys and values ----
run_case "learning_rate = \"fast\"" learning_rate --set 'train.learning_rate="fast"'
run_case "group_size = 8.5" group_size --set sample.group_size=8.5
run_case "lora.enabled = 1" enabled --set lora.enabled=1
run_case "unknown key train.lerning_rate" lerning_rate --set train.lerning_rate=1e-3
run_case "unknown section foo.bar" foo --set foo.bar=1
run_case "model.dtype = f8" dtype --set model.dtype=f8
run_case "sample.sampler = rk4" sampler --set sample.sampler=rk4
run_case "train.algorithm = ppo" algorithm --set train.algorithm=ppo
run_case "lora.targets = []" lora.targets --set 'lora.targets=[]'
run_case "lora.targets match nothing" lora.targets --set 'lora.targets=["nothing.matches"]'
run_case "no [[reward]]" reward --set 'reward=[]'
run_case "reward kind = nope" nope --set reward.0.kind=nope
# ---- missing and broken files ----
run_case "model.pretrained missing" /nonexistent/model --set model.pretrained=/nonexistent/model
run_case "prompts.train missing" /nonexistent/train.jsonl --set prompts.train=/nonexistent/train.jsonl
run_case "prompts.test missing" /nonexistent/test.jsonl --set prompts.test=/nonexistent/test.jsonl
: >"$work/empty.jsonl"
run_case "prompts.train empty file" empty.jsonl --set prompts.train="$work/empty.jsonl"
head -c 300 configs/shapes/train_metadata.jsonl >"$work/cut.jsonl"
run_case "prompts.train cut mid-line" cut.jsonl --set prompts.train="$work/cut.jsonl"
head -n 20 "$CONFIG" >"$work/truncated.toml"
printf '[sample\nnum_steps = 4\n' >>"$work/truncated.toml"
run_case "TOML syntax error" truncated.toml --config "$work/truncated.toml"
run_case "config file missing" nope.toml --config "$work/nope.toml"
cp -r configs/shapes/base "$work/base-cut"
w="$work/base-cut/transformer/diffusion_pytorch_model.safetensors"
head -c $(($(stat -c %s "$w") / 2)) "$w" >"$w.part" && mv "$w.part" "$w"
run_case "transformer weights truncated" diffusion_pytorch_model.safetensors --set model.pretrained="$work/base-cut"
cp -r configs/shapes/base "$work/base-json"
echo '{"num_layers": ' >"$work/base-json/transformer/config.json"
run_case "transformer config.json broken" config.json --set model.pretrained="$work/base-json"

echo "---"
echo "$n cases: ${total[refused]} refused cleanly before any file was written, ${total[unclear]} unclear, ${total[panicked]} panicked, ${total[accepted]} accepted"
