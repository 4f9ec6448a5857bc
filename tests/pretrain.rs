//! Pretraining of the shapes model end to end on a tiny configuration: metrics, checkpoints, the saved
//! pipeline, and `--resume` continuing bit for bit.

use candle_core::Device;
use dgpo::config::Config;
use dgpo::model::Trainable;
use dgpo::pipeline::shapes::ShapesPipeline;
use std::path::{Path, PathBuf};

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn tmp(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("dgpo-pretrain-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// A tiny pipeline configuration and a 6-prompt test file in `dir`.
fn tiny_config(dir: &Path, steps: usize) -> Config {
    let tok = root().join("configs/shapes/tokenizer.json");
    let vocab = tokenizers::Tokenizer::from_file(&tok)
        .unwrap()
        .get_vocab_size(true);
    std::fs::write(
        dir.join("transformer.json"),
        r#"{"sample_size": 4, "patch_size": 1, "in_channels": 12, "out_channels": 12, "num_layers": 1,
            "attention_head_dim": 8, "num_attention_heads": 2, "joint_attention_dim": 16,
            "caption_projection_dim": 16, "pooled_projection_dim": 12, "pos_embed_max_size": 4,
            "qk_norm": "rms_norm"}"#,
    )
    .unwrap();
    std::fs::write(
        dir.join("text_encoder.json"),
        format!(
            r#"{{"_class_name": "DgpoShapesTextEncoder", "vocab_size": {vocab}, "max_length": 16,
                "width": 16, "num_layers": 1, "num_heads": 2, "mlp_ratio": 2, "context_dim": 16,
                "pooled_dim": 12}}"#
        ),
    )
    .unwrap();
    let test: Vec<String> =
        std::fs::read_to_string(root().join("configs/shapes/test_metadata.jsonl"))
            .unwrap()
            .lines()
            .step_by(15)
            .take(6)
            .map(String::from)
            .collect();
    std::fs::write(dir.join("test.jsonl"), test.join("\n")).unwrap();
    let text = format!(
        r#"
[run]
seed = 3
[model]
resolution = 48
[sample]
sampler = "euler"
eval_num_steps = 2
eval_batch_size = 4
eval_images_per_prompt = 1
[prompts]
test = "{d}/test.jsonl"
[pretrain]
transformer_config = "{d}/transformer.json"
text_encoder_config = "{d}/text_encoder.json"
tokenizer = "{tok}"
codec_config = "{codec}"
steps = {steps}
batch_size = 4
warmup_steps = 2
eval_every = 2
save_every = 2
log_every = 1
"#,
        d = dir.display(),
        tok = tok.display(),
        codec = root().join("configs/shapes/codec.json").display()
    );
    std::fs::write(dir.join("tiny.toml"), &text).unwrap();
    Config::from_toml(&text, "tiny", &[]).unwrap()
}

fn dgpo(args: &[&str]) -> (i32, String, String) {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_dgpo"))
        .args(args)
        .current_dir(root())
        .env_remove("RUST_LOG")
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into(),
        String::from_utf8_lossy(&out.stderr).into(),
    )
}

fn model_tensors(dir: &Path) -> Vec<(String, Vec<f32>)> {
    let p = ShapesPipeline::load(dir, &Trainable::None, &Device::Cpu).unwrap();
    let mut all: Vec<(String, candle_core::Tensor)> =
        p.transformer.state_dict().unwrap().into_iter().collect();
    all.extend(p.text.tensors());
    all.sort_by(|a, b| a.0.cmp(&b.0));
    all.into_iter()
        .map(|(k, t)| (k, t.flatten_all().unwrap().to_vec1().unwrap()))
        .collect()
}

#[test]
fn pretrain_writes_metrics_checkpoints_and_a_loadable_model_and_resumes_exactly() {
    let dir = tmp("run");
    let cfg = tiny_config(&dir, 4);
    let dev = Device::Cpu;
    let a = dir.join("a");
    dgpo::train::pretrain::run(&cfg, &a, false, &dev).unwrap();
    let metrics = std::fs::read_to_string(a.join("metrics.jsonl")).unwrap();
    let lines: Vec<serde_json::Value> = metrics
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let train = lines.iter().filter(|v| v["kind"] == "pretrain").count();
    let evals: Vec<&serde_json::Value> = lines.iter().filter(|v| v["kind"] == "eval").collect();
    assert_eq!(train, 4, "{metrics}");
    assert_eq!(
        evals.len(),
        2,
        "an eval at step 2 and a final one: {metrics}"
    );
    for e in &evals {
        let g = e["geneval_overall"].as_f64().unwrap();
        assert!((0.0..=1.0).contains(&g));
        assert!(!e["per_tag"].as_object().unwrap().is_empty());
    }
    assert!(a.join("checkpoint/state.json").exists());
    assert!(a.join("eval.json").exists());
    let final_model = model_tensors(&a.join("model"));
    assert_eq!(final_model, model_tensors(&a.join("checkpoint/model")));

    // Running into the same folder again without --resume is refused.
    let e = dgpo::train::pretrain::run(&cfg, &a, false, &dev)
        .unwrap_err()
        .to_string();
    assert!(e.contains("--resume"), "{e}");

    // Killed after step 3 (checkpoint at 3), resumed: the same final weights, bit for bit.
    let b = dir.join("b");
    dgpo::train::pretrain::run_until(&cfg, &b, false, &dev, Some(3)).unwrap();
    assert!(!b.join("model").exists());
    dgpo::train::pretrain::run(&cfg, &b, true, &dev).unwrap();
    assert_eq!(final_model, model_tensors(&b.join("model")));
    let mb = std::fs::read_to_string(b.join("metrics.jsonl")).unwrap();
    assert_eq!(
        mb.lines().filter(|l| l.contains("\"pretrain\"")).count(),
        4,
        "{mb}"
    );

    // `dgpo eval` on the saved model: table, JSON with the documented names, a PNG grid.
    let cfg_file = dir.join("tiny.toml");
    let json = dir.join("eval.json");
    let grid = dir.join("grid.png");
    let (code, out, err) = dgpo(&[
        "eval",
        "--config",
        cfg_file.to_str().unwrap(),
        "--checkpoint",
        a.join("model").to_str().unwrap(),
        "--json",
        json.to_str().unwrap(),
        "--grid",
        grid.to_str().unwrap(),
    ]);
    assert_eq!(code, 0, "{err}");
    assert!(
        out.contains("color_attr") || out.contains("colors"),
        "{out}"
    );
    let v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    for k in [
        "geneval_overall",
        "per_tag",
        "reward_mean",
        "strict_accuracy",
    ] {
        assert!(v.get(k).is_some(), "{k} missing in {v}");
    }
    let png = std::fs::read(&grid).unwrap();
    assert_eq!(&png[1..4], b"PNG");
    // A folder that is no kind of model is named in the error, before any base model is loaded.
    let (code, _, err) = dgpo(&[
        "eval",
        "--config",
        cfg_file.to_str().unwrap(),
        "--checkpoint",
        dir.to_str().unwrap(),
    ]);
    assert_eq!(code, 1);
    assert!(
        err.contains("is not a dgpo run") && err.contains(dir.to_str().unwrap()),
        "{err}"
    );
    std::fs::remove_dir_all(&dir).unwrap();
}

fn max_diff(a: &[(String, Vec<f32>)], b: &[(String, Vec<f32>)]) -> f32 {
    assert_eq!(a.len(), b.len());
    let mut m = 0f32;
    for ((ka, va), (kb, vb)) in a.iter().zip(b) {
        assert_eq!(ka, kb);
        for (x, y) in va.iter().zip(vb) {
            m = m.max((x - y).abs());
        }
    }
    m
}

#[test]
fn pretrain_init_from_starts_from_a_saved_pipeline_and_refuses_another_model() {
    let dir = tmp("init");
    let mut cfg = tiny_config(&dir, 2);
    // Large steps, so that the source is far from the fresh initialisation (the same seed).
    cfg.pretrain.learning_rate = 5e-2;
    let dev = Device::Cpu;
    let a = dir.join("a");
    dgpo::train::pretrain::run(&cfg, &a, false, &dev).unwrap();
    let source = model_tensors(&a.join("model"));

    // With a learning rate too small to move an f32 weight, the saved model is the source model...
    let mut warm = cfg.clone();
    warm.pretrain.init_from = Some(a.join("model"));
    warm.pretrain.learning_rate = 1e-30;
    dgpo::train::pretrain::run(&warm, &dir.join("b"), false, &dev).unwrap();
    let d = max_diff(&source, &model_tensors(&dir.join("b/model")));
    assert!(d < 1e-6, "warm start moved the weights by {d}");
    // ...while the same run from a fresh initialisation is another model.
    let mut cold = warm.clone();
    cold.pretrain.init_from = None;
    dgpo::train::pretrain::run(&cold, &dir.join("c"), false, &dev).unwrap();
    let d = max_diff(&source, &model_tensors(&dir.join("c/model")));
    assert!(d > 1e-2, "a fresh model equals the source to {d}");

    // A folder holding another architecture is refused, naming the key and the file that differs.
    let other = dir.join("other");
    std::fs::create_dir_all(&other).unwrap();
    let mut small = tiny_config(&other, 2);
    let t = std::fs::read_to_string(other.join("transformer.json"))
        .unwrap()
        .replace("\"num_layers\": 1", "\"num_layers\": 2");
    std::fs::write(other.join("transformer.json"), t).unwrap();
    small.pretrain.init_from = Some(a.join("model"));
    let e = format!(
        "{:#}",
        dgpo::train::pretrain::run(&small, &dir.join("d"), false, &dev).unwrap_err()
    );
    assert!(
        e.contains("pretrain.init_from") && e.contains("transformer/config.json"),
        "{e}"
    );
    // And a folder that is no pipeline at all is named.
    small.pretrain.init_from = Some(dir.clone());
    let e = format!(
        "{:#}",
        dgpo::train::pretrain::run(&small, &dir.join("e"), false, &dev).unwrap_err()
    );
    assert!(e.contains("not a shapes pipeline folder"), "{e}");
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn versioned_tokenizer_covers_the_prompt_space_exactly() {
    let (train, test) = dgpo::testbed::prompt_split();
    let mut words: Vec<String> = train
        .iter()
        .chain(&test)
        .flat_map(|m| {
            m.prompt
                .split_whitespace()
                .map(String::from)
                .collect::<Vec<_>>()
        })
        .collect();
    words.sort();
    words.dedup();
    let built = dgpo::pipeline::shapes::text::build_tokenizer(&words).unwrap();
    let path = root().join("configs/shapes/tokenizer.json");
    if std::env::var("DGPO_REGENERATE").is_ok() {
        built.save(&path, true).unwrap();
    }
    let shipped = tokenizers::Tokenizer::from_file(&path).unwrap_or_else(|e| {
        panic!(
            "{}: {e}; regenerate with DGPO_REGENERATE=1 cargo test --test pretrain",
            path.display()
        )
    });
    assert_eq!(
        shipped
            .get_vocab(true)
            .into_iter()
            .collect::<std::collections::BTreeMap<_, _>>(),
        built
            .get_vocab(true)
            .into_iter()
            .collect::<std::collections::BTreeMap<_, _>>(),
        "the tokenizer is stale; regenerate with DGPO_REGENERATE=1 cargo test --test pretrain"
    );
    let enc: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(root().join("configs/shapes/text_encoder.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(
        enc["vocab_size"].as_u64().unwrap() as usize,
        shipped.get_vocab_size(true)
    );
}
