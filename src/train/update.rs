//! The update of one epoch: every training micro-batch (whole groups) at every trained step index,
//! each pass's gradients accumulated into one optimizer step — the loss averaged over the passes, as
//! accelerate's accumulation does. What a pass computes is the [`Objective`]'s.

use crate::train::metrics::{stage_bar, PassTotals};
use crate::train::objective::{MicroBatch, Objective, ShardPass};
use crate::train::optim::{AdamW, GradAccum};
use anyhow::{bail, Context, Result};
use rand::rngs::StdRng;

/// What an epoch's optimizer steps report: the totals of all their passes, how many passes, the mean
/// gradient norm (before clipping) and every trained timestep.
#[derive(Default)]
pub struct Updated {
    pub totals: PassTotals,
    pub passes: f64,
    pub grad_norm: f64,
    pub timesteps: Vec<f32>,
}

impl Updated {
    /// Add one optimizer step's passes; `grad_norm` is summed (the caller divides by the steps).
    pub fn add(
        &mut self,
        t: PassTotals,
        passes: f64,
        grad_norm: f64,
        timesteps: impl IntoIterator<Item = f32>,
    ) {
        let tot = &mut self.totals;
        tot.policy += t.policy;
        tot.kl += t.kl;
        tot.clip += t.clip;
        tot.weight += t.weight;
        tot.loss += t.loss;
        self.passes += passes;
        self.grad_norm += grad_norm;
        self.timesteps.extend(timesteps);
    }
}

/// Add the shards' gradients to the accumulator and their terms to the totals; a non-finite loss
/// stops the run naming the epoch, the algorithm and its terms.
fn absorb(
    totals: &mut PassTotals,
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
        totals.policy += p.share * p.policy_loss as f64;
        totals.kl += p.share * p.kl as f64;
        totals.clip += p.share * p.clip_frac as f64;
        totals.weight += p.share * p.weight as f64;
        totals.loss += p.share * p.loss as f64;
    }
    Ok(())
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
    let bar = stage_bar(
        micro_batches.len() * steps.len(),
        &format!("epoch {epoch} update"),
        "passes",
    );
    for mb in micro_batches {
        for &j in steps {
            let shards = objective.pass(mb, j, rng).with_context(|| {
                format!(
                    "epoch {epoch}: the {} pass over images {}..{} at step index {j} (timestep {}) \
                     failed; the last good checkpoint is kept — {}",
                    objective.name(),
                    mb.lo,
                    mb.lo + mb.len(),
                    mb.sched.timesteps[j],
                    objective.nan_hint()
                )
            })?;
            absorb(&mut totals, opt, &mut acc, shards, epoch, objective)?;
            bar.inc(1);
        }
    }
    bar.finish_and_clear();
    Ok((acc, totals))
}
