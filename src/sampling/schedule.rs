//! The step grids of the flow-matching schedulers: SD3's Euler grid and DPM-Solver++'s flow sigmas,
//! each with its time shift, as diffusers stores them (f32 sigmas, the model's timesteps).

use crate::config::Sampler;
use anyhow::{bail, Result};

/// Training timesteps of the flow-matching schedulers (`num_train_timesteps`).
pub(super) const NUM_TRAIN_TIMESTEPS: f64 = 1000.0;

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

    pub(super) fn check(&self) -> Result<()> {
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
