//! Flow-GRPO (Liu et al., 2025), the baseline DGPO is measured against: the flow ODE turned into an
//! SDE so that every rollout step is a Gaussian policy with a log-probability, and a PPO-clipped
//! ratio objective on those steps. The behavioural reference is `yifan123/flow_grpo`
//! (`sde_step_with_logprob`, `train_sd3.py`); this module restates its formulas:
//!
//! * step `σ → σ'` (`dt = σ' − σ < 0`), noise level `a`:
//!   `s_t = a·√(σ / (1 − σ))` (with `σ_max = σ_1` in place of σ in the denominator when `σ = 1`);
//!   mean `μ = x·(1 + s_t²·dt / (2σ)) + v·(1 + s_t²·(1 − σ) / (2σ))·dt`; std `s_t·√(−dt)`;
//!   `x' = μ + s_t·√(−dt)·ε`;
//! * `log p(x' | x)` = the Gaussian log-density **averaged** over all latent elements;
//! * loss of a step: `mean_i max(−A_i·ρ_i, −A_i·clip(ρ_i, 1 − c, 1 + c))` with
//!   `ρ_i = exp(log p_θ − log p_old)`, plus `β·mean_i(mean_elements((μ_θ − μ_ref)²) / (2·s_t²))`.

use crate::model::{MMDiT, Weights};
use crate::sampling::{guided_velocity_at, Conditioning, Schedule};
use anyhow::{bail, Result};
use candle_core::{DType, Tensor, D};

/// One SDE step's outputs.
#[derive(Debug)]
pub struct SdeStep {
    /// `x'` (the given one when re-evaluating a stored trajectory).
    pub prev: Tensor,
    /// `[B]` log-probability of `x'` given `x`, averaged over the latent's elements.
    pub log_prob: Tensor,
    /// `[B, …]` the step's mean `μ` (carries the velocity's gradient).
    pub mean: Tensor,
    /// `s_t` (without the `√(−dt)` factor), as the reference returns it.
    pub std_dev_t: f64,
}

/// `s_t` of a step from `sigma` (`sigma_max` = the schedule's second sigma, used when `sigma = 1`).
pub fn std_dev_t(sigma: f64, sigma_max: f64, noise_level: f64) -> f64 {
    let denom = 1.0 - if sigma == 1.0 { sigma_max } else { sigma };
    (sigma / denom).sqrt() * noise_level
}

/// Flow-GRPO's `sde_step_with_logprob` for a batch that shares one step (`sigma` → `sigma_prev`).
/// `x` and `v` are `[B, …]`; with `prev = None` the next sample is drawn with `noise` (`[B, …]`,
/// standard normal), otherwise `prev` is scored. Computed in f32.
#[allow(clippy::too_many_arguments)]
pub fn sde_step(
    x: &Tensor,
    v: &Tensor,
    sigma: f64,
    sigma_prev: f64,
    sigma_max: f64,
    noise_level: f64,
    prev: Option<&Tensor>,
    noise: Option<&Tensor>,
) -> Result<SdeStep> {
    if sigma_prev >= sigma || sigma <= 0.0 {
        bail!("an SDE step needs 0 ≤ σ' < σ ≤ 1, got σ = {sigma}, σ' = {sigma_prev}");
    }
    let x = x.to_dtype(DType::F32)?;
    let v = v.to_dtype(DType::F32)?;
    let dt = sigma_prev - sigma;
    let s = std_dev_t(sigma, sigma_max, noise_level);
    let mean = ((&x * (1.0 + s * s / (2.0 * sigma) * dt))?
        + (&v * ((1.0 + s * s * (1.0 - sigma) / (2.0 * sigma)) * dt))?)?;
    let std = s * (-dt).sqrt();
    let prev = match (prev, noise) {
        (Some(p), _) => p.to_dtype(DType::F32)?,
        (None, Some(n)) => (&mean.detach() + (n.to_dtype(DType::F32)? * std)?)?,
        (None, None) => bail!("sde_step needs either the next sample or the noise to draw it"),
    };
    let b = x.dim(0)?;
    let diff = (prev.detach() - &mean)?;
    let per = (diff.sqr()? * (-1.0 / (2.0 * std * std)))?
        .reshape((b, ()))?
        .mean(D::Minus1)?;
    let log_prob = (per - (std.ln() + 0.5 * (2.0 * std::f64::consts::PI).ln()))?;
    Ok(SdeStep {
        prev,
        log_prob,
        mean,
        std_dev_t: s,
    })
}

/// The loss of one trained step and its statistics.
#[derive(Debug)]
pub struct GrpoTerms {
    /// `policy + β·kl` (scalar, differentiable).
    pub loss: Tensor,
    pub policy_loss: f32,
    pub kl: f32,
    /// Share of samples whose ratio left `[1 − c, 1 + c]`.
    pub clip_frac: f32,
    /// Mean `|ρ − 1|`.
    pub ratio_dev: f32,
}

/// Flow-GRPO's loss of one step for a micro-batch. `log_prob` `[B]` (with gradient), `old_log_prob`
/// `[B]` (from the rollout), `adv` the clamped advantages, `clip_range` c; `kl` is
/// `(μ_θ, μ_ref, s_t)` when `beta > 0`.
pub fn grpo_loss(
    log_prob: &Tensor,
    old_log_prob: &Tensor,
    adv: &[f32],
    clip_range: f64,
    kl: Option<(&Tensor, &Tensor, f64)>,
    beta: f64,
) -> Result<GrpoTerms> {
    let b = log_prob.dim(0)?;
    if adv.len() != b || old_log_prob.dim(0)? != b {
        bail!(
            "grpo_loss: {} advantages and {} old log-probs for {b} samples",
            adv.len(),
            old_log_prob.dim(0)?
        );
    }
    let dev = log_prob.device();
    let a = Tensor::from_slice(adv, b, dev)?;
    let ratio = (log_prob - old_log_prob.detach())?.exp()?;
    let unclipped = (a.neg()? * &ratio)?;
    let clipped = (a.neg()? * ratio.clamp(1.0 - clip_range, 1.0 + clip_range)?)?;
    let policy = unclipped.maximum(&clipped)?.mean_all()?;
    let r: Vec<f32> = ratio.detach().to_vec1()?;
    let clip_frac = r
        .iter()
        .filter(|x| (**x as f64 - 1.0).abs() > clip_range)
        .count() as f32
        / b as f32;
    let ratio_dev = r.iter().map(|x| (x - 1.0).abs()).sum::<f32>() / b as f32;
    let (loss, kl_v) = match kl {
        Some((m, m_ref, s)) if beta > 0.0 => {
            let k = (m - m_ref.detach())?
                .sqr()?
                .reshape((b, ()))?
                .mean(D::Minus1)?
                .affine(1.0 / (2.0 * s * s), 0.0)?
                .mean_all()?;
            let kv = k.to_scalar::<f32>()?;
            ((&policy + (k * beta)?)?, kv)
        }
        _ => (policy.clone(), 0.0),
    };
    Ok(GrpoTerms {
        policy_loss: policy.to_scalar::<f32>()?,
        loss,
        kl: kl_v,
        clip_frac,
        ratio_dev,
    })
}

/// How many of an `N`-step rollout's steps Flow-GRPO trains on: `⌊N·timestep_fraction⌋`, at least 1.
pub fn num_train_steps(num_steps: usize, timestep_fraction: f64) -> usize {
    ((num_steps as f64 * timestep_fraction) as usize).clamp(1, num_steps)
}

/// A batch of SDE rollouts: the latents at every step (`N + 1` tensors `[B, …]`, from the noise to
/// the final sample) and the log-probability of each step under the rollout weights (`[B, N]`).
pub struct Trajectory {
    pub latents: Vec<Tensor>,
    pub log_probs: Tensor,
}

impl Trajectory {
    /// Concatenate the trajectories of several batches along the batch.
    pub fn cat(parts: &[Trajectory]) -> Result<Trajectory> {
        let n = parts.first().map_or(0, |p| p.latents.len());
        let latents = (0..n)
            .map(|j| {
                let xs: Vec<&Tensor> = parts.iter().map(|p| &p.latents[j]).collect();
                Tensor::cat(&xs, 0)
            })
            .collect::<candle_core::Result<Vec<_>>>()?;
        let lps: Vec<&Tensor> = parts.iter().map(|p| &p.log_probs).collect();
        Ok(Trajectory {
            latents,
            log_probs: Tensor::cat(&lps, 0)?,
        })
    }
}

/// Flow-GRPO's rollout: from `x_t` (σ = 1) down the Euler grid of `schedule` with [`sde_step`] at
/// every step, the CFG velocity of `model` under `w` (no gradient), `step_noise[j]` the standard
/// normal draw of step `j` (`[B, …]` each; drawn by the caller so the result does not depend on how
/// the batch is split). On the CPU each worker thread rolls out its own slice of the batch.
#[allow(clippy::too_many_arguments)]
pub fn sde_rollout(
    model: &MMDiT,
    schedule: &Schedule,
    x_t: &Tensor,
    step_noise: &[Tensor],
    cond: &Conditioning,
    uncond: Option<&Conditioning>,
    guidance: f64,
    noise_level: f64,
    w: Weights,
) -> Result<Trajectory> {
    let n = schedule.num_steps();
    if step_noise.len() != n {
        bail!(
            "sde_rollout: {} step noises for {n} steps",
            step_noise.len()
        );
    }
    let sig = &schedule.sigmas;
    let sigma_max = f64::from(*sig.get(1).unwrap_or(&0.0));
    let ranges = crate::par::shards(x_t.dim(0)?, crate::par::workers_for(x_t.device()), 1);
    let parts = crate::par::map_shards(&ranges, |r| {
        let c = cond.narrow(r.clone())?;
        let u = uncond.map(|u| u.narrow(r.clone())).transpose()?;
        let mut x = x_t.narrow(0, r.start, r.len())?.to_dtype(DType::F32)?;
        let mut latents = vec![x.clone()];
        let mut lps = Vec::with_capacity(n);
        for j in 0..n {
            let v = guided_velocity_at(
                model,
                &x,
                schedule.timesteps[j],
                &c,
                u.as_ref(),
                guidance,
                w,
            )?;
            let z = step_noise[j].narrow(0, r.start, r.len())?;
            let st = sde_step(
                &x,
                &v,
                f64::from(sig[j]),
                f64::from(sig[j + 1]),
                sigma_max,
                noise_level,
                None,
                Some(&z),
            )?;
            x = st.prev;
            latents.push(x.clone());
            lps.push(st.log_prob.unsqueeze(1)?);
        }
        Ok(Trajectory {
            latents,
            log_probs: Tensor::cat(&lps, 1)?,
        })
    })?;
    Trajectory::cat(&parts)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    fn t(v: &[f32], shape: (usize, usize)) -> Tensor {
        Tensor::from_slice(v, shape, &Device::Cpu).unwrap()
    }

    #[test]
    fn log_prob_is_the_mean_gaussian_log_density() {
        let x = t(&[0.3, -1.2, 0.8, 0.1, 0.5, -0.4], (2, 3));
        let v = t(&[-0.7, 0.2, 1.1, 0.0, -0.3, 0.9], (2, 3));
        let xp = t(&[0.35, -1.0, 0.6, 0.2, 0.45, -0.5], (2, 3));
        let (sigma, sigma_prev, sigma_max, a) = (0.8, 0.6, 0.97, 0.7);
        let st = sde_step(&x, &v, sigma, sigma_prev, sigma_max, a, Some(&xp), None).unwrap();
        let lp: Vec<f32> = st.log_prob.to_vec1().unwrap();
        // direct: N(x'; μ, (s√(−dt))²) per element, f64, averaged
        let s = a * (sigma / (1.0 - sigma)).sqrt();
        let dt = sigma_prev - sigma;
        let std = s * (-dt).sqrt();
        let xs: Vec<Vec<f32>> = x.to_vec2().unwrap();
        let vs: Vec<Vec<f32>> = v.to_vec2().unwrap();
        let ps: Vec<Vec<f32>> = xp.to_vec2().unwrap();
        for i in 0..2 {
            let mut acc = 0.0;
            for k in 0..3 {
                let mu = xs[i][k] as f64 * (1.0 + s * s / (2.0 * sigma) * dt)
                    + vs[i][k] as f64 * (1.0 + s * s * (1.0 - sigma) / (2.0 * sigma)) * dt;
                let z = (ps[i][k] as f64 - mu) / std;
                acc += -0.5 * z * z - std.ln() - 0.5 * (2.0 * std::f64::consts::PI).ln();
            }
            let want = acc / 3.0;
            assert!((lp[i] as f64 - want).abs() < 1e-5, "{} vs {want}", lp[i]);
        }
        assert!((st.std_dev_t - s).abs() < 1e-12);
        // at σ = 1 the denominator uses σ_max
        assert!((std_dev_t(1.0, 0.97, 0.7) - 0.7 * (1.0f64 / 0.03).sqrt()).abs() < 1e-12);
    }

    #[test]
    fn drawn_samples_follow_the_step_distribution() {
        let dev = Device::Cpu;
        let n = 20000;
        let x = Tensor::full(0.5f32, (1, n), &dev).unwrap();
        let v = Tensor::full(-1.0f32, (1, n), &dev).unwrap();
        let noise = Tensor::randn(0f32, 1., (1, n), &dev).unwrap();
        let (sigma, sp) = (0.9, 0.7);
        let st = sde_step(&x, &v, sigma, sp, 0.95, 0.7, None, Some(&noise)).unwrap();
        let p: Vec<f32> = st.prev.flatten_all().unwrap().to_vec1().unwrap();
        let m: f32 = st.mean.flatten_all().unwrap().to_vec1::<f32>().unwrap()[0];
        let mean = p.iter().sum::<f32>() / n as f32;
        let var = p.iter().map(|q| (q - mean).powi(2)).sum::<f32>() / n as f32;
        let s = 0.7 * (sigma / (1.0 - sigma)).sqrt();
        let want_var = (s * s * (sigma - sp)) as f32;
        assert!((mean - m).abs() < 0.02, "{mean} vs {m}");
        assert!((var / want_var - 1.0).abs() < 0.05, "{var} vs {want_var}");
    }

    #[test]
    fn loss_matches_hand_computed_values_and_clips() {
        // ratios e^{0.02}, e^{-0.03}, 1 with c = 0.01
        let lp = t(&[0.02, -0.03, 0.0], (1, 3)).flatten_all().unwrap();
        let old = Tensor::zeros(3, DType::F32, &Device::Cpu).unwrap();
        let adv = [1.0f32, 1.0, -2.0];
        let terms = grpo_loss(&lp, &old, &adv, 0.01, None, 0.0).unwrap();
        let r = [0.02f64.exp(), (-0.03f64).exp(), 1.0];
        let per = |a: f64, r: f64| (-a * r).max(-a * r.clamp(0.99, 1.01));
        let want = (per(1.0, r[0]) + per(1.0, r[1]) + per(-2.0, r[2])) / 3.0;
        assert!((terms.policy_loss as f64 - want).abs() < 1e-6);
        assert!((terms.clip_frac - 2.0 / 3.0).abs() < 1e-6);
        // KL term: mean over elements of (μ − μ_ref)² / (2 s²), averaged over samples
        let m = t(&[1.0, 2.0, 0.0, 0.0], (2, 2));
        let mr = t(&[0.0, 0.0, 0.0, 1.0], (2, 2));
        let lp2 = t(&[0.0, 0.0], (1, 2)).flatten_all().unwrap();
        let old2 = Tensor::zeros(2, DType::F32, &Device::Cpu).unwrap();
        let k = grpo_loss(&lp2, &old2, &[1.0, -1.0], 0.01, Some((&m, &mr, 0.5)), 0.1).unwrap();
        let want_kl = ((1.0 + 4.0) / 2.0 / 0.5 + (0.0 + 1.0) / 2.0 / 0.5) / 2.0;
        assert!((k.kl as f64 - want_kl).abs() < 1e-6, "{}", k.kl);
        let total = k.loss.to_scalar::<f32>().unwrap() as f64;
        assert!((total - (k.policy_loss as f64 + 0.1 * want_kl)).abs() < 1e-6);
    }

    #[test]
    fn unclipped_gradient_is_minus_advantage_times_ratio_gradient() {
        // d/dlogp of mean(-A·e^{logp − old}) = −A_i·ρ_i / B where unclipped; 0 where clipped
        let dev = Device::Cpu;
        let lp = Var::from_slice(&[0.001f32, 0.05, -0.002], 3, &dev).unwrap();
        let old = Tensor::zeros(3, DType::F32, &dev).unwrap();
        let adv = [2.0f32, 1.0, -1.0];
        let terms = grpo_loss(lp.as_tensor(), &old, &adv, 0.01, None, 0.0).unwrap();
        let g = terms.loss.backward().unwrap();
        let g: Vec<f32> = g.get(lp.as_tensor()).unwrap().to_vec1().unwrap();
        let want0 = -2.0 * 0.001f32.exp() / 3.0;
        let want2 = 1.0 * (-0.002f32).exp() / 3.0;
        assert!((g[0] - want0).abs() < 1e-6, "{g:?}");
        assert!(g[1].abs() < 1e-9, "clipped: {g:?}");
        assert!((g[2] - want2).abs() < 1e-6, "{g:?}");
        assert_eq!(num_train_steps(10, 0.99), 9);
        assert_eq!(num_train_steps(10, 1.0), 10);
        assert_eq!(num_train_steps(10, 0.01), 1);
    }
}
