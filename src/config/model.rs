//! `[model]` and `[lora]`: the base model, its dtype and resolution, and the adapters trained on it.

use super::problems::Problems;
use crate::model::lora::{LoraInit, LoraSpec, DEFAULT_TARGETS};
use serde::{Deserialize, Serialize};
use std::path::PathBuf;

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

impl ModelConfig {
    pub(super) fn check(&self, p: &mut Problems) {
        p.need(
            !self.pretrained.is_empty(),
            "model.pretrained is empty: give a folder, a hub id or a .safetensors file".into(),
        );
        // What the model works at (SD3: its latent side × the VAE's 8; shapes: its cells × the
        // codec's cell) is checked once the model's config files are read (`train::session`).
        p.need(
            self.resolution > 0,
            "model.resolution must be a positive number of pixels".into(),
        );
        p.at_most(
            "model.resolution",
            self.resolution,
            MAX_RESOLUTION,
            "no model of the SD3 family or the shapes testbed works above it",
        );
        p.need(
            self.max_sequence_length >= 1,
            "model.max_sequence_length must be at least 1".into(),
        );
        p.at_most(
            "model.max_sequence_length",
            self.max_sequence_length,
            MAX_T5_TOKENS,
            "T5 takes at most 512 tokens, as diffusers' SD3 pipelines",
        );
    }
}

/// The largest image side accepted before the model is read (SD3.5's positional embedding covers
/// 192 latent patches × 2 × 8 = 3072 pixels).
const MAX_RESOLUTION: usize = 8192;

/// The most T5 tokens SD3 pipelines take.
pub const MAX_T5_TOKENS: usize = 512;

/// The largest LoRA rank accepted (SD3.5-Large's widest projection is 2432 × 9728).
const MAX_LORA_RANK: usize = 4096;

impl LoraConfig {
    pub(super) fn check(&self, p: &mut Problems) {
        if self.enabled {
            p.need(self.rank >= 1, "lora.rank must be at least 1".into());
            p.need(
                self.rank <= MAX_LORA_RANK,
                format!(
                    "lora.rank = {} is above {MAX_LORA_RANK}, wider than every layer of the SD3 family \
                     (a rank past a layer's width adds nothing)",
                    self.rank
                ),
            );
            p.need(
                self.alpha > 0.0,
                format!("lora.alpha = {} must be positive", self.alpha),
            );
            p.need(
                !self.targets.is_empty(),
                "lora.targets is empty: name at least one module (e.g. \"attn.to_q\")".into(),
            );
        }
    }
}
