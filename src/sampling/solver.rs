//! The ODE solvers: Euler and DPM-Solver++ (2M), each step for step what diffusers computes for the
//! configuration the DGPO authors use, and the CFG rollout of a batch on them.
//!
//! * **Euler** (`FlowMatchEulerDiscreteScheduler`, SD3's scheduler, static `shift`): the grid is
//!   `linspace(1000·σ_max, 1000·σ_min, N) / 1000` shifted by `σ' = sσ / (1 + (s − 1)σ)`, then a final 0.
//!   `σ_max = 1` and `σ_min` is the *already shifted* `1/1000` of the training grid, so the last non-zero
//!   sigma is shifted twice (diffusers' own quirk). The model is called with `t = 1000·σ_i` (f32) and the
//!   update is `x ← x + (σ_{i+1} − σ_i)·v`.
//! * **DPM-Solver++ 2M** (`DPMSolverMultistepScheduler` built, as in the authors' `train_sd3_dgpo.py`, from
//!   the scheduler config of `Sana_1600M_1024px_BF16_diffusers` with `flow_shift` overridden:
//!   `use_flow_sigmas`, `prediction_type = "flow_prediction"`, `algorithm_type = "dpmsolver++"`,
//!   `solver_order = 2`, `solver_type = "midpoint"`, `lower_order_final`, `final_sigmas_type = "zero"`,
//!   linspace spacing): `σ_i = shift(0.999·(1 − i/N))`, i < N, then a final 0 (so the first sigma is
//!   `shift(0.999)`, not 1). The model is called with the **integer** timestep `trunc(1000·σ_i)` (diffusers
//!   stores them as int64) while the update uses the float `σ_i`. Each step converts the velocity to a data
//!   prediction `x̂0 = x − σ_i·v`, with `α = 1 − σ`, `λ = ln α − ln σ`, `h = λ_{i+1} − λ_i`:
//!   first order (step 0, and the last step because the final sigma is zero — it returns `x̂0` exactly):
//!   `x ← (σ_{i+1}/σ_i)·x − α_{i+1}(e^{−h} − 1)·x̂0`; second order (midpoint) otherwise, with
//!   `r = (λ_i − λ_{i−1})/h`, `D1 = (x̂0_i − x̂0_{i−1})/r`:
//!   `x ← (σ_{i+1}/σ_i)·x − α_{i+1}(e^{−h} − 1)·x̂0_i − ½·α_{i+1}(e^{−h} − 1)·D1`.
//!   Scalars are f32 and combined in diffusers' order (it upcasts the sample to f32 for the update).
//!
//! DGPO trains on `σ = t_j / 1000` of the stored timesteps ([`Schedule::train_sigma`]), which for
//! DPM-Solver is the truncated integer timestep, not the solver's `σ_j`.
//!
//! Fixtures generated with diffusers (`scripts/make_scheduler_fixtures.py`) are checked in
//! `tests/schedulers.rs`.

use super::guidance::{guided_velocity_at, per_shard, Conditioning};
use super::schedule::{Schedule, NUM_TRAIN_TIMESTEPS};
use crate::config::Sampler;
use crate::model::{MMDiT, Weights};
use anyhow::{bail, Result};
use candle_core::{DType, Tensor};

/// `λ = ln α − ln σ` with `α = 1 − σ` (flow sigmas), in f32; `+∞` at σ = 0.
fn lambda(sigma: f32) -> f32 {
    (1.0 - sigma).ln() - sigma.ln()
}

/// Integrate the probability-flow ODE from `x_T` along `schedule` with `sampler`. `velocity(x, i, t)` is
/// the model's velocity at step `i` for the latent `x` (f32) and timestep `t = schedule.timesteps[i]`.
/// The state is kept in f32 whatever dtype `x_T` and the velocities have. Returns the final latent `x0`.
pub fn integrate(
    sampler: Sampler,
    schedule: &Schedule,
    x_t: &Tensor,
    mut velocity: impl FnMut(&Tensor, usize, f32) -> Result<Tensor>,
) -> Result<Tensor> {
    schedule.check()?;
    let s = &schedule.sigmas;
    let n = schedule.num_steps();
    let mut x = x_t.to_dtype(DType::F32)?;
    let mut v_at = |x: &Tensor, i: usize| -> Result<Tensor> {
        let v = velocity(x, i, schedule.timesteps[i])?;
        if v.dims() != x.dims() {
            bail!(
                "velocity at step {i} has shape {:?}, the latent {:?}",
                v.dims(),
                x.dims()
            );
        }
        Ok(v.to_dtype(DType::F32)?)
    };
    match sampler {
        Sampler::Euler => {
            for i in 0..n {
                let v = v_at(&x, i)?;
                x = (x + (v * (s[i + 1] - s[i]) as f64)?)?;
            }
        }
        Sampler::DpmSolver2m => {
            // The previous step's data prediction (diffusers' `model_outputs[-2]`).
            let mut prev: Option<Tensor> = None;
            for i in 0..n {
                let v = v_at(&x, i)?;
                let x0 = (&x - (v * s[i] as f64)?)?;
                let (sigma_t, sigma_s0) = (s[i + 1], s[i]);
                let alpha_t = 1.0 - sigma_t;
                let lambda_s0 = lambda(sigma_s0);
                let h = lambda(sigma_t) - lambda_s0;
                let ratio = (sigma_t / sigma_s0) as f64;
                let c = alpha_t * ((-h).exp() - 1.0);
                // First order at the first step and, as the final sigma is zero, at the last one.
                x = match prev.as_ref().filter(|_| i + 1 < n) {
                    Some(m1) => {
                        let h_0 = lambda_s0 - lambda(s[i - 1]);
                        let r0 = h_0 / h;
                        let d1 = ((&x0 - m1)? * (1.0 / r0) as f64)?;
                        (((&x * ratio)? - (&x0 * c as f64)?)? - (d1 * (0.5 * c) as f64)?)?
                    }
                    None => ((&x * ratio)? - (&x0 * c as f64)?)?,
                };
                prev = Some(x0);
            }
        }
    }
    Ok(x)
}

/// A deterministic CFG rollout of a batch: [`integrate`] from `noise` with [`guided_velocity_at`] at
/// each step's timestep. Returns the final latent `x0` (f32).
#[allow(clippy::too_many_arguments)]
pub fn sample(
    model: &MMDiT,
    sampler: Sampler,
    schedule: &Schedule,
    noise: &Tensor,
    cond: &Conditioning,
    uncond: Option<&Conditioning>,
    guidance: f64,
    w: Weights,
) -> Result<Tensor> {
    // Samples are independent: on the CPU each worker thread integrates its own slice of the batch.
    per_shard(noise, cond, uncond, |noise, c, u| {
        integrate(sampler, schedule, noise, |x, _, t| {
            guided_velocity_at(model, x, t, c, u, guidance, w)
        })
    })
}

/// Integrate the probability-flow ODE from `noise` (at σ = 1) to σ = 0 with Euler steps on `sigmas`
/// (e.g. [`euler_sigmas`]), calling the model at `t = 1000·σ_i`.
pub fn sample_euler(
    model: &MMDiT,
    noise: &Tensor,
    cond: &Conditioning,
    uncond: Option<&Conditioning>,
    guidance: f64,
    sigmas: &[f32],
    w: Weights,
) -> Result<Tensor> {
    if sigmas.is_empty() {
        return Ok(noise.to_dtype(DType::F32)?);
    }
    let schedule = Schedule {
        sigmas: sigmas.to_vec(),
        timesteps: sigmas[..sigmas.len() - 1]
            .iter()
            .map(|s| s * NUM_TRAIN_TIMESTEPS as f32)
            .collect(),
    };
    sample(
        model,
        Sampler::Euler,
        &schedule,
        noise,
        cond,
        uncond,
        guidance,
        w,
    )
}
