//! What DGPO and Flow-GRPO do differently inside one epoch, behind one trait: how a rollout batch is
//! sampled (DGPO: the deterministic ODE; Flow-GRPO: the SDE with its log-probabilities kept), which
//! step indices are trained, and what one pass over a micro-batch differentiates. The equations are
//! in [`crate::train::dgpo`] and [`crate::train::flow_grpo`]; see docs/algorithm.md.

use crate::config::{Algorithm, SampleConfig, Sampler, TrainConfig};
use crate::model::{MMDiT, VarGrads, Weights};
use crate::sampling::{
    guided_velocity_at, sample, seeded_randn as randn, velocity_sharded, Conditioning, Schedule,
};
use crate::train::dgpo::{dgpo_loss, draw_timestep_indices, per_sample_mse, DgpoParams};
use crate::train::flow_grpo::{grpo_loss, sde_step, SdeStep, Trajectory};
use crate::train::policy::{Policies, Policy};
use anyhow::{Context, Result};
use candle_core::{DType, Tensor};
use rand::rngs::StdRng;
use rand::seq::SliceRandom;

/// One training micro-batch of an epoch, with what every pass over it needs.
pub struct MicroBatch<'a> {
    pub model: &'a MMDiT,
    /// The weights as of this pass's optimizer step.
    pub policies: &'a Policies<'a>,
    pub sched: &'a Schedule,
    /// The rollouts' final samples.
    pub x0: Tensor,
    pub cond: Conditioning,
    /// The empty prompt's conditioning (one row).
    pub empty: &'a Conditioning,
    pub adv: &'a [f32],
    /// Offset of the micro-batch in the epoch's rollouts.
    pub lo: usize,
    pub group: usize,
    pub workers: usize,
    /// Passes of the epoch (micro-batches × step indices): each gradient is scaled by `1 / passes`.
    pub passes: f64,
}

impl MicroBatch<'_> {
    pub fn len(&self) -> usize {
        self.adv.len()
    }

    pub fn is_empty(&self) -> bool {
        self.adv.is_empty()
    }
}

/// What one worker's shard of a training pass reports: its loss terms, its share of the
/// micro-batch, the loss value and the gradients (`None` when the loss is not finite).
pub struct ShardPass {
    pub policy_loss: f32,
    pub kl: f32,
    pub clip_frac: f32,
    /// DGPO: the mean group weight `σ(s_g)` of the shard's groups (0 for Flow-GRPO).
    pub weight: f32,
    pub share: f64,
    pub loss: f32,
    /// The trainable weights' gradients only ([`MMDiT::trainable_grads`]).
    pub grads: Option<VarGrads>,
}

impl ShardPass {
    /// A shard from `[policy loss, KL, clip fraction, mean weight]`, its share, loss and gradients.
    pub fn new(
        [policy_loss, kl, clip_frac, weight]: [f32; 4],
        share: f64,
        loss: f32,
        grads: Option<VarGrads>,
    ) -> Self {
        Self {
            policy_loss,
            kl,
            clip_frac,
            weight,
            share,
            loss,
            grads,
        }
    }

    /// A shard's pass from its loss and terms: the loss, when finite, is backpropagated with
    /// weight `share / passes`.
    pub fn backprop(
        model: &MMDiT,
        loss: &Tensor,
        terms: [f32; 4],
        share: f64,
        passes: f64,
    ) -> Result<Self> {
        let lv = loss.to_dtype(DType::F32)?.to_scalar::<f32>()?;
        let grads = if lv.is_finite() {
            Some(model.trainable_grads(&(loss * (share / passes))?.backward()?))
        } else {
            None
        };
        Ok(Self::new(terms, share, lv, grads))
    }
}

/// One rollout batch to sample.
pub struct RolloutBatch<'a> {
    pub model: &'a MMDiT,
    pub policies: &'a Policies<'a>,
    pub sched: &'a Schedule,
    pub noise: &'a Tensor,
    pub cond: &'a Conditioning,
    pub uncond: &'a Conditioning,
    pub guidance: f64,
}

pub trait Objective: Sync {
    /// The algorithm's name in messages.
    fn name(&self) -> &'static str;
    /// What to change when its loss is not finite.
    fn nan_hint(&self) -> &'static str;
    /// The weights the rollouts are sampled with (`policy` or `ema_ref`), for the metrics.
    fn rollout_weights(&self) -> &'static str;
    /// Sample one rollout batch; returns the final samples `x0`. Further noise comes from `rng`.
    fn rollout(&mut self, b: &RolloutBatch, rng: &mut StdRng) -> Result<Tensor>;
    /// Called once after the epoch's last rollout batch.
    fn end_rollouts(&mut self) -> Result<()> {
        Ok(())
    }
    /// The rollout step indices trained this epoch.
    fn train_steps(&self, rng: &mut StdRng, sched: &Schedule) -> Vec<usize>;
    /// One pass over a micro-batch at step index `j`: the shards' loss terms and gradients.
    fn pass(&self, mb: &MicroBatch, j: usize, rng: &mut StdRng) -> Result<Vec<ShardPass>>;
}

/// The objective of `train.algorithm` for an epoch that starts after `opt_step` optimizer steps.
pub fn for_epoch<'a>(
    train: &'a TrainConfig,
    sample: &SampleConfig,
    opt_step: u64,
) -> Box<dyn Objective + 'a> {
    match train.algorithm {
        Algorithm::Dgpo => Box::new(Dgpo::new(train, sample.sampler, opt_step)),
        Algorithm::FlowGrpo => Box::new(FlowGrpo {
            train,
            guidance: sample.guidance_scale,
            trajectories: vec![],
            trajectory: None,
        }),
    }
}

/// DGPO: deterministic rollouts (under the EMA-reference once `train.switch_ema_ref` steps are
/// done), and at each drawn step index the group-weighted flow-matching loss.
pub struct Dgpo<'a> {
    train: &'a TrainConfig,
    sampler: Sampler,
    params: DgpoParams,
    rollout_policy: Policy,
}

impl<'a> Dgpo<'a> {
    fn new(train: &'a TrainConfig, sampler: Sampler, opt_step: u64) -> Self {
        let rollout_policy = if opt_step as usize > train.switch_ema_ref {
            Policy::EmaReference
        } else {
            Policy::Current
        };
        Self {
            params: DgpoParams {
                beta_dpo: train.beta_dpo,
                beta_kl: train.beta_kl,
                clip_range: train.clip_range,
                use_ema_ref: train.use_ema_ref,
            },
            train,
            sampler,
            rollout_policy,
        }
    }
}

impl Objective for Dgpo<'_> {
    fn name(&self) -> &'static str {
        "DGPO"
    }

    fn nan_hint(&self) -> &'static str {
        "lower train.learning_rate or train.beta_dpo"
    }

    fn rollout_weights(&self) -> &'static str {
        match self.rollout_policy {
            Policy::EmaReference => "ema_ref",
            _ => "policy",
        }
    }

    fn rollout(&mut self, b: &RolloutBatch, _rng: &mut StdRng) -> Result<Tensor> {
        b.policies.no_grad(self.rollout_policy, |w| {
            sample(
                b.model,
                self.sampler,
                b.sched,
                b.noise,
                b.cond,
                Some(b.uncond),
                b.guidance,
                w,
            )
        })
    }

    fn train_steps(&self, rng: &mut StdRng, _sched: &Schedule) -> Vec<usize> {
        draw_timestep_indices(rng, self.train.trunc_steps, self.train.num_train_timesteps)
    }

    /// One noise per group, shared by its members: `x_t = (1 − σ)·x0 + σ·ε`, target `ε − x0`; the
    /// frozen velocities over the whole micro-batch (sharded over the worker threads inside), then
    /// the policy's forward, loss and backward — whole, or `train.backward_chunk` images at a time.
    fn pass(&self, mb: &MicroBatch, j: usize, rng: &mut StdRng) -> Result<Vec<ShardPass>> {
        let (n, g) = (mb.len(), mb.group);
        let dev = mb.x0.device();
        let (_, c, h, w) = mb.x0.dims4()?;
        let sigma = mb.sched.train_sigma(j);
        let group_noise = randn(rng, (n / g, c, h, w), dev)?;
        let member_of: Vec<u32> = (0..n).map(|i| (i / g) as u32).collect();
        let eps = group_noise.index_select(&Tensor::new(member_of.as_slice(), dev)?, 0)?;
        let xt = ((&mb.x0 * (1.0 - sigma as f64))? + (&eps * sigma as f64)?)?;
        let target = (&eps - &mb.x0)?;
        let timestep = mb.sched.timesteps[j];
        let m = mb.model;
        let train = self.train;
        let uncond = (train.kl_cfg > 1.0)
            .then(|| mb.empty.repeat(n))
            .transpose()?;
        let v_ref = mb.policies.no_grad(Policy::Reference, |w| {
            velocity_sharded(m, &xt, timestep, &mb.cond, uncond.as_ref(), train.kl_cfg, w)
        })?;
        let v_old = mb.policies.no_grad(Policy::EmaReference, |w| {
            velocity_sharded(m, &xt, timestep, &mb.cond, None, 1.0, w)
        })?;
        let p = DgpoPass {
            mb,
            xt: &xt,
            target: &target,
            v_ref: &v_ref,
            v_old: &v_old,
            timestep,
            params: &self.params,
        };
        if train.gradient_checkpointing || (train.backward_chunk > 0 && train.backward_chunk < n) {
            let chunk = match train.backward_chunk {
                0 => n.div_ceil(mb.workers.max(1)),
                c => c,
            };
            p.chunked(chunk, train.gradient_checkpointing)
        } else {
            p.whole()
        }
    }
}

/// The tensors of one DGPO pass over a micro-batch.
struct DgpoPass<'a> {
    mb: &'a MicroBatch<'a>,
    xt: &'a Tensor,
    target: &'a Tensor,
    v_ref: &'a Tensor,
    v_old: &'a Tensor,
    timestep: f32,
    params: &'a DgpoParams,
}

impl DgpoPass<'_> {
    /// The policy's velocities on rows `r` with graph, and the per-image terms the loss depends
    /// on them through: `l_θ,i = ‖v_θ − (ε − x0)‖²` and `kl_i = ‖v_θ − v_ref‖²`.
    fn policy_terms(&self, r: std::ops::Range<usize>) -> Result<(Tensor, Tensor, Tensor)> {
        let (lo, len) = (r.start, r.len());
        let cond = self.mb.cond.narrow(r)?;
        let xt = self.xt.narrow(0, lo, len)?;
        let timesteps = Tensor::full(self.timestep, len, self.xt.device())?;
        let v = self.mb.model.forward(
            &xt,
            &timesteps,
            &cond.context,
            &cond.pooled,
            Weights::Policy,
        )?;
        let l_theta = per_sample_mse(&self.target.narrow(0, lo, len)?, &v)?;
        let kl = per_sample_mse(&v, &self.v_ref.narrow(0, lo, len)?.detach())?;
        Ok((v, l_theta, kl))
    }

    /// The loss over the whole micro-batch: one shard of whole groups per worker thread. The loss
    /// is a mean over samples, so shard losses weighted by their share sum to it.
    fn whole(&self) -> Result<Vec<ShardPass>> {
        let (n, g) = (self.mb.len(), self.mb.group);
        let ranges = crate::par::shards(n, self.mb.workers, g);
        crate::par::map_shards(&ranges, |r| {
            let (lo, len) = (r.start, r.len());
            let (_, l_theta, kl) = self.policy_terms(r.clone())?;
            let l_ref = per_sample_mse(
                &self.target.narrow(0, lo, len)?,
                &self.v_ref.narrow(0, lo, len)?,
            )?;
            let l_old = per_sample_mse(
                &self.target.narrow(0, lo, len)?,
                &self.v_old.narrow(0, lo, len)?,
            )?;
            let adv = &self.mb.adv[r];
            let terms = dgpo_loss(&l_theta, &l_ref, &l_old, &kl, adv, g, self.params)?;
            ShardPass::backprop(
                self.mb.model,
                &terms.loss,
                [
                    terms.policy_loss,
                    terms.kl,
                    terms.clip_frac,
                    terms.mean_weight(),
                ],
                len as f64 / n as f64,
                self.mb.passes,
            )
        })
    }

    /// The same gradient with bounded activation memory, `chunk` images differentiated at a time.
    /// The loss couples a group's images only through their `l_θ,i` and `kl_i`, so its gradient is
    /// `Σ_i ∂L/∂l_θ,i · ∇l_θ,i + ∂L/∂kl_i · ∇kl_i`: a forward without graph gives every `l_θ,i` and
    /// `kl_i`; the loss differentiated with respect to those numbers gives the coefficients; then
    /// each chunk is run with graph and `Σ coef · term` differentiated (chunks spread over the
    /// worker threads). With `checkpoint`, each chunk's backward recomputes the transformer one
    /// block at a time. The loss terms travel with the first chunk.
    fn chunked(&self, chunk: usize, checkpoint: bool) -> Result<Vec<ShardPass>> {
        let mb = self.mb;
        let (n, m) = (mb.len(), mb.model);
        let dev = self.xt.device().clone();
        let v_pol = velocity_sharded(
            m,
            self.xt,
            self.timestep,
            &mb.cond,
            None,
            1.0,
            Weights::PolicyNoGrad,
        )?;
        let l_theta = candle_core::Var::from_tensor(&per_sample_mse(self.target, &v_pol)?)?;
        let kl = candle_core::Var::from_tensor(&per_sample_mse(&v_pol, self.v_ref)?)?;
        let l_ref = per_sample_mse(self.target, self.v_ref)?;
        let l_old = per_sample_mse(self.target, self.v_old)?;
        let terms = dgpo_loss(
            l_theta.as_tensor(),
            &l_ref,
            &l_old,
            kl.as_tensor(),
            mb.adv,
            mb.group,
            self.params,
        )?;
        let reported = [
            terms.policy_loss,
            terms.kl,
            terms.clip_frac,
            terms.mean_weight(),
        ];
        let lv = terms.loss.to_dtype(DType::F32)?.to_scalar::<f32>()?;
        if !lv.is_finite() {
            return Ok(vec![ShardPass::new(reported, 1.0, lv, None)]);
        }
        let coef = terms.loss.backward()?;
        let zeros = Tensor::zeros(n, DType::F32, &dev)?;
        let c_theta = coef.get(l_theta.as_tensor()).unwrap_or(&zeros).clone();
        let c_kl = coef.get(kl.as_tensor()).unwrap_or(&zeros).clone();
        let chunks: Vec<std::ops::Range<usize>> = (0..n)
            .step_by(chunk)
            .map(|s| s..(s + chunk).min(n))
            .collect();
        let surrogate = |lo: usize, len: usize, lt: &Tensor, k: &Tensor| -> Result<Tensor> {
            let s = ((lt * c_theta.narrow(0, lo, len)?)?.sum_all()?
                + (k * c_kl.narrow(0, lo, len)?)?.sum_all()?)?;
            Ok((s / mb.passes)?)
        };
        let mut out = vec![];
        for wave in chunks.chunks(mb.workers.max(1)) {
            out.extend(crate::par::map_shards(wave, |r| {
                let (lo, len) = (r.start, r.len());
                let grads = if checkpoint {
                    // The gradient at the output, from the no-graph velocities computed above;
                    // then the transformer's backward one recomputed block at a time.
                    let v = candle_core::Var::from_tensor(&v_pol.narrow(0, lo, len)?)?;
                    let lt = per_sample_mse(&self.target.narrow(0, lo, len)?, v.as_tensor())?;
                    let k =
                        per_sample_mse(v.as_tensor(), &self.v_ref.narrow(0, lo, len)?.detach())?;
                    let mut g = surrogate(lo, len, &lt, &k)?.backward()?;
                    let gv = g
                        .remove(v.as_tensor())
                        .context("the DGPO loss gave no gradient for the velocities")?;
                    let cond = mb.cond.narrow(r.clone())?;
                    let timesteps = Tensor::full(self.timestep, len, &dev)?;
                    let xt = self.xt.narrow(0, lo, len)?;
                    m.checkpointed_backward(&xt, &timesteps, &cond.context, &cond.pooled, &gv)?
                } else {
                    let (_, lt, k) = self.policy_terms(r.clone())?;
                    m.trainable_grads(&surrogate(lo, len, &lt, &k)?.backward()?)
                };
                let first = lo == 0;
                let f = |x: f32| if first { x } else { 0.0 };
                Ok(ShardPass::new(
                    reported.map(f),
                    if first { 1.0 } else { 0.0 },
                    f(lv),
                    Some(grads),
                ))
            })?);
        }
        Ok(out)
    }
}

/// Flow-GRPO: on-policy SDE rollouts with their trajectories and log-probabilities kept, and at
/// each trained step the PPO-clipped ratio of the stored transition.
pub struct FlowGrpo<'a> {
    train: &'a TrainConfig,
    /// `sample.guidance_scale`, the rollouts' CFG (also the passes' with `train.grpo_train_cfg`).
    guidance: f64,
    trajectories: Vec<Trajectory>,
    trajectory: Option<Trajectory>,
}

impl Objective for FlowGrpo<'_> {
    fn name(&self) -> &'static str {
        "Flow-GRPO"
    }

    fn nan_hint(&self) -> &'static str {
        "lower train.learning_rate"
    }

    fn rollout_weights(&self) -> &'static str {
        "policy"
    }

    fn rollout(&mut self, b: &RolloutBatch, rng: &mut StdRng) -> Result<Tensor> {
        let (n, c, h, w) = b.noise.dims4()?;
        let z = (0..b.sched.num_steps())
            .map(|_| randn(rng, (n, c, h, w), b.noise.device()))
            .collect::<Result<Vec<_>>>()?;
        let tr = crate::train::flow_grpo::sde_rollout(
            b.model,
            b.sched,
            b.noise,
            &z,
            b.cond,
            Some(b.uncond),
            b.guidance,
            self.train.noise_level,
            Weights::PolicyNoGrad,
        )?;
        let x0 = tr.latents[b.sched.num_steps()].clone();
        self.trajectories.push(tr);
        Ok(x0)
    }

    fn end_rollouts(&mut self) -> Result<()> {
        self.trajectory = Some(Trajectory::cat(&std::mem::take(&mut self.trajectories))?);
        Ok(())
    }

    fn train_steps(&self, rng: &mut StdRng, sched: &Schedule) -> Vec<usize> {
        let mut all: Vec<usize> = (0..sched.num_steps()).collect();
        all.shuffle(rng);
        all.truncate(crate::train::flow_grpo::num_train_steps(
            sched.num_steps(),
            self.train.timestep_fraction,
        ));
        all.sort_unstable();
        all
    }

    fn pass(&self, mb: &MicroBatch, j: usize, _rng: &mut StdRng) -> Result<Vec<ShardPass>> {
        let traj = self
            .trajectory
            .as_ref()
            .context("Flow-GRPO: a pass before the epoch's rollouts ended")?;
        grpo_pass(mb, traj, j, self.train, self.guidance)
    }
}

/// One Flow-GRPO pass over a micro-batch at rollout step `j`: the policy's SDE-step
/// log-probability of the stored transition `x_j → x_{j+1}` (CFG `guidance` as in the rollout when
/// `train.grpo_train_cfg`), the reference's step mean for the KL term, the loss of [`grpo_loss`] and
/// its gradient (scaled by the shard's share over the epoch's passes), one shard of whole groups per
/// worker thread.
pub fn grpo_pass(
    mb: &MicroBatch,
    traj: &Trajectory,
    j: usize,
    train: &TrainConfig,
    guidance: f64,
) -> Result<Vec<ShardPass>> {
    let n = mb.len();
    let sig = &mb.sched.sigmas;
    let (sigma, sigma_next) = (f64::from(sig[j]), f64::from(sig[j + 1]));
    let sigma_max = f64::from(sig[1.min(sig.len() - 1)]);
    let timestep = mb.sched.timesteps[j];
    let xj = traj.latents[j].narrow(0, mb.lo, n)?;
    let xn = traj.latents[j + 1].narrow(0, mb.lo, n)?;
    let old = traj
        .log_probs
        .narrow(0, mb.lo, n)?
        .narrow(1, j, 1)?
        .squeeze(1)?;
    let uncond = mb.empty.repeat(n)?;
    let w = if train.grpo_train_cfg { guidance } else { 1.0 };
    let ranges = crate::par::shards(n, mb.workers, mb.group);
    crate::par::map_shards(&ranges, |r| {
        let (lo, len) = (r.start, r.len());
        let c = mb.cond.narrow(r.clone())?;
        let u = uncond.narrow(r.clone())?;
        let x = xj.narrow(0, lo, len)?;
        let xp = xn.narrow(0, lo, len)?;
        let step = |weights: Weights| -> Result<SdeStep> {
            let v = guided_velocity_at(mb.model, &x, timestep, &c, Some(&u), w, weights)?;
            sde_step(
                &x,
                &v,
                sigma,
                sigma_next,
                sigma_max,
                train.noise_level,
                Some(&xp),
                None,
            )
        };
        let st = step(Weights::Policy)?;
        let mean_ref = if train.beta_kl > 0.0 {
            Some(step(Weights::Reference)?.mean.detach())
        } else {
            None
        };
        let terms = grpo_loss(
            &st.log_prob,
            &old.narrow(0, lo, len)?,
            &mb.adv[r],
            train.clip_range,
            mean_ref.as_ref().map(|m| (&st.mean, m, st.std_dev_t)),
            train.beta_kl,
        )?;
        ShardPass::backprop(
            mb.model,
            &terms.loss,
            [terms.policy_loss, terms.kl, terms.clip_frac, 0.0],
            len as f64 / n as f64,
            mb.passes,
        )
    })
}
