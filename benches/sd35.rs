//! Throughput of the transformer at SD3.5 scale, on any device: what a rollout step and an update
//! chunk of `dgpo train` cost for a given transformer config, with random weights (no download).
//! `scripts/bench_sd35_torch.py` measures the same work with PyTorch + diffusers + peft.
//!
//! * `rollout_step`: one guided velocity as the rollouts compute it — the conditional and the
//!   unconditional halves in one batch of 2·B, no graph;
//! * `train_chunk`: forward with graph and backward of a mean-squared loss for C images (the unit of
//!   `train.backward_chunk`), LoRA weights trainable in f32 on frozen weights in `--dtype`; with
//!   `--checkpointing`, as `train.gradient_checkpointing` does it (a forward without graph, then the
//!   blocks recomputed one at a time in the backward); with `--single-stream`, under cudarc's
//!   one-stream settings ([`dgpo::cuda_single_stream`]); with `--rank 0`, the rollout step of the
//!   model without adapters only.
//!
//! Output: one JSON object per line, with the process's resident memory (`rss_gb` after set-up,
//! `peak_rss_gb` during each benchmark: the memory the work needs on the CPU, host memory only on a
//! GPU).
//!
//!     cargo bench --features cuda --bench sd35 -- --device cuda --dtype bf16
//!     cargo bench --bench sd35 -- --config configs/shapes/transformer.json --resolution 32 \
//!         --text-tokens 16 --batch 32 --chunk 8 --rank 8          # the shapes model on the CPU

use std::path::PathBuf;
use std::time::Instant;

use anyhow::{bail, Context};
use candle_core::{DType, Tensor};
use dgpo::model::init::init_weights;
use dgpo::model::lora::LoraSpec;
use dgpo::model::{MMDiT, Trainable, TransformerConfig, WeightStore, Weights};
use dgpo::sampling::{guided_velocity_at, Conditioning};

struct Args {
    device: String,
    config: PathBuf,
    dtype: DType,
    resolution: usize,
    batch: usize,
    chunk: usize,
    text_tokens: usize,
    rank: usize,
    reps: usize,
    checkpointing: bool,
    single_stream: bool,
}

fn parse() -> anyhow::Result<Args> {
    let mut a = Args {
        device: "cpu".into(),
        config: "configs/sd3.5-medium/transformer_config.json".into(),
        dtype: DType::BF16,
        resolution: 512,
        batch: 16,
        chunk: 4,
        // 77 CLIP tokens + model.max_sequence_length = 128 T5 tokens, as configs/geneval.toml
        text_tokens: 205,
        rank: 64,
        reps: 5,
        checkpointing: false,
        single_stream: false,
    };
    let argv: Vec<String> = std::env::args().skip(1).collect();
    let mut i = 0;
    while i < argv.len() {
        let key = argv[i].as_str();
        if key == "--bench" {
            i += 1;
            continue;
        }
        if key == "--checkpointing" || key == "--single-stream" {
            a.checkpointing |= key == "--checkpointing";
            a.single_stream |= key == "--single-stream";
            i += 1;
            continue;
        }
        let val = argv
            .get(i + 1)
            .with_context(|| format!("{key} needs a value"))?;
        let num = || -> anyhow::Result<usize> {
            val.parse()
                .with_context(|| format!("{key} {val}: expected a whole number"))
        };
        match key {
            "--device" => a.device = val.clone(),
            "--config" => a.config = val.into(),
            "--dtype" => {
                a.dtype = match val.as_str() {
                    "f32" => DType::F32,
                    "bf16" => DType::BF16,
                    "f16" => DType::F16,
                    _ => bail!("--dtype {val}: expected f32, bf16 or f16"),
                }
            }
            "--resolution" => a.resolution = num()?,
            "--batch" => a.batch = num()?,
            "--chunk" => a.chunk = num()?,
            "--text-tokens" => a.text_tokens = num()?,
            "--rank" => a.rank = num()?,
            "--reps" => a.reps = num()?,
            _ => bail!("unknown option {key}"),
        }
        i += 2;
    }
    Ok(a)
}

/// Resident memory of this process in GB: (now, peak since the last reset); Linux only. On the CPU
/// this is the benchmark's memory; on a GPU it is the host side only.
fn rss_gb() -> (f64, f64) {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let field = |name: &str| {
        status
            .lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse::<f64>().ok())
            .map_or(f64::NAN, |kb| kb / 1e6)
    };
    (field("VmRSS:"), field("VmHWM:"))
}

/// A figure in GB for the JSON line; `null` when not measured.
fn json_gb(x: f64) -> String {
    if x.is_finite() {
        format!("{x:.3}")
    } else {
        "null".into()
    }
}

/// Starts a new peak for [`rss_gb`] (writing 5 to /proc/self/clear_refs resets VmHWM).
fn reset_peak() {
    let _ = std::fs::write("/proc/self/clear_refs", "5");
}

fn main() -> anyhow::Result<()> {
    let a = parse()?;
    let dev = dgpo::device(&a.device)?;
    if a.single_stream {
        dgpo::cuda_single_stream(&dev)?;
    }
    let cfg = TransformerConfig::from_json_file(&a.config)?;
    let latent = a.resolution / 8;
    let n_img = (latent / cfg.patch_size).pow(2);
    let t0 = Instant::now();
    // Random weights (std 0.02, no zero-initialised modulations) so that no path is trivially cheap.
    let w = init_weights(&cfg, 0, &dev)?
        .into_iter()
        .map(|(k, v)| Ok((k, v.randn_like(0.0, 0.02)?.to_dtype(a.dtype)?)))
        .collect::<candle_core::Result<_>>()?;
    // --rank 0: no adapters (the frozen model alone; the rollout step only)
    let trainable = match a.rank {
        0 => Trainable::None,
        rank => Trainable::Lora {
            spec: LoraSpec {
                rank,
                alpha: 2.0 * rank as f64,
                ..LoraSpec::paper_default()
            },
            seed: 0,
        },
    };
    let model = MMDiT::new(
        &cfg,
        WeightStore::new("bench", w, a.dtype),
        &trainable,
        a.dtype,
    )?;
    dev.synchronize()?;
    let params: usize = cfg
        .linear_shapes()
        .iter()
        .map(|(_, i, o)| (i + 1) * o)
        .sum();
    let trainable: usize = model
        .trainable_vars()
        .iter()
        .map(|(_, v)| v.elem_count())
        .sum();
    println!(
        "{{\"bench\": \"setup\", \"device\": \"{}\", \"dtype\": \"{:?}\", \"params\": {params}, \"trainable\": {trainable}, \"image_tokens\": {n_img}, \"text_tokens\": {}, \"init_s\": {:.2}, \"rss_gb\": {:.3}}}",
        a.device,
        a.dtype,
        a.text_tokens,
        t0.elapsed().as_secs_f64(),
        rss_gb().0
    );

    let c = cfg.in_channels;
    let rnd = |shape: &[usize]| Tensor::randn(0f32, 1.0, shape, &dev)?.to_dtype(a.dtype);
    let b = a.batch;
    let x = rnd(&[b, c, latent, latent])?;
    let cond = Conditioning {
        context: rnd(&[b, a.text_tokens, cfg.joint_attention_dim])?,
        pooled: rnd(&[b, cfg.pooled_projection_dim])?,
    };
    let uncond = Conditioning {
        context: rnd(&[1, a.text_tokens, cfg.joint_attention_dim])?,
        pooled: rnd(&[1, cfg.pooled_projection_dim])?,
    }
    .repeat(b)?;
    let flops = cfg.forward_flops(n_img, a.text_tokens);
    let time = |f: &mut dyn FnMut() -> anyhow::Result<()>| -> anyhow::Result<f64> {
        reset_peak();
        f()?; // warm-up
        dev.synchronize()?;
        let mut v = Vec::with_capacity(a.reps);
        for _ in 0..a.reps {
            let s = Instant::now();
            f()?;
            dev.synchronize()?;
            v.push(s.elapsed().as_secs_f64());
        }
        v.sort_by(|p, q| p.total_cmp(q));
        Ok(v[a.reps / 2])
    };

    let step = time(&mut || {
        guided_velocity_at(
            &model,
            &x,
            500.0,
            &cond,
            Some(&uncond),
            4.5,
            Weights::PolicyNoGrad,
        )?;
        Ok(())
    })?;
    println!(
        "{{\"bench\": \"rollout_step\", \"images\": {b}, \"forward_batch\": {}, \"ms\": {:.2}, \"tflops\": {:.2}, \"peak_rss_gb\": {:.3}}}",
        2 * b,
        step * 1e3,
        2.0 * b as f64 * flops / step / 1e12,
        rss_gb().1
    );

    if a.rank == 0 {
        return Ok(());
    }
    let n = a.chunk.min(b);
    let xc = x.narrow(0, 0, n)?;
    let target = Tensor::randn(0f32, 1.0, xc.shape(), &dev)?;
    let tc = Tensor::full(500f32, n, &dev)?;
    let (ctx, pooled) = (cond.context.narrow(0, 0, n)?, cond.pooled.narrow(0, 0, n)?);
    // Resident memory just after the plain backward, the graph dropped: with Candle's whole gradient
    // store still held, then with only the trainable weights' gradients (what dgpo train keeps).
    let mut held = (f64::NAN, f64::NAN);
    let chunk = time(&mut || {
        let grads = if a.checkpointing {
            // train.gradient_checkpointing: the loss's gradient at the output, then the blocks
            // recomputed one at a time.
            let v = model.forward(&xc, &tc, &ctx, &pooled, Weights::PolicyNoGrad)?;
            let v = candle_core::Var::from_tensor(&v.to_dtype(DType::F32)?)?;
            let mut g = (v.as_tensor() - &target)?.sqr()?.mean_all()?.backward()?;
            let gv = g.remove(v.as_tensor()).context("no output gradient")?;
            model.checkpointed_backward(&xc, &tc, &ctx, &pooled, &gv)?
        } else {
            let v = model.forward(&xc, &tc, &ctx, &pooled, Weights::Policy)?;
            let loss = (v.to_dtype(DType::F32)? - &target)?.sqr()?.mean_all()?;
            let g = loss.backward()?;
            drop((v, loss));
            let store = rss_gb().0;
            let grads = model.trainable_grads(&g);
            drop(g);
            held = (store, rss_gb().0);
            grads
        };
        // every LoRA weight gets its gradient, in f32
        for (name, var) in model.trainable_vars() {
            let g = grads
                .get(&var.id())
                .with_context(|| format!("{name} got no gradient"))?;
            if g.dtype() != DType::F32 {
                bail!("LoRA gradient in {:?}, expected f32", g.dtype());
            }
        }
        Ok(())
    })?;
    // Backward of a LoRA model ≈ one more forward (frozen weights get no weight gradient).
    println!(
        "{{\"bench\": \"train_chunk\", \"images\": {n}, \"checkpointing\": {}, \"ms\": {:.2}, \"tflops\": {:.2}, \"peak_rss_gb\": {:.3}, \"rss_store_held_gb\": {}, \"rss_trainable_grads_gb\": {}}}",
        a.checkpointing,
        chunk * 1e3,
        2.0 * n as f64 * flops / chunk / 1e12,
        rss_gb().1,
        json_gb(held.0),
        json_gb(held.1)
    );
    Ok(())
}
