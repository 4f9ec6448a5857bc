#!/usr/bin/env python3
"""Build tests/fixtures/schedulers/schedulers.safetensors with PyTorch + diffusers.

Run by hand (not in CI), with the environment of make_parity_fixtures.py:
    /tmp/pt/bin/python scripts/make_scheduler_fixtures.py

Two schedulers, configured as the DGPO authors' rollouts use them:
  * "euler": `FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=s)`, SD3.5's own scheduler
    (its scheduler_config.json holds only these two values; no dynamic shifting).
  * "dpm": `DPMSolverMultistepScheduler` from the scheduler config of
    `Efficient-Large-Model/Sana_1600M_1024px_BF16_diffusers` with `flow_shift` overridden, exactly as
    `scripts/train_sd3_dgpo.py` of Luo-Yihong/DGPO builds it (`from_pretrained(<Sana>, subfolder="scheduler")`,
    `config['flow_shift'] = 3`, `from_config`). The Sana config is written out below.

For each (num_steps, shift) it stores, under `<sampler>/n<N>_s<shift>/`:
  timesteps    what the transformer is called with (int64 for DPM-Solver, as diffusers keeps them; f32 for Euler)
  sigmas       N + 1 float32 sigmas, last 0
  train_sigmas `timesteps / 1000` as torch computes it (DGPO's `sigmas_t = t / 1000` in training)
  traj         [N + 1, *latent] every latent of the rollout loop of `pipeline_with_logprob`
               (x_T, then the output of each `scheduler.step`), driven by the fake model below
and `x_T`, the shared starting latent. Everything is float32 as diffusers computes it (CPU).
"""
import os

import torch
from diffusers import DPMSolverMultistepScheduler, FlowMatchEulerDiscreteScheduler
from safetensors.torch import save_file

OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests", "fixtures", "schedulers")

# scheduler/scheduler_config.json of Efficient-Large-Model/Sana_1600M_1024px_BF16_diffusers.
SANA_SCHEDULER_CONFIG = dict(
    num_train_timesteps=1000,
    beta_start=0.0001,
    beta_end=0.02,
    beta_schedule="linear",
    trained_betas=None,
    solver_order=2,
    prediction_type="flow_prediction",
    thresholding=False,
    dynamic_thresholding_ratio=0.995,
    sample_max_value=1.0,
    algorithm_type="dpmsolver++",
    solver_type="midpoint",
    lower_order_final=True,
    euler_at_final=False,
    use_karras_sigmas=False,
    use_exponential_sigmas=False,
    use_beta_sigmas=False,
    use_lu_lambdas=False,
    use_flow_sigmas=True,
    flow_shift=3.0,
    final_sigmas_type="zero",
    lambda_min_clipped=-float("inf"),
    variance_type=None,
    timestep_spacing="linspace",
    steps_offset=0,
    rescale_betas_zero_snr=False,
)

CASES = [(10, 3.0), (14, 3.0), (4, 1.0), (1, 3.0), (2, 3.0), (15, 3.0)]


def fake_velocity(x, t):
    """Nonlinear in x and t; t enters directly (t / 100) so that the exact timestep the model is called
    with matters. Mirrored in tests/schedulers.rs with the same f32 operation order."""
    t = t.to(torch.float32)
    return 0.5 * x * (t / 1000) - 0.3 * torch.sin(2 * x + t / 100)


def make(sampler, n, shift):
    if sampler == "euler":
        s = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=shift)
    else:
        s = DPMSolverMultistepScheduler.from_config({**SANA_SCHEDULER_CONFIG, "flow_shift": shift})
    s.set_timesteps(n, device="cpu")
    return s


def rollout(s, x):
    # The denoising loop of flow_grpo/diffusers_patch/sd3_pipeline_with_logprob.py, noise_level = 0.
    traj = [x]
    for t in s.timesteps:
        v = fake_velocity(x, t)
        x = s.step(v, t, x, return_dict=False)[0]
        traj.append(x)
    return torch.stack(traj)


def main():
    os.makedirs(OUT, exist_ok=True)
    g = torch.Generator().manual_seed(0)
    x_t = torch.randn((2, 3, 4, 4), generator=g, dtype=torch.float32)
    out = {"x_T": x_t}
    for sampler in ["euler", "dpm"]:
        for n, shift in CASES:
            s = make(sampler, n, shift)
            key = f"{sampler}/n{n}_s{shift:g}"
            out[f"{key}/timesteps"] = s.timesteps.clone()
            out[f"{key}/sigmas"] = s.sigmas.clone().to(torch.float32)
            out[f"{key}/train_sigmas"] = (s.timesteps / 1000).to(torch.float32)
            out[f"{key}/traj"] = rollout(make(sampler, n, shift), x_t.clone())
            print(key, "timesteps", s.timesteps.tolist())
            print(key, "sigmas", [f"{v:.8f}" for v in s.sigmas.tolist()])
    out = {k: v.contiguous() for k, v in out.items()}
    path = os.path.join(OUT, "schedulers.safetensors")
    save_file(out, path)
    print("wrote", path, os.path.getsize(path), "bytes")


if __name__ == "__main__":
    main()
