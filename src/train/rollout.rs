//! The rollouts of one epoch: the prompts' groups sampled batch by batch from seeded noise by the
//! [`Objective`], each batch decoded and scored on a second thread while the next one is sampled
//! (a remote reward's latency hides behind the rollouts).

use crate::geneval::Metadata;
use crate::image::Image;
use crate::pipeline::Pipeline;
use crate::reward::{Rewards, Scored};
use crate::sampling::{seeded_randn as randn, Conditioning, Schedule};
use crate::train::objective::{Objective, RolloutBatch};
use crate::train::policy::Policies;
use anyhow::Result;
use candle_core::Tensor;
use rand::rngs::StdRng;
use std::time::Instant;

/// An epoch's rollouts and their scores.
pub struct Rollouts {
    /// Final samples of every image, in prompt order.
    pub x0: Tensor,
    pub cond: Conditioning,
    /// The rewards, or why they failed.
    pub scored: Result<Scored>,
    /// Sampling time, without the wait for the last batch's scores.
    pub rollout_s: f64,
    /// Time the scoring thread was busy.
    pub reward_busy_s: f64,
    /// Time spent waiting for the scores after the last batch.
    pub reward_wait_s: f64,
}

/// The prompts of an epoch (each `group_size` times in a row), with what rollouts need.
pub struct EpochPrompts<'a> {
    /// The weights the objective samples with.
    pub policies: &'a Policies<'a>,
    pub prompts: &'a [String],
    pub metas: &'a [Option<Metadata>],
    /// The empty prompt's conditioning (one row): the unconditional branch of CFG.
    pub empty: &'a Conditioning,
    pub batch_size: usize,
    pub guidance: f64,
}

/// Sample and score every batch of `ep`; the initial noise of each batch comes from `rng`.
pub fn rollout_epoch(
    pipe: &dyn Pipeline,
    objective: &mut dyn Objective,
    sched: &Schedule,
    ep: &EpochPrompts,
    rewards: &Rewards,
    rng: &mut StdRng,
    bar_label: &str,
) -> Result<Rollouts> {
    let t_roll = Instant::now();
    let shape = pipe.latent_shape();
    let dev = pipe.device();
    let (mut x0s, mut conds) = (vec![], vec![]);
    let bar = crate::train::metrics::stage_bar(ep.prompts.len(), bar_label, "images");
    let (scored, reward_busy_s, reward_wait_s) = std::thread::scope(|sc| -> Result<_> {
        let (tx, rx) = std::sync::mpsc::channel::<(usize, Vec<Image>)>();
        let scorer = sc.spawn(move || score_batches(rx, rewards, ep.prompts, ep.metas));
        for start in (0..ep.prompts.len()).step_by(ep.batch_size) {
            let range = start..(start + ep.batch_size).min(ep.prompts.len());
            let ps: Vec<&str> = ep.prompts[range.clone()]
                .iter()
                .map(|p| p.as_str())
                .collect();
            let cond = pipe.encode(&ps)?;
            let noise = randn(rng, (ps.len(), shape.0, shape.1, shape.2), &dev)?;
            let uncond = ep.empty.repeat(ps.len())?;
            let batch = RolloutBatch {
                model: pipe.transformer(),
                policies: ep.policies,
                sched,
                noise: &noise,
                cond: &cond,
                uncond: &uncond,
                guidance: ep.guidance,
            };
            let x0 = objective.rollout(&batch, rng)?;
            // A closed channel means the scorer is gone; its result says why.
            let _ = tx.send((range.start, pipe.decode(&x0)?));
            x0s.push(x0);
            conds.push(cond);
            bar.inc(ps.len() as u64);
        }
        drop(tx);
        let t_wait = Instant::now();
        let (outs, busy) = scorer
            .join()
            .map_err(|_| anyhow::anyhow!("the reward thread panicked"))?;
        let scored = outs
            .into_iter()
            .collect::<Result<Vec<_>>>()
            .and_then(crate::reward::concat_scored);
        Ok((scored, busy, t_wait.elapsed().as_secs_f64()))
    })?;
    bar.finish_and_clear();
    objective.end_rollouts()?;
    Ok(Rollouts {
        x0: Tensor::cat(&x0s, 0)?,
        cond: Conditioning::cat(&conds.iter().collect::<Vec<_>>())?,
        scored,
        rollout_s: t_roll.elapsed().as_secs_f64() - reward_wait_s,
        reward_busy_s,
        reward_wait_s,
    })
}

/// The scoring thread: batches `(first image, images)` in, one result per batch out (none after
/// the first failure), and the busy time.
fn score_batches(
    rx: std::sync::mpsc::Receiver<(usize, Vec<Image>)>,
    rewards: &Rewards,
    prompts: &[String],
    metas: &[Option<Metadata>],
) -> (Vec<Result<Scored>>, f64) {
    let mut outs: Vec<Result<Scored>> = vec![];
    let mut busy = 0f64;
    for (start, imgs) in rx {
        let t = Instant::now();
        let end = start + imgs.len();
        if !outs.last().is_some_and(|o| o.is_err()) {
            outs.push(rewards.score_parts(&imgs, &prompts[start..end], &metas[start..end]));
        }
        busy += t.elapsed().as_secs_f64();
    }
    (outs, busy)
}
