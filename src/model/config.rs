//! The MMDiT's hyperparameters, read from diffusers' `transformer/config.json`.
//!
//! The field names are diffusers' own, so a `config.json` deserialises directly; the named constructors
//! reproduce the published configs of the SD3 family for tests and dry runs.

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};
use std::path::Path;

/// Configuration of `SD3Transformer2DModel`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TransformerConfig {
    pub sample_size: usize,
    pub patch_size: usize,
    pub in_channels: usize,
    pub num_layers: usize,
    pub attention_head_dim: usize,
    pub num_attention_heads: usize,
    pub joint_attention_dim: usize,
    pub caption_projection_dim: usize,
    pub pooled_projection_dim: usize,
    pub out_channels: usize,
    pub pos_embed_max_size: usize,
    /// Blocks with the MMDiT-X extra self-attention (`attn2`), SD3.5-Medium: 0..=12.
    #[serde(default)]
    pub dual_attention_layers: Vec<usize>,
    /// `None` or `"rms_norm"` (SD3.5).
    #[serde(default)]
    pub qk_norm: Option<String>,
}

impl TransformerConfig {
    /// `stabilityai/stable-diffusion-3-medium-diffusers`.
    pub fn sd3_medium() -> Self {
        Self {
            sample_size: 128,
            patch_size: 2,
            in_channels: 16,
            num_layers: 24,
            attention_head_dim: 64,
            num_attention_heads: 24,
            joint_attention_dim: 4096,
            caption_projection_dim: 1536,
            pooled_projection_dim: 2048,
            out_channels: 16,
            pos_embed_max_size: 192,
            dual_attention_layers: vec![],
            qk_norm: None,
        }
    }

    /// `stabilityai/stable-diffusion-3.5-medium` (MMDiT-X).
    pub fn sd3_5_medium() -> Self {
        Self {
            pos_embed_max_size: 384,
            dual_attention_layers: (0..=12).collect(),
            qk_norm: Some("rms_norm".into()),
            ..Self::sd3_medium()
        }
    }

    /// `stabilityai/stable-diffusion-3.5-large`.
    pub fn sd3_5_large() -> Self {
        Self {
            num_layers: 38,
            num_attention_heads: 38,
            caption_projection_dim: 2432,
            pos_embed_max_size: 192,
            qk_norm: Some("rms_norm".into()),
            ..Self::sd3_medium()
        }
    }

    /// Read and check a diffusers `config.json`.
    pub fn from_json_file(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("reading transformer config {}", path.display()))?;
        let cfg: Self = serde_json::from_str(&text).with_context(|| {
            format!(
                "{} is not a diffusers SD3Transformer2DModel config.json",
                path.display()
            )
        })?;
        cfg.check()
            .with_context(|| format!("invalid transformer config {}", path.display()))?;
        Ok(cfg)
    }

    /// Width of the token stream (`num_attention_heads · attention_head_dim`).
    pub fn inner_dim(&self) -> usize {
        self.num_attention_heads * self.attention_head_dim
    }

    pub fn use_qk_norm(&self) -> bool {
        self.qk_norm.is_some()
    }

    pub fn is_dual_attention(&self, layer: usize) -> bool {
        self.dual_attention_layers.contains(&layer)
    }

    /// Reject combinations the architecture cannot run.
    pub fn check(&self) -> Result<()> {
        match self.qk_norm.as_deref() {
            None | Some("rms_norm") => {}
            Some(other) => {
                bail!("qk_norm = {other:?} is not supported (expected null or \"rms_norm\")")
            }
        }
        if self.caption_projection_dim != self.inner_dim() {
            bail!(
                "caption_projection_dim = {} must equal num_attention_heads · attention_head_dim = {}",
                self.caption_projection_dim,
                self.inner_dim()
            );
        }
        for (name, v) in [
            ("patch_size", self.patch_size),
            ("num_layers", self.num_layers),
            ("attention_head_dim", self.attention_head_dim),
            ("num_attention_heads", self.num_attention_heads),
            ("in_channels", self.in_channels),
            ("out_channels", self.out_channels),
            ("pos_embed_max_size", self.pos_embed_max_size),
        ] {
            if v == 0 {
                bail!("{name} must be positive");
            }
        }
        if let Some(&l) = self
            .dual_attention_layers
            .iter()
            .find(|&&l| l >= self.num_layers)
        {
            bail!(
                "dual_attention_layers contains {l}, but the model has only {} layers",
                self.num_layers
            );
        }
        if !self.attention_head_dim.is_multiple_of(2) || !self.inner_dim().is_multiple_of(4) {
            bail!("the sin-cos position embedding needs an inner dim divisible by 4");
        }
        Ok(())
    }

    /// FLOPs (2 per multiply–add) of one forward pass for one sample with `n_img` image and `n_txt`
    /// text tokens: every linear layer at its token count, plus attention scores and mixing.
    pub fn forward_flops(&self, n_img: usize, n_txt: usize) -> f64 {
        let mut f = 0.0;
        for (name, i, o) in self.linear_shapes() {
            let tokens = if name.contains("add_")
                || name.contains("to_add_out")
                || name.contains("ff_context")
                || name == "context_embedder"
            {
                n_txt
            } else if name.contains("norm1")
                || name.contains("norm_out")
                || name.starts_with("time_text_embed")
            {
                1
            } else {
                n_img
            };
            f += 2.0 * (i * o * tokens) as f64;
        }
        let d = self.inner_dim() as f64;
        let t = (n_img + n_txt) as f64;
        f += self.num_layers as f64 * 4.0 * t * t * d;
        f += self.dual_attention_layers.len() as f64 * 4.0 * (n_img * n_img) as f64 * d;
        f
    }

    /// Every linear layer as (diffusers module name, in features, out features), in checkpoint order.
    pub fn linear_shapes(&self) -> Vec<(String, usize, usize)> {
        let d = self.inner_dim();
        let p = self.patch_size;
        let mut v: Vec<(String, usize, usize)> = vec![
            ("pos_embed.proj".into(), self.in_channels * p * p, d),
            ("time_text_embed.timestep_embedder.linear_1".into(), 256, d),
            ("time_text_embed.timestep_embedder.linear_2".into(), d, d),
            (
                "time_text_embed.text_embedder.linear_1".into(),
                self.pooled_projection_dim,
                d,
            ),
            ("time_text_embed.text_embedder.linear_2".into(), d, d),
            (
                "context_embedder".into(),
                self.joint_attention_dim,
                self.caption_projection_dim,
            ),
        ];
        for i in 0..self.num_layers {
            let b = format!("transformer_blocks.{i}");
            let last = i + 1 == self.num_layers;
            let dual = self.is_dual_attention(i);
            v.push((format!("{b}.norm1.linear"), d, if dual { 9 } else { 6 } * d));
            v.push((
                format!("{b}.norm1_context.linear"),
                d,
                if last { 2 } else { 6 } * d,
            ));
            let mut attn = vec!["attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0"];
            attn.extend(["attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"]);
            if !last {
                attn.push("attn.to_add_out");
            }
            if dual {
                attn.extend(["attn2.to_q", "attn2.to_k", "attn2.to_v", "attn2.to_out.0"]);
            }
            v.extend(attn.into_iter().map(|n| (format!("{b}.{n}"), d, d)));
            v.push((format!("{b}.ff.net.0.proj"), d, 4 * d));
            v.push((format!("{b}.ff.net.2"), 4 * d, d));
            if !last {
                v.push((format!("{b}.ff_context.net.0.proj"), d, 4 * d));
                v.push((format!("{b}.ff_context.net.2"), 4 * d, d));
            }
        }
        v.push(("norm_out.linear".into(), d, 2 * d));
        v.push(("proj_out".into(), d, p * p * self.out_channels));
        v
    }

    /// Number of qk-norm scale parameters.
    fn num_norm_params(&self) -> usize {
        if !self.use_qk_norm() {
            return 0;
        }
        let per_attn = 2 * self.attention_head_dim;
        self.num_layers * 2 * per_attn + self.dual_attention_layers.len() * per_attn
    }

    /// Number of parameters of the base transformer, without the position-embedding buffer.
    pub fn num_params(&self) -> usize {
        let lin: usize = self.linear_shapes().iter().map(|(_, i, o)| i * o + o).sum();
        lin + self.num_norm_params()
    }

    /// Number of LoRA parameters for the given rank and target rule.
    pub fn num_lora_params(&self, rank: usize, targets: impl Fn(&str) -> bool) -> usize {
        self.linear_shapes()
            .iter()
            .filter(|(n, _, _)| targets(n))
            .map(|(_, i, o)| rank * (i + o))
            .sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn published_configs_are_valid_and_sized_right() {
        for c in [
            TransformerConfig::sd3_medium(),
            TransformerConfig::sd3_5_medium(),
            TransformerConfig::sd3_5_large(),
        ] {
            c.check().unwrap();
        }
        // Counted by diffusers on the meta device (scripts/make_parity_fixtures.py prints them).
        assert_eq!(TransformerConfig::sd3_medium().num_params(), 2_028_328_000);
        assert_eq!(
            TransformerConfig::sd3_5_medium().num_params(),
            2_243_171_520
        );
        assert_eq!(TransformerConfig::sd3_5_large().num_params(), 8_056_627_520);
    }

    #[test]
    fn bad_qk_norm_is_rejected_with_its_value() {
        let c = TransformerConfig {
            qk_norm: Some("layer_norm".into()),
            ..TransformerConfig::sd3_medium()
        };
        let e = c.check().unwrap_err().to_string();
        assert!(e.contains("layer_norm"), "{e}");
    }
}
