//! The update of one epoch: every training micro-batch (whole groups) at every trained step index,
//! each pass's gradients accumulated into one optimizer step — the loss averaged over the passes, as
//! accelerate's accumulation does. What a pass computes is the [`Objective`]'s.

use crate::model::{MMDiT, VarGrads};
use crate::sampling::{Conditioning, Schedule};
use crate::train::objective::Objective;
use crate::train::optim::{AdamW, GradAccum};
use anyhow::{bail, Result};
use candle_core::{DType, Tensor};
use rand::rngs::StdRng;

/// One training micro-batch of an epoch, with what every pass over it needs.
pub struct MicroBatch<'a> {
    pub model: &'a MMDiT,
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

/// An epoch's loss terms summed over its passes, weighted by shard share.
#[derive(Default)]
pub struct PassTotals {
    pub policy: f64,
    pub kl: f64,
    pub clip: f64,
    pub weight: f64,
    pub loss: f64,
}

impl PassTotals {
    /// Add the shards' gradients to the accumulator and their terms to the totals; a non-finite
    /// loss stops the run naming the epoch, the algorithm and its terms.
    fn absorb(
        &mut self,
        opt: &AdamW,
        acc: &mut GradAccum,
        shards: Vec<ShardPass>,
        epoch: usize,
        objective: &dyn Objective,
    ) -> Result<()> {
        for p in shards {
            let Some(grads) = &p.grads else {
                bail!(
                    "epoch {epoch}: the {} loss is {} (policy {}, kl {}); the last good checkpoint is kept — {}",
                    objective.name(),
                    p.loss,
                    p.policy_loss,
                    p.kl,
                    objective.nan_hint()
                );
            };
            opt.add_var_grads(acc, grads)?;
            self.policy += p.share * p.policy_loss as f64;
            self.kl += p.share * p.kl as f64;
            self.clip += p.share * p.clip_frac as f64;
            self.weight += p.share * p.weight as f64;
            self.loss += p.share * p.loss as f64;
        }
        Ok(())
    }
}

/// Run every pass of the epoch over `micro_batches` at the step indices `steps` (micro-batch
/// major), drawing the passes' noise from `rng`; returns the accumulated gradients and the totals.
pub fn accumulate(
    objective: &dyn Objective,
    opt: &AdamW,
    micro_batches: &[MicroBatch],
    steps: &[usize],
    rng: &mut StdRng,
    epoch: usize,
) -> Result<(GradAccum, PassTotals)> {
    let mut acc = opt.accum();
    let mut totals = PassTotals::default();
    let bar = crate::train::metrics::stage_bar(
        micro_batches.len() * steps.len(),
        &format!("epoch {epoch} update"),
        "passes",
    );
    for mb in micro_batches {
        for &j in steps {
            let shards = objective.pass(mb, j, rng)?;
            totals.absorb(opt, &mut acc, shards, epoch, objective)?;
            bar.inc(1);
        }
    }
    bar.finish_and_clear();
    Ok((acc, totals))
}
