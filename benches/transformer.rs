//! Baseline speed of the MMDiT on CPU: forward and LoRA forward+backward time per sample and achieved
//! GFLOP/s, for a tiny and a small config. Later speed work is measured against these figures.
//!
//!     cargo bench --bench transformer            # both configs
//!     cargo bench --bench transformer -- small   # one

use candle_core::{DType, Device, Tensor};
use dgpo::model::init::init_weights;
use dgpo::model::lora::LoraSpec;
use dgpo::model::{MMDiT, Trainable, TransformerConfig, WeightStore, Weights};
mod common;

use common::median as time;

struct Case {
    name: &'static str,
    cfg: TransformerConfig,
    latent: usize,
    text_tokens: usize,
    batch: usize,
    rank: usize,
}

fn cases() -> Vec<Case> {
    let base = TransformerConfig {
        sample_size: 32,
        patch_size: 2,
        in_channels: 4,
        out_channels: 4,
        pos_embed_max_size: 32,
        joint_attention_dim: 64,
        pooled_projection_dim: 64,
        dual_attention_layers: vec![],
        qk_norm: Some("rms_norm".into()),
        ..TransformerConfig::sd3_medium()
    };
    vec![
        Case {
            name: "tiny",
            cfg: TransformerConfig {
                num_layers: 2,
                num_attention_heads: 2,
                attention_head_dim: 32,
                caption_projection_dim: 64,
                ..base.clone()
            },
            latent: 16,
            text_tokens: 16,
            batch: 8,
            rank: 8,
        },
        Case {
            name: "small",
            cfg: TransformerConfig {
                num_layers: 6,
                num_attention_heads: 3,
                attention_head_dim: 64,
                caption_projection_dim: 192,
                ..base
            },
            latent: 32,
            text_tokens: 32,
            batch: 8,
            rank: 16,
        },
    ]
}

fn main() {
    let filter: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| !a.starts_with('-'))
        .collect();
    let dev = Device::Cpu;
    println!(
        "threads: {} (candle CPU backend, f32)",
        candle_core::utils::get_num_threads()
    );
    for c in cases() {
        if !filter.is_empty() && !filter.iter().any(|f| c.name.contains(f.as_str())) {
            continue;
        }
        let w = init_weights(&c.cfg, 0, &dev).unwrap();
        // Random (not zero) modulations so that no path is trivially cheap.
        let w = w
            .into_iter()
            .map(|(k, v)| {
                let r = v.randn_like(0.0, 0.02).unwrap();
                (k, r)
            })
            .collect();
        let spec = LoraSpec {
            rank: c.rank,
            alpha: c.rank as f64,
            ..LoraSpec::paper_default()
        };
        let lora = MMDiT::new(
            &c.cfg,
            WeightStore::new("bench", w, DType::F32),
            &Trainable::Lora { spec, seed: 0 },
            DType::F32,
        )
        .unwrap();
        let b = c.batch;
        let x = Tensor::randn(0f32, 1.0, (b, c.cfg.in_channels, c.latent, c.latent), &dev).unwrap();
        let t = Tensor::full(500f32, b, &dev).unwrap();
        let ctx = Tensor::randn(
            0f32,
            1.0,
            (b, c.text_tokens, c.cfg.joint_attention_dim),
            &dev,
        )
        .unwrap();
        let pooled = Tensor::randn(0f32, 1.0, (b, c.cfg.pooled_projection_dim), &dev).unwrap();
        let n_img = (c.latent / c.cfg.patch_size).pow(2);
        let flops = c.cfg.forward_flops(n_img, c.text_tokens);

        let fwd = time(
            || {
                lora.forward(&x, &t, &ctx, &pooled, Weights::PolicyNoGrad)
                    .unwrap();
            },
            5,
        );
        let train = time(
            || {
                let v = lora
                    .forward(&x, &t, &ctx, &pooled, Weights::Policy)
                    .unwrap();
                v.sqr().unwrap().mean_all().unwrap().backward().unwrap();
            },
            5,
        );
        let per = |s: f64| s * 1e3 / b as f64;
        println!(
            "{:<6} layers {} hidden {} tokens {}+{} batch {} LoRA r={} | {:.2} GFLOP/sample fwd",
            c.name,
            c.cfg.num_layers,
            c.cfg.inner_dim(),
            n_img,
            c.text_tokens,
            b,
            c.rank,
            flops / 1e9
        );
        println!(
            "  LoRA forward (no grad) {:>8.2} ms/sample  {:>6.1} GFLOP/s",
            per(fwd),
            flops * b as f64 / fwd / 1e9
        );
        println!(
            "  LoRA forward+backward  {:>8.2} ms/sample  {:>6.1} GFLOP/s (2× forward FLOPs: frozen weights get no gradient)",
            per(train),
            2.0 * flops * b as f64 / train / 1e9
        );
    }
}
