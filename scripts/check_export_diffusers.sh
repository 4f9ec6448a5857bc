#!/usr/bin/env bash
# Load dgpo's LoRA, merged-folder and single-file exports in diffusers and compare a forward pass
# with dgpo's. Run by hand; needs the PyTorch venv (created if missing, ~3.5 GB).
#   bash scripts/check_export_diffusers.sh [fixture-dir]
set -euo pipefail
cd "$(dirname "$0")/.."
DIR="${1:-/tmp/dgpo-export-check}"
VENV="${DGPO_TORCH_VENV:-/tmp/pt}"
if [ ! -x "$VENV/bin/python" ]; then
  python3 -m venv "$VENV"
  "$VENV/bin/pip" install -q torch diffusers transformers peft safetensors
fi
DGPO_EXPORT_CHECK_DIR="$DIR" cargo test --release -q --test export write_diffusers_check_fixture -- --ignored
"$VENV/bin/python" scripts/check_export_diffusers.py "$DIR"
