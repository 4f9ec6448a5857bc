//! `dgpo train` on a diffusers SD3 pipeline folder (the tiny random pipeline of
//! `tests/fixtures/sd3_pipeline`): text encoders run once into the embedding cache and are freed,
//! rollouts are decoded by the VAE and scored by the reward modules, evaluations report GenEval
//! scores when a module gives `strict_accuracy`, and a resumed run repeats the uninterrupted one.

mod common;

use candle_core::Device;
use dgpo::config::Config;
use std::path::Path;

use common::tiny::{root, tmp};

use common::metrics_without_times as metrics;

/// A config training the tiny SD3 pipeline: `prompts` names the train/test files, `rewards` the
/// `[[reward]]` tables.
fn config(dir: &Path, prompts: &str, rewards: &str) -> Config {
    let text = format!(
        r#"
[run]
seed = 3
num_epochs = 2
save_every = 1
eval_every = 1
keep_checkpoints = 3
[model]
pretrained = "{fx}"
dtype = "f32"
resolution = 16
max_sequence_length = 16
embedding_cache = "{d}/cache"
[lora]
rank = 2
alpha = 4.0
[sample]
sampler = "dpm_solver2m"
num_steps = 3
eval_num_steps = 2
group_size = 2
batch_size = 4
num_batches_per_epoch = 1
eval_batch_size = 4
eval_images_per_prompt = 2
[train]
batch_size = 2
learning_rate = 1e-2
trunc_steps = 2
num_train_timesteps = 2
ema_every = 1
[prompts]
{prompts}
{rewards}
"#,
        fx = root().join("tests/fixtures/sd3_pipeline").display(),
        d = dir.display()
    );
    Config::from_toml(&text, "tiny-sd3", &[]).unwrap()
}

/// A CLIP score reward on the tiny random CLIP of `tests/fixtures/clip` (continuous, so groups of
/// tiny images differ; JPEG sizes of 16×16 images often tie).
fn clip_reward() -> String {
    format!(
        "[[reward]]\nkind = \"clip_score\"\nmodel = \"{m}\"\nprocessor = \"{m}\"",
        m = root().join("tests/fixtures/clip/gelu").display()
    )
}

/// Embeddings in `<dir>/cache`, over all encoder identities.
fn cache_entries(dir: &Path) -> usize {
    std::fs::read_dir(dir.join("cache")).map_or(0, |rd| {
        rd.map(|d| common::safetensors_count(&d.unwrap().path()))
            .sum()
    })
}

#[test]
fn sd3_pipeline_trains_with_geneval_metadata_and_resumes_exactly() {
    let dir = tmp("train-sd3");
    let lines = common::tiny::shapes_test_metadata_lines();
    std::fs::write(dir.join("train.jsonl"), lines[4..10].join("\n")).unwrap();
    std::fs::write(dir.join("test.jsonl"), lines[16..18].join("\n")).unwrap();
    let cfg = config(
        &dir,
        &format!(
            "train = \"{d}/train.jsonl\"\ntest = \"{d}/test.jsonl\"",
            d = dir.display()
        ),
        &format!(
            "[[reward]]\nkind = \"shapes_geneval\"\n[[reward]]\nkind = \"jpeg_compressibility\"\nweight = 0.1\n{}",
            clip_reward()
        ),
    );
    let dev = Device::Cpu;
    let a = dir.join("a");
    dgpo::train::run(&cfg, &a, false, &dev).unwrap();
    // 6 train + 2 test prompts + the empty one, each encoded once.
    assert_eq!(cache_entries(&dir), 9);
    let ma = metrics(&a);
    let train: Vec<_> = ma.iter().filter(|v| v["kind"] == "train").collect();
    let evals: Vec<_> = ma.iter().filter(|v| v["kind"] == "eval").collect();
    assert_eq!(train.len(), 2, "{ma:?}");
    assert_eq!(evals.len(), 3, "epochs 0 and 1 and the final one: {ma:?}");
    for t in &train {
        for k in ["loss", "kl", "grad_norm", "reward_mean"] {
            assert!(t[k].as_f64().is_some_and(f64::is_finite), "{k} in {t}");
        }
        assert!(
            t.get("reward/shapes_geneval/strict_accuracy").is_some(),
            "{t}"
        );
        assert!(t.get("reward/jpeg_compressibility").is_some(), "{t}");
        assert!(t["grad_norm"].as_f64().unwrap() > 0.0, "{t}");
    }
    for e in &evals {
        // GenEval verdicts come from the shapes_geneval module's sub-metrics.
        assert!(e["geneval_overall"].as_f64().is_some(), "{e}");
        assert!(e["per_tag"]["colors"].as_f64().is_some(), "{e}");
        assert!(e["eval_reward_mean"].as_f64().is_some(), "{e}");
    }
    assert!(a.join("grids/eval-epoch-00000.png").exists());
    let ema = candle_core::safetensors::load(
        a.join("checkpoints/epoch-00002/trainable_ema.safetensors"),
        &dev,
    )
    .unwrap();
    assert!(
        ema.keys().any(|k| k.contains("lora_A")),
        "LoRA tensors: {:?}",
        ema.keys().collect::<Vec<_>>()
    );

    // Killed after epoch 1, resumed (embeddings now all from the cache): the same run.
    let b = dir.join("b");
    dgpo::train::run_until(&cfg, &b, false, &dev, Some(1)).unwrap();
    dgpo::train::run(&cfg, &b, true, &dev).unwrap();
    assert_eq!(ma, metrics(&b));
    let wa = std::fs::read(a.join("checkpoints/epoch-00002/train_state.safetensors")).unwrap();
    let wb = std::fs::read(b.join("checkpoints/epoch-00002/train_state.safetensors")).unwrap();
    assert!(wa == wb, "resumed weights differ");
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn sd3_pipeline_trains_on_plain_prompt_files_without_geneval_scores() {
    let dir = tmp("train-sd3-txt");
    std::fs::write(
        dir.join("train.txt"),
        "a red circle\na blue square\n\na photo of a cat\na green triangle\n",
    )
    .unwrap();
    std::fs::write(dir.join("test.txt"), "a yellow diamond\n").unwrap();
    let prompts = format!(
        "train = \"{d}/train.txt\"\ntest = \"{d}/test.txt\"",
        d = dir.display()
    );
    let rewards = "[[reward]]\nkind = \"jpeg_compressibility\"";
    let mut cfg = config(&dir, &prompts, rewards);
    cfg.run.num_epochs = 1;
    let dev = Device::Cpu;
    dgpo::train::run(&cfg, &dir.join("a"), false, &dev).unwrap();
    let m = metrics(&dir.join("a"));
    let evals: Vec<_> = m.iter().filter(|v| v["kind"] == "eval").collect();
    assert_eq!(evals.len(), 2);
    for e in &evals {
        assert!(e["geneval_overall"].is_null(), "no GenEval module: {e}");
        assert!(e["eval_reward_mean"].as_f64().is_some(), "{e}");
    }
    // T5 off (zeros in its place, as diffusers): another encoder identity, so its own cache folder.
    let mut c = config(&dir, &prompts, rewards);
    c.run.num_epochs = 1;
    c.model.t5 = false;
    dgpo::train::run(&c, &dir.join("no-t5"), false, &dev).unwrap();
    assert_eq!(std::fs::read_dir(dir.join("cache")).unwrap().count(), 2);
    // Tag-balanced sampling needs metadata, the shapes detector is not used on SD3 images, and a
    // resolution that is not the pipeline's is refused, all before any work.
    let mut c = config(&dir, &prompts, rewards);
    c.prompts.sampling = dgpo::config::PromptSampling::ByTag;
    let e = format!(
        "{:#}",
        dgpo::train::run(&c, &dir.join("x"), false, &dev).unwrap_err()
    );
    assert!(e.contains("by_tag") && e.contains("train.txt"), "{e}");
    let mut c = config(&dir, &prompts, rewards);
    c.model.resolution = 512;
    let e = format!(
        "{:#}",
        dgpo::train::run(&c, &dir.join("x"), false, &dev).unwrap_err()
    );
    assert!(e.contains("resolution") && e.contains("16"), "{e}");
    assert!(!dir.join("x").exists(), "nothing written for a refused run");
    std::fs::remove_dir_all(&dir).unwrap();
}

/// The transformer's velocity on fixed inputs (latents, timesteps, the pipeline's own embeddings).
fn probe(p: &mut dgpo::pipeline::sd3::Sd3Pipeline) -> candle_core::Tensor {
    use dgpo::pipeline::Pipeline;
    let dev = Device::Cpu;
    let (c, h, w) = p.latent_shape();
    let x = candle_core::Tensor::arange(0f32, (2 * c * h * w) as f32, &dev)
        .unwrap()
        .reshape((2, c, h, w))
        .unwrap()
        .affine(1e-2, -0.5)
        .unwrap()
        .sin()
        .unwrap();
    let t = candle_core::Tensor::new(&[900f32, 250.], &dev).unwrap();
    let prompts = ["a red circle", "a blue square"];
    p.prepare_prompts(&prompts, 2).unwrap();
    let cond = Pipeline::encode(p, &prompts).unwrap();
    p.transformer
        .forward(
            &x,
            &t,
            &cond.context,
            &cond.pooled,
            dgpo::model::Weights::PolicyNoGrad,
        )
        .unwrap()
}

#[test]
fn sd3_runs_sample_evaluate_and_export() {
    use dgpo::cli::export::{export, ExportArgs, ExportDtype, ExportFormat};
    use dgpo::cli::source::load_sd3_model;
    use dgpo::train::run_dir::WeightsChoice;
    let dir = tmp("sd3-export");
    std::fs::write(dir.join("train.txt"), "a red circle\na blue square\n").unwrap();
    let prompts = format!(
        "train = \"{d}/train.txt\"\ntest = \"{d}/train.txt\"",
        d = dir.display()
    );
    let mut cfg = config(&dir, &prompts, &clip_reward());
    cfg.run.num_epochs = 2;
    cfg.train.learning_rate = 5e-2;
    let dev = Device::Cpu;
    let run = dir.join("run");
    dgpo::train::run(&cfg, &run, false, &dev).unwrap();

    let mut base = load_sd3_model(&cfg, None, WeightsChoice::Ema, &dev).unwrap();
    let mut trained = load_sd3_model(&cfg, Some(&run), WeightsChoice::Ema, &dev).unwrap();
    let (pb, want) = (probe(&mut base.pipe), probe(&mut trained.pipe));
    assert!(
        common::max_abs_diff(&pb, &want) > 1e-6,
        "the run changed the model"
    );
    let ex = |format, out: std::path::PathBuf| {
        export(
            &ExportArgs {
                checkpoint: run.clone(),
                format,
                dtype: ExportDtype::F32,
                weights: WeightsChoice::Ema,
                out,
                max_shard_bytes: usize::MAX,
            },
            &dev,
        )
        .unwrap()
    };
    // Each export loads back (on the config's SD3 base where it is not a whole pipeline) with the
    // run's outputs.
    let lora = dir.join("lora.safetensors");
    ex(ExportFormat::Lora, lora.clone());
    let folder = dir.join("merged");
    ex(ExportFormat::Diffusers, folder.clone());
    assert!(dgpo::pipeline::sd3::is_sd3_pipeline(&folder));
    assert!(folder.join("text_encoder_3/config.json").exists());
    let single = dir.join("single.safetensors");
    ex(ExportFormat::SingleFile, single.clone());
    for p in [&lora, &folder, &single] {
        let mut m = load_sd3_model(&cfg, Some(p), WeightsChoice::Ema, &dev).unwrap();
        let d = common::max_abs_diff(&probe(&mut m.pipe), &want);
        assert!(d < 1e-4, "{}: {d:e}", p.display());
    }

    // dgpo sample compares the base and the run side by side; dgpo eval scores the run with the
    // reward modules.
    let mut a = dgpo::cli::sample::SampleArgs::from_config(&cfg, dir.join("samples"));
    a.checkpoints = vec![dir.join("merged"), run.clone()];
    let summaries = dgpo::cli::sample::run(&cfg, &a, &dev).unwrap();
    let mut bad = a.clone();
    bad.guidance = 0.5;
    let e = dgpo::cli::sample::run(&cfg, &bad, &dev)
        .unwrap_err()
        .to_string();
    assert!(e.contains("--cfg 0.5"), "{e}");
    assert_eq!(summaries.len(), 2);
    assert!(summaries.iter().all(|s| s.reward_mean.is_some()));
    assert!(dir.join("samples/grid.png").exists());
    let j = dir.join("eval.json");
    dgpo::cli::eval::run_cli(&cfg, Some(&run), Some(&j), None, &dev).unwrap();
    let v: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&j).unwrap()).unwrap();
    assert!(v["reward_mean"].as_f64().is_some(), "{v}");
    std::fs::remove_dir_all(&dir).unwrap();
}
