//! `dgpo pretrain`: flow-matching pretraining of the shapes-testbed pipeline (MMDiT + text encoder) on
//! freshly rendered scenes, as SD3 was trained: `x_σ = (1 − σ)·x0 + σ·ε`, target `ε − x0`, σ drawn
//! logit-normal (or uniform), captions dropped to the empty prompt with probability `caption_dropout` so
//! classifier-free guidance works.
//!
//! Everything random is drawn from a generator seeded by `(run.seed, step)`, so a run resumed from a
//! checkpoint continues exactly as the uninterrupted run would have.
//!
//! Run folder: `metrics.jsonl` (one JSON object per log line and per evaluation), `checkpoint/` (the
//! latest, replaced atomically: `model/` = EMA pipeline, `train_state.safetensors` = raw weights, EMA and
//! AdamW moments, `state.json`), and at the end `model/` (EMA pipeline) and `eval.json`.

use crate::config::{Config, TimestepSampling};
use crate::eval::{evaluate, EvalSettings};
use crate::geneval::{read_metadata, Metadata};
use crate::io::{
    append_jsonl as append_metrics, replace_dir, save_safetensors, staging_dir, write_atomic,
};
use crate::model::weights::read_safetensors;
use crate::model::{TransformerConfig, Weights};
use crate::pipeline::shapes::codec::CellCodec;
use crate::pipeline::shapes::text::{ShapesTokenizer, TextEncoderConfig};
use crate::pipeline::shapes::{encode_images, ShapesPipeline};
use crate::sampling::seeded_randn;
use crate::testbed::{loosen, random_metadata, random_metadata_of, scene_in};
use crate::train::optim::{AdamW, AdamWParams, Shadow};
use anyhow::{bail, Context, Result};
use candle_core::{Device, Tensor, Var};
use rand::{Rng, SeedableRng};
use rand_distr::{Distribution, StandardNormal};
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::Instant;

#[derive(Debug, Clone, Serialize, Deserialize)]
struct State {
    step: usize,
    wall_s: f64,
    config: String,
    /// Batch shards per step (`dgpo --threads`): results are bit-for-bit only for the same count.
    #[serde(default)]
    workers: Option<usize>,
}

/// A training batch drawn for one step.
pub struct Batch {
    pub x0: Tensor,
    pub captions: Vec<String>,
    pub sigmas: Vec<f32>,
    pub noise: Tensor,
}

impl Batch {
    /// Rows `r` of the batch.
    pub fn narrow(&self, r: std::ops::Range<usize>) -> Result<Batch> {
        Ok(Batch {
            x0: self.x0.narrow(0, r.start, r.len())?,
            captions: self.captions[r.clone()].to_vec(),
            sigmas: self.sigmas[r.clone()].to_vec(),
            noise: self.noise.narrow(0, r.start, r.len())?,
        })
    }
}

/// The batch of step `step`: deterministic in `(seed, step)`.
pub fn make_batch(
    cfg: &Config,
    step: usize,
    codec: Option<&CellCodec>,
    shape: (usize, usize, usize),
    dev: &Device,
) -> Result<Batch> {
    let pt = &cfg.pretrain;
    let mut rng = rand::rngs::StdRng::seed_from_u64(
        cfg.run.seed ^ (step as u64 + 1).wrapping_mul(0x9E37_79B9_7F4A_7C15),
    );
    let mut images = Vec::with_capacity(pt.batch_size);
    let mut captions = Vec::with_capacity(pt.batch_size);
    let mut sigmas = Vec::with_capacity(pt.batch_size);
    // Tag weights, when given; none keeps the uniform draw (and the RNG stream) of earlier runs.
    let mix = pt.tag_mix();
    let total: f64 = mix.iter().flatten().sum();
    for _ in 0..pt.batch_size {
        let meta = match &mix {
            None => random_metadata(&mut rng),
            Some(weights) => {
                let mut u = rng.random::<f64>() * total;
                let k = weights
                    .iter()
                    .position(|&w| {
                        if u < w {
                            return true;
                        }
                        u -= w;
                        false
                    })
                    // Rounding ran past the end: the last positive weight.
                    .or_else(|| weights.iter().rposition(|&w| w > 0.0))
                    .context("pretrain.tag_weights: no positive weight")?;
                random_metadata_of(crate::geneval::TAGS[k], &mut rng)?
            }
        };
        let drawn = loosen(&meta, &pt.caption_noise, &mut rng)?;
        let scene = scene_in(&drawn, pt.relation_layout, &mut rng)
            .with_context(|| format!("rendering a scene for {:?}", meta.prompt))?;
        images.push(scene.render());
        let drop = rng.random::<f64>() < pt.caption_dropout;
        captions.push(if drop { String::new() } else { meta.prompt });
        let sigma = match pt.timestep_sampling {
            TimestepSampling::Uniform => rng.random::<f64>(),
            TimestepSampling::LogitNormal => {
                let n: f64 = StandardNormal.sample(&mut rng);
                1.0 / (1.0 + (-(pt.logit_mean + pt.logit_std * n)).exp())
            }
        };
        sigmas.push(sigma as f32);
    }
    let noise = seeded_randn(&mut rng, (pt.batch_size, shape.0, shape.1, shape.2), dev)?;
    Ok(Batch {
        x0: encode_images(codec, &images, dev)?,
        captions,
        sigmas,
        noise,
    })
}

/// Flow-matching loss of one batch (mean squared velocity error).
pub fn flow_matching_loss(pipe: &ShapesPipeline, b: &Batch) -> Result<Tensor> {
    let dev = pipe.device();
    let n = b.sigmas.len();
    let sig = Tensor::from_vec(b.sigmas.clone(), (n, 1, 1, 1), &dev)?;
    let xt = (b.x0.broadcast_mul(&(1.0 - &sig)?)? + b.noise.broadcast_mul(&sig)?)?;
    let target = (&b.noise - &b.x0)?;
    let prompts: Vec<&str> = b.captions.iter().map(|s| s.as_str()).collect();
    let (ctx, pooled) = pipe.text_forward(&prompts, true)?;
    let t = (sig.flatten_all()? * 1000.0)?;
    let v = pipe
        .transformer
        .forward(&xt, &t, &ctx, &pooled, Weights::Policy)?;
    Ok((v - target)?.sqr()?.mean_all()?)
}

/// Linear warm-up, constant, then (with `decay_steps`) a linear cool-down to zero over the last steps.
/// Before the cool-down, stopping a run at step N gives exactly the model a run configured with
/// `steps = N` gives; a cool-down can be added later by resuming with a larger `steps`.
fn lr_at(cfg: &Config, step: usize) -> f64 {
    let pt = &cfg.pretrain;
    let warm = if step < pt.warmup_steps {
        (step + 1) as f64 / pt.warmup_steps as f64
    } else {
        1.0
    };
    let left = pt.steps.saturating_sub(step);
    let cool = if pt.decay_steps > 0 && left <= pt.decay_steps {
        left as f64 / (pt.decay_steps + 1) as f64
    } else {
        1.0
    };
    pt.learning_rate * warm * cool
}

/// Everything pretraining reads, checked before the first step.
struct Inputs {
    tcfg: TransformerConfig,
    ecfg: TextEncoderConfig,
    tokenizer: ShapesTokenizer,
    codec: Option<CellCodec>,
    test: Vec<Metadata>,
}

fn check_inputs(cfg: &Config) -> Result<Inputs> {
    let pt = &cfg.pretrain;
    let tcfg = TransformerConfig::from_json_file(&pt.transformer_config)
        .with_context(|| "pretrain.transformer_config".to_string())?;
    tcfg.check()?;
    let ecfg = TextEncoderConfig::from_json_file(&pt.text_encoder_config)
        .with_context(|| "pretrain.text_encoder_config".to_string())?;
    let tokenizer = ShapesTokenizer::from_file(&pt.tokenizer, ecfg.max_length)
        .with_context(|| "pretrain.tokenizer".to_string())?;
    let codec = pt
        .codec_config
        .as_ref()
        .map(|p| CellCodec::from_file(p).context("pretrain.codec_config"))
        .transpose()?;
    let cell = codec.as_ref().map_or(1, |c| c.cfg.cell);
    if tcfg.sample_size * cell != cfg.model.resolution {
        bail!(
            "model.resolution = {} but {} has sample_size = {} ({})",
            cfg.model.resolution,
            pt.transformer_config.display(),
            tcfg.sample_size,
            match &codec {
                Some(_) => format!("latent pixels of {cell}-pixel cells"),
                None => "pixels".to_string(),
            }
        );
    }
    let test_path = cfg
        .prompts
        .test
        .as_ref()
        .context("prompts.test is not set: pretraining evaluates on the test prompts")?;
    let test = read_metadata(test_path)?;
    for m in &test {
        tokenizer
            .encode(&m.prompt)
            .with_context(|| format!("test prompt in {}", test_path.display()))?;
    }
    if cfg.model.resolution != crate::testbed::SIZE {
        bail!(
            "model.resolution = {}: the shapes world renders {}×{} scenes",
            cfg.model.resolution,
            crate::testbed::SIZE,
            crate::testbed::SIZE
        );
    }
    Ok(Inputs {
        tcfg,
        ecfg,
        tokenizer,
        codec,
        test,
    })
}

/// Fails, naming both sides, when the `part/config.json` of the `pretrain.init_from` folder differs from
/// the config's `pretrain.<part>_config`.
fn same_config<T: PartialEq + std::fmt::Debug>(
    what: &str,
    part: &str,
    theirs: &T,
    ours: &T,
) -> Result<()> {
    if theirs != ours {
        bail!(
            "{what}: its {part}/config.json differs from pretrain.{part}_config \
             (theirs: {theirs:?}; the config's: {ours:?})"
        );
    }
    Ok(())
}

/// Every weight pretraining trains, named as in the pipeline folder: `transformer.<name>` for the
/// transformer's, `text_encoder.<name>` for the text encoder's. The optimizer, the checkpoints and
/// `pretrain.init_from` all go by these names.
fn named_vars(pipe: &ShapesPipeline) -> Vec<(String, Var)> {
    let transformer = pipe.transformer.trainable_vars().into_iter();
    let text = pipe.text.vars().into_iter();
    transformer
        .map(|(n, v)| (format!("transformer.{n}"), v))
        .chain(text.map(|(n, v)| (format!("text_encoder.{n}"), v)))
        .collect()
}

/// Sets `vars` (named `transformer.*` / `text_encoder.*`) to the weights of the pipeline folder `dir`
/// (`pretrain.init_from`), after checking that it holds the model the config describes.
fn init_from_pipeline(
    dir: &Path,
    inputs: &Inputs,
    vars: &[(String, Var)],
    dev: &Device,
) -> Result<()> {
    let what = format!("pretrain.init_from = {}", dir.display());
    let src =
        ShapesPipeline::load(dir, &crate::model::Trainable::Full, dev).context(what.clone())?;
    same_config(&what, "transformer", &src.transformer.cfg, &inputs.tcfg)?;
    same_config(&what, "text_encoder", &src.text.cfg, &inputs.ecfg)?;
    same_config(
        &what,
        "codec",
        &src.codec.as_ref().map(|c| &c.cfg),
        &inputs.codec.as_ref().map(|c| &c.cfg),
    )?;
    if src.tokenizer.inner().get_vocab(true) != inputs.tokenizer.inner().get_vocab(true) {
        bail!("{what}: its tokenizer's vocabulary differs from pretrain.tokenizer's");
    }
    let mut have: HashMap<String, Var> = named_vars(&src).into_iter().collect();
    for (name, var) in vars {
        let t = have
            .remove(name)
            .with_context(|| format!("{what}: the folder has no weight for {name}"))?;
        if t.dims() != var.dims() {
            bail!(
                "{what}: {name} has shape {:?}, the model {:?}",
                t.dims(),
                var.dims()
            );
        }
        var.set(t.as_tensor())?;
    }
    if let Some(extra) = have.keys().next() {
        bail!("{what}: the folder holds {extra}, which the model does not have");
    }
    tracing::info!("initialised the weights from {}", dir.display());
    Ok(())
}

fn eval_json(step: usize, wall_s: f64, r: &crate::eval::EvalResult) -> serde_json::Value {
    let s = &r.summary;
    serde_json::json!({
        "kind": "eval",
        "step": step,
        "wall_s": wall_s,
        "geneval_overall": s.geneval_overall,
        "strict_accuracy": s.strict_accuracy,
        "accuracy": s.accuracy,
        "reward_mean": s.reward_mean,
        "per_tag": s.per_tag.iter().map(|(k, v)| (k.clone(), serde_json::json!(v.strict_accuracy))).collect::<serde_json::Map<_, _>>(),
        "eval_s": r.wall_s,
    })
}

/// Run (or resume) pretraining into `out`.
pub fn run(cfg: &Config, out: &Path, resume: bool, dev: &Device) -> Result<()> {
    run_until(cfg, out, resume, dev, None)
}

/// As [`run`], but stop after step `stop_at` with a checkpoint, as if the process had been killed right
/// after it (tests of `--resume`).
pub fn run_until(
    cfg: &Config,
    out: &Path,
    resume: bool,
    dev: &Device,
    stop_at: Option<usize>,
) -> Result<()> {
    let inputs = check_inputs(cfg)?;
    let pt = &cfg.pretrain;
    let ckpt = out.join("checkpoint");
    let has_ckpt = ckpt.join("state.json").exists();
    if has_ckpt && !resume {
        bail!(
            "{} already holds a checkpoint: pass --resume to continue it, or choose another --out",
            out.display()
        );
    }
    if resume && !has_ckpt {
        bail!("--resume: {} has no checkpoint/state.json", out.display());
    }
    std::fs::create_dir_all(out).with_context(|| format!("creating {}", out.display()))?;
    let settings = EvalSettings::from_config(cfg)?;
    let pipe = ShapesPipeline::from_scratch(
        &inputs.tcfg,
        &inputs.ecfg,
        inputs.tokenizer.clone(),
        inputs.codec.clone(),
        cfg.run.seed,
        dev,
    )?;
    let vars = named_vars(&pipe);
    if let (Some(dir), false) = (&pt.init_from, resume) {
        init_from_pipeline(dir, &inputs, &vars, dev)?;
    }
    let mut opt = AdamW::new(
        vars.clone(),
        AdamWParams {
            lr: pt.learning_rate,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: pt.weight_decay,
        },
    )?;
    let mut ema = Shadow::of(&vars)?;
    let workers = crate::par::workers_for(dev);
    let mut start = 0usize;
    let mut wall0 = 0f64;
    let metrics = out.join("metrics.jsonl");
    if resume {
        let st: State = serde_json::from_str(
            &std::fs::read_to_string(ckpt.join("state.json"))
                .with_context(|| format!("reading {}", ckpt.join("state.json").display()))?,
        )
        .with_context(|| format!("parsing {}", ckpt.join("state.json").display()))?;
        let file = ckpt.join("train_state.safetensors");
        let mut t = read_safetensors(std::slice::from_ref(&file), dev)?;
        let mut moments = HashMap::new();
        for (i, (name, var)) in vars.iter().enumerate() {
            let raw = t
                .remove(&format!("raw.{name}"))
                .with_context(|| format!("{} has no raw.{name}", file.display()))?;
            let e = t
                .remove(&format!("ema.{name}"))
                .with_context(|| format!("{} has no ema.{name}", file.display()))?;
            if raw.dims() != var.dims() {
                bail!(
                    "{}: raw.{name} has shape {:?}, the model {:?} (was the config changed?)",
                    file.display(),
                    raw.dims(),
                    var.dims()
                );
            }
            var.set(&raw)?;
            ema.values[i] = e;
        }
        for (k, v) in t {
            moments.insert(k, v);
        }
        opt.load_state(moments, st.step as u64)?;
        if let Some(w) = st.workers.filter(|&w| w != workers) {
            tracing::warn!(
                "the checkpoint was written with {w} worker threads, this run uses {workers}: \
                 it continues correctly but will not equal an uninterrupted run bit for bit \
                 (pass --threads {w} for that)"
            );
        }
        start = st.step;
        wall0 = st.wall_s;
        crate::io::retain_jsonl(&metrics, "step", |s| s as usize <= start)?;
        tracing::info!(step = start, "resumed from {}", ckpt.display());
    }
    tracing::info!(
        transformer_params = pipe.transformer.num_base_params(),
        text_encoder_params = pipe.text.num_params(),
        steps = pt.steps,
        batch = pt.batch_size,
        workers,
        "pretraining the shapes model into {}",
        out.display()
    );
    let shape = pipe.latent_shape();
    let t0 = Instant::now();
    let bar = indicatif::ProgressBar::new(pt.steps as u64);
    bar.set_style(
        indicatif::ProgressStyle::with_template(
            "pretrain {bar:30} {pos}/{len} steps [{elapsed_precise}<{eta_precise}] {msg}",
        )
        .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
    );
    bar.set_position(start as u64);
    let mut loss_acc = 0f64;
    let mut loss_n = 0usize;
    let save = |step: usize, wall: f64, opt: &AdamW, ema: &Shadow| -> Result<()> {
        let s = staging_dir(&ckpt)?;
        let meta = HashMap::from([
            ("dgpo_step".to_string(), step.to_string()),
            ("dgpo_weights".to_string(), "ema".to_string()),
        ]);
        ema.with(&vars, || {
            pipe.save(&s.join("model"), &meta, pt.save_dtype.candle())
        })?;
        let mut t = opt.state();
        for (i, (name, var)) in vars.iter().enumerate() {
            t.insert(format!("raw.{name}"), var.as_tensor().clone());
            t.insert(format!("ema.{name}"), ema.values[i].clone());
        }
        save_safetensors(&s.join("train_state.safetensors"), &t, None)?;
        let st = State {
            step,
            wall_s: wall,
            config: cfg.to_toml(),
            workers: Some(workers),
        };
        write_atomic(
            &s.join("state.json"),
            serde_json::to_string_pretty(&st)?.as_bytes(),
        )?;
        replace_dir(&s, &ckpt)?;
        tracing::debug!(step, "checkpoint written");
        Ok(())
    };
    let run_eval = |step: usize, wall: f64, ema: &Shadow| -> Result<crate::eval::EvalResult> {
        let r = ema.with(&vars, || {
            evaluate(&pipe, &inputs.test, &settings, Weights::PolicyNoGrad, false)
        })?;
        append_metrics(&metrics, &eval_json(step, wall, &r))?;
        bar.println(format!(
            "step {step}: geneval_overall {:.3}, reward {:.3} ({:.0} s eval)",
            r.summary.geneval_overall, r.summary.reward_mean, r.wall_s
        ));
        Ok(r)
    };
    for step in start..pt.steps {
        let batch = make_batch(cfg, step, pipe.codec.as_ref(), shape, dev)?;
        // One shard of the batch per worker thread; shard losses are weighted so that their sum is
        // the batch mean, and their gradients are summed in shard order.
        let ranges = crate::par::shards(pt.batch_size, workers, 1);
        let parts = crate::par::map_shards(&ranges, |r| {
            let loss = (flow_matching_loss(&pipe, &batch.narrow(r.clone())?)?
                * (r.len() as f64 / pt.batch_size as f64))?;
            let lv = loss.to_scalar::<f32>()? as f64;
            Ok((lv, loss.backward()?))
        })?;
        let lv: f64 = parts.iter().map(|(l, _)| l).sum();
        if !lv.is_finite() {
            bail!("pretraining loss is {lv} at step {step}: lower pretrain.learning_rate");
        }
        let mut acc = opt.accum();
        for (_, grads) in &parts {
            opt.add(&mut acc, grads)?;
        }
        let lr = lr_at(cfg, step);
        let gn = opt.step(acc, lr, Some(pt.max_grad_norm))?;
        let decay = pt.ema_decay.min((1.0 + step as f64) / (10.0 + step as f64));
        ema.update(&vars, decay)?;
        loss_acc += lv;
        loss_n += 1;
        let done = step + 1;
        bar.set_position(done as u64);
        let wall = wall0 + t0.elapsed().as_secs_f64();
        if done % pt.log_every == 0 || done == pt.steps {
            let mean = loss_acc / loss_n as f64;
            bar.set_message(format!("loss {mean:.4}"));
            append_metrics(
                &metrics,
                &serde_json::json!({"kind": "pretrain", "step": done, "wall_s": wall, "loss": mean,
                    "lr": lr, "grad_norm": gn, "images": done * pt.batch_size}),
            )?;
            tracing::debug!(step = done, loss = mean, lr, grad_norm = gn);
            loss_acc = 0.0;
            loss_n = 0;
        }
        if pt.eval_every > 0 && done % pt.eval_every == 0 && done != pt.steps {
            run_eval(done, wall, &ema)?;
        }
        if done % pt.save_every == 0 || done == pt.steps || Some(done) == stop_at {
            save(done, wall, &opt, &ema)?;
        }
        if Some(done) == stop_at {
            bar.finish_and_clear();
            return Ok(());
        }
    }
    bar.finish_and_clear();
    let wall = wall0 + t0.elapsed().as_secs_f64();
    let r = run_eval(pt.steps, wall, &ema)?;
    let model_dir = out.join("model");
    let meta = HashMap::from([
        ("dgpo_step".to_string(), pt.steps.to_string()),
        ("dgpo_weights".to_string(), "ema".to_string()),
    ]);
    ema.with(&vars, || {
        pipe.save(&model_dir, &meta, pt.save_dtype.candle())
    })?;
    let report = serde_json::json!({
        "steps": pt.steps,
        "pretrain_wall_s": wall,
        "summary": r.summary,
    });
    write_atomic(
        &out.join("eval.json"),
        serde_json::to_string_pretty(&report)?.as_bytes(),
    )?;
    println!("{}", r.summary.table());
    println!(
        "pretrained {} steps in {:.1} min; model (EMA weights) in {}",
        pt.steps,
        wall / 60.0,
        model_dir.display()
    );
    Ok(())
}

/// Where `dgpo pretrain` writes when no `--out` is given.
pub fn default_out(cfg: &Config) -> PathBuf {
    cfg.run.out_dir.clone()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn learning_rate_warms_up_holds_and_cools_down_to_zero() {
        let mut cfg = Config::default();
        cfg.pretrain.steps = 10;
        cfg.pretrain.learning_rate = 1.0;
        cfg.pretrain.warmup_steps = 2;
        cfg.pretrain.decay_steps = 3;
        let lrs: Vec<f64> = (0..10).map(|s| lr_at(&cfg, s)).collect();
        let expect = [0.5, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 0.75, 0.5, 0.25];
        for (a, b) in lrs.iter().zip(expect) {
            assert!((a - b).abs() < 1e-12, "{lrs:?}");
        }
        cfg.pretrain.decay_steps = 0;
        assert_eq!(lr_at(&cfg, 9), 1.0);
    }

    /// Tag of each non-empty caption of the batches of steps `0..steps`.
    fn caption_tags(cfg: &Config, steps: usize) -> Vec<String> {
        let tag_of: HashMap<String, String> = crate::testbed::all_prompts()
            .into_iter()
            .map(|m| (m.prompt, m.tag))
            .collect();
        (0..steps)
            .flat_map(|s| {
                make_batch(cfg, s, None, (3, 48, 48), &Device::Cpu)
                    .unwrap()
                    .captions
            })
            .filter(|c| !c.is_empty())
            .map(|c| tag_of[&c].clone())
            .collect()
    }

    #[test]
    fn tag_weights_set_the_caption_mix() {
        let mut cfg = Config::default();
        cfg.pretrain.batch_size = 50;
        let uniform = caption_tags(&cfg, 8);
        let share = |tags: &[String], t: &str| {
            tags.iter().filter(|x| *x == t).count() as f64 / tags.len() as f64
        };
        assert!((share(&uniform, "colors") - 1.0 / 6.0).abs() < 0.07);
        // Only colors and color_attr, 1 : 3.
        for t in crate::geneval::TAGS {
            cfg.pretrain.tag_weights.insert(t.to_string(), 0.0);
        }
        cfg.pretrain.tag_weights.insert("colors".into(), 1.0);
        cfg.pretrain.tag_weights.insert("color_attr".into(), 3.0);
        let mixed = caption_tags(&cfg, 8);
        assert!(mixed.iter().all(|t| t == "colors" || t == "color_attr"));
        let s = share(&mixed, "color_attr");
        assert!((s - 0.75).abs() < 0.07, "{s}");
        // A tag not named weighs 1: colors 4 of 9 with the other five at 1.
        cfg.pretrain.tag_weights.clear();
        cfg.pretrain.tag_weights.insert("colors".into(), 4.0);
        let s = share(&caption_tags(&cfg, 8), "colors");
        assert!((s - 4.0 / 9.0).abs() < 0.08, "{s}");
    }
}
