#!/usr/bin/env python3
"""Build the parity fixtures under tests/fixtures/parity/ with PyTorch + diffusers + peft.

Run by hand (not in CI):
    python3 -m venv /tmp/pt && /tmp/pt/bin/pip install torch diffusers transformers peft safetensors
    /tmp/pt/bin/python scripts/make_parity_fixtures.py

For three tiny random SD3Transformer2DModel variants (SD3 style; SD3.5-Medium style: dual attention +
qk RMS-norm; SD3.5-Large style: qk RMS-norm) it saves the model in diffusers layout, inputs and the
outputs diffusers computes, with and without a random peft LoRA (saved as peft saves adapters). One variant
is saved sharded (index + shards) and one also as a StabilityAI single file, which is checked to load back
in diffusers (`from_single_file`) with identical outputs. It also prints the parameter counts of the
published SD3 / SD3.5 configs (meta device, no weights), which src/model/config.rs tests against.
"""
import json
import os
import shutil
import sys

import torch
from diffusers import SD3Transformer2DModel
from peft import LoraConfig, get_peft_model
from safetensors.torch import save_file

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests", "fixtures", "parity")
TARGETS = ["attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0",
           "attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj", "attn.to_add_out"]

BASE = dict(sample_size=8, patch_size=2, in_channels=4, num_layers=3, attention_head_dim=8,
            num_attention_heads=4, joint_attention_dim=24, caption_projection_dim=32,
            pooled_projection_dim=20, out_channels=4, pos_embed_max_size=12)
VARIANTS = {
    "sd3": dict(BASE),
    "sd35_medium": dict(BASE, dual_attention_layers=(0, 1), qk_norm="rms_norm"),
    "sd35_large": dict(BASE, qk_norm="rms_norm"),
}


def randomize(model, gen):
    # diffusers zero-initialises several layers (adaLN, proj_out); give every tensor random values so
    # that each weight matters for parity, scaled by fan-in so activations stay O(1).
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name and p.ndim == 1:
                p.copy_(1.0 + 0.2 * torch.randn(p.shape, generator=gen))  # RMS-norm scales
            elif p.ndim > 1:
                fan_in = p[0].numel()
                p.copy_(torch.randn(p.shape, generator=gen) * (1.0 / fan_in ** 0.5))
            else:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.1)


def sai_state_dict(sd, num_layers):
    """diffusers → StabilityAI single-file names, written out independently of the Rust map."""
    out = {}
    swap = lambda t: torch.cat(list(reversed(t.chunk(2, dim=0))), dim=0)
    g = {"pos_embed.proj": "x_embedder.proj",
         "time_text_embed.timestep_embedder.linear_1": "t_embedder.mlp.0",
         "time_text_embed.timestep_embedder.linear_2": "t_embedder.mlp.2",
         "time_text_embed.text_embedder.linear_1": "y_embedder.mlp.0",
         "time_text_embed.text_embedder.linear_2": "y_embedder.mlp.2",
         "context_embedder": "context_embedder", "proj_out": "final_layer.linear"}
    P = "model.diffusion_model."
    out[P + "pos_embed"] = sd["pos_embed.pos_embed"]
    for s in ("weight", "bias"):
        for d, a in g.items():
            out[f"{P}{a}.{s}"] = sd[f"{d}.{s}"]
        out[f"{P}final_layer.adaLN_modulation.1.{s}"] = swap(sd[f"norm_out.linear.{s}"])
        for i in range(num_layers):
            b, j = f"transformer_blocks.{i}", f"{P}joint_blocks.{i}"
            last = i == num_layers - 1
            cat = lambda *n: torch.cat([sd[f"{b}.{x}.{s}"] for x in n], 0)
            out[f"{j}.x_block.attn.qkv.{s}"] = cat("attn.to_q", "attn.to_k", "attn.to_v")
            out[f"{j}.context_block.attn.qkv.{s}"] = cat("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj")
            out[f"{j}.x_block.attn.proj.{s}"] = sd[f"{b}.attn.to_out.0.{s}"]
            out[f"{j}.x_block.mlp.fc1.{s}"] = sd[f"{b}.ff.net.0.proj.{s}"]
            out[f"{j}.x_block.mlp.fc2.{s}"] = sd[f"{b}.ff.net.2.{s}"]
            out[f"{j}.x_block.adaLN_modulation.1.{s}"] = sd[f"{b}.norm1.linear.{s}"]
            ctx_ada = sd[f"{b}.norm1_context.linear.{s}"]
            out[f"{j}.context_block.adaLN_modulation.1.{s}"] = swap(ctx_ada) if last else ctx_ada
            if not last:
                out[f"{j}.context_block.attn.proj.{s}"] = sd[f"{b}.attn.to_add_out.{s}"]
                out[f"{j}.context_block.mlp.fc1.{s}"] = sd[f"{b}.ff_context.net.0.proj.{s}"]
                out[f"{j}.context_block.mlp.fc2.{s}"] = sd[f"{b}.ff_context.net.2.{s}"]
            if f"{b}.attn2.to_q.{s}" in sd:
                out[f"{j}.x_block.attn2.qkv.{s}"] = cat("attn2.to_q", "attn2.to_k", "attn2.to_v")
                out[f"{j}.x_block.attn2.proj.{s}"] = sd[f"{b}.attn2.to_out.0.{s}"]
    for i in range(num_layers):
        b, j = f"transformer_blocks.{i}", f"{P}joint_blocks.{i}"
        for d, a in [("attn.norm_q", "x_block.attn.ln_q"), ("attn.norm_k", "x_block.attn.ln_k"),
                     ("attn.norm_added_q", "context_block.attn.ln_q"),
                     ("attn.norm_added_k", "context_block.attn.ln_k"),
                     ("attn2.norm_q", "x_block.attn2.ln_q"), ("attn2.norm_k", "x_block.attn2.ln_k")]:
            if f"{b}.{d}.weight" in sd:
                out[f"{j}.{a}.weight"] = sd[f"{b}.{d}.weight"]
    assert sum(v.numel() for v in out.values()) == sum(v.numel() for v in sd.values())
    return {k: v.contiguous() for k, v in out.items()}


def build(name, cfg, seed):
    gen = torch.Generator().manual_seed(seed)
    d = os.path.join(ROOT, name)
    shutil.rmtree(d, ignore_errors=True)
    os.makedirs(d)
    model = SD3Transformer2DModel(**cfg).eval()
    randomize(model, gen)
    # Non-square latent so that the position-embedding crop is exercised.
    x = torch.randn(2, cfg["in_channels"], 8, 6, generator=gen)
    t = torch.tensor([250.0, 875.5])
    ctx = torch.randn(2, 7, cfg["joint_attention_dim"], generator=gen)
    pooled = torch.randn(2, cfg["pooled_projection_dim"], generator=gen)
    # Reference outputs are computed in float64, so the fixture's own rounding is negligible and the
    # error the tests measure is dgpo's f32 error alone.
    with torch.no_grad():
        out = model.double()(hidden_states=x.double(), encoder_hidden_states=ctx.double(),
                             pooled_projections=pooled.double(), timestep=t.double(),
                             return_dict=False)[0].float()
    model.float()
    with torch.no_grad():
        out_f32 = model(hidden_states=x, encoder_hidden_states=ctx, pooled_projections=pooled,
                        timestep=t, return_dict=False)[0]
    shard = "100KB" if name == "sd35_large" else "10GB"
    model.save_pretrained(os.path.join(d, "transformer"), safe_serialization=True, max_shard_size=shard)

    # A random peft LoRA (B is zero at init: randomise it so the adapter changes the output).
    lcfg = LoraConfig(r=4, lora_alpha=8, init_lora_weights="gaussian", target_modules=TARGETS)
    peft_model = get_peft_model(model, lcfg)
    with torch.no_grad():
        for n, p in peft_model.named_parameters():
            if "lora_B" in n:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.5)
        peft_model.double()
        args = dict(hidden_states=x.double(), encoder_hidden_states=ctx.double(),
                    pooled_projections=pooled.double(), timestep=t.double(), return_dict=False)
        out_lora = peft_model(**args)[0].float()
        with peft_model.disable_adapter():
            out_off = peft_model(**args)[0].float()
        peft_model.float()
        out_lora_f32 = peft_model(hidden_states=x, encoder_hidden_states=ctx, pooled_projections=pooled,
                                  timestep=t, return_dict=False)[0]
    assert torch.equal(out_off, out), "disabling the adapter must give the base output"
    peft_model.save_pretrained(os.path.join(d, "lora"))
    os.remove(os.path.join(d, "lora", "README.md"))  # peft's model-card boilerplate

    save_file({"x": x, "t": t, "context": ctx, "pooled": pooled, "out": out.contiguous(),
               "out_lora": out_lora.contiguous(), "out_f32": out_f32.contiguous(),
               "out_lora_f32": out_lora_f32.contiguous()}, os.path.join(d, "io.safetensors"))
    print(f"{name}: out std {out.std():.3f}, lora changes output by {(out_lora - out).abs().max():.3f}; "
          f"diffusers f32 vs f64: {(out_f32 - out).abs().max():.2e} base, "
          f"{(out_lora_f32 - out_lora).abs().max():.2e} lora")

    if name == "sd35_medium":
        base = peft_model.unload()  # the base transformer, adapters removed
        sd = {k: v for k, v in base.state_dict().items()}
        sai = sai_state_dict(sd, cfg["num_layers"])
        path = os.path.join(d, "sai_single_file.safetensors")
        save_file(sai, path)
        back = SD3Transformer2DModel.from_single_file(path, config=os.path.join(d, "transformer"),
                                                      local_files_only=True).eval()
        with torch.no_grad():
            o2 = back.double()(hidden_states=x.double(), encoder_hidden_states=ctx.double(),
                               pooled_projections=pooled.double(), timestep=t.double(),
                               return_dict=False)[0].float()
        print(f"  single file reloaded in diffusers: max diff {(o2 - out).abs().max():.2e}")
        assert (o2 - out).abs().max() < 1e-5


def published_param_counts():
    cfgs = {
        "sd3_medium": dict(num_layers=24, num_attention_heads=24, caption_projection_dim=1536,
                           pos_embed_max_size=192),
        "sd3_5_medium": dict(num_layers=24, num_attention_heads=24, caption_projection_dim=1536,
                             pos_embed_max_size=384, dual_attention_layers=tuple(range(13)),
                             qk_norm="rms_norm"),
        "sd3_5_large": dict(num_layers=38, num_attention_heads=38, caption_projection_dim=2432,
                            pos_embed_max_size=192, qk_norm="rms_norm"),
    }
    for k, c in cfgs.items():
        with torch.device("meta"):
            m = SD3Transformer2DModel(sample_size=128, patch_size=2, in_channels=16, attention_head_dim=64,
                                      joint_attention_dim=4096, pooled_projection_dim=2048,
                                      out_channels=16, **c)
        print(f"{k}: {sum(p.numel() for p in m.parameters())} parameters")


if __name__ == "__main__":
    torch.manual_seed(0)
    for i, (n, c) in enumerate(VARIANTS.items()):
        build(n, c, seed=100 + i)
    if "--no-counts" not in sys.argv:
        published_param_counts()
