//! What a run will do, computed from the config alone: the work of one epoch, parameter counts and a
//! rough memory estimate. Printed by `dgpo train --dry-run`.

use crate::config::Config;
use crate::model::TransformerConfig;
use std::fmt::Write;
use std::path::{Path, PathBuf};

/// Per-epoch work and sizes.
#[derive(Debug, Clone, PartialEq)]
pub struct Plan {
    pub groups_per_epoch: usize,
    pub images_per_epoch: usize,
    pub micro_batches_per_epoch: usize,
    pub optimizer_steps_per_epoch: usize,
    /// Transformer forward passes (per image) of the rollouts.
    pub rollout_forwards_per_image: usize,
    /// Transformer forward passes (per image) of the DGPO update: θ, reference, EMA-reference.
    pub train_forwards_per_image: usize,
    pub model: Option<ModelPlan>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct ModelPlan {
    pub source: PathBuf,
    pub base_params: usize,
    pub trainable_params: usize,
    pub image_tokens: usize,
    pub text_tokens: usize,
    /// Bytes: frozen weights, trainable state (values, gradients, two Adam moments, two EMAs),
    /// activations kept for one backward pass (the micro-batch, or `train.backward_chunk` images; one
    /// block's worth with `train.gradient_checkpointing`).
    pub weights_bytes: usize,
    pub trainable_bytes: usize,
    pub activation_bytes: usize,
}

impl Plan {
    pub fn new(cfg: &Config, transformer: Option<(PathBuf, TransformerConfig)>) -> Self {
        let s = &cfg.sample;
        let t = &cfg.train;
        let images = s.batch_size * s.num_batches_per_epoch;
        let cfg_mult = if s.guidance_scale > 1.0 { 2 } else { 1 };
        let ref_mult = if t.kl_cfg > 1.0 { 2 } else { 1 };
        let model = transformer.map(|(source, m)| model_plan(cfg, source, &m));
        Plan {
            groups_per_epoch: images / s.group_size.max(1),
            images_per_epoch: images,
            micro_batches_per_epoch: images / t.batch_size.max(1),
            optimizer_steps_per_epoch: 1,
            rollout_forwards_per_image: s.num_steps * cfg_mult,
            train_forwards_per_image: match t.algorithm {
                crate::config::Algorithm::Dgpo => t.num_train_timesteps * (1 + ref_mult + 1),
                // policy (and reference for the KL term), with CFG when grpo_train_cfg
                crate::config::Algorithm::FlowGrpo => {
                    let c = if t.grpo_train_cfg { cfg_mult } else { 1 };
                    crate::train::flow_grpo::num_train_steps(s.num_steps, t.timestep_fraction)
                        * c
                        * (1 + usize::from(t.beta_kl > 0.0))
                }
            },
            model,
        }
    }

    pub fn render(&self, cfg: &Config) -> String {
        let mut o = String::new();
        let s = &cfg.sample;
        let _ = writeln!(o, "plan for one epoch:");
        let _ = writeln!(
            o,
            "  rollouts        {} images = {} groups × group_size {} ({} batches of {}), {} ODE steps, CFG {}",
            self.images_per_epoch,
            self.groups_per_epoch,
            s.group_size,
            s.num_batches_per_epoch,
            s.batch_size,
            s.num_steps,
            s.guidance_scale
        );
        let _ = match cfg.train.algorithm {
            crate::config::Algorithm::Dgpo => writeln!(
                o,
                "  training        DGPO: {} micro-batches of {} × {} timesteps (step indices 0..={})",
                self.micro_batches_per_epoch,
                cfg.train.batch_size,
                cfg.train.num_train_timesteps,
                cfg.train.trunc_steps
            ),
            crate::config::Algorithm::FlowGrpo => writeln!(
                o,
                "  training        Flow-GRPO: SDE rollouts (noise level {}), {} micro-batches of {} × {} of the {} steps",
                cfg.train.noise_level,
                self.micro_batches_per_epoch,
                cfg.train.batch_size,
                crate::train::flow_grpo::num_train_steps(s.num_steps, cfg.train.timestep_fraction),
                s.num_steps
            ),
        };
        let _ = writeln!(
            o,
            "  forward passes  {} per image for rollouts, {} per image for the update",
            self.rollout_forwards_per_image, self.train_forwards_per_image
        );
        let _ = writeln!(
            o,
            "  optimizer steps {} per epoch, {} in the run",
            self.optimizer_steps_per_epoch, cfg.run.num_epochs
        );
        for (key, path) in [
            ("prompts.train", &cfg.prompts.train),
            ("prompts.test", &cfg.prompts.test),
        ] {
            let _ = match path {
                None => writeln!(o, "{key}: not set"),
                Some(p) => match std::fs::read_to_string(p) {
                    Ok(t) => writeln!(
                        o,
                        "{key}: {} ({} non-empty lines)",
                        p.display(),
                        t.lines().filter(|l| !l.trim().is_empty()).count()
                    ),
                    Err(e) => writeln!(o, "{key}: {} cannot be read: {e}", p.display()),
                },
            };
        }
        match &self.model {
            None => {
                let _ = writeln!(
                    o,
                    "model: config.json of {:?} not found locally, so parameter counts and memory are unknown \
                     (download the model or point model.pretrained at a folder)",
                    cfg.model.pretrained
                );
            }
            Some(m) => {
                let gib = |b: usize| b as f64 / (1u64 << 30) as f64;
                let _ = writeln!(o, "model: {}", m.source.display());
                let _ = writeln!(
                    o,
                    "  parameters      {} base, {} trainable ({})",
                    count(m.base_params),
                    count(m.trainable_params),
                    if cfg.lora.enabled {
                        format!("LoRA r = {}", cfg.lora.rank)
                    } else {
                        "full fine-tune".into()
                    }
                );
                if cfg.lora.enabled && m.trainable_params == 0 {
                    let _ = writeln!(
                        o,
                        "  WARNING: lora.targets = {:?} match no linear layer of this model; training would fail",
                        cfg.lora.targets
                    );
                }
                let _ = writeln!(
                    o,
                    "  tokens          {} image + {} text per sample",
                    m.image_tokens, m.text_tokens
                );
                let _ = writeln!(
                    o,
                    "  memory (rough)  {:.2} GiB weights + {:.2} GiB trainable state + {:.2} GiB activations \
                     = {:.2} GiB for the transformer (text encoders and VAE not counted)",
                    gib(m.weights_bytes),
                    gib(m.trainable_bytes),
                    gib(m.activation_bytes),
                    gib(m.weights_bytes + m.trainable_bytes + m.activation_bytes)
                );
            }
        }
        o
    }
}

/// `2.24 B`, `18.9 M`, `3.1 k`.
fn count(n: usize) -> String {
    let f = n as f64;
    match n {
        0..=9_999 => format!("{n}"),
        10_000..=999_999 => format!("{:.1} k", f / 1e3),
        1_000_000..=999_999_999 => format!("{:.1} M", f / 1e6),
        _ => format!("{:.2} B", f / 1e9),
    }
}

fn model_plan(cfg: &Config, source: PathBuf, m: &TransformerConfig) -> ModelPlan {
    let base = m.num_params() + m.pos_embed_max_size.pow(2) * m.inner_dim();
    let spec = cfg.lora.spec();
    let trainable = if cfg.lora.enabled {
        m.num_lora_params(cfg.lora.rank, |n| spec.targets_module(n))
    } else {
        m.num_params()
    };
    let latent = cfg.model.resolution / 8 / m.patch_size;
    let image_tokens = latent * latent;
    let text_tokens = 77 + cfg.model.max_sequence_length;
    let tokens = image_tokens + text_tokens;
    let d = m.inner_dim();
    // Kept per layer and sample: ~24 token-width tensors (norms, q/k/v, MLP ×4 …) and two attention maps.
    let per_layer = tokens * d * 24 + 2 * m.num_attention_heads * tokens * tokens;
    // Images differentiated at once: the micro-batch, or train.backward_chunk of it.
    let at_once = match cfg.train.backward_chunk {
        0 => cfg.train.batch_size,
        c => c.min(cfg.train.batch_size),
    };
    // Gradient checkpointing keeps each block's input tokens and one block's graph at a time.
    let activation = if cfg.train.gradient_checkpointing {
        at_once * (m.num_layers * tokens * d + per_layer) * 4
    } else {
        at_once * m.num_layers * per_layer * 4
    };
    let mut weights = base * cfg.model.dtype.bytes();
    if !cfg.lora.enabled {
        weights += m.num_params() * cfg.model.dtype.bytes(); // the frozen reference copy
    }
    ModelPlan {
        source,
        base_params: m.num_params(),
        trainable_params: trainable,
        image_tokens,
        text_tokens,
        weights_bytes: weights,
        trainable_bytes: trainable * 4 * 6,
        activation_bytes: activation,
    }
}

/// Find the transformer's `config.json` for `pretrained` without downloading: a folder, or the local
/// Hugging Face cache for a hub id.
pub fn locate_transformer_config(pretrained: &str, explicit: Option<&Path>) -> Option<PathBuf> {
    if let Some(p) = explicit {
        return p.exists().then(|| p.to_path_buf());
    }
    let p = Path::new(pretrained);
    for c in [p.join("transformer/config.json"), p.join("config.json")] {
        if c.is_file() {
            return Some(c);
        }
    }
    if p.exists() {
        return None;
    }
    hf_hub::Cache::from_env()
        .model(pretrained.to_string())
        .get("transformer/config.json")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn official_geneval_epoch_counts() {
        let cfg = Config::default();
        let p = Plan::new(&cfg, Some(("x".into(), TransformerConfig::sd3_5_medium())));
        assert_eq!(p.images_per_epoch, 128);
        assert_eq!(p.groups_per_epoch, 8);
        assert_eq!(p.micro_batches_per_epoch, 8);
        assert_eq!(p.rollout_forwards_per_image, 20);
        assert_eq!(p.train_forwards_per_image, 12);
        let m = p.model.unwrap();
        assert_eq!(m.image_tokens, 1024);
        // r = 64 on the eight projections of 24 blocks (the last has no to_add_out): 23·8 + 7 layers.
        assert_eq!(m.trainable_params, (23 * 8 + 7) * 64 * (1536 + 1536));
    }
}
