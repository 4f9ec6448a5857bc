//! dgpo's half of the side-by-side CPU benchmark against PyTorch + diffusers + peft; run
//! both halves with `bash scripts/bench_vs_torch.sh`, which prints the ratios.
//!
//! The shipped shapes model (`configs/shapes/transformer.json`) with the main job's LoRA (rank 8,
//! alpha 16, the eight attention projections), batch 32, 16 text tokens, through dgpo's own code
//! paths (batch shards over `dgpo --threads` worker threads):
//!
//! * `forward`: one no-grad forward of the batch;
//! * `lora_fwd_bwd`: forward + backward of a mean-squared loss, gradients of the LoRA weights only;
//! * `rollout`: 10 Euler steps with CFG (a conditional and an unconditional pass per step);
//! * `dgpo_pass`: one DGPO training pass as `dgpo train` runs it — the reference and old velocities
//!   without gradients, the policy forward, the DGPO loss and its backward — plus an AdamW step.
//!
//! Output: one JSON object per line (`{"bench": …, "ms": …}`), then the achieved GFLOP/s.
//!
//!     cargo bench --bench vs_torch                   # all threads
//!     cargo bench --bench vs_torch -- --threads 1
//!     cargo bench --bench vs_torch -- --only lora_fwd_bwd --reps 100   # one bench, for a profiler
//!     cargo bench --bench vs_torch -- --plain        # without the coarse ops (src/model/coarse.rs)

use candle_core::{DType, Device, Tensor};
use dgpo::config::Sampler;
use dgpo::model::init::init_weights;
use dgpo::model::lora::LoraSpec;
use dgpo::model::{MMDiT, Trainable, TransformerConfig, WeightStore, Weights};
use dgpo::par;
use dgpo::sampling::{sample, schedule, velocity_sharded, Conditioning};
use dgpo::train::dgpo::{dgpo_loss, per_sample_mse, DgpoParams};
use dgpo::train::optim::{AdamW, AdamWParams};
mod common;

/// The allocator `dgpo` itself runs with (src/main.rs): Candle allocates a fresh buffer for every op,
/// and the system allocator returns them to the kernel, so without it the bench times page faults.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

use common::median;

const BATCH: usize = 32;
const TEXT_TOKENS: usize = 16;
const GROUP: usize = 8;
const STEPS: usize = 10;

fn main() -> anyhow::Result<()> {
    // As `dgpo` itself does: Candle single-threaded, parallelism over batch shards.
    if std::env::var_os("RAYON_NUM_THREADS").is_none() {
        std::env::set_var("RAYON_NUM_THREADS", "1");
    }
    let args: Vec<String> = std::env::args().collect();
    if let Some(i) = args.iter().position(|a| a == "--threads") {
        let n: usize = args
            .get(i + 1)
            .and_then(|s| s.parse().ok())
            .ok_or_else(|| anyhow::anyhow!("--threads needs a number"))?;
        par::set_threads(n);
    }
    // `--only NAME` runs one bench, `--reps N` times it N times (for profilers).
    let only = args
        .iter()
        .position(|a| a == "--only")
        .and_then(|i| args.get(i + 1).cloned());
    let reps: Option<usize> = args
        .iter()
        .position(|a| a == "--reps")
        .and_then(|i| args.get(i + 1)?.parse().ok());
    // `--plain`: the plain Candle formulas instead of the coarse ops, to measure what those give.
    if args.iter().any(|a| a == "--plain") {
        dgpo::model::coarse::set_enabled(false);
    }
    let want = |name: &str| only.as_deref().is_none_or(|o| o == name);
    let n = |default: usize| reps.unwrap_or(default);
    let dev = Device::Cpu;
    let cfg =
        TransformerConfig::from_json_file(std::path::Path::new("configs/shapes/transformer.json"))?;
    let w = init_weights(&cfg, 0, &dev)?
        .into_iter()
        .map(|(k, v)| {
            let r = v.randn_like(0.0, 0.02)?;
            Ok((k, r))
        })
        .collect::<candle_core::Result<_>>()?;
    let spec = LoraSpec {
        rank: 8,
        alpha: 16.0,
        ..LoraSpec::paper_default()
    };
    let model = MMDiT::new(
        &cfg,
        WeightStore::new("bench", w, DType::F32),
        &Trainable::Lora { spec, seed: 0 },
        DType::F32,
    )?;
    let mut opt = AdamW::new(
        model.trainable_vars(),
        AdamWParams {
            lr: 1e-4,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 1e-4,
        },
    )?;
    let b = BATCH;
    let (c, s) = (cfg.in_channels, cfg.sample_size);
    let x = Tensor::randn(0f32, 1.0, (b, c, s, s), &dev)?;
    let target = Tensor::randn(0f32, 1.0, (b, c, s, s), &dev)?;
    let cond = Conditioning {
        context: Tensor::randn(0f32, 1.0, (b, TEXT_TOKENS, cfg.joint_attention_dim), &dev)?,
        pooled: Tensor::randn(0f32, 1.0, (b, cfg.pooled_projection_dim), &dev)?,
    };
    let uncond = Conditioning {
        context: Tensor::randn(0f32, 1.0, (1, TEXT_TOKENS, cfg.joint_attention_dim), &dev)?,
        pooled: Tensor::randn(0f32, 1.0, (1, cfg.pooled_projection_dim), &dev)?,
    }
    .repeat(b)?;
    let adv: Vec<f32> = (0..b).map(|i| ((i * 7) % 5) as f32 - 2.0).collect();
    let params = DgpoParams {
        beta_dpo: 100.0,
        beta_kl: 0.01,
        clip_range: 1e-4,
        use_ema_ref: true,
    };
    let threads = par::threads();
    let shards = par::shards(b, threads, GROUP);
    let tt = |n: usize| Tensor::full(500f32, n, &dev);

    let policy_fwd_bwd =
        |opt: &AdamW, v_ref: Option<&Tensor>, v_old: Option<&Tensor>| -> anyhow::Result<_> {
            let parts = par::map_shards(&shards, |r| {
                let (lo, n) = (r.start, r.len());
                let c = cond.narrow(r.clone())?;
                let xs = x.narrow(0, lo, n)?;
                let ts = target.narrow(0, lo, n)?;
                let v = model.forward(&xs, &tt(n)?, &c.context, &c.pooled, Weights::Policy)?;
                let share = n as f64 / b as f64;
                let loss = match (v_ref, v_old) {
                    (Some(vr), Some(vo)) => {
                        let vr = vr.narrow(0, lo, n)?;
                        let l_theta = per_sample_mse(&ts, &v)?;
                        let l_ref = per_sample_mse(&ts, &vr)?;
                        let l_old = per_sample_mse(&ts, &vo.narrow(0, lo, n)?)?;
                        let kl = per_sample_mse(&v, &vr.detach())?;
                        dgpo_loss(&l_theta, &l_ref, &l_old, &kl, &adv[r], GROUP, &params)?.loss
                    }
                    _ => (v - &ts)?.sqr()?.mean_all()?,
                };
                Ok((loss * share)?.backward()?)
            })?;
            let mut acc = opt.accum();
            for g in &parts {
                opt.add(&mut acc, g)?;
            }
            Ok(acc)
        };

    let flops = cfg.forward_flops((s / cfg.patch_size).pow(2), TEXT_TOKENS);
    let report = |name: &str, secs: f64, fwd_passes: f64| {
        let gflops = flops * b as f64 * fwd_passes / secs / 1e9;
        println!(
            "{{\"bench\": \"{name}\", \"ms\": {:.3}, \"ms_per_sample\": {:.4}, \"gflops\": {gflops:.2}, \"threads\": {threads}}}",
            secs * 1e3,
            secs * 1e3 / b as f64
        );
    };

    if want("forward") {
        let fwd = median(
            || {
                velocity_sharded(&model, &x, 500.0, &cond, None, 1.0, Weights::PolicyNoGrad)
                    .unwrap();
            },
            n(7),
        );
        report("forward", fwd, 1.0);
    }
    // Backward of a LoRA model ≈ one more forward (input gradients only for frozen weights).
    if want("lora_fwd_bwd") {
        let fb = median(
            || {
                policy_fwd_bwd(&opt, None, None).unwrap();
            },
            n(5),
        );
        report("lora_fwd_bwd", fb, 2.0);
    }
    let sched = schedule(Sampler::Euler, STEPS, 3.0);
    if want("rollout") {
        let roll = median(
            || {
                sample(
                    &model,
                    Sampler::Euler,
                    &sched,
                    &x,
                    &cond,
                    Some(&uncond),
                    4.5,
                    Weights::PolicyNoGrad,
                )
                .unwrap();
            },
            n(3),
        );
        report("rollout", roll, 2.0 * STEPS as f64);
    }
    if want("dgpo_pass") {
        let pass = median(
            || {
                let v_ref =
                    velocity_sharded(&model, &x, 500.0, &cond, None, 1.0, Weights::Reference)
                        .unwrap();
                let v_old =
                    velocity_sharded(&model, &x, 500.0, &cond, None, 1.0, Weights::PolicyNoGrad)
                        .unwrap();
                let acc = policy_fwd_bwd(&opt, Some(&v_ref), Some(&v_old)).unwrap();
                opt.step(acc, 1e-4, Some(1.0)).unwrap();
            },
            n(5),
        );
        report("dgpo_pass", pass, 4.0);
    }
    Ok(())
}
