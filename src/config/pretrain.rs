//! `[pretrain]`: flow-matching pretraining of the shapes-testbed base model (`dgpo pretrain`).

use super::model::WeightDType;
use super::problems::Problems;
use serde::{Deserialize, Serialize};
use std::path::PathBuf;

/// How pretraining draws flow-matching timesteps.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TimestepSampling {
    /// SD3's logit-normal: `σ = sigmoid(n)`, `n ~ N(logit_mean, logit_std²)`.
    LogitNormal,
    /// `σ ~ U(0, 1)`.
    Uniform,
}

/// Flow-matching pretraining of the shapes-testbed model (`dgpo pretrain`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct PretrainConfig {
    /// Diffusers `config.json` of the transformer to build from scratch.
    pub transformer_config: PathBuf,
    /// `config.json` of the text encoder to build from scratch.
    pub text_encoder_config: PathBuf,
    /// WordLevel `tokenizer.json`.
    pub tokenizer: PathBuf,
    /// `config.json` of the cell codec (the model then works on one latent pixel per grid cell);
    /// unset: on pixels.
    pub codec_config: Option<PathBuf>,
    /// Start from the weights of this pipeline folder (what `dgpo pretrain` writes to `model/`, e.g.
    /// the shipped `configs/shapes/base`) instead of a fresh initialisation; the optimizer starts fresh.
    /// Its transformer, text encoder and tokenizer must be the ones the three paths above describe.
    /// Ignored by `--resume`, whose checkpoint holds the weights.
    pub init_from: Option<PathBuf>,
    /// Optimizer steps.
    pub steps: usize,
    /// Freshly rendered scenes per step.
    pub batch_size: usize,
    pub learning_rate: f64,
    /// Linear learning-rate warm-up steps.
    pub warmup_steps: usize,
    /// Final steps over which the learning rate falls linearly to zero (0 = constant to the end).
    /// Until the cool-down starts a run cut at step N equals a run configured with `steps = N`.
    pub decay_steps: usize,
    pub weight_decay: f64,
    pub max_grad_norm: f64,
    /// Probability of training on the empty prompt (makes classifier-free guidance possible).
    pub caption_dropout: f64,
    /// Relative frequency of each GenEval tag among the pretraining captions, e.g.
    /// `{ colors = 2.0, color_attr = 2.0 }`; a tag not named weighs 1. Empty (the default) draws the
    /// six tags uniformly, exactly as before the key existed.
    pub tag_weights: std::collections::BTreeMap<String, f64>,
    /// How loosely the rendered scenes follow their captions (`[pretrain.caption_noise]`; all zero,
    /// the default: exactly).
    pub caption_noise: crate::testbed::CaptionNoise,
    /// Where scenes for position captions put their objects: `anywhere` (the default) the relation
    /// holds, or `edges` (the first object on the edge its relation names, the other opposite).
    pub relation_layout: crate::testbed::RelationLayout,
    pub timestep_sampling: TimestepSampling,
    pub logit_mean: f64,
    pub logit_std: f64,
    /// Decay of the weight EMA that is evaluated and saved.
    pub ema_decay: f64,
    /// Steps between evaluations of the GenEval-shapes score (0 = only at the end).
    pub eval_every: usize,
    /// Steps between checkpoints.
    pub save_every: usize,
    /// Steps between log lines.
    pub log_every: usize,
    /// Storage dtype of the saved pipeline folders (`model/`); resume state is always f32.
    pub save_dtype: WeightDType,
}

impl PretrainConfig {
    /// The caption weight of each of [`crate::geneval::TAGS`], in that order (a tag not named in
    /// `tag_weights` weighs 1); `None` when `tag_weights` is empty: the uniform draw.
    pub fn tag_mix(&self) -> Option<Vec<f64>> {
        (!self.tag_weights.is_empty()).then(|| {
            crate::geneval::TAGS
                .iter()
                .map(|t| self.tag_weights.get(*t).copied().unwrap_or(1.0))
                .collect()
        })
    }
}

impl Default for PretrainConfig {
    fn default() -> Self {
        Self {
            transformer_config: PathBuf::from("configs/shapes/transformer.json"),
            text_encoder_config: PathBuf::from("configs/shapes/text_encoder.json"),
            tokenizer: PathBuf::from("configs/shapes/tokenizer.json"),
            codec_config: None,
            init_from: None,
            steps: 3000,
            batch_size: 64,
            learning_rate: 1e-3,
            warmup_steps: 100,
            decay_steps: 0,
            weight_decay: 0.0,
            max_grad_norm: 1.0,
            caption_dropout: 0.1,
            tag_weights: Default::default(),
            caption_noise: Default::default(),
            relation_layout: Default::default(),
            timestep_sampling: TimestepSampling::LogitNormal,
            logit_mean: 0.0,
            logit_std: 1.0,
            ema_decay: 0.999,
            eval_every: 1000,
            save_every: 250,
            log_every: 25,
            save_dtype: WeightDType::F32,
        }
    }
}

impl PretrainConfig {
    pub(super) fn check(&self, p: &mut Problems) {
        for (k, v) in [
            ("steps", self.steps),
            ("batch_size", self.batch_size),
            ("save_every", self.save_every),
            ("log_every", self.log_every),
        ] {
            p.need(v >= 1, format!("pretrain.{k} must be at least 1"));
        }
        for (k, v) in [
            ("learning_rate", self.learning_rate),
            ("max_grad_norm", self.max_grad_norm),
            ("logit_std", self.logit_std),
        ] {
            p.need(v > 0.0, format!("pretrain.{k} = {v} must be positive"));
        }
        p.need(
            self.warmup_steps + self.decay_steps <= self.steps,
            format!(
                "pretrain.warmup_steps = {} plus pretrain.decay_steps = {} exceed pretrain.steps = {}",
                self.warmup_steps, self.decay_steps, self.steps
            ),
        );
        p.need(
            self.weight_decay >= 0.0,
            format!("pretrain.weight_decay = {} must be ≥ 0", self.weight_decay),
        );
        p.need(
            (0.0..1.0).contains(&self.caption_dropout),
            format!(
                "pretrain.caption_dropout = {} must be in [0, 1)",
                self.caption_dropout
            ),
        );
        for (tag, w) in &self.tag_weights {
            p.need(
                crate::geneval::TAGS.contains(&tag.as_str()),
                format!(
                    "pretrain.tag_weights.{tag}: unknown tag; the tags are {}",
                    crate::geneval::TAGS.join(", ")
                ),
            );
            p.need(
                w.is_finite() && *w >= 0.0,
                format!("pretrain.tag_weights.{tag} = {w} must be a finite number ≥ 0"),
            );
        }
        p.need(
            self.tag_mix().is_none_or(|w| w.iter().any(|&w| w > 0.0)),
            "pretrain.tag_weights: every tag weighs 0; at least one must be positive".into(),
        );
        for (k, v) in self.caption_noise.fields() {
            p.need(
                (0.0..=1.0).contains(&v),
                format!("pretrain.caption_noise.{k} = {v} must be a probability in [0, 1]"),
            );
        }
        p.need(
            (0.0..1.0).contains(&self.ema_decay),
            format!("pretrain.ema_decay = {} must be in [0, 1)", self.ema_decay),
        );
    }
}
