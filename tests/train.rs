//! `dgpo train` end to end on a tiny random shapes pipeline: metrics, checkpoints, and a resumed run
//! that reproduces the uninterrupted one.

mod common;

use candle_core::Device;
use dgpo::config::Config;

use common::tiny::{setup, tmp};

use common::metrics_without_times as metrics;

#[test]
fn train_writes_metrics_and_checkpoints_and_resume_repeats_the_run() {
    let dir = tmp("resume");
    let cfg = setup(&dir);
    let dev = Device::Cpu;
    let a = dir.join("a");
    dgpo::train::run(&cfg, &a, false, &dev).unwrap();
    let ma = metrics(&a);
    let train: Vec<_> = ma.iter().filter(|v| v["kind"] == "train").collect();
    let evals: Vec<_> = ma.iter().filter(|v| v["kind"] == "eval").collect();
    assert_eq!(train.len(), 3, "{ma:?}");
    assert_eq!(
        evals.len(),
        3,
        "evals at epochs 0 and 2 and the final one: {ma:?}"
    );
    for t in &train {
        for k in [
            "epoch",
            "opt_step",
            "reward_mean",
            "loss",
            "kl",
            "clip_frac",
            "grad_norm",
            "zero_std_ratio",
        ] {
            assert!(t.get(k).is_some_and(|v| !v.is_null()), "{k} missing in {t}");
        }
        assert!(t["grad_norm"].as_f64().unwrap().is_finite());
    }
    assert_eq!(train[2]["opt_step"], 3);
    for e in &evals {
        assert!(e.get("geneval_overall").is_some() && e.get("eval_reward_mean").is_some());
    }
    // Only the last two checkpoints are kept.
    let mut ck: Vec<String> = std::fs::read_dir(a.join("checkpoints"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().to_string())
        .collect();
    ck.sort();
    assert_eq!(ck, vec!["epoch-00002", "epoch-00003"]);
    assert!(a.join("grids/eval-epoch-00000.png").exists());

    // Running again into the same folder without --resume is refused.
    let e = dgpo::train::run(&cfg, &a, false, &dev)
        .unwrap_err()
        .to_string();
    assert!(e.contains("--resume"), "{e}");

    // Killed after epoch 1, resumed: the same metrics (timings aside) and the same final weights.
    let b = dir.join("b");
    dgpo::train::run_until(&cfg, &b, false, &dev, Some(1)).unwrap();
    assert_eq!(
        metrics(&b).iter().filter(|v| v["kind"] == "train").count(),
        1
    );
    dgpo::train::run(&cfg, &b, true, &dev).unwrap();
    assert_eq!(ma, metrics(&b));
    let wa = std::fs::read(a.join("checkpoints/epoch-00003/train_state.safetensors")).unwrap();
    let wb = std::fs::read(b.join("checkpoints/epoch-00003/train_state.safetensors")).unwrap();
    assert!(wa == wb, "resumed weights differ");
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn bad_setups_are_refused_before_any_work() {
    let dir = tmp("bad");
    let cfg = setup(&dir);
    let dev = Device::Cpu;
    let mut c = cfg.clone();
    c.model.pretrained = dir.join("no-such-model").display().to_string();
    let e = format!(
        "{:#}",
        dgpo::train::run(&c, &dir.join("x"), false, &dev).unwrap_err()
    );
    assert!(e.contains("no-such-model"), "{e}");
    let mut c = cfg.clone();
    c.reward[0].kind = "pickscore_server".into();
    let e = dgpo::train::run(&c, &dir.join("x"), false, &dev)
        .unwrap_err()
        .to_string();
    assert!(e.contains("reward[0].kind"), "{e}");
    let mut c = cfg.clone();
    c.prompts.train = Some(dir.join("missing.jsonl"));
    let e = format!(
        "{:#}",
        dgpo::train::run(&c, &dir.join("x"), false, &dev).unwrap_err()
    );
    assert!(e.contains("missing.jsonl"), "{e}");
    assert!(!dir.join("x").exists(), "nothing written for a refused run");
    let e = Config::from_toml(
        "[sample]\ngroup_size = 3\nbatch_size = 4\n",
        "bad.toml",
        &[],
    )
    .unwrap_err()
    .to_string();
    assert!(e.contains("does not divide"), "{e}");
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn flow_grpo_trains_from_one_config_switch_and_resumes_exactly() {
    let dir = tmp("flow-grpo");
    let mut cfg = setup(&dir);
    cfg.train.algorithm = dgpo::config::Algorithm::FlowGrpo;
    cfg.sample.sampler = dgpo::config::Sampler::Euler;
    cfg.sample.eval_sampler = Some(dgpo::config::Sampler::DpmSolver2m);
    cfg.train.clip_range = 1e-4;
    cfg.train.beta_kl = 0.004;
    let dev = Device::Cpu;
    let a = dir.join("a");
    dgpo::train::run(&cfg, &a, false, &dev).unwrap();
    let ma = metrics(&a);
    let train: Vec<_> = ma.iter().filter(|v| v["kind"] == "train").collect();
    assert_eq!(train.len(), 3);
    for t in &train {
        // ⌊4 · 0.99⌋ = 3 of the 4 rollout steps trained
        assert_eq!(t["timesteps"].as_array().unwrap().len(), 3, "{t}");
        assert!(t["grad_norm"].as_f64().unwrap().is_finite());
    }
    let b = dir.join("b");
    dgpo::train::run_until(&cfg, &b, false, &dev, Some(2)).unwrap();
    dgpo::train::run(&cfg, &b, true, &dev).unwrap();
    assert_eq!(ma, metrics(&b));
    let wa = std::fs::read(a.join("checkpoints/epoch-00003/train_state.safetensors")).unwrap();
    let wb = std::fs::read(b.join("checkpoints/epoch-00003/train_state.safetensors")).unwrap();
    assert!(wa == wb, "resumed weights differ");
    // Flow-GRPO's SDE lives on the Euler grid: another rollout solver is refused up front
    let e = Config::from_toml(
        "[train]\nalgorithm = \"flow_grpo\"\n[sample]\nsampler = \"dpm_solver2m\"\n",
        "fg.toml",
        &[],
    )
    .unwrap_err()
    .to_string();
    assert!(e.contains("sample.sampler = \"euler\""), "{e}");
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn several_rewards_with_decoupled_advantages_train_and_report_each() {
    let dir = tmp("multi-reward");
    let mut cfg = setup(&dir);
    cfg.run.num_epochs = 1;
    cfg.train.advantages = dgpo::config::AdvantageMode::Decoupled;
    cfg.reward.push(dgpo::config::RewardConfig {
        kind: "jpeg_compressibility".into(),
        weight: 0.5,
        ..Default::default()
    });
    let out = dir.join("a");
    dgpo::train::run(&cfg, &out, false, &Device::Cpu).unwrap();
    let m = metrics(&out);
    let t = m.iter().find(|v| v["kind"] == "train").unwrap();
    let jpeg = t["reward/jpeg_compressibility"].as_f64().unwrap();
    assert!(jpeg < 0.0, "{t}");
    assert!(t["reward/jpeg_compressibility/size_kb"].as_f64().unwrap() > 0.0);
    assert!(t.get("reward/shapes_geneval").is_some());
    // JPEG sizes differ between images, so the groups carry signal even at zero GenEval reward
    assert!(t["adv_abs_mean"].as_f64().unwrap() > 0.1, "{t}");
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn chunked_backward_gives_the_gradient_of_the_whole_micro_batch() {
    let dir = tmp("chunked");
    let mut cfg = setup(&dir);
    cfg.run.num_epochs = 2;
    cfg.run.eval_every = 100;
    cfg.train.batch_size = 4; // two groups of 2 per micro-batch
    cfg.reward[0].kind = "jpeg_compressibility".into(); // differs within groups of random images
                                                        // Full fine-tuning: the random model's zero-initialised output layer would stop every LoRA
                                                        // gradient.
    cfg.lora.enabled = false;
    // A large Adam epsilon makes each step ≈ lr·gradient, so the weights compare the gradients
    // (with the usual 1e-8, near-zero components are amplified to ±lr by rounding alone).
    cfg.train.adam_epsilon = 1.0;
    let dev = Device::Cpu;
    dgpo::train::run(&cfg, &dir.join("whole"), false, &dev).unwrap();
    // Chunks of 3 images cut across the groups the loss couples.
    cfg.train.backward_chunk = 3;
    dgpo::train::run(&cfg, &dir.join("chunked"), false, &dev).unwrap();
    // Gradient checkpointing, alone and with chunks.
    cfg.train.gradient_checkpointing = true;
    dgpo::train::run(&cfg, &dir.join("chunked-ckpt"), false, &dev).unwrap();
    cfg.train.backward_chunk = 0;
    dgpo::train::run(&cfg, &dir.join("ckpt"), false, &dev).unwrap();
    for other in ["chunked", "chunked-ckpt", "ckpt"] {
        same_update(&dir, "whole", other);
    }
    let e = Config::from_toml(
        "[train]\nbatch_size = 4\nbackward_chunk = 5\n",
        "bad.toml",
        &[],
    )
    .unwrap_err()
    .to_string();
    assert!(e.contains("backward_chunk"), "{e}");
    let e = Config::from_toml(
        "[sample]\nsampler = \"euler\"\n[train]\nalgorithm = \"flow_grpo\"\ngradient_checkpointing = true\n",
        "bad.toml",
        &[],
    )
    .unwrap_err()
    .to_string();
    assert!(e.contains("gradient_checkpointing"), "{e}");
    std::fs::remove_dir_all(&dir).unwrap();
}

/// Two runs of `chunked_backward_…` took the same two updates: loss terms, gradient norms, weights.
fn same_update(dir: &std::path::Path, run_a: &str, run_b: &str) {
    let dev = Device::Cpu;
    let (a, b) = (metrics(&dir.join(run_a)), metrics(&dir.join(run_b)));
    let train = |m: &[serde_json::Value]| -> Vec<(f64, f64, f64)> {
        m.iter()
            .filter(|v| v["kind"] == "train")
            .map(|v| {
                (
                    v["loss"].as_f64().unwrap(),
                    v["kl"].as_f64().unwrap(),
                    v["grad_norm"].as_f64().unwrap(),
                )
            })
            .collect()
    };
    let (ta, tb) = (train(&a), train(&b));
    assert_eq!(ta.len(), 2);
    for ((la, ka, ga), (lb, kb, gb)) in ta.iter().zip(&tb) {
        assert!(*ga > 0.0);
        for (x, y, what) in [(la, lb, "loss"), (ka, kb, "kl"), (ga, gb, "grad_norm")] {
            assert!(
                (x - y).abs() <= 1e-4 * (1.0 + x.abs()),
                "{what}: {run_a} {x} vs {run_b} {y}"
            );
        }
    }
    let load = |run: &str| {
        candle_core::safetensors::load(
            dir.join(run)
                .join("checkpoints/epoch-00002/train_state.safetensors"),
            &dev,
        )
        .unwrap()
    };
    let (wa, wb) = (load(run_a), load(run_b));
    let mut worst = 0f64;
    for (k, v) in &wa {
        if k.starts_with("raw.") {
            worst = worst.max(common::max_abs_diff(v, &wb[k]));
        }
    }
    assert!(
        worst < 1e-5,
        "{run_a} and {run_b}: weights differ by {worst:e}"
    );
}

#[test]
fn resume_refuses_a_changed_run_before_writing_and_takes_safe_changes() {
    let dir = tmp("resume-config");
    let cfg = setup(&dir);
    let dev = Device::Cpu;
    let run = dir.join("run");
    dgpo::train::run_until(&cfg, &run, false, &dev, Some(1)).unwrap();
    let saved = std::fs::read(run.join("config.toml")).unwrap();
    let resume = |c: &Config, allow: &[&str]| {
        let opts = dgpo::train::RunOptions {
            resume: true,
            allow_config_change: allow.iter().map(|s| s.to_string()).collect(),
            stop_after: Some(2),
        };
        dgpo::train::run_with(c, &run, &opts, &dev)
    };
    // A different seed, algorithm or learning rate is another run: refused, listing each change,
    // and the run's config.toml still describes its checkpoints.
    let mut c = cfg.clone();
    c.run.seed += 1;
    c.train.learning_rate *= 2.0;
    let e = format!("{:#}", resume(&c, &[]).unwrap_err());
    assert!(
        e.contains("run.seed") && e.contains("train.learning_rate"),
        "{e}"
    );
    assert!(e.contains("--allow-config-change"), "{e}");
    assert_eq!(std::fs::read(run.join("config.toml")).unwrap(), saved);
    let e = format!("{:#}", resume(&c, &["run.seed"]).unwrap_err());
    assert!(
        e.contains("train.learning_rate") && !e.contains("run.seed:"),
        "{e}"
    );
    // What a kill leaves behind is cleared; a safe change (the evaluation cadence) is taken.
    let staging = run.join("checkpoints/.epoch-00002.staging-99");
    std::fs::create_dir_all(&staging).unwrap();
    std::fs::write(staging.join("train_state.safetensors.tmp-99"), b"half").unwrap();
    let half_deleted = run.join("checkpoints/epoch-00000");
    std::fs::create_dir_all(&half_deleted).unwrap();
    let mut c = cfg.clone();
    c.run.eval_every = 5;
    resume(&c, &[]).unwrap();
    assert!(!staging.exists() && !half_deleted.exists());
    assert!(run.join("checkpoints/epoch-00002/state.json").exists());
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn a_fresh_run_never_appends_and_a_corrupt_checkpoint_names_the_intact_one() {
    let dir = tmp("fresh-corrupt");
    let cfg = setup(&dir);
    let dev = Device::Cpu;
    // A folder whose run died before its first checkpoint: the new run starts clean.
    let run = dir.join("run");
    std::fs::create_dir_all(run.join("grids")).unwrap();
    std::fs::write(
        run.join("metrics.jsonl"),
        "{\"kind\":\"train\",\"epoch\":0}\n",
    )
    .unwrap();
    std::fs::write(run.join("grids/eval-epoch-00007.png"), b"old").unwrap();
    dgpo::train::run_until(&cfg, &run, false, &dev, Some(2)).unwrap();
    let rows = metrics(&run);
    assert_eq!(
        rows.iter().filter(|v| v["kind"] == "train").count(),
        2,
        "{rows:?}"
    );
    assert!(!run.join("grids/eval-epoch-00007.png").exists());
    // The newest checkpoint broken: --resume says which older one is intact.
    let newest = run.join("checkpoints/epoch-00002");
    std::fs::write(
        newest.join("train_state.safetensors"),
        b"not a safetensors file",
    )
    .unwrap();
    let e = format!(
        "{:#}",
        dgpo::train::run(&cfg, &run, true, &dev).unwrap_err()
    );
    assert!(
        e.contains("epoch-00002") && e.contains("epoch-00001"),
        "{e}"
    );
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn a_diverging_run_names_the_epoch_and_the_step_and_saves_no_broken_weights() {
    let dir = tmp("diverge");
    let mut cfg = setup(&dir);
    cfg.train.learning_rate = 1e30;
    let run = dir.join("run");
    let e = format!(
        "{:#}",
        dgpo::train::run(&cfg, &run, false, &Device::Cpu).unwrap_err()
    );
    assert!(
        e.contains("epoch ") && e.contains("last good checkpoint"),
        "{e}"
    );
    // Every checkpoint that was written holds finite weights.
    for (_, ck) in dgpo::train::run_dir::checkpoints(&run).unwrap() {
        let t = dgpo::model::weights::read_safetensors(
            &[ck.join("train_state.safetensors")],
            &Device::Cpu,
        )
        .unwrap();
        for (k, v) in t {
            let s = v
                .abs()
                .unwrap()
                .sum_all()
                .unwrap()
                .to_scalar::<f32>()
                .unwrap();
            assert!(!s.is_nan(), "{k} in {}", ck.display());
        }
    }
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn inner_epochs_take_several_steps_per_rollout_batch_and_resume_exactly() {
    let dir = tmp("inner");
    let mut cfg = setup(&dir);
    cfg.run.eval_every = 100;
    let dev = Device::Cpu;
    let one = dir.join("one");
    cfg.run.num_epochs = 1;
    dgpo::train::run(&cfg, &one, false, &dev).unwrap();
    cfg.run.num_epochs = 3;
    cfg.train.num_inner_epochs = 2;
    let a = dir.join("a");
    dgpo::train::run(&cfg, &a, false, &dev).unwrap();
    let ma = metrics(&a);
    let train: Vec<_> = ma.iter().filter(|v| v["kind"] == "train").collect();
    let m = cfg.train.num_train_timesteps;
    for (e, t) in train.iter().enumerate() {
        assert_eq!(t["opt_step"], 2 * (e + 1), "{t}");
        // each inner epoch draws its own step indices
        assert_eq!(t["timesteps"].as_array().unwrap().len(), 2 * m, "{t}");
    }
    // The first inner epoch is the one-step epoch: the same indices and the same first rollouts.
    let m1 = metrics(&one);
    let t1 = m1.iter().find(|v| v["kind"] == "train").unwrap();
    assert_eq!(t1["reward_mean"], train[0]["reward_mean"]);
    assert_eq!(
        t1["timesteps"].as_array().unwrap()[..],
        train[0]["timesteps"].as_array().unwrap()[..m]
    );
    // Killed after epoch 1, resumed: the same run.
    let b = dir.join("b");
    dgpo::train::run_until(&cfg, &b, false, &dev, Some(1)).unwrap();
    dgpo::train::run(&cfg, &b, true, &dev).unwrap();
    assert_eq!(ma, metrics(&b));
    for bad in ["0", "65"] {
        let e = Config::from_toml(
            &format!("[train]\nnum_inner_epochs = {bad}\n"),
            "bad.toml",
            &[],
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("train.num_inner_epochs"), "{e}");
    }
    // The paper's configs keep one optimizer step per epoch.
    for f in ["geneval.toml", "ocr.toml", "pickscore.toml"] {
        let c = Config::load(&common::tiny::root().join("configs").join(f), &[]).unwrap();
        assert_eq!(c.train.num_inner_epochs, 1, "{f}");
    }
    std::fs::remove_dir_all(&dir).unwrap();
}
