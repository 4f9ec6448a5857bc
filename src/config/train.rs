//! `[train]`: the update — optimizer, DGPO's β_dpo, β_kl, clip and timestep rule, the EMAs, memory
//! knobs, and the Flow-GRPO baseline's own settings.

use super::problems::{Problems, MAX_IMAGES};
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TrainConfig {
    /// Images per training micro-batch; holds whole groups.
    pub batch_size: usize,
    /// DGPO: images per backward pass (0 = the whole micro-batch, split over the worker threads).
    /// Smaller values bound the update's activation memory: a forward without graph over the
    /// micro-batch gives the loss and each image's weight in its gradient, then the images are
    /// differentiated this many at a time with those weights fixed. The gradient is the same; the
    /// price is one extra forward.
    pub backward_chunk: usize,
    /// DGPO: gradient checkpointing. The transformer's blocks run forward without a graph, keeping
    /// only each block's inputs, and are run again one at a time during the backward pass: the
    /// activation memory of one block instead of all of them, for one more forward of the blocks.
    /// Same gradient (up to summation order). Combines with `backward_chunk`.
    pub gradient_checkpointing: bool,
    pub learning_rate: f64,
    /// Passes of the update over each epoch's rollouts, each with its own step indices and noise
    /// and its own optimizer step (1 = the algorithm's one step per epoch). More reuse the same
    /// rollouts: cheaper steps, slightly off-policy after the first.
    pub num_inner_epochs: usize,
    pub adam_beta1: f64,
    pub adam_beta2: f64,
    pub adam_weight_decay: f64,
    pub adam_epsilon: f64,
    pub max_grad_norm: f64,
    pub beta_dpo: f64,
    pub beta_kl: f64,
    /// PPO-style clip `c` of the ratio against the EMA-reference.
    pub clip_range: f64,
    /// `K`: train only on rollout step indices `0..=K` (timestep clipping).
    pub trunc_steps: usize,
    /// `M`: distinct step indices drawn per epoch.
    pub num_train_timesteps: usize,
    pub adv_clip_max: f64,
    /// Normalise advantages by the batch std instead of each group's.
    pub global_std: bool,
    /// CFG scale of the reference velocity (1 = conditional only).
    pub kl_cfg: f64,
    /// Use the EMA-reference as the DGPO reference (mode 2b).
    pub use_ema_ref: bool,
    /// Optimizer steps after which rollouts use the EMA-reference weights.
    pub switch_ema_ref: usize,
    /// Decay of the slow EMA used for evaluation and checkpoints.
    pub ema_decay: f64,
    /// Optimizer steps between slow-EMA updates.
    pub ema_every: usize,
    /// `dgpo` (this project's algorithm) or `flow_grpo` (the baseline, docs/flow-grpo.md).
    pub algorithm: Algorithm,
    /// Flow-GRPO: SDE noise level `a` of the rollouts (0.7 in the reference).
    pub noise_level: f64,
    /// Flow-GRPO: share of the rollout steps trained on (`⌊N·fraction⌋` steps; 0.99 in the reference).
    pub timestep_fraction: f64,
    /// Flow-GRPO: evaluate the policy with CFG (`sample.guidance_scale`) when training, as the
    /// reference does (`train.cfg = True`).
    pub grpo_train_cfg: bool,
    /// Several rewards: `sum` normalises the weighted sum per group (the reference); `decoupled`
    /// normalises each reward per group, sums with the weights and renormalises over the batch (GDPO).
    pub advantages: AdvantageMode,
}

/// How several rewards become one advantage.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum AdvantageMode {
    #[default]
    Sum,
    Decoupled,
}

/// The RL algorithm of `dgpo train`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum Algorithm {
    /// Direct Group Preference Optimization (deterministic ODE rollouts, docs/algorithm.md).
    #[default]
    Dgpo,
    /// Flow-GRPO: SDE rollouts with per-step log-probabilities, PPO-clipped ratio loss on the steps.
    FlowGrpo,
}

impl Algorithm {
    /// The algorithm's name in messages.
    pub fn name(self) -> &'static str {
        match self {
            Algorithm::Dgpo => "DGPO",
            Algorithm::FlowGrpo => "Flow-GRPO",
        }
    }
}

impl Default for TrainConfig {
    fn default() -> Self {
        Self {
            batch_size: 16,
            learning_rate: 3e-4,
            num_inner_epochs: 1,
            adam_beta1: 0.9,
            adam_beta2: 0.999,
            adam_weight_decay: 1e-4,
            adam_epsilon: 1e-8,
            max_grad_norm: 1.0,
            beta_dpo: 100.0,
            beta_kl: 0.02,
            clip_range: 1e-2,
            trunc_steps: 4,
            num_train_timesteps: 4,
            adv_clip_max: 5.0,
            global_std: false,
            kl_cfg: 1.0,
            use_ema_ref: false,
            switch_ema_ref: 500,
            ema_decay: 0.9,
            ema_every: 8,
            backward_chunk: 0,
            gradient_checkpointing: false,
            algorithm: Algorithm::Dgpo,
            noise_level: 0.7,
            timestep_fraction: 0.99,
            grpo_train_cfg: true,
            advantages: AdvantageMode::Sum,
        }
    }
}

impl TrainConfig {
    /// The checks of `[train]` alone; those against `[sample]` are the config's.
    pub(super) fn check(&self, p: &mut Problems) {
        for (k, v) in [
            ("adam_beta1", self.adam_beta1),
            ("adam_beta2", self.adam_beta2),
        ] {
            p.need(
                (0.0..1.0).contains(&v),
                format!("train.{k} = {v} must be in [0, 1)"),
            );
        }
        for (k, v) in [
            ("learning_rate", self.learning_rate),
            ("adam_epsilon", self.adam_epsilon),
            ("max_grad_norm", self.max_grad_norm),
            ("beta_dpo", self.beta_dpo),
            ("adv_clip_max", self.adv_clip_max),
        ] {
            p.need(v > 0.0, format!("train.{k} = {v} must be positive"));
        }
        for (k, v) in [
            ("adam_weight_decay", self.adam_weight_decay),
            ("beta_kl", self.beta_kl),
        ] {
            p.need(v >= 0.0, format!("train.{k} = {v} must be ≥ 0"));
        }
        p.need(
            self.clip_range >= 0.0 && self.clip_range < 1.0,
            format!("train.clip_range = {} must be in [0, 1)", self.clip_range),
        );
        p.need(
            self.kl_cfg >= 1.0,
            format!(
                "train.kl_cfg = {} must be ≥ 1 (1 = conditional reference)",
                self.kl_cfg
            ),
        );
        p.need(
            (0.0..1.0).contains(&self.ema_decay),
            format!("train.ema_decay = {} must be in [0, 1)", self.ema_decay),
        );
        p.at_most(
            "train.batch_size",
            self.batch_size,
            MAX_IMAGES,
            "more images than any machine holds at once",
        );
        p.need(
            (1..=64).contains(&self.num_inner_epochs),
            format!(
                "train.num_inner_epochs = {} must be in 1..=64 (1 = one optimizer step per epoch)",
                self.num_inner_epochs
            ),
        );
        p.need(
            self.ema_every >= 1,
            "train.ema_every must be at least 1".into(),
        );
        p.need(
            self.backward_chunk <= self.batch_size,
            format!(
                "train.backward_chunk = {} is larger than train.batch_size = {} (0 = the whole \
                 micro-batch)",
                self.backward_chunk, self.batch_size
            ),
        );
        p.need(
            self.backward_chunk == 0 || self.algorithm == Algorithm::Dgpo,
            "train.backward_chunk applies to the DGPO update only (train.algorithm = \"dgpo\")"
                .into(),
        );
        p.need(
            !self.gradient_checkpointing || self.algorithm == Algorithm::Dgpo,
            "train.gradient_checkpointing applies to the DGPO update only (train.algorithm = \"dgpo\")"
                .into(),
        );
        if self.algorithm == Algorithm::FlowGrpo {
            p.need(
                self.noise_level > 0.0,
                format!("train.noise_level = {} must be positive", self.noise_level),
            );
            p.need(
                self.timestep_fraction > 0.0 && self.timestep_fraction <= 1.0,
                format!(
                    "train.timestep_fraction = {} must be in (0, 1]",
                    self.timestep_fraction
                ),
            );
        }
    }
}
