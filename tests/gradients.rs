//! Gradients of the whole transformer against central finite differences (f64), for LoRA and for full
//! fine-tuning, and a check that no gradient is computed for frozen base weights.

mod common;
use candle_core::{DType, Device, Tensor, Var};
use common::*;
use dgpo::model::{load_transformer, MMDiT, Trainable, WeightSource, Weights};

fn loss(m: &MMDiT, io: &std::collections::HashMap<String, Tensor>, r: &Tensor) -> Tensor {
    let out = forward(m, io, Weights::Policy);
    (out * r).unwrap().sum_all().unwrap()
}

fn scalar(t: &Tensor) -> f64 {
    t.to_scalar::<f64>().unwrap()
}

/// Compare `∂L/∂v[idx]` from backprop with a central difference, for a few entries of each var.
fn check(m: &MMDiT, vars: &[(String, Var)], io: &std::collections::HashMap<String, Tensor>) -> f64 {
    // A fixed, deterministic weighting of the output elements.
    let n = io["x"].elem_count();
    let r = Tensor::arange(0f64, n as f64, &Device::Cpu)
        .and_then(|t| (t * 0.731)?.sin()?.reshape(io["x"].dims()))
        .unwrap();
    let grads = loss(m, io, &r).backward().unwrap();
    let mut worst: f64 = 0.0;
    for (name, var) in vars {
        let g = grads
            .get(var.as_tensor())
            .unwrap_or_else(|| panic!("no gradient for {name}"));
        let g: Vec<f64> = g.flatten_all().unwrap().to_vec1().unwrap();
        let v0 = var.as_tensor().copy().unwrap();
        let n = g.len();
        for idx in [0, n / 3, n / 2, n - 1] {
            let h = 1e-5;
            let flat: Vec<f64> = v0.flatten_all().unwrap().to_vec1().unwrap();
            let eval = |delta: f64| {
                let mut f = flat.clone();
                f[idx] += delta;
                var.set(&Tensor::from_vec(f, v0.dims(), &Device::Cpu).unwrap())
                    .unwrap();
                scalar(&loss(m, io, &r))
            };
            let fd = (eval(h) - eval(-h)) / (2.0 * h);
            var.set(&v0).unwrap();
            let err = (fd - g[idx]).abs() / (fd.abs().max(g[idx].abs()).max(1e-3));
            assert!(
                err < 1e-4,
                "{name}[{idx}]: backprop {} vs finite difference {fd}",
                g[idx]
            );
            worst = worst.max(err);
        }
    }
    worst
}

#[test]
fn lora_gradients_match_finite_differences() {
    let io = io("sd35_medium", DType::F64);
    let m = model_with_lora("sd35_medium", DType::F64);
    let vars = m.trainable_vars();
    // A and B of the first, a middle and the last block, context and image projections.
    let pick: Vec<(String, Var)> = vars
        .into_iter()
        .filter(|(n, _)| {
            n.starts_with("transformer_blocks.0.attn.to_q.")
                || n.starts_with("transformer_blocks.1.attn.add_v_proj.")
                || n.starts_with("transformer_blocks.1.attn.to_add_out.")
                || n.starts_with("transformer_blocks.2.attn.to_out.0.")
                || n.starts_with("transformer_blocks.2.attn.add_k_proj.")
        })
        .collect();
    assert_eq!(pick.len(), 10);
    let worst = check(&m, &pick, &io);
    println!(
        "LoRA: worst relative error {worst:.2e} over {} vars",
        pick.len()
    );
}

#[test]
fn full_finetune_gradients_match_finite_differences() {
    let io = io("sd35_medium", DType::F64);
    let src = WeightSource::from_path(&fixture("sd35_medium"), None).unwrap();
    let m = load_transformer(&src, &Trainable::Full, DType::F64, &Device::Cpu).unwrap();
    let vars = m.trainable_vars();
    assert_eq!(
        vars.iter().map(|(_, v)| v.elem_count()).sum::<usize>(),
        m.cfg.num_params()
    );
    let pick: Vec<(String, Var)> = vars
        .into_iter()
        .filter(|(n, _)| {
            [
                "pos_embed.proj.weight",
                "time_text_embed.timestep_embedder.linear_1.weight",
                "context_embedder.bias",
                "transformer_blocks.0.norm1.linear.weight",
                "transformer_blocks.0.attn.norm_added_k.weight",
                "transformer_blocks.1.attn2.norm_q.weight",
                "transformer_blocks.1.ff_context.net.0.proj.weight",
                "transformer_blocks.2.norm1_context.linear.bias",
                "norm_out.linear.weight",
                "proj_out.bias",
            ]
            .contains(&n.as_str())
        })
        .collect();
    assert_eq!(pick.len(), 10);
    let worst = check(&m, &pick, &io);
    println!("full fine-tune: worst relative error {worst:.2e}");
    // The reference weights stay where they were.
    let r = forward(&m, &io, Weights::Reference);
    assert!(max_abs_diff(&r, &io["out"]) < 2e-5);
}

#[test]
fn frozen_base_weights_get_no_gradient() {
    let io = io("sd3", DType::F32);
    let m = model_with_lora("sd3", DType::F32);
    let r = Tensor::ones(io["x"].dims(), DType::F32, &Device::Cpu).unwrap();
    let grads = loss(&m, &io, &r).backward().unwrap();
    for l in m.linears() {
        assert!(
            grads.get(l.weight.value()).is_none(),
            "{} got a weight gradient",
            l.name
        );
    }
    for (n, v) in m.trainable_vars() {
        assert!(grads.get(v.as_tensor()).is_some(), "{n} got no gradient");
    }
}

#[test]
fn no_grad_policy_gives_the_same_output_without_a_graph() {
    let io = io("sd35_medium", DType::F32);
    let m = model_with_lora("sd35_medium", DType::F32);
    let a = forward(&m, &io, Weights::Policy);
    let b = forward(&m, &io, Weights::PolicyNoGrad);
    assert!(a.track_op(), "the training forward must record a graph");
    assert!(!b.track_op(), "the no-grad forward must not");
    assert!(max_abs_diff(&a, &b) < 1e-5);
    assert!(max_abs_diff(&b, &io["out_lora"]) < 1e-4);
}

/// `checkpointed_backward` (blocks recomputed one at a time) gives the gradients of one backward
/// through the whole network: every trainable var, LoRA and full fine-tuning, dual attention
/// (SD3.5-Medium) and plain joint blocks (SD3), in f64.
#[test]
fn checkpointed_backward_equals_the_plain_backward() {
    for (variant, full) in [
        ("sd35_medium", false),
        ("sd35_medium", true),
        ("sd3", false),
    ] {
        let io = io(variant, DType::F64);
        let m = if full {
            let src = WeightSource::from_path(&fixture(variant), None).unwrap();
            load_transformer(&src, &Trainable::Full, DType::F64, &Device::Cpu).unwrap()
        } else {
            model_with_lora(variant, DType::F64)
        };
        let n = io["x"].elem_count();
        let r = Tensor::arange(0f64, n as f64, &Device::Cpu)
            .and_then(|t| (t * 0.731)?.sin()?.reshape(io["x"].dims()))
            .unwrap();
        let plain = loss(&m, &io, &r).backward().unwrap();
        let got_all = m
            .checkpointed_backward(&io["x"], &io["t"], &io["context"], &io["pooled"], &r)
            .unwrap();
        let vars = m.trainable_vars();
        assert!(!vars.is_empty());
        assert_eq!(
            got_all.len(),
            vars.len(),
            "{variant}: one gradient per trainable var"
        );
        for (name, var) in &vars {
            let want = plain.get(var.as_tensor()).unwrap();
            let got = got_all
                .get(&var.id())
                .unwrap_or_else(|| panic!("{variant}: {name} got no checkpointed gradient"));
            let scale = want
                .abs()
                .unwrap()
                .max_all()
                .unwrap()
                .to_scalar::<f64>()
                .unwrap();
            let err = max_abs_diff(got, want);
            assert!(
                err <= 1e-9 * scale.max(1e-12),
                "{variant} (full: {full}): {name}: checkpointed gradient differs by {err:e} (scale {scale:e})"
            );
        }
    }
}
