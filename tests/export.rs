//! `dgpo export` and `dgpo sample` on a tiny trained run: every export format loads back into dgpo
//! and gives the run's outputs; the side-by-side sample writes its files and reproduces itself from
//! its saved noise; bad input fails with messages that name the culprit.

mod common;

use candle_core::{DType, Device, Tensor};
use common::tiny::{setup, tmp};
use dgpo::cli::export::{export, ExportArgs, ExportDtype, ExportFormat};
use dgpo::cli::source::load_model;
use dgpo::config::Config;
use dgpo::model::Weights;
use dgpo::pipeline::shapes::ShapesPipeline;
use dgpo::train::run_dir::WeightsChoice;
use std::path::{Path, PathBuf};

/// A tiny LoRA run of 2 epochs. A random model earns no reward, so its adapter would stay at zero:
/// the checkpoint's `lora_B` tensors (raw and EMA, different values) are then set at random, as a
/// real run would have moved them.
fn trained_run(name: &str) -> (PathBuf, Config) {
    let dir = tmp(name);
    let mut cfg = setup(&dir);
    cfg.run.num_epochs = 2;
    cfg.run.eval_every = 100;
    let run = dir.join("run");
    let dev = Device::Cpu;
    // a fresh init zeroes the output layer and the adaLN modulations: move every base weight so
    // that the output depends on all of them
    let bf = PathBuf::from(&cfg.model.pretrained)
        .join("transformer/diffusion_pytorch_model.safetensors");
    let mut b = candle_core::safetensors::load(&bf, &dev).unwrap();
    for v in b.values_mut() {
        *v = (&*v + (Tensor::randn(0f32, 1., v.dims(), &dev).unwrap() * 0.05).unwrap()).unwrap();
    }
    candle_core::safetensors::save(&b, &bf).unwrap();
    dgpo::train::run(&cfg, &run, false, &dev).unwrap();
    let ck = run.join("checkpoints/epoch-00002/train_state.safetensors");
    let mut t = candle_core::safetensors::load(&ck, &dev).unwrap();
    let mut n = 0;
    for (k, v) in t.iter_mut() {
        if k.ends_with("lora_B.weight") && !k.starts_with("ema_ref.") {
            let s = if k.starts_with("raw.") { 0.2 } else { 0.1 };
            *v = (Tensor::randn(0f32, 1., v.dims(), &dev).unwrap() * s).unwrap();
            n += 1;
        }
    }
    assert!(n > 0);
    candle_core::safetensors::save(&t, &ck).unwrap();
    (dir, cfg)
}

/// One transformer forward on fixed inputs with the prompt's conditioning.
fn probe(pipe: &ShapesPipeline) -> Tensor {
    let dev = Device::Cpu;
    let (c, h, w) = pipe.latent_shape();
    let x = Tensor::arange(0f32, (2 * c * h * w) as f32, &dev)
        .unwrap()
        .reshape((2, c, h, w))
        .unwrap()
        .affine(1e-3, -0.5)
        .unwrap()
        .sin()
        .unwrap();
    let t = Tensor::new(&[900f32, 250.], &dev).unwrap();
    let cond = pipe
        .encode(&["a photo of a red circle", "a photo of two squares"])
        .unwrap();
    pipe.transformer
        .forward(&x, &t, &cond.context, &cond.pooled, Weights::PolicyNoGrad)
        .unwrap()
}

fn header(path: &Path) -> std::collections::HashMap<String, String> {
    let bytes = std::fs::read(path).unwrap();
    let (_, m) = safetensors::SafeTensors::read_metadata(&bytes).unwrap();
    m.metadata().clone().unwrap_or_default()
}

fn args(run: &Path, format: ExportFormat, out: PathBuf) -> ExportArgs {
    ExportArgs {
        checkpoint: run.to_path_buf(),
        format,
        dtype: ExportDtype::F32,
        weights: WeightsChoice::Ema,
        out,
        max_shard_bytes: usize::MAX,
    }
}

#[test]
fn every_export_format_loads_back_with_the_runs_outputs() {
    let (dir, cfg) = trained_run("export");
    let dev = Device::Cpu;
    let run = dir.join("run");
    let trained = load_model(&cfg, Some(&run), WeightsChoice::Ema, &dev).unwrap();
    let want = probe(&trained.pipe);
    let base = load_model(&cfg, None, WeightsChoice::Ema, &dev).unwrap();
    let base_out = probe(&base.pipe);
    let moved = common::max_abs_diff(&want, &base_out);
    assert!(moved > 1e-3, "the adapter must change the output ({moved})");
    // the raw weights differ from the slow EMA
    let raw = load_model(&cfg, Some(&run), WeightsChoice::Raw, &dev).unwrap();
    assert!(common::max_abs_diff(&probe(&raw.pipe), &want) > 1e-6);

    // LoRA: loads back through the generic LoRA loader on the config's base
    let lora = dir.join("out/lora.safetensors");
    let r = export(&args(&run, ExportFormat::Lora, lora.clone()), &dev).unwrap();
    assert_eq!(r.files, vec![lora.clone()]);
    let m = load_model(&cfg, Some(&lora), WeightsChoice::Ema, &dev).unwrap();
    let d = common::max_abs_diff(&probe(&m.pipe), &want);
    assert!(d < 1e-5, "lora round trip differs by {d}");
    let h = header(&lora);
    assert_eq!(h["dgpo_epoch"], "2");
    assert_eq!(h["dgpo_weights"], "ema");
    assert_eq!(h["dgpo_base_model"], cfg.model.pretrained);
    assert_eq!(h["dgpo_lora_alpha"], "8");
    let meta: serde_json::Value = serde_json::from_str(&h["lora_adapter_metadata"]).unwrap();
    assert_eq!(meta["transformer.r"], 4);
    assert_eq!(meta["transformer.lora_alpha"], 4, "scale folded into B");
    let keys = {
        let bytes = std::fs::read(&lora).unwrap();
        let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
        let mut k: Vec<String> = st.names().into_iter().map(String::from).collect();
        k.sort();
        k
    };
    assert!(keys.contains(&"transformer.transformer_blocks.0.attn.to_q.lora_A.weight".to_string()));
    assert!(keys.iter().all(|k| k.starts_with("transformer.")
        && (k.ends_with(".lora_A.weight") || k.ends_with(".lora_B.weight"))));

    // diffusers: a merged pipeline folder, sharded when asked, equal to base + LoRA
    let folder = dir.join("out/merged");
    let mut a = args(&run, ExportFormat::Diffusers, folder.clone());
    a.max_shard_bytes = 20_000;
    export(&a, &dev).unwrap();
    let t = folder.join("transformer");
    assert!(t.join("config.json").is_file());
    let index: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(t.join("diffusion_pytorch_model.safetensors.index.json")).unwrap(),
    )
    .unwrap();
    let shards: std::collections::BTreeSet<&str> = index["weight_map"]
        .as_object()
        .unwrap()
        .values()
        .map(|v| v.as_str().unwrap())
        .collect();
    assert!(shards.len() > 1, "{shards:?}");
    let m = load_model(&cfg, Some(&folder), WeightsChoice::Ema, &dev).unwrap();
    assert_eq!(m.kind, dgpo::cli::source::SourceKind::Pipeline);
    let d = common::max_abs_diff(&probe(&m.pipe), &want);
    assert!(d < 1e-4, "merged diffusers export differs by {d}");

    // single file (StabilityAI layout), on the config's base text encoder
    let single = dir.join("out/single.safetensors");
    export(&args(&run, ExportFormat::SingleFile, single.clone()), &dev).unwrap();
    let bytes = std::fs::read(&single).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    assert!(st
        .names()
        .iter()
        .all(|k| k.starts_with("model.diffusion_model.")));
    let m = load_model(&cfg, Some(&single), WeightsChoice::Ema, &dev).unwrap();
    assert_eq!(m.kind, dgpo::cli::source::SourceKind::SingleFile);
    let d = common::max_abs_diff(&probe(&m.pipe), &want);
    assert!(d < 1e-4, "single-file export differs by {d}");

    // half precision stores half the bytes and stays close
    let half = dir.join("out/merged-f16");
    let mut a = args(&run, ExportFormat::Diffusers, half.clone());
    a.dtype = ExportDtype::F16;
    export(&a, &dev).unwrap();
    let st_bytes =
        std::fs::read(half.join("transformer/diffusion_pytorch_model.safetensors")).unwrap();
    let st = safetensors::SafeTensors::deserialize(&st_bytes).unwrap();
    assert!(st
        .tensors()
        .iter()
        .all(|(_, v)| v.dtype() == safetensors::Dtype::F16));
    let m = load_model(&cfg, Some(&half), WeightsChoice::Ema, &dev).unwrap();
    let d = common::max_abs_diff(&probe(&m.pipe), &want);
    assert!(d < 5e-2, "f16 export differs by {d}");
    let _ = DType::F16;
}

#[test]
fn bad_exports_and_checkpoints_say_what_is_wrong() {
    let (dir, cfg) = trained_run("export-bad");
    let dev = Device::Cpu;
    let run = dir.join("run");
    // not a run
    let e = export(
        &args(
            &dir.join("nowhere"),
            ExportFormat::Lora,
            dir.join("x.safetensors"),
        ),
        &dev,
    )
    .unwrap_err();
    assert!(format!("{e:#}").contains("nowhere"), "{e:#}");
    let e = load_model(&cfg, Some(&dir.join("missing")), WeightsChoice::Ema, &dev)
        .err()
        .unwrap();
    assert!(format!("{e:#}").contains("missing"), "{e:#}");
    // a LoRA for another base: a wider base model
    let lora = dir.join("lora.safetensors");
    export(&args(&run, ExportFormat::Lora, lora.clone()), &dev).unwrap();
    let other_dir = dir.join("other");
    std::fs::create_dir_all(&other_dir).unwrap();
    let tcfg: dgpo::model::TransformerConfig = serde_json::from_str(
        r#"{"sample_size": 32, "patch_size": 4, "in_channels": 3, "out_channels": 3, "num_layers": 1,
            "attention_head_dim": 8, "num_attention_heads": 3, "joint_attention_dim": 16,
            "caption_projection_dim": 24, "pooled_projection_dim": 12, "pos_embed_max_size": 8,
            "qk_norm": "rms_norm"}"#,
    )
    .unwrap();
    let base = ShapesPipeline::load(
        Path::new(&cfg.model.pretrained),
        &dgpo::model::Trainable::None,
        &dev,
    )
    .unwrap();
    let other =
        ShapesPipeline::from_scratch(&tcfg, &base.text.cfg, base.tokenizer.clone(), None, 3, &dev)
            .unwrap();
    other
        .save(&other_dir.join("base"), &Default::default(), DType::F32)
        .unwrap();
    let mut cfg2 = cfg.clone();
    cfg2.model.pretrained = other_dir.join("base").display().to_string();
    let e = load_model(&cfg2, Some(&lora), WeightsChoice::Ema, &dev)
        .err()
        .unwrap();
    let msg = format!("{e:#}");
    assert!(
        msg.contains("another base") && msg.contains("lora.safetensors"),
        "{msg}"
    );
    // nothing half-written: a failed export leaves no output file behind
    assert!(!dir.join("x.safetensors").exists());
}

#[test]
fn sample_compares_models_on_the_same_noise_and_reproduces_itself() {
    let (dir, cfg) = trained_run("sample");
    let dev = Device::Cpu;
    let out = dir.join("samples");
    let mut a = dgpo::cli::sample::SampleArgs::from_config(&cfg, out.clone());
    a.checkpoints = vec![PathBuf::from(&cfg.model.pretrained), dir.join("run")];
    a.images_per_prompt = 2;
    a.steps = 3;
    let s = dgpo::cli::sample::run(&cfg, &a, &dev).unwrap();
    let n_prompts = std::fs::read_to_string(cfg.prompts.test.as_ref().unwrap())
        .unwrap()
        .lines()
        .filter(|l| !l.trim().is_empty())
        .count();
    assert_eq!(s.len(), 2);
    for m in &s {
        let g = m
            .geneval
            .as_ref()
            .expect("jsonl prompts give GenEval scores");
        assert_eq!(g.n, n_prompts * 2);
        assert!(m.reward_mean.is_some());
    }
    let scores = std::fs::read_to_string(out.join("scores.jsonl")).unwrap();
    let lines: Vec<serde_json::Value> = scores
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 2 * n_prompts * 2);
    for l in &lines {
        for k in [
            "model",
            "prompt",
            "prompt_index",
            "image_index",
            "seed",
            "reward",
            "tag",
        ] {
            assert!(l.get(k).is_some(), "{k} missing in {l}");
        }
        assert!(l.get("shapes_geneval/strict_accuracy").is_some(), "{l}");
        assert!(out.join(l["image"].as_str().unwrap()).is_file());
    }
    let grid = png_size(&out.join("grid.png"));
    assert_eq!(grid.1, 2 + n_prompts * (32 + 2));
    assert!(grid.0 > 2 * 2 * 32, "two models side by side: {grid:?}");
    let html = std::fs::read_to_string(out.join("index.html")).unwrap();
    assert!(html.contains("a photo of"), "prompts under their images");
    let summary: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("summary.json")).unwrap()).unwrap();
    assert_eq!(summary["models"].as_array().unwrap().len(), 2);

    // the saved noise reproduces the images exactly
    let out2 = dir.join("samples2");
    let mut b = a.clone();
    b.out = out2.clone();
    b.seed = 12345;
    b.noise = Some(out.join("noise.safetensors"));
    dgpo::cli::sample::run(&cfg, &b, &dev).unwrap();
    for p in [
        "images/0/p0000_i00.png",
        "images/1/p0001_i01.png",
        "grid.png",
    ] {
        assert_eq!(
            std::fs::read(out.join(p)).unwrap(),
            std::fs::read(out2.join(p)).unwrap(),
            "{p}"
        );
    }
    // noise of the wrong shape is refused with both shapes named
    let bad = dir.join("bad-noise.safetensors");
    let t = Tensor::zeros((3, 3, 8, 8), DType::F32, &dev).unwrap();
    t.save_safetensors("noise", &bad).unwrap();
    let mut c = a.clone();
    c.out = dir.join("samples3");
    c.noise = Some(bad);
    let e = dgpo::cli::sample::run(&cfg, &c, &dev).unwrap_err();
    assert!(format!("{e:#}").contains("[3, 3, 8, 8]"), "{e:#}");
    // a prompt file with a broken line names the file and the line
    let broken = dir.join("broken.jsonl");
    let good = std::fs::read_to_string(cfg.prompts.test.as_ref().unwrap()).unwrap();
    let first = good.lines().next().unwrap();
    std::fs::write(
        &broken,
        format!("{first}\n{{\"tag\": \"colors\", \"prompt\": 3}}\n"),
    )
    .unwrap();
    let mut d = a.clone();
    d.out = dir.join("samples4");
    d.prompt_file = Some(broken);
    let e = dgpo::cli::sample::run(&cfg, &d, &dev).unwrap_err();
    assert!(format!("{e:#}").contains("broken.jsonl:2"), "{e:#}");
}

fn png_size(p: &Path) -> (usize, usize) {
    let dec = png::Decoder::new(std::io::BufReader::new(std::fs::File::open(p).unwrap()));
    let r = dec.read_info().unwrap();
    let i = r.info();
    (i.width as usize, i.height as usize)
}

/// Fixture for `scripts/check_export_diffusers.sh` (run by hand): a tiny run with a random adapter,
/// exported in every format, plus fixed transformer inputs and dgpo's outputs for the base and the
/// fine-tuned model, written to `$DGPO_EXPORT_CHECK_DIR`.
#[test]
#[ignore = "writes the fixture of scripts/check_export_diffusers.sh"]
fn write_diffusers_check_fixture() {
    let Some(out) = std::env::var_os("DGPO_EXPORT_CHECK_DIR").map(PathBuf::from) else {
        panic!("set DGPO_EXPORT_CHECK_DIR");
    };
    let (dir, cfg) = trained_run("diffusers-check");
    let dev = Device::Cpu;
    let run = dir.join("run");
    let _ = std::fs::remove_dir_all(&out);
    std::fs::create_dir_all(&out).unwrap();
    let base = load_model(&cfg, None, WeightsChoice::Ema, &dev).unwrap();
    base.pipe
        .save(&out.join("base"), &Default::default(), DType::F32)
        .unwrap();
    export(
        &args(
            &run,
            ExportFormat::Lora,
            out.join("pytorch_lora_weights.safetensors"),
        ),
        &dev,
    )
    .unwrap();
    export(
        &args(&run, ExportFormat::Diffusers, out.join("merged")),
        &dev,
    )
    .unwrap();
    export(
        &args(
            &run,
            ExportFormat::SingleFile,
            out.join("single.safetensors"),
        ),
        &dev,
    )
    .unwrap();
    let trained = load_model(&cfg, Some(&run), WeightsChoice::Ema, &dev).unwrap();
    let (c, h, w) = base.pipe.latent_shape();
    let x = Tensor::randn(0f32, 1., (2, c, h, w), &dev).unwrap();
    let t = Tensor::new(&[900f32, 250.], &dev).unwrap();
    let cond = base
        .pipe
        .encode(&["a photo of a red circle", "a photo of two squares"])
        .unwrap();
    let fwd = |p: &ShapesPipeline| {
        p.transformer
            .forward(&x, &t, &cond.context, &cond.pooled, Weights::PolicyNoGrad)
            .unwrap()
    };
    let tensors = std::collections::HashMap::from([
        ("x".to_string(), x.clone()),
        ("t".to_string(), t.clone()),
        ("context".to_string(), cond.context.clone()),
        ("pooled".to_string(), cond.pooled.clone()),
        ("out_base".to_string(), fwd(&base.pipe)),
        ("out_tuned".to_string(), fwd(&trained.pipe)),
    ]);
    candle_core::safetensors::save(&tensors, out.join("io.safetensors")).unwrap();
}
