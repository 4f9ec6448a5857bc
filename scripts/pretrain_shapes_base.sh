#!/usr/bin/env bash
# Reproduces the shipped shapes-testbed base, configs/shapes/base, in its three pretraining stages
# (on 2 cores: stage 1 about 11 min, stages 2 and 3 a few minutes each). Users never need this: the base is shipped.
#   bash scripts/pretrain_shapes_base.sh            # writes runs/shapes-pretrain{,-position,-loose}
# 1. configs/shapes-pretrain.toml: 12000 steps from scratch, every tag, loose captions;
# 2. configs/shapes-pretrain-position.toml: 3000 steps of exact position captions alone;
# 3. configs/shapes-pretrain-loose.toml: 3000 steps of stage 1's loose captions again.
# Runs are bit-reproducible for a given thread count; the shipped weights were made with 2 threads.
# At the end the script compares the result with configs/shapes/base, file by file.
set -euo pipefail
cd "$(dirname "$0")/.."
THREADS="${THREADS:-2}"
cargo build --release
dgpo=target/release/dgpo
for stage in "" -position -loose; do
  out="runs/shapes-pretrain$stage"
  if [ -e "$out/model/model_index.json" ]; then
    echo "stage $out already done, kept" >&2
    continue
  fi
  "$dgpo" --threads "$THREADS" pretrain --config "configs/shapes-pretrain$stage.toml" --out "$out"
done
status=0
for f in transformer/diffusion_pytorch_model.safetensors text_encoder/model.safetensors; do
  if cmp -s "runs/shapes-pretrain-loose/model/$f" "configs/shapes/base/$f"; then
    echo "$f: identical to configs/shapes/base"
  else
    echo "$f: differs from configs/shapes/base" >&2
    status=1
  fi
done
exit $status
