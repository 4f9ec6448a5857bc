//! Shared helpers for the integration tests: fixture paths and tensor comparisons.
#![allow(dead_code)]

pub mod tiny;

use candle_core::{DType, Device, Tensor};
use dgpo::model::lora::{load_lora, LoraFile};
use dgpo::model::{load_transformer, MMDiT, Trainable, WeightSource};
use std::collections::HashMap;
use std::path::PathBuf;

pub fn fixture(variant: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/parity")
        .join(variant)
}

pub fn io(variant: &str, dtype: DType) -> HashMap<String, Tensor> {
    let t = candle_core::safetensors::load(fixture(variant).join("io.safetensors"), &Device::Cpu)
        .unwrap();
    t.into_iter()
        .map(|(k, v)| (k, v.to_dtype(dtype).unwrap()))
        .collect()
}

pub fn max_abs_diff(a: &Tensor, b: &Tensor) -> f64 {
    dgpo::model::nn::max_abs_diff(a, b).unwrap()
}

pub fn lora_file(variant: &str) -> LoraFile {
    load_lora(&fixture(variant).join("lora"), &Device::Cpu, None).unwrap()
}

/// The fixture's transformer with the fixture's LoRA loaded into fresh adapters.
pub fn model_with_lora(variant: &str, dtype: DType) -> MMDiT {
    let lf = lora_file(variant);
    let src = WeightSource::from_path(&fixture(variant).join("transformer"), None).unwrap();
    let m = load_transformer(
        &src,
        &Trainable::Lora {
            spec: lf.spec.clone(),
            seed: 0,
        },
        dtype,
        &Device::Cpu,
    )
    .unwrap();
    m.set_lora(&lf.modules).unwrap();
    m
}

/// The model on a fixture's inputs.
pub fn forward(m: &MMDiT, io: &HashMap<String, Tensor>, w: dgpo::model::Weights) -> Tensor {
    m.forward(&io["x"], &io["t"], &io["context"], &io["pooled"], w)
        .unwrap()
}

/// `<run>/metrics.jsonl` without wall-clock fields (`wall_s`, `*_s`), for comparing runs.
pub fn metrics_without_times(run: &std::path::Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(run.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| {
            let mut v: serde_json::Value = serde_json::from_str(l).unwrap();
            v.as_object_mut()
                .unwrap()
                .retain(|k, _| !(k == "wall_s" || k.ends_with("_s")));
            v
        })
        .collect()
}

/// How many `.safetensors` files `dir` holds (0 when it does not exist).
pub fn safetensors_count(dir: &std::path::Path) -> usize {
    std::fs::read_dir(dir).map_or(0, |rd| {
        rd.filter(|f| {
            f.as_ref()
                .unwrap()
                .path()
                .extension()
                .is_some_and(|x| x == "safetensors")
        })
        .count()
    })
}

/// The tiny SD3 pipeline of `tests/fixtures/sd3_pipeline`, f32 on the CPU, `t5_len` T5 tokens,
/// every component loaded, no embedding cache.
pub fn sd3_fixture_pipeline(t5_len: usize) -> dgpo::pipeline::sd3::Sd3Pipeline {
    dgpo::pipeline::sd3::Sd3Pipeline::load(
        &tiny::root().join("tests/fixtures/sd3_pipeline"),
        &Trainable::None,
        t5_len,
        true,
        DType::F32,
        &Device::Cpu,
    )
    .unwrap()
}
