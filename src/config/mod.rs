//! The run configuration: TOML with the paper's names, every default defined here and only here,
//! `--set key.path=value` overrides, and a validation pass that explains each rejected value.

use crate::model::lora::{LoraInit, LoraSpec, DEFAULT_TARGETS};
use anyhow::{anyhow, bail, Context, Result};
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

/// Storage dtype of the frozen weights.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum WeightDType {
    F32,
    Bf16,
    F16,
}

impl WeightDType {
    pub fn candle(self) -> candle_core::DType {
        match self {
            WeightDType::F32 => candle_core::DType::F32,
            WeightDType::Bf16 => candle_core::DType::BF16,
            WeightDType::F16 => candle_core::DType::F16,
        }
    }

    pub fn bytes(self) -> usize {
        match self {
            WeightDType::F32 => 4,
            _ => 2,
        }
    }
}

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
pub struct RunConfig {
    /// Run directory (checkpoints, metrics.jsonl); `--out` overrides it.
    pub out_dir: PathBuf,
    pub seed: u64,
    pub num_epochs: usize,
    /// Epochs between checkpoints.
    pub save_every: usize,
    /// Epochs between evaluations on the test prompts.
    pub eval_every: usize,
    /// Checkpoints kept (older ones are deleted once a newer one is complete).
    pub keep_checkpoints: usize,
    /// Stop after the first epoch that ends past this many minutes of training wall time (checkpoint
    /// and final evaluation as at the last epoch); 0 = no limit. Gives two runs the same time budget.
    pub max_minutes: f64,
}

impl Default for RunConfig {
    fn default() -> Self {
        Self {
            out_dir: PathBuf::from("runs/dgpo"),
            seed: 42,
            num_epochs: 1000,
            save_every: 20,
            eval_every: 10,
            keep_checkpoints: 2,
            max_minutes: 0.0,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ModelConfig {
    /// A diffusers pipeline or transformer folder, a Hugging Face hub id, or a single `.safetensors` file.
    pub pretrained: String,
    /// Diffusers `config.json` of the transformer, needed only for single files.
    pub transformer_config: Option<PathBuf>,
    /// Storage dtype of frozen weights (CPU always computes in f32).
    pub dtype: WeightDType,
    /// Image side in pixels.
    pub resolution: usize,
    /// T5 tokens appended after the 77 CLIP tokens (the authors use 128).
    pub max_sequence_length: usize,
    /// SD3 pipelines: keep prompt embeddings in this folder (one file per prompt and encoder set).
    pub embedding_cache: Option<PathBuf>,
    /// SD3 pipelines: run T5-XXL (false: zeros in its place, as diffusers with `text_encoder_3 =
    /// None`; T5 is then neither loaded nor downloaded).
    pub t5: bool,
}

impl Default for ModelConfig {
    fn default() -> Self {
        Self {
            pretrained: "stabilityai/stable-diffusion-3.5-medium".into(),
            transformer_config: None,
            dtype: WeightDType::Bf16,
            resolution: 512,
            max_sequence_length: 128,
            embedding_cache: None,
            t5: true,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LoraConfig {
    /// `false` trains every weight and keeps a frozen reference copy.
    pub enabled: bool,
    pub rank: usize,
    pub alpha: f64,
    /// Module names or suffixes (peft's `target_modules`).
    pub targets: Vec<String>,
    pub init: LoraInit,
}

impl Default for LoraConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            rank: 64,
            alpha: 128.0,
            targets: DEFAULT_TARGETS.iter().map(|s| s.to_string()).collect(),
            init: LoraInit::Gaussian,
        }
    }
}

impl LoraConfig {
    /// The adapter shape this section describes.
    pub fn spec(&self) -> LoraSpec {
        LoraSpec {
            rank: self.rank,
            alpha: self.alpha,
            targets: self.targets.clone(),
            init: self.init,
            use_rslora: false,
        }
    }
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

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
#[serde(default, deny_unknown_fields)]
pub struct PromptsConfig {
    /// Training prompts: a GenEval-style `.jsonl` or a text file (one prompt a line).
    pub train: Option<PathBuf>,
    /// Evaluation prompts, same formats.
    pub test: Option<PathBuf>,
    /// How an epoch's training prompts are drawn.
    pub sampling: PromptSampling,
}

/// How `dgpo train` draws an epoch's prompts (one per group) from the training file.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum PromptSampling {
    /// Passes over the file in a fresh random order each epoch (every prompt equally likely).
    #[default]
    Uniform,
    /// Stratified by GenEval `tag`: each group's tag is taken in turn from a random order of the
    /// file's tags, then a prompt is drawn uniformly within the tag, so rare tags are trained as
    /// often as common ones (needs GenEval metadata).
    ByTag,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RewardConfig {
    /// Reward module name (see the README's reward table).
    pub kind: String,
    #[serde(default = "one")]
    pub weight: f64,
    /// Server address for remote rewards (`kind = "remote"`: the JSON protocol of Flow-Factory's
    /// reward servers, `POST <url>/compute`).
    #[serde(default)]
    pub url: Option<String>,
    /// Remote rewards: seconds before a request is abandoned (and retried).
    #[serde(default = "default_timeout")]
    pub timeout_s: f64,
    /// Remote rewards: further attempts after a failed request, with doubling back-off.
    #[serde(default = "default_retries")]
    pub retries: u32,
    /// Remote rewards: seconds before the first retry (doubling each time).
    #[serde(default = "one")]
    pub backoff_s: f64,
    /// Remote rewards: `json` (Flow-Factory's `POST <url>/compute`) or `flow_grpo_pickle` (the
    /// pickle-over-HTTP protocol of Flow-GRPO's GenEval server, `POST <url>` with JPEG bytes).
    #[serde(default = "default_protocol")]
    pub protocol: String,
    /// Remote rewards: images per request (0: all images of a call in one request).
    #[serde(default)]
    pub batch_size: usize,
    /// Remote rewards: requests in flight at once.
    #[serde(default = "default_concurrency")]
    pub max_concurrency: usize,
    /// CLIP-family rewards: the CLIP model (a local folder or a Hugging Face repo id; default per kind).
    #[serde(default)]
    pub model: Option<String>,
    /// CLIP-family rewards: where the tokenizer and `preprocessor_config.json` come from (default per
    /// kind: the model itself, or the CLIP-H processor for pickscore).
    #[serde(default)]
    pub processor: Option<String>,
    /// `aesthetic`: the LAION head (`sac+logos+ava1-l14-linearMSE.pth` or a .safetensors of it).
    #[serde(default)]
    pub head: Option<String>,
}

impl Default for RewardConfig {
    fn default() -> Self {
        Self {
            kind: "shapes_geneval".into(),
            weight: 1.0,
            url: None,
            timeout_s: default_timeout(),
            retries: default_retries(),
            backoff_s: 1.0,
            protocol: default_protocol(),
            batch_size: 0,
            max_concurrency: default_concurrency(),
            model: None,
            processor: None,
            head: None,
        }
    }
}

fn default_protocol() -> String {
    "json".into()
}

fn default_concurrency() -> usize {
    4
}

fn default_timeout() -> f64 {
    120.0
}

fn default_retries() -> u32 {
    3
}

fn one() -> f64 {
    1.0
}

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
    /// Pixels between the allowed positions of a shape's top-left corner in the rendered scenes
    /// (1 = any pixel, as the shipped base was trained; 4 = the patch size of the shapes model: every
    /// shape sits at the same offset within its patches).
    pub position_lattice: usize,
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
            position_lattice: 1,
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

/// The whole configuration of a run.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    pub run: RunConfig,
    pub model: ModelConfig,
    pub lora: LoraConfig,
    pub sample: SampleConfig,
    pub train: TrainConfig,
    pub prompts: PromptsConfig,
    pub reward: Vec<RewardConfig>,
    pub pretrain: PretrainConfig,
}

impl Config {
    /// Read `path`, apply `overrides` (`key.path=value`), validate.
    pub fn load(path: &Path, overrides: &[String]) -> Result<Self> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("reading config file {}", path.display()))?;
        Self::from_toml(&text, &path.display().to_string(), overrides)
    }

    /// Parse TOML text (`origin` names it in errors), apply overrides, validate.
    pub fn from_toml(text: &str, origin: &str, overrides: &[String]) -> Result<Self> {
        // Parsing the text itself first gives errors with the line and the offending key.
        let cfg: Config =
            toml::from_str(text).map_err(|e| anyhow!("in config file {origin}: {e}"))?;
        let cfg = if overrides.is_empty() {
            cfg
        } else {
            let mut table: toml::Table = toml::from_str(text)?;
            for o in overrides {
                apply_override(&mut table, o)?;
            }
            toml::Value::Table(table)
                .try_into()
                .map_err(|e: toml::de::Error| {
                    anyhow!(
                        "after applying --set {}: {}",
                        overrides.join(" --set "),
                        e.message()
                    )
                })?
        };
        let problems = cfg.problems();
        if !problems.is_empty() {
            bail!(
                "{origin}: {} invalid setting{}:\n  - {}",
                problems.len(),
                if problems.len() == 1 { "" } else { "s" },
                problems.join("\n  - ")
            );
        }
        Ok(cfg)
    }

    /// Every rejected value, explained in the config's own terms.
    pub fn problems(&self) -> Vec<String> {
        let mut p = vec![];
        let s = &self.sample;
        let t = &self.train;
        let mut need = |ok: bool, msg: String| {
            if !ok {
                p.push(msg)
            }
        };
        need(
            s.group_size >= 2,
            format!(
                "sample.group_size = {} must be at least 2 (advantages are relative to the group)",
                s.group_size
            ),
        );
        need(s.batch_size > 0 && s.group_size > 0 && s.batch_size.is_multiple_of(s.group_size.max(1)), format!(
            "sample.group_size = {} does not divide sample.batch_size = {} (a rollout batch holds whole groups)",
            s.group_size, s.batch_size
        ));
        need(t.batch_size > 0 && t.batch_size.is_multiple_of(s.group_size.max(1)), format!(
            "sample.group_size = {} does not divide train.batch_size = {} (a training micro-batch holds whole groups)",
            s.group_size, t.batch_size
        ));
        let per_epoch = s.batch_size * s.num_batches_per_epoch;
        need(
            s.num_batches_per_epoch > 0,
            "sample.num_batches_per_epoch must be at least 1".into(),
        );
        need(t.batch_size == 0 || per_epoch.is_multiple_of(t.batch_size.max(1)), format!(
            "train.batch_size = {} does not divide the {} images of an epoch (sample.batch_size {} × sample.num_batches_per_epoch {})",
            t.batch_size, per_epoch, s.batch_size, s.num_batches_per_epoch
        ));
        need(
            s.eval_batch_size > 0,
            "sample.eval_batch_size must be at least 1".into(),
        );
        need(
            s.num_steps >= 1,
            "sample.num_steps must be at least 1".into(),
        );
        need(
            s.eval_num_steps >= 1,
            "sample.eval_num_steps must be at least 1".into(),
        );
        need(
            s.guidance_scale >= 1.0,
            format!(
                "sample.guidance_scale = {} must be ≥ 1 (1 disables classifier-free guidance)",
                s.guidance_scale
            ),
        );
        need(
            s.flow_shift > 0.0,
            format!("sample.flow_shift = {} must be positive", s.flow_shift),
        );
        need(t.trunc_steps < s.num_steps, format!(
            "train.trunc_steps = {} must be below sample.num_steps = {} (it indexes rollout steps 0..=K)",
            t.trunc_steps, s.num_steps
        ));
        need((1..=t.trunc_steps + 1).contains(&t.num_train_timesteps), format!(
            "train.num_train_timesteps = {} must be between 1 and train.trunc_steps + 1 = {} (distinct step indices)",
            t.num_train_timesteps,
            t.trunc_steps + 1
        ));
        for (k, v) in [("adam_beta1", t.adam_beta1), ("adam_beta2", t.adam_beta2)] {
            need(
                (0.0..1.0).contains(&v),
                format!("train.{k} = {v} must be in [0, 1)"),
            );
        }
        for (k, v) in [
            ("learning_rate", t.learning_rate),
            ("adam_epsilon", t.adam_epsilon),
            ("max_grad_norm", t.max_grad_norm),
            ("beta_dpo", t.beta_dpo),
            ("adv_clip_max", t.adv_clip_max),
        ] {
            need(v > 0.0, format!("train.{k} = {v} must be positive"));
        }
        for (k, v) in [
            ("adam_weight_decay", t.adam_weight_decay),
            ("beta_kl", t.beta_kl),
        ] {
            need(v >= 0.0, format!("train.{k} = {v} must be ≥ 0"));
        }
        need(
            t.clip_range >= 0.0 && t.clip_range < 1.0,
            format!("train.clip_range = {} must be in [0, 1)", t.clip_range),
        );
        need(
            t.kl_cfg >= 1.0,
            format!(
                "train.kl_cfg = {} must be ≥ 1 (1 = conditional reference)",
                t.kl_cfg
            ),
        );
        need(
            (0.0..1.0).contains(&t.ema_decay),
            format!("train.ema_decay = {} must be in [0, 1)", t.ema_decay),
        );
        need(
            self.run.max_minutes >= 0.0,
            format!(
                "run.max_minutes = {} must be ≥ 0 (0 = no limit)",
                self.run.max_minutes
            ),
        );
        need(
            t.ema_every >= 1,
            "train.ema_every must be at least 1".into(),
        );
        need(
            t.backward_chunk <= t.batch_size,
            format!(
                "train.backward_chunk = {} is larger than train.batch_size = {} (0 = the whole \
                 micro-batch)",
                t.backward_chunk, t.batch_size
            ),
        );
        need(
            t.backward_chunk == 0 || t.algorithm == Algorithm::Dgpo,
            "train.backward_chunk applies to the DGPO update only (train.algorithm = \"dgpo\")"
                .into(),
        );
        need(
            !t.gradient_checkpointing || t.algorithm == Algorithm::Dgpo,
            "train.gradient_checkpointing applies to the DGPO update only (train.algorithm = \"dgpo\")"
                .into(),
        );
        if t.algorithm == Algorithm::FlowGrpo {
            need(
                s.sampler == Sampler::Euler,
                "train.algorithm = \"flow_grpo\" rolls out with its SDE on the Euler grid: set \
                 sample.sampler = \"euler\""
                    .into(),
            );
            need(
                t.noise_level > 0.0,
                format!("train.noise_level = {} must be positive", t.noise_level),
            );
            need(
                t.timestep_fraction > 0.0 && t.timestep_fraction <= 1.0,
                format!(
                    "train.timestep_fraction = {} must be in (0, 1]",
                    t.timestep_fraction
                ),
            );
        }
        let l = &self.lora;
        if l.enabled {
            need(l.rank >= 1, "lora.rank must be at least 1".into());
            need(
                l.alpha > 0.0,
                format!("lora.alpha = {} must be positive", l.alpha),
            );
            need(
                !l.targets.is_empty(),
                "lora.targets is empty: name at least one module (e.g. \"attn.to_q\")".into(),
            );
        }
        let m = &self.model;
        need(
            !m.pretrained.is_empty(),
            "model.pretrained is empty: give a folder, a hub id or a .safetensors file".into(),
        );
        need(
            m.resolution > 0 && m.resolution.is_multiple_of(16),
            format!(
                "model.resolution = {} must be a positive multiple of 16 (VAE /8 × patch 2)",
                m.resolution
            ),
        );
        need(
            m.max_sequence_length >= 1,
            "model.max_sequence_length must be at least 1".into(),
        );
        need(
            s.eval_images_per_prompt >= 1,
            "sample.eval_images_per_prompt must be at least 1".into(),
        );
        let pt = &self.pretrain;
        for (k, v) in [
            ("steps", pt.steps),
            ("batch_size", pt.batch_size),
            ("save_every", pt.save_every),
            ("log_every", pt.log_every),
        ] {
            need(v >= 1, format!("pretrain.{k} must be at least 1"));
        }
        for (k, v) in [
            ("learning_rate", pt.learning_rate),
            ("max_grad_norm", pt.max_grad_norm),
            ("logit_std", pt.logit_std),
        ] {
            need(v > 0.0, format!("pretrain.{k} = {v} must be positive"));
        }
        need(
            pt.warmup_steps + pt.decay_steps <= pt.steps,
            format!(
                "pretrain.warmup_steps = {} plus pretrain.decay_steps = {} exceed pretrain.steps = {}",
                pt.warmup_steps, pt.decay_steps, pt.steps
            ),
        );
        need(
            pt.weight_decay >= 0.0,
            format!("pretrain.weight_decay = {} must be ≥ 0", pt.weight_decay),
        );
        need(
            (0.0..1.0).contains(&pt.caption_dropout),
            format!(
                "pretrain.caption_dropout = {} must be in [0, 1)",
                pt.caption_dropout
            ),
        );
        for (tag, w) in &pt.tag_weights {
            need(
                crate::geneval::TAGS.contains(&tag.as_str()),
                format!(
                    "pretrain.tag_weights.{tag}: unknown tag; the tags are {}",
                    crate::geneval::TAGS.join(", ")
                ),
            );
            need(
                w.is_finite() && *w >= 0.0,
                format!("pretrain.tag_weights.{tag} = {w} must be a finite number ≥ 0"),
            );
        }
        need(
            pt.tag_mix().is_none_or(|w| w.iter().any(|&w| w > 0.0)),
            "pretrain.tag_weights: every tag weighs 0; at least one must be positive".into(),
        );
        need(
            (1..=8).contains(&pt.position_lattice),
            format!(
                "pretrain.position_lattice = {} must be between 1 and 8 pixels",
                pt.position_lattice
            ),
        );
        need(
            (0.0..1.0).contains(&pt.ema_decay),
            format!("pretrain.ema_decay = {} must be in [0, 1)", pt.ema_decay),
        );
        let r = &self.run;
        need(
            r.num_epochs >= 1,
            "run.num_epochs must be at least 1".into(),
        );
        need(
            r.save_every >= 1,
            "run.save_every must be at least 1".into(),
        );
        need(
            r.eval_every >= 1,
            "run.eval_every must be at least 1".into(),
        );
        for (i, rw) in self.reward.iter().enumerate() {
            need(
                rw.weight.is_finite(),
                format!(
                    "reward[{i}] ({}) has weight {} (must be finite)",
                    rw.kind, rw.weight
                ),
            );
            need(!rw.kind.is_empty(), format!("reward[{i}].kind is empty"));
            need(
                ["json", "flow_grpo_pickle"].contains(&rw.protocol.as_str()),
                format!(
                    "reward[{i}].protocol = {:?}: expected \"json\" or \"flow_grpo_pickle\"",
                    rw.protocol
                ),
            );
            need(
                rw.max_concurrency >= 1,
                format!("reward[{i}].max_concurrency must be at least 1"),
            );
            need(
                rw.backoff_s >= 0.0 && rw.backoff_s.is_finite(),
                format!(
                    "reward[{i}].backoff_s = {} must be a non-negative number of seconds",
                    rw.backoff_s
                ),
            );
        }
        p
    }

    /// The resolved configuration as TOML.
    pub fn to_toml(&self) -> String {
        toml::to_string_pretty(self).unwrap_or_else(|e| format!("# cannot print config: {e}"))
    }
}

/// Set `a.b.c = value` in a TOML table; `value` is read as TOML, or as a string if it is not TOML.
fn apply_override(table: &mut toml::Table, assignment: &str) -> Result<()> {
    let (key, raw) = assignment
        .split_once('=')
        .with_context(|| format!("--set {assignment:?}: expected key.path=value"))?;
    let key = key.trim();
    let value: toml::Value = match toml::from_str::<toml::Table>(&format!("v = {}", raw.trim())) {
        Ok(mut t) => t
            .remove("v")
            .unwrap_or(toml::Value::String(raw.to_string())),
        Err(_) => toml::Value::String(raw.trim().to_string()),
    };
    let parts: Vec<&str> = key.split('.').collect();
    if parts.iter().any(|p| p.is_empty()) {
        bail!("--set {assignment:?}: {key:?} is not a key path like train.beta_dpo");
    }
    let mut root = toml::Value::Table(std::mem::take(table));
    let r = set_path(&mut root, &parts, value, assignment);
    if let toml::Value::Table(t) = root {
        *table = t;
    }
    r
}

/// Set `parts` under `v`, creating tables on the way; a number indexes an array (`reward.0.url`).
fn set_path(
    v: &mut toml::Value,
    parts: &[&str],
    value: toml::Value,
    assignment: &str,
) -> Result<()> {
    let (head, rest) = (parts[0], &parts[1..]);
    let child = match v {
        toml::Value::Table(t) => {
            if rest.is_empty() {
                t.insert(head.to_string(), value);
                return Ok(());
            }
            t.entry(head.to_string())
                .or_insert_with(|| toml::Value::Table(toml::Table::new()))
        }
        toml::Value::Array(a) => {
            let len = a.len();
            let i: usize = head.parse().with_context(|| {
                format!("--set {assignment:?}: {head:?} indexes a list of {len}: expected a number")
            })?;
            let slot = a.get_mut(i).with_context(|| {
                format!("--set {assignment:?}: index {i}, but the list has {len} entries")
            })?;
            if rest.is_empty() {
                *slot = value;
                return Ok(());
            }
            slot
        }
        _ => bail!("--set {assignment:?}: {head} is not inside a table"),
    };
    set_path(child, rest, value, assignment)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn overrides_reach_into_lists_of_tables() {
        let text = "[[reward]]\nkind = \"remote\"\nurl = \"http://a:1\"\n";
        let c = Config::from_toml(text, "t", &["reward.0.url=http://b:2".into()]).unwrap();
        assert_eq!(c.reward[0].url.as_deref(), Some("http://b:2"));
        let e = Config::from_toml(text, "t", &["reward.3.url=x".into()]).unwrap_err();
        assert!(e.to_string().contains("index 3, but the list has 1"), "{e}");
        let e = Config::from_toml(text, "t", &["reward.x.url=x".into()]).unwrap_err();
        assert!(e.to_string().contains("expected a number"), "{e}");
    }

    #[test]
    fn empty_file_gives_the_documented_defaults() {
        let c = Config::from_toml("", "t", &[]).unwrap();
        assert_eq!(c, Config::default());
        assert_eq!(c.train.beta_dpo, 100.0);
        assert_eq!(c.train.adam_weight_decay, 1e-4);
        assert_eq!(c.lora.rank, 64);
    }

    #[test]
    fn misspelt_key_is_named_with_its_line() {
        let e = Config::from_toml(
            "[train]\nbeta_dpo = 10\nlerning_rate = 1e-3\n",
            "cfg.toml",
            &[],
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("cfg.toml"), "{e}");
        assert!(e.contains("line 3"), "{e}");
        assert!(e.contains("lerning_rate"), "{e}");
    }

    #[test]
    fn overrides_apply_and_unknown_override_keys_fail() {
        let c = Config::from_toml(
            "[train]\nbeta_dpo = 10\n",
            "t",
            &["train.beta_dpo=50".into(), "model.pretrained=/tmp/m".into()],
        )
        .unwrap();
        assert_eq!(c.train.beta_dpo, 50.0);
        assert_eq!(c.model.pretrained, "/tmp/m");
        let e = Config::from_toml("", "t", &["lora.rnk=8".into()])
            .unwrap_err()
            .to_string();
        assert!(e.contains("rnk") && e.contains("--set"), "{e}");
    }

    #[test]
    fn validation_explains_each_rejected_value() {
        let e = Config::from_toml(
            "[sample]\ngroup_size = 16\nbatch_size = 12\n[train]\nbatch_size = 16\ntrunc_steps = 12\n",
            "t",
            &[],
        )
        .unwrap_err()
        .to_string();
        assert!(
            e.contains("sample.group_size = 16 does not divide sample.batch_size = 12"),
            "{e}"
        );
        assert!(
            e.contains("train.trunc_steps = 12 must be below sample.num_steps = 10"),
            "{e}"
        );
    }

    #[test]
    fn pretrain_tag_weights_name_known_tags_and_leave_one_positive() {
        let bad = |toml: &str| Config::from_toml(toml, "t", &[]).unwrap_err().to_string();
        let e = bad("[pretrain.tag_weights]\ncolour = 2.0\n");
        assert!(
            e.contains("pretrain.tag_weights.colour: unknown tag"),
            "{e}"
        );
        assert!(e.contains("color_attr"), "{e}");
        let e = bad("[pretrain.tag_weights]\ncolors = -1.0\n");
        assert!(e.contains("pretrain.tag_weights.colors = -1"), "{e}");
        let zero = "single_object = 0\ntwo_object = 0\ncounting = 0\ncolors = 0\nposition = 0\n";
        let e = bad(&format!("[pretrain.tag_weights]\n{zero}color_attr = 0\n"));
        assert!(e.contains("every tag weighs 0"), "{e}");
        let c = Config::from_toml(&format!("[pretrain.tag_weights]\n{zero}"), "t", &[]).unwrap();
        assert_eq!(c.pretrain.tag_weights.len(), 5);
        for l in [0, 9] {
            let e = bad(&format!("[pretrain]\nposition_lattice = {l}\n"));
            assert!(
                e.contains(&format!(
                    "pretrain.position_lattice = {l} must be between 1 and 8"
                )),
                "{e}"
            );
        }
    }

    #[test]
    fn shipped_configs_parse_and_validate() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("configs");
        let mut n = 0;
        for e in std::fs::read_dir(&dir).unwrap() {
            let p = e.unwrap().path();
            if p.extension().is_some_and(|x| x == "toml") {
                Config::load(&p, &[]).unwrap_or_else(|e| panic!("{}: {e:#}", p.display()));
                n += 1;
            }
        }
        assert!(n >= 3, "expected the paper's configs in configs/");
    }
}
