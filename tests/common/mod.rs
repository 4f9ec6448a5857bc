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
