"""PyTorch + diffusers + peft half of the side-by-side CPU benchmark.

The same work as `benches/vs_torch.rs`, on the same model: diffusers' SD3Transformer2DModel built from
configs/shapes/transformer.json, peft LoRA rank 8 / alpha 16 on the eight attention projections,
batch 32, 16 text tokens, f32:

* forward       no-grad forward of the batch
* lora_fwd_bwd  forward + backward of a mean-squared loss (LoRA weights trainable)
* rollout       10 Euler steps with CFG (conditional and unconditional halves in one batch of 64)
* dgpo_pass     reference velocity (adapters disabled) and old velocity without gradients, policy
                forward, the DGPO loss (group sigmoid weights, KL) and its backward, an AdamW step

Also measures the machine's matmul peak (1024^3 f32). Prints one JSON object per line. Run by hand
(`bash scripts/bench_vs_torch.sh` runs both halves); needs torch, diffusers and peft, not part of CI.
"""

import argparse
import json
import statistics
import time

import torch
from diffusers import SD3Transformer2DModel
from peft import LoraConfig

BATCH, TEXT_TOKENS, GROUP, STEPS = 32, 16, 8, 10
TARGETS = ["attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0",
           "attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj", "attn.to_add_out"]


def median(f, reps):
    f()  # warm-up
    ts = []
    for _ in range(reps):
        t = time.perf_counter()
        f()
        ts.append(time.perf_counter() - t)
    return statistics.median(ts)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--config", default="configs/shapes/transformer.json")
    a = ap.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    threads = torch.get_num_threads()
    torch.manual_seed(0)

    # Matmul peak of this machine, for the GFLOP/s comparison.
    m = torch.randn(1024, 1024)
    mm = median(lambda: m @ m, 10)
    print(json.dumps({"bench": "matmul_peak", "gflops": 2 * 1024**3 / mm / 1e9, "threads": threads}))

    cfg = {k: v for k, v in json.load(open(a.config)).items() if not k.startswith("_")}
    model = SD3Transformer2DModel(**cfg).float()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.02)
    model.requires_grad_(False)
    model.add_adapter(LoraConfig(r=8, lora_alpha=16, init_lora_weights="gaussian",
                                 target_modules=TARGETS))
    trainable = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(trainable, lr=1e-4, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-4)

    b, c, s = BATCH, cfg["in_channels"], cfg["sample_size"]
    x = torch.randn(b, c, s, s)
    target = torch.randn(b, c, s, s)
    ctx = torch.randn(b, TEXT_TOKENS, cfg["joint_attention_dim"])
    pooled = torch.randn(b, cfg["pooled_projection_dim"])
    uctx = torch.randn(1, TEXT_TOKENS, cfg["joint_attention_dim"]).expand(b, -1, -1)
    upooled = torch.randn(1, cfg["pooled_projection_dim"]).expand(b, -1)
    adv = torch.tensor([float((i * 7) % 5) - 2.0 for i in range(b)])
    t500 = torch.full((b,), 500.0)

    def fwd(xx, t, cc, pp):
        return model(hidden_states=xx, timestep=t, encoder_hidden_states=cc,
                     pooled_projections=pp, return_dict=False)[0]

    def forward():
        with torch.no_grad():
            fwd(x, t500, ctx, pooled)

    def fwd_bwd():
        opt.zero_grad(set_to_none=True)
        v = fwd(x, t500, ctx, pooled)
        ((v - target) ** 2).mean().backward()

    sigmas = torch.linspace(1.0, 1.0 / STEPS, STEPS)
    sigmas = 3.0 * sigmas / (1 + 2.0 * sigmas)
    sigmas = torch.cat([sigmas, torch.zeros(1)])
    cc2, pp2 = torch.cat([uctx, ctx]), torch.cat([upooled, pooled])

    def rollout():
        with torch.no_grad():
            z = x
            for i in range(STEPS):
                t = torch.full((2 * b,), float(sigmas[i]) * 1000)
                v = fwd(torch.cat([z, z]), t, cc2, pp2)
                vu, vc = v.chunk(2)
                z = z + (sigmas[i + 1] - sigmas[i]) * (vu + 4.5 * (vc - vu))

    def per_sample(a_, b_):
        return ((a_ - b_) ** 2).mean(dim=(1, 2, 3))

    def dgpo_pass():
        with torch.no_grad():
            model.disable_adapters()
            v_ref = fwd(x, t500, ctx, pooled)
            model.enable_adapters()
            v_old = fwd(x, t500, ctx, pooled)
        opt.zero_grad(set_to_none=True)
        v = fwd(x, t500, ctx, pooled)
        l_theta = per_sample(target, v)
        l_old = per_sample(target, v_old)
        rho = torch.exp(l_old - l_theta.detach())
        clipped = torch.where(adv > 0, rho > 1 + 1e-4, rho < 1 - 1e-4)
        l_eff = torch.where(clipped, l_theta.detach(), l_theta)
        score = (adv * 100.0 * (l_theta.detach() - l_old) / GROUP).view(-1, GROUP).sum(1)
        w = torch.sigmoid(score).repeat_interleave(GROUP)
        loss = (w * adv * l_eff).mean() + 0.01 * per_sample(v, v_ref).mean()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trainable, 1.0)
        opt.step()

    tok = (s // cfg["patch_size"]) ** 2
    n_params = sum(p.numel() for p in model.parameters())
    for name, f, reps, passes in [("forward", forward, 7, 1), ("lora_fwd_bwd", fwd_bwd, 5, 2),
                                  ("rollout", rollout, 3, 2 * STEPS), ("dgpo_pass", dgpo_pass, 5, 4)]:
        sec = median(f, reps)
        print(json.dumps({"bench": name, "ms": sec * 1e3, "ms_per_sample": sec * 1e3 / b,
                          "threads": threads, "passes": passes, "params": n_params,
                          "image_tokens": tok}))


if __name__ == "__main__":
    main()
