//! `dgpo train` on a diffusers SD3 pipeline folder (the tiny random pipeline of
//! `tests/fixtures/sd3_pipeline`): text encoders run once into the embedding cache and are freed,
//! rollouts are decoded by the VAE and scored by the reward modules, evaluations report GenEval
//! scores when a module gives `strict_accuracy`, and a resumed run repeats the uninterrupted one.

mod common;

use candle_core::Device;
use dgpo::config::Config;
use std::path::Path;

use common::tiny::{root, tmp};

/// Metric lines without wall-clock fields.
fn metrics(out: &Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(out.join("metrics.jsonl"))
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
[prompts]
{prompts}
{rewards}
"#,
        fx = root().join("tests/fixtures/sd3_pipeline").display(),
        d = dir.display()
    );
    Config::from_toml(&text, "tiny-sd3", &[]).unwrap()
}

fn cache_entries(dir: &Path) -> usize {
    let Ok(rd) = std::fs::read_dir(dir.join("cache")) else {
        return 0;
    };
    rd.map(|d| {
        std::fs::read_dir(d.unwrap().path())
            .unwrap()
            .filter(|f| {
                f.as_ref()
                    .unwrap()
                    .path()
                    .extension()
                    .is_some_and(|x| x == "safetensors")
            })
            .count()
    })
    .sum()
}

#[test]
fn sd3_pipeline_trains_with_geneval_metadata_and_resumes_exactly() {
    let dir = tmp("train-sd3");
    let lines: Vec<String> =
        std::fs::read_to_string(root().join("configs/shapes/test_metadata.jsonl"))
            .unwrap()
            .lines()
            .map(String::from)
            .collect();
    std::fs::write(dir.join("train.jsonl"), lines[4..10].join("\n")).unwrap();
    std::fs::write(dir.join("test.jsonl"), lines[16..18].join("\n")).unwrap();
    let cfg = config(
        &dir,
        &format!(
            "train = \"{d}/train.jsonl\"\ntest = \"{d}/test.jsonl\"",
            d = dir.display()
        ),
        "[[reward]]\nkind = \"shapes_geneval\"\n[[reward]]\nkind = \"jpeg_compressibility\"\nweight = 0.1",
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
