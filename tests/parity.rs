//! Parity with diffusers' `SD3Transformer2DModel` (+ peft LoRA) on tiny random models built by
//! `scripts/make_parity_fixtures.py`: outputs must match within 1e-4 in f32.

mod common;
use candle_core::{DType, Device};
use common::*;
use dgpo::model::mmdit::sincos_pos_embed;
use dgpo::model::{
    load_transformer, Trainable, TransformerConfig, WeightSource, WeightStore, Weights,
};

const TOL: f64 = 1e-4;

fn check_variant(variant: &str) {
    let io = io(variant, DType::F32);
    let src = WeightSource::from_path(&fixture(variant), None).unwrap();
    let base = load_transformer(&src, &Trainable::None, DType::F32, &Device::Cpu).unwrap();
    let out = forward(&base, &io, Weights::Policy);
    let e_base = max_abs_diff(&out, &io["out"]);

    let m = model_with_lora(variant, DType::F32);
    let on = forward(&m, &io, Weights::Policy);
    let off = forward(&m, &io, Weights::Reference);
    let e_on = max_abs_diff(&on, &io["out_lora"]);
    let e_off = max_abs_diff(&off, &io["out"]);
    println!("{variant}: max abs error base {e_base:.2e}, adapter on {e_on:.2e}, adapter off {e_off:.2e}");
    assert!(e_base <= TOL, "{variant} base: {e_base}");
    assert!(e_on <= TOL, "{variant} adapter on: {e_on}");
    assert!(e_off <= TOL, "{variant} adapter off: {e_off}");
    // The adapter must matter, or the test would prove nothing.
    assert!(max_abs_diff(&on, &off) > 1.0);

    // In f64 only the timestep features remain f32 (in diffusers too), so what is left is the ulp-level
    // difference of two f32 sin/cos implementations, amplified by the network: far below any real bug
    // (a wrong eps, order or constant shows up at 1e-3 or more).
    let io64 = common::io(variant, DType::F64);
    let m = model_with_lora(variant, DType::F64);
    let on = forward(&m, &io64, Weights::Policy);
    let off = forward(&m, &io64, Weights::Reference);
    let (e_on, e_off) = (
        max_abs_diff(&on, &io64["out_lora"]),
        max_abs_diff(&off, &io64["out"]),
    );
    println!("{variant} in f64: adapter on {e_on:.2e}, adapter off {e_off:.2e}");
    assert!(e_on < 2e-5 && e_off < 2e-5, "{variant} f64: {e_on} {e_off}");
}

#[test]
fn parity_sd3_medium_style() {
    check_variant("sd3");
}

#[test]
fn parity_sd35_medium_style_dual_attention_qk_norm() {
    check_variant("sd35_medium");
}

#[test]
fn parity_sd35_large_style_qk_norm_sharded() {
    // This fixture is saved in shards with a `.safetensors.index.json`.
    assert!(
        fixture("sd35_large/transformer/diffusion_pytorch_model.safetensors.index.json").exists()
    );
    check_variant("sd35_large");
}

#[test]
fn parity_stabilityai_single_file_through_the_name_map() {
    let io = io("sd35_medium", DType::F32);
    let src = WeightSource::from_path(
        &fixture("sd35_medium/sai_single_file.safetensors"),
        Some(&fixture("sd35_medium/transformer/config.json")),
    )
    .unwrap();
    let m = load_transformer(&src, &Trainable::None, DType::F32, &Device::Cpu).unwrap();
    let out = forward(&m, &io, Weights::Policy);
    let e = max_abs_diff(&out, &io["out"]);
    println!("single file: max abs error {e:.2e}");
    assert!(e <= TOL, "{e}");
}

#[test]
fn parity_bf16_and_f16_storage_stay_close() {
    let io = io("sd3", DType::F32);
    let src = WeightSource::from_path(&fixture("sd3"), None).unwrap();
    for dt in [DType::BF16, DType::F16] {
        let m = load_transformer(&src, &Trainable::None, dt, &Device::Cpu).unwrap();
        let out = forward(&m, &io, Weights::Policy);
        assert_eq!(out.dtype(), dt);
        let e = max_abs_diff(&out, &io["out"]);
        let scale = max_abs_diff(&io["out"], &io["out"].zeros_like().unwrap());
        println!("{dt:?} storage: max abs error {e:.3} (output scale {scale:.1})");
        assert!(e < 0.1 * scale, "{dt:?}: {e}");
    }
}

#[test]
fn single_file_requires_an_explicit_config() {
    let e = WeightSource::from_path(&fixture("sd35_medium/sai_single_file.safetensors"), None)
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("config.json") && e.contains("never guessed"),
        "{e}"
    );
}

#[test]
fn position_table_matches_the_checkpoint_buffer() {
    let cfg = TransformerConfig::from_json_file(&fixture("sd3/transformer/config.json")).unwrap();
    let t = candle_core::safetensors::load(
        fixture("sd3/transformer/diffusion_pytorch_model.safetensors"),
        &Device::Cpu,
    )
    .unwrap();
    let ours = sincos_pos_embed(
        cfg.inner_dim(),
        cfg.pos_embed_max_size,
        cfg.sample_size / cfg.patch_size,
        &Device::Cpu,
    )
    .unwrap();
    let e = max_abs_diff(&ours, &t["pos_embed.pos_embed"]);
    assert!(e < 1e-5, "{e}");
}

#[test]
fn mismatched_config_lists_missing_unexpected_and_misshapen_tensors() {
    // SD3-style weights read with the SD3.5-Medium-style config: attn2 and qk norms are missing.
    let cfg =
        TransformerConfig::from_json_file(&fixture("sd35_medium/transformer/config.json")).unwrap();
    let tensors = candle_core::safetensors::load(
        fixture("sd3/transformer/diffusion_pytorch_model.safetensors"),
        &Device::Cpu,
    )
    .unwrap();
    let e = dgpo::model::MMDiT::new(
        &cfg,
        WeightStore::new("sd3 weights", tensors, DType::F32),
        &Trainable::None,
        DType::F32,
    )
    .unwrap_err()
    .to_string();
    assert!(e.contains("missing keys"), "{e}");
    assert!(e.contains("transformer_blocks.0.attn2.to_q.weight"), "{e}");
    assert!(
        e.contains("transformer_blocks.0.norm1.linear.weight: expected [288, 32], found [192, 32]"),
        "{e}"
    );
    // Wrong-size config: every tensor's shape is reported, not only the first.
    let mut small = cfg.clone();
    small.dual_attention_layers.clear();
    small.qk_norm = None;
    small.num_layers = 2;
    let tensors = candle_core::safetensors::load(
        fixture("sd3/transformer/diffusion_pytorch_model.safetensors"),
        &Device::Cpu,
    )
    .unwrap();
    let e = dgpo::model::MMDiT::new(
        &small,
        WeightStore::new("sd3 weights", tensors, DType::F32),
        &Trainable::None,
        DType::F32,
    )
    .unwrap_err()
    .to_string();
    assert!(
        e.contains("unexpected keys") && e.contains("transformer_blocks.2."),
        "{e}"
    );
}

#[test]
fn model_layers_agree_with_the_config_enumeration() {
    let m = model_with_lora("sd35_medium", DType::F32);
    let from_model: Vec<(String, usize, usize)> = m
        .linears()
        .iter()
        .map(|l| (l.name.clone(), l.in_features(), l.out_features()))
        .collect();
    let mut a = from_model.clone();
    let mut b = m.cfg.linear_shapes();
    a.sort();
    b.sort();
    assert_eq!(a, b);
    assert_eq!(m.num_base_params(), m.cfg.num_params());
    let lora = m.trainable_vars();
    let spec = lora_file("sd35_medium").spec;
    let n: usize = lora.iter().map(|(_, v)| v.elem_count()).sum();
    assert_eq!(
        n,
        m.cfg.num_lora_params(spec.rank, |x| spec.targets_module(x))
    );
    assert!(lora
        .iter()
        .all(|(k, _)| k.ends_with(".lora_A.weight") || k.ends_with(".lora_B.weight")));
}

#[test]
fn half_precision_files_load_into_an_f32_model() {
    let io = io("sd3", DType::F32);
    let src_dir = fixture("sd3/transformer");
    let tensors = candle_core::safetensors::load(
        src_dir.join("diffusion_pytorch_model.safetensors"),
        &Device::Cpu,
    )
    .unwrap();
    for dt in [DType::BF16, DType::F16] {
        let dir = std::env::temp_dir().join(format!("dgpo-half-{dt:?}-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::copy(src_dir.join("config.json"), dir.join("config.json")).unwrap();
        let half: std::collections::HashMap<String, candle_core::Tensor> = tensors
            .iter()
            .map(|(k, v)| (k.clone(), v.to_dtype(dt).unwrap()))
            .collect();
        candle_core::safetensors::save(&half, dir.join("diffusion_pytorch_model.safetensors"))
            .unwrap();
        let m = load_transformer(
            &WeightSource::from_path(&dir, None).unwrap(),
            &Trainable::None,
            DType::F32,
            &Device::Cpu,
        )
        .unwrap();
        let out = forward(&m, &io, Weights::Policy);
        assert_eq!(out.dtype(), DType::F32);
        let e = max_abs_diff(&out, &io["out"]);
        println!("{dt:?} file, f32 compute: max abs error {e:.3} (weight rounding only)");
        assert!(e > 0.0 && e < 0.2, "{dt:?}: {e}");
        std::fs::remove_dir_all(&dir).ok();
    }
}

#[test]
fn diffusers_lora_file_with_transformer_prefix_loads_like_peft() {
    // diffusers' `save_lora_weights` writes `transformer.<module>.lora_A.weight` without a config.
    let io = io("sd35_large", DType::F32);
    let raw = candle_core::safetensors::load(
        fixture("sd35_large/lora/adapter_model.safetensors"),
        &Device::Cpu,
    )
    .unwrap();
    let renamed: std::collections::HashMap<String, candle_core::Tensor> = raw
        .into_iter()
        .map(|(k, v)| (k.replace("base_model.model.", "transformer."), v))
        .collect();
    let f = std::env::temp_dir().join(format!("dgpo-lora-{}.safetensors", std::process::id()));
    candle_core::safetensors::save(&renamed, &f).unwrap();
    let lf = dgpo::model::lora::load_lora(&f, &Device::Cpu, Some(8.0)).unwrap();
    std::fs::remove_file(&f).ok();
    assert_eq!((lf.spec.rank, lf.spec.alpha), (4, 8.0));
    let src = WeightSource::from_path(&fixture("sd35_large"), None).unwrap();
    let m = load_transformer(
        &src,
        &Trainable::Lora {
            spec: lf.spec.clone(),
            seed: 0,
        },
        DType::F32,
        &Device::Cpu,
    )
    .unwrap();
    m.set_lora(&lf.modules).unwrap();
    let on = forward(&m, &io, Weights::Policy);
    assert!(max_abs_diff(&on, &io["out_lora"]) <= TOL);
}

#[test]
fn lora_for_another_base_is_rejected_with_shapes() {
    // The sd3 fixture's adapter has the same rank but the models differ in layers: loading the
    // sd35_medium adapter into the sd3 model must name the module and shapes, or the extra modules.
    let lf = lora_file("sd35_medium");
    let mut spec = lf.spec.clone();
    spec.rank = 2; // a different-rank adapter set on the model
    let src = WeightSource::from_path(&fixture("sd3"), None).unwrap();
    let m = load_transformer(
        &src,
        &Trainable::Lora { spec, seed: 0 },
        DType::F32,
        &Device::Cpu,
    )
    .unwrap();
    let e = m.set_lora(&lf.modules).unwrap_err().to_string();
    assert!(
        e.contains("expected A [2, 32]") && e.contains("another base model"),
        "{e}"
    );
}

#[test]
fn wrong_input_shapes_are_reported_in_the_callers_terms() {
    let io = io("sd3", DType::F32);
    let m = model_with_lora("sd3", DType::F32);
    let ctx = io["context"].narrow(2, 0, 10).unwrap();
    let e = m
        .forward(&io["x"], &io["t"], &ctx, &io["pooled"], Weights::Policy)
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("context [2, 7, 10] (expected [B, L, 24])"),
        "{e}"
    );
}

#[test]
fn lora_targets_that_match_nothing_are_an_error() {
    let mut spec = lora_file("sd3").spec;
    spec.targets = vec!["attn.to_qq".into()];
    let src = WeightSource::from_path(&fixture("sd3"), None).unwrap();
    let e = load_transformer(
        &src,
        &Trainable::Lora { spec, seed: 0 },
        DType::F32,
        &Device::Cpu,
    )
    .unwrap_err()
    .to_string();
    assert!(
        e.contains("attn.to_qq") && e.contains("match no linear layer"),
        "{e}"
    );
}
