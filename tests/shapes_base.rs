//! The shipped shapes base model (`configs/shapes/base/`): small enough to version, loads through the
//! pipeline code, and draws coloured objects the detector finds (it is a weak base: see the README).

use candle_core::Device;
use dgpo::eval::{evaluate, EvalSettings};
use dgpo::geneval::read_metadata;
use dgpo::model::{Trainable, Weights};
use dgpo::pipeline::shapes::ShapesPipeline;
use std::path::PathBuf;

fn base() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("configs/shapes/base")
}

fn folder_size(p: &std::path::Path) -> u64 {
    std::fs::read_dir(p)
        .unwrap()
        .map(|e| {
            let e = e.unwrap();
            if e.file_type().unwrap().is_dir() {
                folder_size(&e.path())
            } else {
                e.metadata().unwrap().len()
            }
        })
        .sum()
}

#[test]
fn shipped_base_model_is_small_loads_and_draws_objects() {
    let size = folder_size(&base());
    assert!(size <= 10 * 1024 * 1024, "base model is {size} bytes");
    let pipe = ShapesPipeline::load(&base(), &Trainable::None, &Device::Cpu).unwrap();
    let test = read_metadata(
        &PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("configs/shapes/test_metadata.jsonl"),
    )
    .unwrap();
    // Every sixth test prompt (13 prompts, all six tags), two images each.
    let some: Vec<_> = test.into_iter().step_by(6).collect();
    let s = EvalSettings {
        sampler: dgpo::config::Sampler::Euler,
        num_steps: 14,
        guidance: 4.5,
        shift: 3.0,
        images_per_prompt: 2,
        batch_size: 32,
        seed: 0,
    };
    let r = evaluate(&pipe, &some, &s, Weights::PolicyNoGrad, false).unwrap();
    println!("{}", r.summary.table());
    let with_objects = r
        .images
        .iter()
        .filter(|im| !dgpo::testbed::detect(im).is_empty())
        .count();
    println!(
        "{with_objects}/{} images with a detected object",
        r.images.len()
    );
    assert!(
        with_objects * 2 >= r.images.len(),
        "the base model should draw objects: {with_objects}/{}",
        r.images.len()
    );
    assert!(
        r.summary.reward_mean >= 0.1,
        "mean GenEval-shapes reward {} (the shipped model scores about 0.2–0.28 here)",
        r.summary.reward_mean
    );
}
