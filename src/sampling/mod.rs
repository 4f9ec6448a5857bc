//! Deterministic flow-matching ODE sampling with classifier-free guidance: Euler and DPM-Solver++ (2M),
//! each step-for-step what diffusers computes for the configuration the DGPO authors use.
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

use crate::config::Sampler;
use crate::model::{MMDiT, Weights};
use anyhow::{bail, Result};
use candle_core::{DType, Tensor};

/// Training timesteps of the flow-matching schedulers (`num_train_timesteps`).
const NUM_TRAIN_TIMESTEPS: f64 = 1000.0;

/// Gaussian noise of `shape` drawn from `rng` in row-major order (Candle's own CPU `randn` cannot be
/// seeded); every seeded noise of rollouts, evaluations and pretraining comes from here.
pub fn seeded_randn(
    rng: &mut impl rand::Rng,
    shape: (usize, usize, usize, usize),
    dev: &candle_core::Device,
) -> Result<Tensor> {
    use rand_distr::Distribution;
    let n = shape.0 * shape.1 * shape.2 * shape.3;
    let v: Vec<f32> = (0..n)
        .map(|_| rand_distr::StandardNormal.sample(&mut *rng))
        .collect();
    Ok(Tensor::from_vec(v, shape, dev)?)
}

/// SD3's time shift.
pub fn shift_sigma(sigma: f64, shift: f64) -> f64 {
    shift * sigma / (1.0 + (shift - 1.0) * sigma)
}

/// The step grid of an `N`-step rollout.
#[derive(Debug, Clone, PartialEq)]
pub struct Schedule {
    /// `N + 1` sigmas, decreasing, the last one 0 (f32 as diffusers stores them).
    pub sigmas: Vec<f32>,
    /// `N` timesteps the model is called with at each step (diffusers' `scheduler.timesteps`; integers
    /// for DPM-Solver).
    pub timesteps: Vec<f32>,
}

impl Schedule {
    pub fn num_steps(&self) -> usize {
        self.timesteps.len()
    }

    /// The noise level DGPO trains on at rollout step `j`: `t_j / 1000` in f32, as the authors compute
    /// `sigmas_t = timesteps[:, j] / 1000`.
    pub fn train_sigma(&self, j: usize) -> f32 {
        self.timesteps[j] / NUM_TRAIN_TIMESTEPS as f32
    }

    fn check(&self) -> Result<()> {
        if self.sigmas.len() != self.timesteps.len() + 1 {
            bail!(
                "schedule has {} sigmas for {} timesteps (need one more sigma)",
                self.sigmas.len(),
                self.timesteps.len()
            );
        }
        Ok(())
    }
}

/// `numpy.linspace(start, stop, num)` bit for bit: `i·step + start` with `step = (stop − start)/(num − 1)`,
/// the last value exactly `stop`.
fn linspace(start: f64, stop: f64, num: usize) -> Vec<f64> {
    if num <= 1 {
        return vec![start; num];
    }
    let step = (stop - start) / (num - 1) as f64;
    let mut y: Vec<f64> = (0..num)
        .map(|i| {
            if step == 0.0 {
                start
            } else {
                i as f64 * step + start
            }
        })
        .collect();
    y[num - 1] = stop;
    y
}

/// The shift as torch applies it to an f32 tensor (`shift * σ / (1 + (shift − 1) * σ)` in f32).
fn shift_sigma_f32(sigma: f32, shift: f64) -> f32 {
    shift as f32 * sigma / (1.0 + (shift - 1.0) as f32 * sigma)
}

/// `FlowMatchEulerDiscreteScheduler(shift).set_timesteps(num_steps)`.
fn euler_schedule(num_steps: usize, shift: f64) -> Schedule {
    // __init__: the training grid 1000, 999, …, 1 over 1000, shifted in f32; its ends are σ_max, σ_min.
    let sigma_max = shift_sigma_f32(1000.0 / NUM_TRAIN_TIMESTEPS as f32, shift) as f64;
    let sigma_min = shift_sigma_f32(1.0 / NUM_TRAIN_TIMESTEPS as f32, shift) as f64;
    // set_timesteps: f64 linspace of timesteps, shifted (again) in f64, stored as f32.
    let sigmas: Vec<f32> = linspace(
        sigma_max * NUM_TRAIN_TIMESTEPS,
        sigma_min * NUM_TRAIN_TIMESTEPS,
        num_steps,
    )
    .into_iter()
    .map(|t| shift_sigma(t / NUM_TRAIN_TIMESTEPS, shift) as f32)
    .collect();
    let timesteps = sigmas
        .iter()
        .map(|s| s * NUM_TRAIN_TIMESTEPS as f32)
        .collect();
    let mut sigmas = sigmas;
    sigmas.push(0.0);
    Schedule { sigmas, timesteps }
}

/// `DPMSolverMultistepScheduler(use_flow_sigmas, flow_shift, final_sigmas_type="zero").set_timesteps(N)`.
fn dpm_schedule(num_steps: usize, shift: f64) -> Schedule {
    // alphas = linspace(1, 1/1000, N + 1); sigmas = shift(1 − alphas), flipped, the trailing 0 dropped.
    let shifted: Vec<f64> = linspace(1.0, 1.0 / NUM_TRAIN_TIMESTEPS, num_steps + 1)
        .into_iter()
        .map(|a| shift_sigma(1.0 - a, shift))
        .rev()
        .take(num_steps)
        .collect();
    // Timesteps are computed in f64 and cast to int64 (truncation).
    let timesteps = shifted
        .iter()
        .map(|s| (s * NUM_TRAIN_TIMESTEPS).trunc() as f32)
        .collect();
    let mut sigmas: Vec<f32> = shifted.iter().map(|&s| s as f32).collect();
    sigmas.push(0.0);
    Schedule { sigmas, timesteps }
}

/// The `num_steps`-step grid of `sampler` with time shift `shift` (`flow_shift` for DPM-Solver).
pub fn schedule(sampler: Sampler, num_steps: usize, shift: f64) -> Schedule {
    match sampler {
        Sampler::Euler => euler_schedule(num_steps, shift),
        Sampler::DpmSolver2m => dpm_schedule(num_steps, shift),
    }
}

/// The `N + 1` Euler sigmas of an `N`-step schedule, from 1 down to 0 (f32 as diffusers stores them).
pub fn euler_sigmas(num_steps: usize, shift: f64) -> Vec<f32> {
    euler_schedule(num_steps, shift).sigmas
}

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

/// Text conditioning of a batch: per-token context `[B, L, D]` and pooled `[B, P]`.
#[derive(Debug, Clone)]
pub struct Conditioning {
    pub context: Tensor,
    pub pooled: Tensor,
}

impl Conditioning {
    pub fn batch(&self) -> Result<usize> {
        Ok(self.context.dim(0)?)
    }

    /// Rows `r` of the batch.
    pub fn narrow(&self, r: std::ops::Range<usize>) -> Result<Self> {
        Ok(Self {
            context: self.context.narrow(0, r.start, r.len())?,
            pooled: self.pooled.narrow(0, r.start, r.len())?,
        })
    }

    /// Repeat a single conditioning (e.g. the empty prompt) `n` times.
    pub fn repeat(&self, n: usize) -> Result<Self> {
        if self.batch()? != 1 {
            bail!("only a single conditioning can be repeated");
        }
        Ok(Self {
            context: self.context.repeat((n, 1, 1))?,
            pooled: self.pooled.repeat((n, 1))?,
        })
    }

    pub fn cat(parts: &[&Conditioning]) -> Result<Self> {
        let c: Vec<&Tensor> = parts.iter().map(|p| &p.context).collect();
        let p: Vec<&Tensor> = parts.iter().map(|p| &p.pooled).collect();
        Ok(Self {
            context: Tensor::cat(&c, 0)?,
            pooled: Tensor::cat(&p, 0)?,
        })
    }
}

/// Guided velocity `v_u + w·(v_c − v_u)` at model timestep `timestep` (0..1000); `uncond` must have the
/// batch of `cond`. With `w == 1` or no `uncond` only the conditional branch runs. Both branches go
/// through the model as one batch (unconditional first, as diffusers concatenates them); the guidance
/// is combined in f32 and returned in the model's output dtype.
pub fn guided_velocity_at(
    model: &MMDiT,
    x: &Tensor,
    timestep: f32,
    cond: &Conditioning,
    uncond: Option<&Conditioning>,
    guidance: f64,
    w: Weights,
) -> Result<Tensor> {
    let b = x.dim(0)?;
    let dev = x.device();
    match uncond {
        Some(u) if guidance != 1.0 => {
            let both = Conditioning::cat(&[u, cond])?;
            let xx = Tensor::cat(&[x, x], 0)?;
            let t = Tensor::full(timestep, 2 * b, dev)?;
            let v = model.forward(&xx, &t, &both.context, &both.pooled, w)?;
            let dtype = v.dtype();
            let v = v.to_dtype(DType::F32)?;
            let vu = v.narrow(0, 0, b)?;
            let vc = v.narrow(0, b, b)?;
            Ok((&vu + ((vc - &vu)? * guidance)?)?.to_dtype(dtype)?)
        }
        _ => {
            let t = Tensor::full(timestep, b, dev)?;
            model.forward(x, &t, &cond.context, &cond.pooled, w)
        }
    }
}

/// Applies `f(x, cond, uncond)` to the batch: on the CPU to one slice per worker thread
/// ([`crate::par`]), the results concatenated in order; elsewhere to the whole batch.
fn per_shard(
    x: &Tensor,
    cond: &Conditioning,
    uncond: Option<&Conditioning>,
    f: impl Fn(&Tensor, &Conditioning, Option<&Conditioning>) -> Result<Tensor> + Sync,
) -> Result<Tensor> {
    let ranges = crate::par::shards(x.dim(0)?, crate::par::workers_for(x.device()), 1);
    if ranges.len() <= 1 {
        return f(x, cond, uncond);
    }
    let outs = crate::par::map_shards(&ranges, |r| {
        let u = uncond.map(|u| u.narrow(r.clone())).transpose()?;
        f(
            &x.narrow(0, r.start, r.len())?,
            &cond.narrow(r)?,
            u.as_ref(),
        )
    })?;
    Ok(Tensor::cat(&outs, 0)?)
}

/// [`guided_velocity_at`] without gradients, the batch split over the worker threads on the CPU.
pub fn velocity_sharded(
    model: &MMDiT,
    x: &Tensor,
    timestep: f32,
    cond: &Conditioning,
    uncond: Option<&Conditioning>,
    guidance: f64,
    w: Weights,
) -> Result<Tensor> {
    per_shard(x, cond, uncond, |x, c, u| {
        guided_velocity_at(model, x, timestep, c, u, guidance, w)
    })
}

/// [`guided_velocity_at`] at `t = 1000·σ` (f32).
pub fn guided_velocity(
    model: &MMDiT,
    x: &Tensor,
    sigma: f32,
    cond: &Conditioning,
    uncond: Option<&Conditioning>,
    guidance: f64,
    w: Weights,
) -> Result<Tensor> {
    let t = sigma * NUM_TRAIN_TIMESTEPS as f32;
    guided_velocity_at(model, x, t, cond, uncond, guidance, w)
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::init::init_weights;
    use crate::model::{Trainable, TransformerConfig, WeightStore};
    use candle_core::Device;

    const BOTH: [Sampler; 2] = [Sampler::Euler, Sampler::DpmSolver2m];

    fn max_abs(a: &Tensor, b: &Tensor) -> f32 {
        (a - b)
            .unwrap()
            .abs()
            .unwrap()
            .flatten_all()
            .unwrap()
            .max(0)
            .unwrap()
            .to_scalar::<f32>()
            .unwrap()
    }

    #[test]
    fn sigmas_follow_the_shifted_diffusers_grid() {
        let s = euler_sigmas(10, 3.0);
        assert_eq!(s.len(), 11);
        assert_eq!(s[0], 1.0);
        assert_eq!(s[10], 0.0);
        assert!(s.windows(2).all(|w| w[0] > w[1]));
        // Last non-zero sigma: the doubly shifted 1/1000 (diffusers' own quirk).
        let last = shift_sigma(shift_sigma(0.001, 3.0), 3.0) as f32;
        assert!((s[9] - last).abs() < 1e-7, "{} vs {last}", s[9]);
        // No shift: a plain linspace from 1 to 1/1000.
        let u = euler_sigmas(4, 1.0);
        assert!((u[1] - (1.0 - 0.999 / 3.0) as f32).abs() < 1e-7);
    }

    #[test]
    fn euler_timesteps_are_the_sigmas_times_1000() {
        let s = schedule(Sampler::Euler, 10, 3.0);
        assert_eq!(s.num_steps(), 10);
        for (t, sig) in s.timesteps.iter().zip(&s.sigmas) {
            assert_eq!(*t, sig * 1000.0);
        }
        assert_eq!(s.timesteps[0], 1000.0);
    }

    #[test]
    fn dpm_grid_starts_below_one_and_calls_the_model_at_integer_timesteps() {
        let s = schedule(Sampler::DpmSolver2m, 10, 3.0);
        assert_eq!(s.sigmas.len(), 11);
        assert_eq!(s.sigmas[10], 0.0);
        // σ_i = shift(0.999·(1 − i/N)): the first is shift(0.999), not 1; the last non-zero one is large.
        assert_eq!(s.sigmas[0], shift_sigma(0.999, 3.0) as f32);
        assert!((s.sigmas[9] - shift_sigma(0.0999, 3.0) as f32).abs() < 1e-7);
        assert_eq!(s.timesteps[0], 999.0);
        for (t, sig) in s.timesteps.iter().zip(&s.sigmas) {
            assert_eq!(t.fract(), 0.0);
            assert_eq!(*t, (*sig as f64 * 1000.0).floor() as f32, "{t} vs {sig}");
        }
        // DGPO trains at t/1000, the truncated timestep.
        assert_eq!(s.train_sigma(0), 0.999);
        assert!(s.train_sigma(0) < s.sigmas[0]);
    }

    #[test]
    fn no_shift_grids_are_plain_linspaces() {
        let e = schedule(Sampler::Euler, 4, 1.0);
        let want = [1.0, 0.667, 0.334, 0.001, 0.0];
        for (a, b) in e.sigmas.iter().zip(want) {
            assert!((a - b).abs() < 1e-7, "{:?}", e.sigmas);
        }
        let d = schedule(Sampler::DpmSolver2m, 4, 1.0);
        let want = [0.999, 0.74925, 0.4995, 0.24975, 0.0];
        for (a, b) in d.sigmas.iter().zip(want) {
            assert!((a - b).abs() < 1e-7, "{:?}", d.sigmas);
        }
        assert_eq!(d.timesteps, vec![999.0, 749.0, 499.0, 249.0]);
    }

    #[test]
    fn one_and_zero_steps() {
        let e = schedule(Sampler::Euler, 1, 3.0);
        assert_eq!(e.sigmas, vec![1.0, 0.0]);
        assert_eq!(e.timesteps, vec![1000.0]);
        let d = schedule(Sampler::DpmSolver2m, 1, 3.0);
        assert_eq!(d.sigmas, vec![shift_sigma(0.999, 3.0) as f32, 0.0]);
        assert_eq!(d.timesteps, vec![999.0]);

        let dev = Device::Cpu;
        let x = Tensor::randn(0f32, 1.0, (2, 3, 4, 4), &dev).unwrap();
        let v = Tensor::randn(0f32, 1.0, (2, 3, 4, 4), &dev).unwrap();
        let mut calls = vec![];
        // One Euler step: x − v; one DPM step returns the data prediction x − σ_0·v.
        let out = integrate(Sampler::Euler, &e, &x, |_, i, t| {
            calls.push((i, t));
            Ok(v.clone())
        })
        .unwrap();
        assert_eq!(calls, vec![(0, 1000.0)]);
        assert!(max_abs(&out, &(&x - &v).unwrap()) < 1e-7);
        let out = integrate(Sampler::DpmSolver2m, &d, &x, |_, _, _| Ok(v.clone())).unwrap();
        let want = (&x - (&v * d.sigmas[0] as f64).unwrap()).unwrap();
        assert!(max_abs(&out, &want) < 1e-7);

        for sampler in BOTH {
            let z = schedule(sampler, 0, 3.0);
            assert_eq!(z.sigmas, vec![0.0]);
            assert!(z.timesteps.is_empty());
            let out = integrate(sampler, &z, &x, |_, _, _| unreachable!()).unwrap();
            assert_eq!(max_abs(&out, &x), 0.0);
        }
    }

    #[test]
    fn both_solvers_are_exact_on_straight_paths() {
        // A single data point x0: the exact velocity is (x − x0)/σ, the flow is a straight line and both
        // Euler and DPM-Solver++ (constant data prediction) land on x0.
        let dev = Device::Cpu;
        let x0 = Tensor::randn(0f32, 1.0, (2, 3, 4, 4), &dev).unwrap();
        let noise = Tensor::randn(0f32, 1.0, (2, 3, 4, 4), &dev).unwrap();
        for sampler in BOTH {
            for (n, shift) in [(1, 3.0), (2, 3.0), (10, 3.0), (14, 3.0), (7, 1.0)] {
                let s = schedule(sampler, n, shift);
                let s0 = s.sigmas[0] as f64;
                let start = ((&x0 * (1.0 - s0)).unwrap() + (&noise * s0).unwrap()).unwrap();
                let sig = s.sigmas.clone();
                let out = integrate(sampler, &s, &start, |x, i, _| {
                    Ok(((x - &x0)? / sig[i] as f64)?)
                })
                .unwrap();
                let e = max_abs(&out, &x0);
                assert!(e < 1e-5, "{sampler:?} n={n} shift={shift}: {e}");
            }
        }
    }

    #[test]
    fn bad_schedules_and_velocities_are_errors() {
        let dev = Device::Cpu;
        let x = Tensor::zeros((1, 2, 2, 2), DType::F32, &dev).unwrap();
        let bad = Schedule {
            sigmas: vec![1.0, 0.0],
            timesteps: vec![],
        };
        assert!(integrate(Sampler::Euler, &bad, &x, |x, _, _| Ok(x.clone())).is_err());
        let s = schedule(Sampler::DpmSolver2m, 3, 3.0);
        let e = integrate(Sampler::DpmSolver2m, &s, &x, |_, _, _| {
            Ok(Tensor::zeros((1, 2, 2, 3), DType::F32, &dev)?)
        })
        .unwrap_err();
        assert!(e.to_string().contains("shape"), "{e}");
    }

    fn tiny_model() -> MMDiT {
        let cfg = TransformerConfig {
            sample_size: 4,
            num_layers: 1,
            attention_head_dim: 8,
            num_attention_heads: 2,
            joint_attention_dim: 12,
            caption_projection_dim: 16,
            pooled_projection_dim: 10,
            in_channels: 4,
            out_channels: 4,
            pos_embed_max_size: 4,
            dual_attention_layers: vec![],
            ..TransformerConfig::sd3_medium()
        };
        let dev = Device::Cpu;
        // Fresh weights start at zero velocity: give the zero-initialised tensors random values.
        let w = init_weights(&cfg, 7, &dev)
            .unwrap()
            .into_iter()
            .map(|(k, v)| {
                let zero = v
                    .abs()
                    .unwrap()
                    .sum_all()
                    .unwrap()
                    .to_scalar::<f32>()
                    .unwrap()
                    == 0.0;
                let v = if zero {
                    v.randn_like(0.0, 0.2).unwrap()
                } else {
                    v
                };
                (k, v)
            })
            .collect();
        MMDiT::new(
            &cfg,
            WeightStore::new("test", w, DType::F32),
            &Trainable::None,
            DType::F32,
        )
        .unwrap()
    }

    #[test]
    fn sample_guides_each_step_at_the_schedule_timesteps() {
        let m = tiny_model();
        let dev = Device::Cpu;
        let noise = Tensor::randn(0f32, 1.0, (2, 4, 4, 4), &dev).unwrap();
        let cond = Conditioning {
            context: Tensor::randn(0f32, 1.0, (2, 5, 12), &dev).unwrap(),
            pooled: Tensor::randn(0f32, 1.0, (2, 10), &dev).unwrap(),
        };
        let uncond = Conditioning {
            context: Tensor::randn(0f32, 1.0, (1, 5, 12), &dev).unwrap(),
            pooled: Tensor::randn(0f32, 1.0, (1, 10), &dev).unwrap(),
        }
        .repeat(2)
        .unwrap();
        let fwd = |x: &Tensor, t: f32, c: &Conditioning| {
            let tt = Tensor::full(t, 2, &dev).unwrap();
            m.forward(x, &tt, &c.context, &c.pooled, Weights::Policy)
        };
        for sampler in BOTH {
            let s = schedule(sampler, 5, 3.0);
            let got = sample(
                &m,
                sampler,
                &s,
                &noise,
                &cond,
                Some(&uncond),
                4.5,
                Weights::Policy,
            )
            .unwrap();
            let want = integrate(sampler, &s, &noise, |x, _, t| {
                let vu = fwd(x, t, &uncond)?;
                let vc = fwd(x, t, &cond)?;
                Ok((&vu + ((vc - &vu)? * 4.5)?)?)
            })
            .unwrap();
            let e = max_abs(&got, &want);
            assert!(e < 1e-4, "{sampler:?}: {e}");
            // Guidance 1 (or no unconditional branch) is the conditional model alone.
            let plain = integrate(sampler, &s, &noise, |x, _, t| fwd(x, t, &cond)).unwrap();
            let g1 = sample(
                &m,
                sampler,
                &s,
                &noise,
                &cond,
                Some(&uncond),
                1.0,
                Weights::Policy,
            )
            .unwrap();
            let none = sample(&m, sampler, &s, &noise, &cond, None, 4.5, Weights::Policy).unwrap();
            // `sample` shards the batch over worker threads, and a matmul over fewer rows may round
            // differently, so equality is up to float rounding.
            assert!(max_abs(&g1, &plain) < 1e-5);
            assert!(max_abs(&none, &plain) < 1e-5);
            assert!(max_abs(&got, &plain) > 1e-2, "guidance must matter");
        }
        // The old Euler entry point is the Euler sampler.
        let s = schedule(Sampler::Euler, 5, 3.0);
        let old = sample_euler(
            &m,
            &noise,
            &cond,
            Some(&uncond),
            4.5,
            &euler_sigmas(5, 3.0),
            Weights::Policy,
        )
        .unwrap();
        let new = sample(
            &m,
            Sampler::Euler,
            &s,
            &noise,
            &cond,
            Some(&uncond),
            4.5,
            Weights::Policy,
        )
        .unwrap();
        assert_eq!(max_abs(&old, &new), 0.0);
    }
}
