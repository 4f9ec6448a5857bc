//! Deterministic flow-matching ODE sampling with classifier-free guidance.
//!
//! The step grid is diffusers' `FlowMatchEulerDiscreteScheduler.set_timesteps` for SD3 (static shift):
//! `t = linspace(1000·σ_max, 1000·σ_min, N) / 1000`, shifted by `σ' = sσ / (1 + (s − 1)σ)`, with a final 0
//! appended; `σ_max = 1` and `σ_min` is the shifted `1/1000` of the scheduler's training grid. The Euler
//! update is `x ← x + (σ_{i+1} − σ_i)·v`, and the model is called with `t = 1000·σ_i`.

use crate::model::{MMDiT, Weights};
use anyhow::{bail, Result};
use candle_core::{DType, Tensor};

/// SD3's time shift.
pub fn shift_sigma(sigma: f64, shift: f64) -> f64 {
    shift * sigma / (1.0 + (shift - 1.0) * sigma)
}

/// The `N + 1` sigmas of an `N`-step schedule, from 1 down to 0 (f32 as diffusers stores them).
pub fn euler_sigmas(num_steps: usize, shift: f64) -> Vec<f32> {
    let train = 1000.0;
    let sigma_max = shift_sigma(1.0, shift);
    let sigma_min = shift_sigma(1.0 / train, shift);
    let (a, b) = (sigma_max * train, sigma_min * train);
    let mut out: Vec<f32> = (0..num_steps)
        .map(|i| {
            let t = if num_steps == 1 {
                a
            } else {
                a + (b - a) * i as f64 / (num_steps - 1) as f64
            };
            shift_sigma(t / train, shift) as f32
        })
        .collect();
    out.push(0.0);
    out
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

/// Guided velocity `v_u + w·(v_c − v_u)`; `uncond` must have the batch of `cond`. With `w == 1` or no
/// `uncond` only the conditional branch runs. Both branches go through the model as one batch.
pub fn guided_velocity(
    model: &MMDiT,
    x: &Tensor,
    sigma: f32,
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
            let t = Tensor::full(sigma * 1000.0, 2 * b, dev)?;
            let v = model.forward(&xx, &t, &both.context, &both.pooled, w)?;
            let vu = v.narrow(0, 0, b)?;
            let vc = v.narrow(0, b, b)?;
            Ok((&vu + ((vc - &vu)? * guidance)?)?)
        }
        _ => {
            let t = Tensor::full(sigma * 1000.0, b, dev)?;
            model.forward(x, &t, &cond.context, &cond.pooled, w)
        }
    }
}

/// Integrate the probability-flow ODE from `noise` (at σ = 1) to σ = 0 with Euler steps on `sigmas`.
pub fn sample_euler(
    model: &MMDiT,
    noise: &Tensor,
    cond: &Conditioning,
    uncond: Option<&Conditioning>,
    guidance: f64,
    sigmas: &[f32],
    w: Weights,
) -> Result<Tensor> {
    let mut x = noise.to_dtype(DType::F32)?;
    for i in 0..sigmas.len().saturating_sub(1) {
        let v = guided_velocity(model, &x, sigmas[i], cond, uncond, guidance, w)?;
        x = (x + (v.to_dtype(DType::F32)? * (sigmas[i + 1] - sigmas[i]) as f64)?)?;
    }
    Ok(x)
}

#[cfg(test)]
mod tests {
    use super::*;

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
}
