//! Fresh weights for a transformer built from scratch (the shapes testbed, benchmarks), initialised as
//! DiT / SD3 training code does: Xavier-uniform linears, zero biases, zero adaLN modulations and output
//! projection (so every block starts as the identity), unit qk-norm scales, the sin-cos position table.

use super::config::TransformerConfig;
use super::mmdit::sincos_pos_embed;
use anyhow::Result;
use candle_core::{DType, Device, Tensor};
use rand::SeedableRng;
use rand_distr::{Distribution, Uniform};
use std::collections::HashMap;

/// Diffusers-named tensors for `cfg`, deterministic in `seed`.
pub fn init_weights(
    cfg: &TransformerConfig,
    seed: u64,
    dev: &Device,
) -> Result<HashMap<String, Tensor>> {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let mut w = HashMap::new();
    let p = cfg.patch_size;
    for (name, in_f, out_f) in cfg.linear_shapes() {
        let zero = name.ends_with("norm1.linear")
            || name.ends_with("norm1_context.linear")
            || name == "norm_out.linear"
            || name == "proj_out";
        let weight = if zero {
            Tensor::zeros((out_f, in_f), DType::F32, dev)?
        } else {
            let bound = (6.0 / (in_f + out_f) as f32).sqrt();
            let u = Uniform::new(-bound, bound)?;
            let v: Vec<f32> = (0..in_f * out_f).map(|_| u.sample(&mut rng)).collect();
            Tensor::from_vec(v, (out_f, in_f), dev)?
        };
        let weight = if name == "pos_embed.proj" {
            weight.reshape((out_f, cfg.in_channels, p, p))?
        } else {
            weight
        };
        w.insert(format!("{name}.weight"), weight);
        w.insert(
            format!("{name}.bias"),
            Tensor::zeros(out_f, DType::F32, dev)?,
        );
    }
    if cfg.use_qk_norm() {
        let hd = cfg.attention_head_dim;
        for i in 0..cfg.num_layers {
            let mut norms = vec![
                "attn.norm_q",
                "attn.norm_k",
                "attn.norm_added_q",
                "attn.norm_added_k",
            ];
            if cfg.is_dual_attention(i) {
                norms.extend(["attn2.norm_q", "attn2.norm_k"]);
            }
            for n in norms {
                w.insert(
                    format!("transformer_blocks.{i}.{n}.weight"),
                    Tensor::ones(hd, DType::F32, dev)?,
                );
            }
        }
    }
    let base = cfg.sample_size / cfg.patch_size;
    w.insert(
        "pos_embed.pos_embed".into(),
        sincos_pos_embed(cfg.inner_dim(), cfg.pos_embed_max_size, base.max(1), dev)?,
    );
    Ok(w)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{MMDiT, Trainable, WeightStore, Weights};

    #[test]
    fn fresh_model_loads_without_mismatch_and_starts_at_zero_velocity() {
        let cfg = TransformerConfig {
            sample_size: 8,
            num_layers: 2,
            attention_head_dim: 8,
            num_attention_heads: 2,
            joint_attention_dim: 12,
            caption_projection_dim: 16,
            pooled_projection_dim: 10,
            in_channels: 4,
            out_channels: 4,
            pos_embed_max_size: 8,
            dual_attention_layers: vec![0],
            ..TransformerConfig::sd3_5_medium()
        };
        let dev = Device::Cpu;
        let w = init_weights(&cfg, 1, &dev).unwrap();
        let m = MMDiT::new(
            &cfg,
            WeightStore::new("init", w, DType::F32),
            &Trainable::None,
            DType::F32,
        )
        .unwrap();
        let x = Tensor::randn(0f32, 1.0, (2, 4, 8, 8), &dev).unwrap();
        let t = Tensor::new(&[10f32, 900.], &dev).unwrap();
        let c = Tensor::randn(0f32, 1.0, (2, 5, 12), &dev).unwrap();
        let y = Tensor::randn(0f32, 1.0, (2, 10), &dev).unwrap();
        let v = m.forward(&x, &t, &c, &y, Weights::Policy).unwrap();
        assert_eq!(v.dims(), &[2, 4, 8, 8]);
        assert_eq!(
            v.abs()
                .unwrap()
                .sum_all()
                .unwrap()
                .to_scalar::<f32>()
                .unwrap(),
            0.0
        );
    }
}
