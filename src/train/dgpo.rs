//! The DGPO update (docs/algorithm.md, steps 2–4) as equations on Candle tensors: group advantages, the draw
//! of the trained timestep indices, and the loss of one micro-batch at one timestep. No model here: the
//! caller supplies the per-sample flow-matching losses.
//!
//! Behaviour follows the authors' `scripts/train_sd3_dgpo.py` (repository `Luo-Yihong/DGPO`) and the
//! `PerPromptStatTracker` it imports from `flow_grpo/stat_tracking.py`:
//!
//! - **Advantages** `A_i = (r_i − mean_g) / (std + 1e-4)`, population std (numpy `np.std`, ddof 0), the
//!   1e-4 *added* to the std (not a floor), in f64; `std` is the group's own or, with `global_std`, the std
//!   of every reward of the epoch batch — the mean stays the group's. A group whose rewards are all equal
//!   gets `A = 0` (0 / 1e-4). `A` is clamped to `±adv_clip_max` (the reference clamps at each use in the
//!   training loop, which is the same thing). With `group_size == 1` the reference switches per-prompt
//!   tracking off and normalises by the whole batch's mean and std; so does [`advantages`].
//! - **Timesteps**: `random.sample(range(trunc_steps + 1), M)` — distinct, in random order, drawn once per
//!   (inner) epoch and shared by every micro-batch: [`draw_timestep_indices`].
//! - **Loss** (`compute_group_dgpo_loss_allreduce` and the loop around it):
//!   `ρ_i = exp(ℓ_old_i − ℓ_i)`; sample i is clipped when `A_i > 0 ∧ ρ_i > 1 + c` or
//!   `A_i ≤ 0 ∧ ρ_i < 1 − c`, and a clipped `ℓ_i` enters the loss detached;
//!   `s_g = Σ_{i∈g} A_i·β_dpo·(ℓ_i − ℓ*_i)/G` (detached, `ℓ* = ℓ_ref`, or `ℓ_old` with `use_ema_ref`,
//!   `G` = the configured group size), `w_g = σ(s_g)`;
//!   `L = mean_i(w_{g(i)}·A_i·ℓ_i) + β_kl·mean_i kl_i` (the KL term only when `β_kl > 0`, always against the
//!   frozen reference, never detached: the reference's `clip_kl` switch is off in every config). β_dpo
//!   appears only inside the sigmoid.
//! - **Scaling**: the reference accumulates over `gradient_accumulation_steps × M` backward passes and
//!   Accelerate divides each loss by that count, so the epoch's gradient is the *mean* over micro-batches
//!   and timesteps. [`dgpo_loss`] returns the unscaled micro-batch loss: divide it by
//!   `(micro-batches per step) × M` before `backward` when gradients are summed.
//!
//! Why the weight: with `r_i = −β_dpo(ℓ_i − ℓ_ref_i)` and `R(G±) = Σ_{i∈G±}|A_i|·r_i`, the group's
//! Bradley–Terry margin is `R(G⁺) − R(G⁻) = Σ_i A_i r_i = −G·s_g`. For a micro-batch of `n` samples (no
//! clipping, no KL), `∇L = (1/n)·σ(s_g)·Σ_{i∈g} A_i∇ℓ_i` per group, and
//! `∇[−log σ((R⁺ − R⁻)/G)] = (β_dpo/G)·σ(s_g)·Σ A_i∇ℓ_i = (β_dpo·n/G)·∇L` exactly (summed over the
//! groups of the micro-batch, with one common constant). Without the `1/G` temperature the Bradley–Terry
//! gradient is `β_dpo·σ(G·s_g)·Σ A_i∇ℓ_i = β_dpo·n·σ(G·s_g)/σ(s_g)·∇L`: still parallel for a single group,
//! but with a weight that saturates `G` times faster. The unit tests check both.

use anyhow::{bail, ensure, Result};
use candle_core::{DType, Tensor};

/// Added to the reward std before dividing (flow_grpo's `std + 1e-4`).
pub const ADV_STD_EPS: f64 = 1e-4;

/// Normalised rewards of one epoch batch.
#[derive(Debug, Clone, PartialEq)]
pub struct Advantages {
    /// `A_i`, clamped to `±adv_clip_max`, in the order of the rewards.
    pub values: Vec<f32>,
    /// Groups whose rewards are all equal (their advantages are 0); always 0 when `group_size == 1`.
    pub zero_std_groups: usize,
    /// Per group, the std the deviations were divided by (before adding [`ADV_STD_EPS`]): the group's own,
    /// or the whole batch's with `global_std` or `group_size == 1`.
    pub std_used: Vec<f32>,
}

fn mean_std(xs: &[f64]) -> (f64, f64) {
    let n = xs.len() as f64;
    let mean = xs.iter().sum::<f64>() / n;
    let var = xs.iter().map(|x| (x - mean) * (x - mean)).sum::<f64>() / n;
    (mean, var.sqrt())
}

/// Decoupled multi-reward advantages (GDPO, "group reward-decoupled normalization"): each reward
/// module's scores are normalised within their groups on their own (as [`advantages`], unclamped),
/// the normalised values are summed with the modules' weights, and the sum is normalised over the
/// batch (`(s − mean)/(std + 1e-4)`) and clamped to `±adv_clip_max`. `parts` are (weight, scores) per
/// module. A group counts as zero-std when every module's rewards are constant in it.
pub fn decoupled_advantages(
    parts: &[(f64, Vec<f32>)],
    group_size: usize,
    global_std: bool,
    adv_clip_max: f32,
) -> Result<Advantages> {
    ensure!(!parts.is_empty(), "no reward modules to normalise");
    ensure!(
        adv_clip_max > 0.0,
        "adv_clip_max must be positive, got {adv_clip_max}"
    );
    let n = parts[0].1.len();
    let mut sum = vec![0f64; n];
    let mut constant = vec![true; n / group_size.max(1)];
    for (w, r) in parts {
        ensure!(
            r.len() == n,
            "reward modules scored {} and {n} images",
            r.len()
        );
        let a = advantages(r, group_size, global_std, f32::MAX)?;
        for (s, v) in sum.iter_mut().zip(&a.values) {
            *s += w * f64::from(*v);
        }
        for (g, c) in constant.iter_mut().enumerate() {
            let grp = &r[g * group_size..(g + 1) * group_size];
            *c &= grp.iter().all(|x| *x == grp[0]);
        }
    }
    let (mean, std) = mean_std(&sum);
    let clip = f64::from(adv_clip_max);
    Ok(Advantages {
        values: sum
            .iter()
            .map(|s| ((s - mean) / (std + ADV_STD_EPS)).clamp(-clip, clip) as f32)
            .collect(),
        zero_std_groups: if group_size > 1 {
            constant.iter().filter(|c| **c).count()
        } else {
            0
        },
        std_used: vec![std as f32; constant.len()],
    })
}

/// Group advantages `A_i = clamp((r_i − mean_g)/(std + 1e-4), ±adv_clip_max)`; groups are consecutive runs
/// of `group_size` rewards (a prompt repeated `G` times).
pub fn advantages(
    rewards: &[f32],
    group_size: usize,
    global_std: bool,
    adv_clip_max: f32,
) -> Result<Advantages> {
    ensure!(group_size > 0, "group size must be at least 1");
    ensure!(!rewards.is_empty(), "no rewards to normalise");
    ensure!(
        rewards.len().is_multiple_of(group_size),
        "{} rewards do not split into groups of {group_size}",
        rewards.len()
    );
    ensure!(
        adv_clip_max > 0.0,
        "adv_clip_max must be positive, got {adv_clip_max}"
    );
    if let Some((i, r)) = rewards.iter().enumerate().find(|(_, r)| !r.is_finite()) {
        bail!("reward {i} is {r}: rewards must be finite");
    }
    let r: Vec<f64> = rewards.iter().map(|&x| x as f64).collect();
    let (batch_mean, batch_std) = mean_std(&r);
    let clip = adv_clip_max as f64;
    let mut values = Vec::with_capacity(r.len());
    let mut std_used = Vec::with_capacity(r.len() / group_size);
    let mut zero_std_groups = 0;
    for group in r.chunks(group_size) {
        let (mean, std) = if group_size == 1 {
            (batch_mean, batch_std)
        } else {
            let (mean, own_std) = mean_std(group);
            if group.iter().all(|&x| x == group[0]) {
                zero_std_groups += 1;
            }
            (mean, if global_std { batch_std } else { own_std })
        };
        std_used.push(std as f32);
        values.extend(
            group
                .iter()
                .map(|&x| ((x - mean) / (std + ADV_STD_EPS)).clamp(-clip, clip) as f32),
        );
    }
    Ok(Advantages {
        values,
        zero_std_groups,
        std_used,
    })
}

/// `num` distinct step indices from `0..=trunc_steps`, in random order (`random.sample(range(K + 1), M)`).
/// Draw once per epoch and use them for every micro-batch.
///
/// # Panics
/// When `num > trunc_steps + 1`, as `random.sample` raises.
pub fn draw_timestep_indices(
    rng: &mut impl rand::Rng,
    trunc_steps: usize,
    num: usize,
) -> Vec<usize> {
    assert!(
        num <= trunc_steps + 1,
        "cannot draw {num} distinct timestep indices from 0..={trunc_steps}"
    );
    rand::seq::index::sample(rng, trunc_steps + 1, num).into_vec()
}

/// `‖a − b‖²` averaged over all but the first (batch) dimension: `[B, …] → [B]`. Half-precision inputs
/// are promoted to f32 first (the reference's losses are f32).
pub fn per_sample_mse(a: &Tensor, b: &Tensor) -> Result<Tensor> {
    ensure!(
        a.dims() == b.dims(),
        "per_sample_mse: shapes {:?} and {:?} differ",
        a.dims(),
        b.dims()
    );
    ensure!(
        a.rank() >= 1,
        "per_sample_mse: scalars have no batch dimension"
    );
    let (a, b) = match a.dtype() {
        DType::BF16 | DType::F16 => (a.to_dtype(DType::F32)?, b.to_dtype(DType::F32)?),
        _ => (a.clone(), b.clone()),
    };
    let sq = (a - b)?.sqr()?;
    if sq.rank() == 1 {
        return Ok(sq);
    }
    Ok(sq.flatten_from(1)?.mean(1)?)
}

/// DGPO hyper-parameters of the loss.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct DgpoParams {
    /// β inside the group weight's sigmoid (100 GenEval/OCR, 10 PickScore, 2000+ with `use_ema_ref`).
    pub beta_dpo: f64,
    /// Weight of the KL term `mean_i ‖v_θ − v_ref‖²`; 0 leaves it out.
    pub beta_kl: f64,
    /// PPO-style clip range `c`.
    pub clip_range: f64,
    /// Use `ℓ_old` (the EMA-reference model) instead of `ℓ_ref` in the group score.
    pub use_ema_ref: bool,
}

/// The loss of one micro-batch at one timestep, and what to log.
#[derive(Debug, Clone)]
pub struct DgpoTerms {
    /// Scalar `L = mean_i(w_g·A_i·ℓ_i) + β_kl·mean_i kl_i`, differentiable through `ℓ_i` (unclipped) and kl.
    pub loss: Tensor,
    /// `mean_i(w_g·A_i·ℓ_i)` (the reference's `policy_loss`).
    pub policy_loss: f32,
    /// `mean_i kl_i`, before `β_kl`.
    pub kl: f32,
    /// Fraction of samples whose `ℓ_i` was clipped (detached).
    pub clip_frac: f32,
    /// `w_g = σ(s_g)`, one per group.
    pub group_weights: Vec<f32>,
    /// `s_g`, one per group.
    pub group_scores: Vec<f32>,
}

impl DgpoTerms {
    /// The mean group weight `σ(s_g)`: 0.5 while the policy equals the reference, towards 0 as it
    /// already orders a group's losses the way its advantages ask (the update fades), towards 1 as
    /// it orders them the wrong way.
    pub fn mean_weight(&self) -> f32 {
        let n = self.group_weights.len().max(1) as f32;
        self.group_weights.iter().sum::<f32>() / n
    }
}

fn values_f64(name: &str, t: &Tensor, n: usize) -> Result<Vec<f64>> {
    ensure!(
        t.dims() == [n],
        "{name} has shape {:?}, expected [{n}] (one value per sample)",
        t.dims()
    );
    let v = t.detach().to_dtype(DType::F64)?.to_vec1::<f64>()?;
    if let Some((i, x)) = v.iter().enumerate().find(|(_, x)| !x.is_finite()) {
        bail!("{name}[{i}] is {x}: losses must be finite");
    }
    Ok(v)
}

fn sigmoid(x: f64) -> f64 {
    1.0 / (1.0 + (-x).exp())
}

/// The DGPO loss of one micro-batch (whole groups, consecutive runs of `group_size`) at one timestep.
///
/// `l_theta`, `l_ref`, `l_old`, `kl`: `[n]` per-sample `‖v* − v_θ‖²`, `‖v* − v_ref‖²`, `‖v* − v_old‖²`,
/// `‖v_θ − v_ref‖²` (means over elements, see [`per_sample_mse`]); gradients flow only through `l_theta`
/// and `kl`. `adv`: the (clamped) advantages of the same samples.
pub fn dgpo_loss(
    l_theta: &Tensor,
    l_ref: &Tensor,
    l_old: &Tensor,
    kl: &Tensor,
    adv: &[f32],
    group_size: usize,
    p: &DgpoParams,
) -> Result<DgpoTerms> {
    let n = adv.len();
    ensure!(group_size > 0, "group size must be at least 1");
    ensure!(n > 0, "empty micro-batch");
    ensure!(
        n.is_multiple_of(group_size),
        "a micro-batch of {n} samples does not hold whole groups of {group_size}"
    );
    ensure!(
        p.beta_dpo.is_finite() && p.beta_kl.is_finite() && p.beta_kl >= 0.0,
        "beta_dpo must be finite and beta_kl finite and ≥ 0, got {} and {}",
        p.beta_dpo,
        p.beta_kl
    );
    ensure!(
        p.clip_range >= 0.0,
        "clip_range must be ≥ 0, got {}",
        p.clip_range
    );
    if let Some((i, a)) = adv.iter().enumerate().find(|(_, a)| !a.is_finite()) {
        bail!("advantage {i} is {a}: advantages must be finite");
    }
    let lt = values_f64("l_theta", l_theta, n)?;
    let lr = values_f64("l_ref", l_ref, n)?;
    let lo = values_f64("l_old", l_old, n)?;
    ensure!(
        kl.dims() == [n],
        "kl has shape {:?}, expected [{n}] (one value per sample)",
        kl.dims()
    );
    let a: Vec<f64> = adv.iter().map(|&x| x as f64).collect();

    // PPO-style clip: ρ_i = exp(ℓ_old_i − ℓ_i).
    let c = p.clip_range;
    let clipped: Vec<bool> = (0..n)
        .map(|i| {
            let rho = (lo[i] - lt[i]).exp();
            if a[i] > 0.0 {
                rho > 1.0 + c
            } else {
                rho < 1.0 - c
            }
        })
        .collect();

    // s_g = Σ_{i∈g} A_i·β_dpo·(ℓ_i − ℓ*_i)/G, w_g = σ(s_g), all detached.
    let l_star = if p.use_ema_ref { &lo } else { &lr };
    let g = group_size as f64;
    let group_scores: Vec<f64> = (0..n / group_size)
        .map(|k| {
            (k * group_size..(k + 1) * group_size)
                .map(|i| a[i] * p.beta_dpo * (lt[i] - l_star[i]) / g)
                .sum()
        })
        .collect();
    let group_weights: Vec<f64> = group_scores.iter().map(|&s| sigmoid(s)).collect();

    // L = mean_i(w_g·A_i·ℓ_i) with clipped ℓ_i detached, + β_kl·mean_i kl_i.
    let dev = l_theta.device();
    let coef: Vec<f64> = (0..n)
        .map(|i| group_weights[i / group_size] * a[i])
        .collect();
    let coef = Tensor::from_vec(coef, n, dev)?.to_dtype(l_theta.dtype())?;
    let mask: Vec<u8> = clipped.iter().map(|&c| c as u8).collect();
    let mask = Tensor::from_vec(mask, n, dev)?;
    let l_eff = mask.where_cond(&l_theta.detach(), l_theta)?;
    let policy = (coef * l_eff)?.mean_all()?;
    let kl_mean = kl.mean_all()?;
    let loss = if p.beta_kl > 0.0 {
        (&policy + kl_mean.to_dtype(policy.dtype())?.affine(p.beta_kl, 0.0)?)?
    } else {
        policy.clone()
    };
    let scalar =
        |t: &Tensor| -> Result<f32> { Ok(t.to_dtype(DType::F64)?.to_scalar::<f64>()? as f32) };
    Ok(DgpoTerms {
        policy_loss: scalar(&policy)?,
        kl: scalar(&kl_mean)?,
        loss,
        clip_frac: clipped.iter().filter(|&&c| c).count() as f32 / n as f32,
        group_weights: group_weights.iter().map(|&w| w as f32).collect(),
        group_scores: group_scores.iter().map(|&s| s as f32).collect(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decoupled_advantages_normalise_each_reward_then_the_sum() {
        // two groups of 2; module a varies only in group 0, module b only in group 1 and has 100× the scale
        let a = vec![1.0f32, 0.0, 0.5, 0.5];
        let b = vec![7.0f32, 7.0, 300.0, 100.0];
        let d = decoupled_advantages(&[(1.0, a.clone()), (0.5, b.clone())], 2, false, 5.0).unwrap();
        // per module, per group: ±1/(0.5 + 1e-4) and ±100/(100 + 1e-4), zero where constant
        let ua = 0.5 / (0.5 + ADV_STD_EPS);
        let ub = 100.0 / (100.0 + ADV_STD_EPS);
        let sum = [ua, -ua, 0.5 * ub, -0.5 * ub];
        let mean = sum.iter().sum::<f64>() / 4.0;
        let std = (sum.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / 4.0).sqrt();
        for (got, s) in d.values.iter().zip(sum) {
            let want = (s - mean) / (std + ADV_STD_EPS);
            assert!((*got as f64 - want).abs() < 1e-5, "{got} vs {want}");
        }
        assert_eq!(d.zero_std_groups, 0);
        // the plain sum would let b's scale swamp a: group 0's advantages would be ±1 from a alone
        // and group 1's ±1 from b; decoupled keeps a's weight 1 against b's 0.5
        assert!(d.values[0].abs() > d.values[2].abs());
        // a group constant in every module counts as zero-std
        let c = decoupled_advantages(&[(1.0, vec![1.0, 1.0, 0.0, 1.0])], 2, false, 5.0).unwrap();
        assert_eq!(c.zero_std_groups, 1);
        assert!(decoupled_advantages(&[(1.0, a), (1.0, vec![1.0])], 2, false, 5.0).is_err());
    }
    use candle_core::{Device, Var};
    use rand::SeedableRng;

    fn close(a: f64, b: f64, tol: f64) -> bool {
        (a - b).abs() <= tol * (1.0 + b.abs())
    }

    fn assert_vec_close(got: &[f32], want: &[f64], tol: f64) {
        assert_eq!(got.len(), want.len(), "{got:?} vs {want:?}");
        for (i, (&g, &w)) in got.iter().zip(want).enumerate() {
            assert!(close(g as f64, w, tol), "[{i}] got {g}, want {w}");
        }
    }

    fn t64(v: &[f64]) -> Tensor {
        Tensor::new(v, &Device::Cpu).unwrap()
    }

    fn scalar(t: &Tensor) -> f64 {
        t.to_scalar::<f64>().unwrap()
    }

    #[test]
    fn advantages_group_std_and_zero_variance_group() {
        // Group 0: [1,2,3,4], mean 2.5, deviations ±0.5, ±1.5, population variance (2.25+0.25)·2/4 = 1.25.
        // Group 1: [5,5,5,5], std 0: A = 0/(0 + 1e-4) = 0, counted as a zero-std group.
        let adv = advantages(&[1., 2., 3., 4., 5., 5., 5., 5.], 4, false, 5.0).unwrap();
        let s = 1.25f64.sqrt() + 1e-4;
        assert_vec_close(
            &adv.values,
            &[-1.5 / s, -0.5 / s, 0.5 / s, 1.5 / s, 0., 0., 0., 0.],
            1e-6,
        );
        assert_eq!(adv.zero_std_groups, 1);
        assert_vec_close(&adv.std_used, &[1.25f64.sqrt(), 0.0], 1e-6);
    }

    #[test]
    fn advantages_global_std() {
        // Batch mean (10 + 20)/8 = 3.75; squared deviations 7.5625 + 3.0625 + 0.5625 + 0.0625 + 4·1.5625
        // = 17.5, /8 = 2.1875. Means stay per group, so group 1 still gets 0.
        let adv = advantages(&[1., 2., 3., 4., 5., 5., 5., 5.], 4, true, 5.0).unwrap();
        let sd = 2.1875f64.sqrt();
        let s = sd + 1e-4;
        assert_vec_close(
            &adv.values,
            &[-1.5 / s, -0.5 / s, 0.5 / s, 1.5 / s, 0., 0., 0., 0.],
            1e-6,
        );
        assert_eq!(adv.zero_std_groups, 1);
        assert_vec_close(&adv.std_used, &[sd, sd], 1e-6);
    }

    #[test]
    fn advantages_clamp_and_singleton_groups() {
        // 31 zeros and one 1: mean 1/32, std √31/32; the winner's (31/32)/(√31/32 + 1e-4) ≈ 5.566 → 5.
        let mut r = vec![0f32; 32];
        r[7] = 1.0;
        let adv = advantages(&r, 32, false, 5.0).unwrap();
        let s = 31f64.sqrt() / 32.0 + 1e-4;
        assert!((31.0 / 32.0) / s > 5.5);
        let mut want = vec![-(1.0 / 32.0) / s; 32];
        want[7] = 5.0;
        assert_vec_close(&adv.values, &want, 1e-6);
        assert_eq!(adv.zero_std_groups, 0);

        // group_size 1 (no per-prompt tracking in the reference): whole-batch mean 2 and std √(2/3).
        let adv = advantages(&[1., 2., 3.], 1, false, 5.0).unwrap();
        let s = (2.0f64 / 3.0).sqrt() + 1e-4;
        assert_vec_close(&adv.values, &[-1. / s, 0., 1. / s], 1e-6);
        assert_eq!(adv.zero_std_groups, 0);
    }

    #[test]
    fn advantages_reject_bad_input() {
        let e = advantages(&[1., 2., 3.], 2, false, 5.0).unwrap_err();
        assert!(e.to_string().contains("groups of 2"), "{e}");
        let e = advantages(&[1., f32::NAN, 3., 4.], 2, false, 5.0).unwrap_err();
        assert!(e.to_string().contains("reward 1 is NaN"), "{e}");
        let e = advantages(&[1., 2., 3., f32::INFINITY], 2, false, 5.0).unwrap_err();
        assert!(e.to_string().contains("reward 3 is inf"), "{e}");
        assert!(advantages(&[1., 2.], 0, false, 5.0).is_err());
        assert!(advantages(&[], 2, false, 5.0).is_err());
        assert!(advantages(&[1., 2.], 2, false, 0.0).is_err());
    }

    #[test]
    fn timestep_indices_are_distinct_and_uniform() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(7);
        let mut counts = [0usize; 7];
        let draws = 7000;
        for _ in 0..draws {
            let idx = draw_timestep_indices(&mut rng, 6, 4);
            assert_eq!(idx.len(), 4);
            let mut s = idx.clone();
            s.sort();
            s.dedup();
            assert_eq!(s.len(), 4, "{idx:?} has repeats");
            for i in idx {
                counts[i] += 1;
            }
        }
        // Each of the 7 indices is drawn with probability 4/7: 4000 expected, sd ≈ 41.
        for (i, &c) in counts.iter().enumerate() {
            assert!((3800..=4200).contains(&c), "index {i} drawn {c} times");
        }
        let mut all = draw_timestep_indices(&mut rng, 4, 5);
        all.sort();
        assert_eq!(all, vec![0, 1, 2, 3, 4]);
        assert!(draw_timestep_indices(&mut rng, 4, 0).is_empty());
    }

    #[test]
    #[should_panic(expected = "cannot draw 6 distinct")]
    fn timestep_indices_too_many() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(0);
        draw_timestep_indices(&mut rng, 4, 6);
    }

    #[test]
    fn per_sample_mse_means_all_but_batch() {
        let dev = Device::Cpu;
        let a = Tensor::new(&[[[1f32, 2.], [3., 4.]], [[0., 0.], [0., 0.]]], &dev).unwrap();
        let b = Tensor::new(&[[[1f32, 0.], [3., 0.]], [[1., 1.], [1., 3.]]], &dev).unwrap();
        // Sample 0: (0 + 4 + 0 + 16)/4 = 5; sample 1: (1 + 1 + 1 + 9)/4 = 3.
        let m = per_sample_mse(&a, &b).unwrap();
        assert_eq!(m.to_vec1::<f32>().unwrap(), vec![5.0, 3.0]);
        let h = per_sample_mse(
            &a.to_dtype(DType::BF16).unwrap(),
            &b.to_dtype(DType::BF16).unwrap(),
        )
        .unwrap();
        assert_eq!(h.dtype(), DType::F32);
        assert_eq!(h.to_vec1::<f32>().unwrap(), vec![5.0, 3.0]);
        assert!(per_sample_mse(&a, &b.flatten_from(1).unwrap()).is_err());
    }

    /// Two groups of two, β_dpo = 10, β_kl = 0.02, c = 0.05, ℓ_θ a leaf so ∂L/∂ℓ_i is visible.
    ///
    /// A = [1, −1 | 0.5, −0.5], ℓ_θ = [0.30, 0.50 | 0.20, 0.40], ℓ_ref = [0.40, 0.40 | 0.20, 0.30],
    /// ℓ_old = [0.40, 0.70 | 0.10, 0.30], kl = [0.1, 0.2, 0.3, 0.4].
    /// ρ = exp(ℓ_old − ℓ_θ) = [e^0.1, e^0.2, e^−0.1, e^−0.1] = [1.105, 1.221, 0.905, 0.905]:
    ///   0: A > 0, ρ > 1.05 → clipped;   1: A < 0, ρ > 1 but only ρ < 0.95 clips → kept;
    ///   2: A > 0, ρ < 1 → kept;          3: A < 0, ρ < 0.95 → clipped.  clip_frac = 2/4.
    fn example() -> (Var, Tensor, Tensor, Tensor, [f32; 4]) {
        let lt = Var::from_tensor(&t64(&[0.30, 0.50, 0.20, 0.40])).unwrap();
        (
            lt,
            t64(&[0.40, 0.40, 0.20, 0.30]),
            t64(&[0.40, 0.70, 0.10, 0.30]),
            t64(&[0.1, 0.2, 0.3, 0.4]),
            [1.0, -1.0, 0.5, -0.5],
        )
    }

    #[test]
    fn dgpo_loss_hand_computed() {
        let (lt, lr, lo, kl, a) = example();
        let mut p = DgpoParams {
            beta_dpo: 10.0,
            beta_kl: 0.02,
            clip_range: 0.05,
            use_ema_ref: false,
        };
        let terms = dgpo_loss(lt.as_tensor(), &lr, &lo, &kl, &a, 2, &p).unwrap();
        // s_0 = [1·10·(0.30−0.40) + (−1)·10·(0.50−0.40)]/2 = (−1 − 1)/2 = −1,    w_0 = σ(−1)    = 0.268941421
        // s_1 = [0.5·10·(0.20−0.20) + (−0.5)·10·(0.40−0.30)]/2 = (0 − 0.5)/2 = −0.25, w_1 = σ(−0.25) = 0.437823499
        let (w0, w1) = (0.2689414213699951, 0.43782349911420193);
        assert_vec_close(&terms.group_scores, &[-1.0, -0.25], 1e-6);
        assert_vec_close(&terms.group_weights, &[w0, w1], 1e-6);
        // policy = ¼[w_0(1·0.30 − 1·0.50) + w_1(0.5·0.20 − 0.5·0.40)] = ¼[−0.2·w_0 − 0.1·w_1] = −0.0243926585
        // (clipping changes no value); KL = 0.02 · mean(kl) = 0.02 · 0.25 = 0.005; L = −0.0193926585.
        let policy = (-0.2 * w0 - 0.1 * w1) / 4.0;
        assert!(close(policy, -0.024392658545, 1e-9));
        assert!(close(terms.policy_loss as f64, policy, 1e-6));
        assert!(close(terms.kl as f64, 0.25, 1e-6));
        assert!(close(scalar(&terms.loss), policy + 0.005, 1e-12));
        assert_eq!(terms.clip_frac, 0.5);
        // ∂L/∂ℓ_i = w_g·A_i/4, zero for the clipped 0 and 3; ∂L/∂kl_i = β_kl/4 (kl is never detached).
        let kl_var = Var::from_tensor(&kl).unwrap();
        let terms = dgpo_loss(lt.as_tensor(), &lr, &lo, kl_var.as_tensor(), &a, 2, &p).unwrap();
        let grads = terms.loss.backward().unwrap();
        let gl = grads.get(lt.as_tensor()).unwrap().to_vec1::<f64>().unwrap();
        let want = [0.0, -w0 / 4.0, 0.5 * w1 / 4.0, 0.0];
        for (g, w) in gl.iter().zip(want) {
            assert!(close(*g, w, 1e-12), "{gl:?} vs {want:?}");
        }
        let gk = grads
            .get(kl_var.as_tensor())
            .unwrap()
            .to_vec1::<f64>()
            .unwrap();
        assert!(gk.iter().all(|&g| close(g, 0.005, 1e-12)), "{gk:?}");

        // use_ema_ref: ℓ_old replaces ℓ_ref in the score.
        // s_0 = [1·10·(0.30−0.40) + (−1)·10·(0.50−0.70)]/2 = (−1 + 2)/2 = 0.5,  w_0 = σ(0.5) = 0.622459331
        // s_1 = [0.5·10·(0.20−0.10) + (−0.5)·10·(0.40−0.30)]/2 = (0.5 − 0.5)/2 = 0, w_1 = 0.5
        // L = ¼[−0.2·0.622459331 − 0.1·0.5] + 0.005 = −0.0436229666 + 0.005 = −0.0386229666.
        p.use_ema_ref = true;
        let terms = dgpo_loss(lt.as_tensor(), &lr, &lo, &kl, &a, 2, &p).unwrap();
        let w0 = 0.6224593312018546;
        assert_vec_close(&terms.group_scores, &[0.5, 0.0], 1e-6);
        assert_vec_close(&terms.group_weights, &[w0, 0.5], 1e-6);
        assert!(close(
            scalar(&terms.loss),
            (-0.2 * w0 - 0.05) / 4.0 + 0.005,
            1e-12
        ));
        assert!(close(scalar(&terms.loss), -0.0386229666, 1e-8));
        assert_eq!(terms.clip_frac, 0.5);

        // β_kl = 0: the KL term is left out (as `if config.train.beta > 0`) but still reported.
        p.beta_kl = 0.0;
        let terms = dgpo_loss(lt.as_tensor(), &lr, &lo, &kl, &a, 2, &p).unwrap();
        assert!(close(scalar(&terms.loss), terms.policy_loss as f64, 1e-6));
        assert!(close(terms.kl as f64, 0.25, 1e-6));
    }

    // Per-sample losses as functions of θ ∈ R^D: ℓ_i = mean_d (x_i − θ)², kl_i = mean_d (θ − y_i)².
    const D: usize = 3;
    const X: [[f64; D]; 4] = [
        [0.3, -0.2, 0.5],
        [1.0, 0.4, -0.7],
        [-0.6, 0.9, 0.2],
        [0.1, 0.1, -0.4],
    ];
    const Y: [[f64; D]; 4] = [
        [0.2, 0.0, 0.1],
        [-0.3, 0.5, 0.4],
        [0.6, -0.1, 0.0],
        [0.0, 0.3, -0.2],
    ];

    fn msd(x: &[f64; D], th: &[f64]) -> f64 {
        x.iter()
            .zip(th)
            .map(|(a, b)| (a - b) * (a - b))
            .sum::<f64>()
            / D as f64
    }

    /// ℓ(θ) and kl(θ) as differentiable [n] tensors.
    fn losses_of(theta: &Var) -> (Tensor, Tensor) {
        let dev = Device::Cpu;
        let th = theta
            .as_tensor()
            .unsqueeze(0)
            .unwrap()
            .broadcast_as((4, D))
            .unwrap();
        let x = Tensor::new(&X, &dev).unwrap();
        let y = Tensor::new(&Y, &dev).unwrap();
        (
            per_sample_mse(&x, &th).unwrap(),
            per_sample_mse(&th, &y).unwrap(),
        )
    }

    #[test]
    fn dgpo_gradient_matches_closed_form_and_finite_differences() {
        let theta0 = [0.1, -0.3, 0.2];
        let theta = Var::new(&theta0, &Device::Cpu).unwrap();
        let (lt, kl) = losses_of(&theta);
        let l0: Vec<f64> = X.iter().map(|x| msd(x, &theta0)).collect();
        let a = [1.3f32, -1.3, -0.4, 0.4];
        let lr = t64(&[0.2, 0.5, 0.3, 0.6]);
        // ℓ_old = ℓ(θ0) + δ, ρ = e^δ: sample 0 (A > 0, ρ = e^0.2 > 1.05) is clipped; 1 (A < 0, ρ = 1),
        // 2 (A < 0, ρ = e^0.3: large, but the wrong side) and 3 (A > 0, ρ = e^0.01 < 1.05) are not.
        let lo = t64(&[l0[0] + 0.2, l0[1], l0[2] + 0.3, l0[3] + 0.01]);
        let p = DgpoParams {
            beta_dpo: 3.0,
            beta_kl: 0.1,
            clip_range: 0.05,
            use_ema_ref: false,
        };
        let terms = dgpo_loss(&lt, &lr, &lo, &kl, &a, 2, &p).unwrap();
        assert_eq!(terms.clip_frac, 0.25);
        // The weights, independently: s_g = Σ A_i·β·(ℓ_i − ℓ_ref_i)/2.
        let lrv = [0.2, 0.5, 0.3, 0.6];
        let w: Vec<f64> = (0..2)
            .map(|g| {
                let s: f64 = (2 * g..2 * g + 2)
                    .map(|i| a[i] as f64 * 3.0 * (l0[i] - lrv[i]) / 2.0)
                    .sum();
                sigmoid(s)
            })
            .collect();
        assert_vec_close(&terms.group_weights, &w, 1e-6);
        let clipped = [true, false, false, false];
        let n = 4.0;

        let grads = terms.loss.backward().unwrap();
        let g = grads
            .get(theta.as_tensor())
            .unwrap()
            .to_vec1::<f64>()
            .unwrap();

        // Closed form: ∇L = (1/n) Σ_{i unclipped} w_g A_i ∇ℓ_i + β_kl (1/n) Σ_i ∇kl_i,
        // ∇ℓ_i = −2(x_i − θ)/D, ∇kl_i = 2(θ − y_i)/D.
        for d in 0..D {
            let mut want = 0.0;
            for i in 0..4 {
                if !clipped[i] {
                    let dl = -2.0 * (X[i][d] - theta0[d]) / D as f64;
                    want += w[i / 2] * a[i] as f64 * dl / n;
                }
                want += 0.1 * 2.0 * (theta0[d] - Y[i][d]) / D as f64 / n;
            }
            assert!((g[d] - want).abs() < 1e-5, "d={d}: {} vs {want}", g[d]);
            assert!((g[d] - want).abs() < 1e-12 * (1.0 + want.abs()));
        }

        // Finite differences of L with the detached terms (w_g, the clip set, the clipped ℓ) held fixed.
        let frozen = |th: &[f64]| -> f64 {
            let mut l = 0.0;
            for i in 0..4 {
                let li = if clipped[i] { l0[i] } else { msd(&X[i], th) };
                l += w[i / 2] * a[i] as f64 * li / n + 0.1 * msd(&Y[i], th) / n;
            }
            l
        };
        assert!((frozen(&theta0) - scalar(&terms.loss)).abs() < 1e-14);
        let h = 1e-4;
        for d in 0..D {
            let (mut up, mut dn) = (theta0, theta0);
            up[d] += h;
            dn[d] -= h;
            let fd = (frozen(&up) - frozen(&dn)) / (2.0 * h);
            assert!((g[d] - fd).abs() < 1e-5, "d={d}: {} vs fd {fd}", g[d]);
        }
    }

    /// −log σ(m) for a scalar tensor m, differentiably: log(1 + e^{−m}).
    fn neg_log_sigmoid(m: &Tensor) -> Tensor {
        m.neg()
            .unwrap()
            .exp()
            .unwrap()
            .affine(1.0, 1.0)
            .unwrap()
            .log()
            .unwrap()
    }

    #[test]
    fn bradley_terry_gradient_is_parallel_to_dgpo() {
        let beta = 2.0;
        let a4 = [1.2f32, 0.3, -0.5, -1.0];
        let lr4 = [0.3, 0.2, 0.6, 0.4];
        let p = DgpoParams {
            beta_dpo: beta,
            beta_kl: 0.0,
            clip_range: 1e9, // never clips: ρ > 1 + 1e9 or ρ < 1 − 1e9 < 0 cannot hold here
            use_ema_ref: false,
        };
        let grad = |loss: &Tensor, theta: &Var| -> Vec<f64> {
            let g = loss.backward().unwrap();
            g.get(theta.as_tensor()).unwrap().to_vec1::<f64>().unwrap()
        };
        // The BT margin R(G⁺) − R(G⁻) = Σ_{A>0}|A_i| r_i − Σ_{A<0}|A_i| r_i, r_i = −β(ℓ_i − ℓ_ref_i).
        let margin = |lt: &Tensor, a: &[f32], lr: &[f64]| -> Tensor {
            let (pos, neg): (Vec<f64>, Vec<f64>) = a
                .iter()
                .map(|&x| {
                    let x = x as f64;
                    (x.max(0.0), (-x).max(0.0))
                })
                .unzip();
            let r = (lt - t64(lr)).unwrap().affine(-beta, 0.0).unwrap();
            let rp = (&r * t64(&pos)).unwrap().sum_all().unwrap();
            let rn = (&r * t64(&neg)).unwrap().sum_all().unwrap();
            (rp - rn).unwrap()
        };

        // One group, n = G = 4.
        let theta = Var::new(&[0.1, -0.3, 0.2], &Device::Cpu).unwrap();
        let (lt, _) = losses_of(&theta);
        let zeros = lt.zeros_like().unwrap();
        let terms = dgpo_loss(&lt, &t64(&lr4), &lt.detach(), &zeros, &a4, 4, &p).unwrap();
        assert_eq!(terms.clip_frac, 0.0);
        let s = terms.group_scores[0] as f64;
        let g_dgpo = grad(&terms.loss, &theta);
        let m = margin(&lt, &a4, &lr4);
        // The margin is −G·s_g.
        assert!(
            close(scalar(&m), -4.0 * s, 1e-6),
            "{} vs {}",
            scalar(&m),
            -4.0 * s
        );
        // (a) −log σ(margin/G): ∇ = (β/G)·σ(s)·Σ A_i∇ℓ_i = (β·n/G)·∇L = β·∇L here.
        let g_bt = grad(&neg_log_sigmoid(&m.affine(0.25, 0.0).unwrap()), &theta);
        for (gb, gd) in g_bt.iter().zip(&g_dgpo) {
            assert!(
                (gb - beta * gd).abs() < 1e-5 * (1.0 + gb.abs()),
                "{g_bt:?} vs β·{g_dgpo:?}"
            );
        }
        // (b) −log σ(margin): ∇ = β·σ(G·s)·Σ A_i∇ℓ_i = β·n·σ(G·s)/σ(s) · ∇L — parallel, other factor.
        let g_bt = grad(&neg_log_sigmoid(&m), &theta);
        let k = beta * 4.0 * sigmoid(4.0 * s) / sigmoid(s);
        for (gb, gd) in g_bt.iter().zip(&g_dgpo) {
            assert!(
                (gb - k * gd).abs() < 1e-5 * (1.0 + gb.abs()),
                "{g_bt:?} vs {k}·{g_dgpo:?}"
            );
        }
        assert!(
            (k - beta).abs() > 0.1,
            "the example should tell (a) from (b): k = {k}"
        );

        // Two groups of two, n = 4: Σ_g −log σ(margin_g/G) has gradient (β·n/G)·∇L = 2β·∇L.
        let a2 = [0.7f32, -0.7, -1.1, 1.1];
        let terms = dgpo_loss(&lt, &t64(&lr4), &lt.detach(), &zeros, &a2, 2, &p).unwrap();
        let g_dgpo = grad(&terms.loss, &theta);
        let mut bt = Tensor::new(0f64, &Device::Cpu).unwrap();
        for g in 0..2 {
            let lt_g = lt.narrow(0, 2 * g, 2).unwrap();
            let m = margin(&lt_g, &a2[2 * g..2 * g + 2], &lr4[2 * g..2 * g + 2]);
            assert!(close(scalar(&m), -2.0 * terms.group_scores[g] as f64, 1e-6));
            bt = (bt + neg_log_sigmoid(&m.affine(0.5, 0.0).unwrap())).unwrap();
        }
        let g_bt = grad(&bt, &theta);
        for (gb, gd) in g_bt.iter().zip(&g_dgpo) {
            assert!(
                (gb - 2.0 * beta * gd).abs() < 1e-5 * (1.0 + gb.abs()),
                "{g_bt:?} vs 2β·{g_dgpo:?}"
            );
        }
    }

    #[test]
    fn dgpo_loss_rejects_bad_input() {
        let (lt, lr, lo, kl, a) = example();
        let p = DgpoParams {
            beta_dpo: 10.0,
            beta_kl: 0.02,
            clip_range: 0.05,
            use_ema_ref: false,
        };
        let lt = lt.as_tensor();
        let short = t64(&[0.1, 0.2, 0.3]);
        let e = dgpo_loss(lt, &short, &lo, &kl, &a, 2, &p).unwrap_err();
        assert!(
            e.to_string().contains("l_ref has shape [3], expected [4]"),
            "{e}"
        );
        let e = dgpo_loss(lt, &lr, &lo, &short, &a, 2, &p).unwrap_err();
        assert!(e.to_string().contains("kl has shape [3]"), "{e}");
        let e = dgpo_loss(lt, &lr, &lo, &kl, &a[..3], 1, &p).unwrap_err();
        assert!(
            e.to_string()
                .contains("l_theta has shape [4], expected [3]"),
            "{e}"
        );
        let e = dgpo_loss(lt, &lr, &lo, &kl, &a[..3], 2, &p).unwrap_err();
        assert!(
            e.to_string()
                .contains("3 samples does not hold whole groups of 2"),
            "{e}"
        );
        let e = dgpo_loss(lt, &lr, &lo, &kl, &a, 3, &p).unwrap_err();
        assert!(e.to_string().contains("whole groups of 3"), "{e}");
        assert!(dgpo_loss(lt, &lr, &lo, &kl, &a, 0, &p).is_err());
        let e = dgpo_loss(lt, &lr, &t64(&[0.1, f64::NAN, 0.2, 0.3]), &kl, &a, 2, &p).unwrap_err();
        assert!(e.to_string().contains("l_old[1] is NaN"), "{e}");
        let e = dgpo_loss(lt, &lr, &lo, &kl, &[1.0, f32::NAN, 0.0, 0.0], 2, &p).unwrap_err();
        assert!(e.to_string().contains("advantage 1 is NaN"), "{e}");
        let bad = DgpoParams {
            clip_range: -1.0,
            ..p
        };
        assert!(dgpo_loss(lt, &lr, &lo, &kl, &a, 2, &bad).is_err());
    }
}
