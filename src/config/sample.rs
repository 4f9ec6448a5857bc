//! `[sample]`: how rollouts and evaluations sample — solver, steps, CFG, shift, groups and batches.

use super::problems::{Problems, MAX_IMAGES, MAX_STEPS};
use serde::{Deserialize, Serialize};

/// ODE solver for rollouts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Sampler {
    /// Euler on the shifted flow-matching grid.
    Euler,
    /// DPM-Solver++ 2M with flow sigmas, as the authors' code.
    DpmSolver2m,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SampleConfig {
    pub sampler: Sampler,
    /// ODE steps of a training rollout.
    pub num_steps: usize,
    /// ODE steps of an evaluation rollout.
    pub eval_num_steps: usize,
    pub guidance_scale: f64,
    /// SD3 time shift `s` in `σ' = sσ / (1 + (s − 1)σ)`.
    pub flow_shift: f64,
    /// Images per prompt (a group); `num_image_per_prompt` in the authors' code.
    pub group_size: usize,
    /// Images per rollout batch; holds whole groups.
    pub batch_size: usize,
    pub num_batches_per_epoch: usize,
    /// Images per evaluation batch.
    pub eval_batch_size: usize,
    /// Images per test prompt in evaluations (each with its own fixed noise).
    pub eval_images_per_prompt: usize,
    /// Solver of evaluations (default: `sampler`); lets runs that roll out differently (Flow-GRPO's
    /// SDE on the Euler grid) be evaluated under one protocol.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub eval_sampler: Option<Sampler>,
}

impl Default for SampleConfig {
    fn default() -> Self {
        Self {
            sampler: Sampler::DpmSolver2m,
            num_steps: 10,
            eval_num_steps: 14,
            guidance_scale: 4.5,
            flow_shift: 3.0,
            group_size: 16,
            batch_size: 16,
            num_batches_per_epoch: 8,
            eval_batch_size: 16,
            eval_images_per_prompt: 1,
            eval_sampler: None,
        }
    }
}

impl SampleConfig {
    /// The checks of what training rollouts use: groups, batches, rollout steps.
    pub(super) fn check_rollouts(&self, p: &mut Problems) {
        p.need(
            self.group_size >= 2,
            format!(
                "sample.group_size = {} must be at least 2 (advantages are relative to the group)",
                self.group_size
            ),
        );
        p.need(
            self.batch_size > 0
                && self.group_size > 0
                && self.batch_size.is_multiple_of(self.group_size.max(1)),
            format!(
                "sample.group_size = {} does not divide sample.batch_size = {} (a rollout batch holds whole groups)",
                self.group_size, self.batch_size
            ),
        );
        p.need(
            self.num_batches_per_epoch > 0,
            "sample.num_batches_per_epoch must be at least 1".into(),
        );
        p.need(
            self.num_steps >= 1,
            "sample.num_steps must be at least 1".into(),
        );
        let bound = "more images than any machine holds at once";
        p.at_most("sample.group_size", self.group_size, MAX_IMAGES, bound);
        p.at_most("sample.batch_size", self.batch_size, MAX_IMAGES, bound);
        p.at_most(
            "sample.num_batches_per_epoch",
            self.num_batches_per_epoch,
            MAX_IMAGES,
            "an epoch of more images than this is not a training epoch",
        );
        p.need(
            self.batch_size.saturating_mul(self.num_batches_per_epoch) <= MAX_IMAGES
                || self.batch_size > MAX_IMAGES
                || self.num_batches_per_epoch > MAX_IMAGES,
            format!(
                "sample.batch_size × sample.num_batches_per_epoch = {} × {} images per epoch is above \
                 the limit of {MAX_IMAGES}",
                self.batch_size, self.num_batches_per_epoch
            ),
        );
        p.at_most(
            "sample.num_steps",
            self.num_steps,
            MAX_STEPS,
            "the flow-matching schedule has 1000 timesteps",
        );
    }

    /// The checks of what evaluations and `dgpo sample` use: solver steps, CFG, shift, batches.
    pub(super) fn check_eval(&self, p: &mut Problems) {
        p.need(
            self.eval_batch_size > 0,
            "sample.eval_batch_size must be at least 1".into(),
        );
        p.need(
            self.eval_num_steps >= 1,
            "sample.eval_num_steps must be at least 1".into(),
        );
        p.need(
            self.guidance_scale >= 1.0,
            format!(
                "sample.guidance_scale = {} must be ≥ 1 (1 disables classifier-free guidance)",
                self.guidance_scale
            ),
        );
        p.need(
            self.flow_shift > 0.0,
            format!("sample.flow_shift = {} must be positive", self.flow_shift),
        );
        p.need(
            self.eval_images_per_prompt >= 1,
            "sample.eval_images_per_prompt must be at least 1".into(),
        );
        let bound = "more images than any machine holds at once";
        p.at_most(
            "sample.eval_batch_size",
            self.eval_batch_size,
            MAX_IMAGES,
            bound,
        );
        p.at_most(
            "sample.eval_images_per_prompt",
            self.eval_images_per_prompt,
            MAX_IMAGES,
            bound,
        );
        p.at_most(
            "sample.eval_num_steps",
            self.eval_num_steps,
            MAX_STEPS,
            "the flow-matching schedule has 1000 timesteps",
        );
    }
}
