//! A tiny random shapes pipeline, a few prompts and a config that trains it in seconds (shared by the
//! train, export and sample tests).
#![allow(dead_code)]

use candle_core::Device;
use dgpo::config::Config;
use dgpo::pipeline::shapes::text::{ShapesTokenizer, TextEncoderConfig, TEXT_ENCODER_CLASS};
use dgpo::pipeline::shapes::ShapesPipeline;
use std::collections::HashMap;
use std::path::{Path, PathBuf};

pub fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

pub fn tmp(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("dgpo-tiny-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// The lines of the versioned shapes test prompts (`configs/shapes/test_metadata.jsonl`).
pub fn shapes_test_metadata_lines() -> Vec<String> {
    std::fs::read_to_string(root().join("configs/shapes/test_metadata.jsonl"))
        .unwrap()
        .lines()
        .map(String::from)
        .collect()
}

/// A tiny random pipeline, a few prompts, and a config training it.
pub fn setup(dir: &Path) -> Config {
    let tcfg: dgpo::model::TransformerConfig = serde_json::from_str(
        r#"{"sample_size": 32, "patch_size": 4, "in_channels": 3, "out_channels": 3, "num_layers": 1,
            "attention_head_dim": 8, "num_attention_heads": 2, "joint_attention_dim": 16,
            "caption_projection_dim": 16, "pooled_projection_dim": 12, "pos_embed_max_size": 8,
            "qk_norm": "rms_norm"}"#,
    )
    .unwrap();
    let tok =
        ShapesTokenizer::from_file(&root().join("configs/shapes/tokenizer.json"), 16).unwrap();
    let ecfg = TextEncoderConfig {
        class_name: TEXT_ENCODER_CLASS.into(),
        vocab_size: tok.vocab_size(),
        max_length: 16,
        width: 16,
        num_layers: 1,
        num_heads: 2,
        mlp_ratio: 2,
        context_dim: 16,
        pooled_dim: 12,
        parse_embedding: true,
    };
    let pipe = ShapesPipeline::from_scratch(&tcfg, &ecfg, tok, None, 7, &Device::Cpu).unwrap();
    pipe.save(&dir.join("base"), &HashMap::new(), candle_core::DType::F32)
        .unwrap();
    let lines = shapes_test_metadata_lines();
    std::fs::write(dir.join("train.jsonl"), lines[..12].join("\n")).unwrap();
    std::fs::write(dir.join("test.jsonl"), lines[40..43].join("\n")).unwrap();
    let text = format!(
        r#"
[run]
seed = 1
num_epochs = 3
save_every = 1
eval_every = 2
keep_checkpoints = 2
[model]
pretrained = "{d}/base"
resolution = 32
max_sequence_length = 16
[lora]
rank = 4
alpha = 8.0
[sample]
sampler = "dpm_solver2m"
num_steps = 4
eval_num_steps = 3
group_size = 2
batch_size = 4
num_batches_per_epoch = 1
eval_batch_size = 4
[train]
batch_size = 2
learning_rate = 1e-2
trunc_steps = 2
num_train_timesteps = 2
[prompts]
train = "{d}/train.jsonl"
test = "{d}/test.jsonl"
[[reward]]
kind = "shapes_geneval"
"#,
        d = dir.display()
    );
    Config::from_toml(&text, "tiny", &[]).unwrap()
}
