"""Load dgpo's exports in diffusers and compare one transformer forward pass with dgpo's.

Run by hand (needs PyTorch + diffusers + peft): scripts/check_export_diffusers.sh
Reads the fixture folder written by the ignored test `write_diffusers_check_fixture`:
  base/transformer/            the base transformer (diffusers layout)
  pytorch_lora_weights.safetensors   `dgpo export --format lora`
  merged/transformer/          `dgpo export --format diffusers`
  single.safetensors           `dgpo export --format single-file`
  io.safetensors               inputs and dgpo's outputs (base and fine-tuned)
Prints the max abs error of each path and exits non-zero above the tolerance.
"""
import sys

import torch
from safetensors.torch import load_file
from diffusers import SD3Transformer2DModel, StableDiffusion3Pipeline

d = sys.argv[1]
tol = float(sys.argv[2]) if len(sys.argv) > 2 else 1e-4
io = load_file(f"{d}/io.safetensors")


def forward(model):
    with torch.no_grad():
        return model(
            hidden_states=io["x"],
            timestep=io["t"],
            encoder_hidden_states=io["context"],
            pooled_projections=io["pooled"],
            return_dict=False,
        )[0]


def report(name, got, want):
    err = (got - want).abs().max().item()
    scale = want.abs().max().item()
    print(f"{name:<44} max abs err {err:.3e}   (output max {scale:.3f})")
    return err


delta = (io["out_tuned"] - io["out_base"]).abs().max().item()
print(f"the fine-tuning changes dgpo's output by up to {delta:.3e} (what the checks below must reproduce)")
errs = {}
base = SD3Transformer2DModel.from_pretrained(f"{d}/base", subfolder="transformer").eval()
errs["base transformer"] = report("base (from_pretrained)", forward(base), io["out_base"])

# The LoRA through the pipeline's own loader (what load_lora_weights calls).
sd, meta = StableDiffusion3Pipeline.lora_state_dict(
    f"{d}/pytorch_lora_weights.safetensors", return_lora_metadata=True
)
tuned = SD3Transformer2DModel.from_pretrained(f"{d}/base", subfolder="transformer").eval()
StableDiffusion3Pipeline.load_lora_into_transformer(sd, transformer=tuned, metadata=meta)
errs["lora"] = report("LoRA (load_lora_into_transformer)", forward(tuned), io["out_tuned"])

merged = SD3Transformer2DModel.from_pretrained(f"{d}/merged", subfolder="transformer").eval()
errs["merged"] = report("merged folder (from_pretrained)", forward(merged), io["out_tuned"])

cfg = f"{d}/merged/transformer"
single = SD3Transformer2DModel.from_single_file(f"{d}/single.safetensors", config=cfg).eval()
errs["single"] = report("single file (from_single_file)", forward(single), io["out_tuned"])

worst = max(errs.values())
print(f"worst {worst:.3e} (tolerance {tol:g})")
sys.exit(0 if worst <= tol else 1)
