"""PyTorch + diffusers + peft half of the SD3.5-scale GPU benchmark (`benches/sd35.rs` is dgpo's half).

The same work on the same model: diffusers' SD3Transformer2DModel built from a transformer config
(default: the published SD3.5-Medium one) with random weights (std 0.02) in --dtype, peft LoRA
(rank r, alpha 2r, gaussian init) on the eight attention projections, adapters in f32 (as
dgpo keeps them), random latents and text embeddings:

* rollout_step  one guided velocity: conditional and unconditional halves in one batch of 2*B, no grad
* train_chunk   forward + backward of a mean-squared loss for C images (LoRA weights trainable)

Prints one JSON object per line, with the peak memory PyTorch allocated for each. Run by hand on a
GPU machine (needs torch, diffusers and peft); not part of CI.
"""

import argparse
import json
import statistics
import time

import torch
from diffusers import SD3Transformer2DModel
from peft import LoraConfig

TARGETS = ["attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0",
           "attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj", "attn.to_add_out"]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--config", default="configs/sd3.5-medium/transformer_config.json")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--dtype", default="bf16", choices=["f32", "bf16", "f16"])
    ap.add_argument("--resolution", type=int, default=512)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--chunk", type=int, default=4)
    ap.add_argument("--text-tokens", type=int, default=205)
    ap.add_argument("--rank", type=int, default=64)
    ap.add_argument("--reps", type=int, default=5)
    a = ap.parse_args()
    dtype = {"f32": torch.float32, "bf16": torch.bfloat16, "f16": torch.float16}[a.dtype]
    dev = torch.device(a.device)
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    torch.manual_seed(0)

    t0 = time.perf_counter()
    cfg = {k: v for k, v in json.load(open(a.config)).items() if not k.startswith("_")}
    with dev:
        model = SD3Transformer2DModel(**cfg)
    model = model.to(dtype)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.02)
    model.requires_grad_(False)
    model.add_adapter(LoraConfig(r=a.rank, lora_alpha=2 * a.rank, init_lora_weights="gaussian",
                                 target_modules=TARGETS))
    trainable = [p for p in model.parameters() if p.requires_grad]
    for p in trainable:  # trained weights stay f32 (diffusers' add_adapter leaves them in --dtype)
        p.data = p.data.float()
    sync()
    latent = a.resolution // 8
    n_img = (latent // cfg["patch_size"]) ** 2
    print(json.dumps({"bench": "setup", "device": a.device, "dtype": a.dtype, "torch": torch.__version__,
                      "params": sum(p.numel() for p in model.parameters()) - sum(p.numel() for p in trainable),
                      "trainable": sum(p.numel() for p in trainable),
                      "trainable_dtype": str(trainable[0].dtype), "image_tokens": n_img,
                      "text_tokens": a.text_tokens, "init_s": round(time.perf_counter() - t0, 2)}),
          flush=True)

    b, c = a.batch, cfg["in_channels"]
    rnd = lambda *s: torch.randn(*s, device=dev, dtype=dtype)
    x = rnd(b, c, latent, latent)
    ctx, pooled = rnd(b, a.text_tokens, cfg["joint_attention_dim"]), rnd(b, cfg["pooled_projection_dim"])
    uctx = rnd(1, a.text_tokens, cfg["joint_attention_dim"]).expand(b, -1, -1)
    upooled = rnd(1, cfg["pooled_projection_dim"]).expand(b, -1)

    def fwd(xx, cc, pp):
        t = torch.full((xx.shape[0],), 500.0, device=dev)
        return model(hidden_states=xx, timestep=t, encoder_hidden_states=cc,
                     pooled_projections=pp, return_dict=False)[0]

    def timed(f):
        f()  # warm-up
        sync()
        if dev.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        ts = []
        for _ in range(a.reps):
            s = time.perf_counter()
            f()
            sync()
            ts.append(time.perf_counter() - s)
        peak = torch.cuda.max_memory_allocated() / 2**30 if dev.type == "cuda" else None
        return statistics.median(ts), peak

    cc2, pp2 = torch.cat([uctx, ctx]), torch.cat([upooled, pooled])

    def rollout_step():
        with torch.no_grad():
            v = fwd(torch.cat([x, x]), cc2, pp2)
            vu, vc = v.float().chunk(2)
            return vu + 4.5 * (vc - vu)

    n = min(a.chunk, b)
    target = torch.randn(n, c, latent, latent, device=dev)

    def train_chunk():
        for p in trainable:
            p.grad = None
        v = fwd(x[:n], ctx[:n], pooled[:n])
        ((v.float() - target) ** 2).mean().backward()

    for name, f, imgs in [("rollout_step", rollout_step, b), ("train_chunk", train_chunk, n)]:
        sec, peak = timed(f)
        print(json.dumps({"bench": name, "images": imgs, "ms": round(sec * 1e3, 2),
                          "peak_gib": None if peak is None else round(peak, 2)}), flush=True)


if __name__ == "__main__":
    main()
