//! `dgpo train`: the DGPO loop of ALGORITHM.md on a shapes pipeline (the SD3.5 pipeline plugs into the
//! same loop with issue 7).
//!
//! One epoch: rollouts (deterministic ODE with CFG, whole groups per batch, optionally under the
//! EMA-reference weights) → rewards → group advantages → for every training micro-batch (whole groups)
//! and every drawn step index j ≤ K: group-shared noise, `x_t`, reference / EMA-reference / policy
//! velocities, the DGPO loss, backward → one AdamW step per epoch → EMA-reference and slow-EMA updates.
//!
//! Determinism: everything random is seeded by `(run.seed, epoch, purpose)`, so a resumed run repeats
//! an uninterrupted one (its metrics match, timings aside).

pub mod dgpo;
pub mod flow_grpo;
pub mod optim;
pub mod plan;
pub mod pretrain;

use crate::config::{AdvantageMode, Algorithm, Config, PromptSampling};
use crate::eval::{evaluate_prompts, EvalSettings};
use crate::geneval::Metadata;
use crate::io::{
    append_jsonl as append_metrics, replace_dir, save_safetensors, staging_dir, write_atomic,
};
use crate::model::weights::read_safetensors;
use crate::model::{Trainable, Weights};
use crate::pipeline::shapes::ShapesPipeline;
use crate::pipeline::Generator;
use crate::prompt_file::read_prompt_file;
use crate::reward::Rewards;
use crate::sampling::{sample, schedule, seeded_randn as randn, Conditioning};
use crate::train::dgpo::{
    advantages, dgpo_loss, draw_timestep_indices, per_sample_mse, DgpoParams,
};
use crate::train::optim::{AdamW, AdamWParams, Shadow};
use anyhow::{bail, Context, Result};
use candle_core::{DType, Device, Tensor};
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Instant;

/// Seeds for the independent random streams of an epoch.
fn rng(seed: u64, epoch: usize, purpose: u64) -> rand::rngs::StdRng {
    rand::rngs::StdRng::seed_from_u64(
        seed.wrapping_mul(0x9E37_79B9_7F4A_7C15)
            ^ ((epoch as u64) << 16).wrapping_add(purpose.wrapping_mul(0xD1B5_4A32_D192_ED03)),
    )
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct State {
    epoch: usize,
    opt_step: u64,
    wall_s: f64,
    config: String,
}

/// The prompts of one epoch: `n_groups` distinct training prompts (fewer if the file has fewer, then
/// repeated), each repeated `group_size` times consecutively.
pub fn epoch_prompts(n_train: usize, n_groups: usize, seed: u64, epoch: usize) -> Vec<usize> {
    let mut r = rng(seed, epoch, 1);
    let mut out = Vec::with_capacity(n_groups);
    while out.len() < n_groups {
        let mut idx: Vec<usize> = (0..n_train).collect();
        idx.shuffle(&mut r);
        out.extend(idx.into_iter().take(n_groups - out.len()));
    }
    out
}

/// As [`epoch_prompts`] with `prompts.sampling = "by_tag"`: group `k` takes the `k`-th tag of a
/// random cycle over the distinct tags (first-seen order, reshuffled each cycle), then a prompt of
/// that tag uniformly at random. `tags[i]` is the tag of training prompt `i`.
pub fn epoch_prompts_by_tag(tags: &[&str], n_groups: usize, seed: u64, epoch: usize) -> Vec<usize> {
    let mut r = rng(seed, epoch, 1);
    let mut names: Vec<&str> = Vec::new();
    let mut members: Vec<Vec<usize>> = Vec::new();
    for (i, t) in tags.iter().enumerate() {
        match names.iter().position(|n| n == t) {
            Some(k) => members[k].push(i),
            None => {
                names.push(t);
                members.push(vec![i]);
            }
        }
    }
    let mut out = Vec::with_capacity(n_groups);
    while out.len() < n_groups && !names.is_empty() {
        let mut cycle: Vec<usize> = (0..names.len()).collect();
        cycle.shuffle(&mut r);
        for k in cycle.into_iter().take(n_groups - out.len()) {
            out.push(members[k][r.random_range(0..members[k].len())]);
        }
    }
    out
}

fn mean(v: &[f32]) -> f64 {
    if v.is_empty() {
        0.0
    } else {
        v.iter().map(|x| *x as f64).sum::<f64>() / v.len() as f64
    }
}

fn checkpoint_dirs(out: &Path) -> Vec<(usize, PathBuf)> {
    let mut v: Vec<(usize, PathBuf)> = std::fs::read_dir(out.join("checkpoints"))
        .map(|rd| {
            rd.filter_map(|e| e.ok())
                .filter_map(|e| {
                    let name = e.file_name().to_string_lossy().to_string();
                    let n = name.strip_prefix("epoch-")?.parse().ok()?;
                    e.path().join("state.json").exists().then(|| (n, e.path()))
                })
                .collect()
        })
        .unwrap_or_default();
    v.sort();
    v
}

/// Run (or resume) DGPO training into `out`.
pub fn run(cfg: &Config, out: &Path, resume: bool, dev: &Device) -> Result<()> {
    run_until(cfg, out, resume, dev, None)
}

/// As [`run`], stopping after epoch `stop_after` (exclusive count) with a checkpoint, as a kill would.
pub fn run_until(
    cfg: &Config,
    out: &Path,
    resume: bool,
    dev: &Device,
    stop_after: Option<usize>,
) -> Result<()> {
    // ---- validate everything before any long work ----
    let s = &cfg.sample;
    let t = &cfg.train;
    let train_path = cfg
        .prompts
        .train
        .as_ref()
        .context("prompts.train is not set")?;
    let test_path = cfg
        .prompts
        .test
        .as_ref()
        .context("prompts.test is not set")?;
    let train_items = read_prompt_file(train_path)?;
    let test_items = read_prompt_file(test_path)?;
    let rewards = Rewards::from_config_on(&cfg.reward, dev)?;
    rewards.check()?;
    let settings = EvalSettings::from_config(cfg)?;
    let trainable = if cfg.lora.enabled {
        Trainable::Lora {
            spec: cfg.lora.spec(),
            seed: cfg.run.seed,
        }
    } else {
        Trainable::Full
    };
    if cfg.prompts.sampling == PromptSampling::ByTag {
        if let Some(i) = train_items.iter().position(|p| p.meta.is_none()) {
            bail!(
                "prompts.sampling = \"by_tag\" needs GenEval metadata (a .jsonl file), but prompt {} of \
                 {} ({:?}) has none: use sampling = \"uniform\"",
                i + 1,
                train_path.display(),
                train_items[i].prompt
            );
        }
    }
    let base = crate::pipeline::sd3::resolve_pretrained(cfg)?;
    let loaded: Box<dyn Generator> = if crate::pipeline::sd3::is_sd3_pipeline(&base) {
        let mut p = crate::pipeline::sd3::load_from_config(cfg, &base, &trainable, dev)?;
        // Every prompt of the run goes through the text encoders once, up front; with
        // model.embedding_cache they are then freed and the run reads the cache.
        let mut texts: Vec<&str> = train_items
            .iter()
            .chain(&test_items)
            .map(|p| p.prompt.as_str())
            .collect();
        texts.push("");
        let n = p.prepare_prompts(&texts, s.batch_size)?;
        if cfg.model.embedding_cache.is_some() {
            tracing::info!(
                encoded = n,
                "prompt embeddings ready; text encoders not in memory"
            );
        }
        Box::new(p)
    } else {
        Box::new(
            ShapesPipeline::load(&base, &trainable, dev)
                .with_context(|| format!("model.pretrained = {:?}", cfg.model.pretrained))?,
        )
    };
    let pipe: &dyn Generator = loaded.as_ref();
    for (path, items) in [(train_path, &train_items), (test_path, &test_items)] {
        for (i, it) in items.iter().enumerate() {
            pipe.check_prompt(&it.prompt)
                .with_context(|| format!("prompt {} of {}", i + 1, path.display()))?;
        }
    }
    if pipe.shapes_world() {
        if let Some(i) = test_items.iter().position(|p| p.meta.is_none()) {
            bail!(
                "{}: test prompt {} ({:?}) has no GenEval metadata; shapes-world evaluations score \
                 .jsonl prompt files",
                test_path.display(),
                i + 1,
                test_items[i].prompt
            );
        }
    }
    let res = pipe.image_size();
    if res != cfg.model.resolution {
        bail!(
            "model.resolution = {} but the model at {} works at {res}",
            cfg.model.resolution,
            base.display()
        );
    }
    let vars = pipe.transformer().trainable_vars();
    if vars.is_empty() {
        bail!("nothing to train: lora.targets match no layer and lora.enabled = true");
    }
    let ckpts = checkpoint_dirs(out);
    if !resume && !ckpts.is_empty() {
        bail!(
            "{} already holds checkpoints (last: epoch {}): pass --resume to continue, or choose another --out",
            out.display(),
            ckpts.last().map(|c| c.0).unwrap_or(0)
        );
    }
    if resume && ckpts.is_empty() {
        bail!(
            "--resume: {} has no checkpoints/epoch-*/state.json",
            out.display()
        );
    }
    std::fs::create_dir_all(out).with_context(|| format!("creating {}", out.display()))?;
    write_atomic(&out.join("config.toml"), cfg.to_toml().as_bytes())?;

    // ---- state ----
    let mut opt = AdamW::new(
        vars.clone(),
        AdamWParams {
            lr: t.learning_rate,
            beta1: t.adam_beta1,
            beta2: t.adam_beta2,
            eps: t.adam_epsilon,
            weight_decay: t.adam_weight_decay,
        },
    )?;
    let mut ema_ref = Shadow::of(&vars)?;
    let mut ema = Shadow::of(&vars)?;
    let mut start_epoch = 0usize;
    let mut wall0 = 0f64;
    let metrics = out.join("metrics.jsonl");
    if resume {
        let (_, dir) = ckpts.last().cloned().context("no checkpoint")?;
        let st: State = serde_json::from_str(&std::fs::read_to_string(dir.join("state.json"))?)
            .with_context(|| format!("parsing {}", dir.join("state.json").display()))?;
        let f = dir.join("train_state.safetensors");
        let mut tensors = read_safetensors(std::slice::from_ref(&f), dev)?;
        for (i, (name, var)) in vars.iter().enumerate() {
            for (prefix, what) in [("raw.", 0), ("ema_ref.", 1), ("ema.", 2)] {
                let k = format!("{prefix}{name}");
                let v = tensors.remove(&k).with_context(|| {
                    format!("{} has no {k}: was the config changed?", f.display())
                })?;
                if v.dims() != var.dims() {
                    bail!(
                        "{}: {k} has shape {:?}, the model {:?}",
                        f.display(),
                        v.dims(),
                        var.dims()
                    );
                }
                match what {
                    0 => var.set(&v)?,
                    1 => ema_ref.values[i] = v,
                    _ => ema.values[i] = v,
                }
            }
        }
        opt.load_state(tensors, st.opt_step)?;
        start_epoch = st.epoch;
        wall0 = st.wall_s;
        crate::io::retain_jsonl(&metrics, "epoch", |e| (e as usize) < start_epoch)?;
        tracing::info!(epoch = start_epoch, "resumed from {}", dir.display());
    }

    let stop = Arc::new(AtomicBool::new(false));
    {
        let stop = stop.clone();
        // A second handler cannot be installed (tests run several loops in one process): ignore that.
        let _ = ctrlc::set_handler(move || {
            if stop.swap(true, Ordering::SeqCst) {
                std::process::exit(130);
            }
            eprintln!("\ninterrupt: finishing this epoch's checkpoint, then exiting (Ctrl-C again to abort)");
        });
    }

    let shape = pipe.latent_shape();
    let g = s.group_size;
    let per_epoch = s.batch_size * s.num_batches_per_epoch;
    let workers = crate::par::workers_for(dev);
    let n_groups = per_epoch / g;
    let sched = schedule(s.sampler, s.num_steps, s.flow_shift);
    let empty = pipe.encode(&[""])?;
    let params = DgpoParams {
        beta_dpo: t.beta_dpo,
        beta_kl: t.beta_kl,
        clip_range: t.clip_range,
        use_ema_ref: t.use_ema_ref,
    };
    let t0 = Instant::now();
    tracing::info!(
        trainable = vars.iter().map(|(_, v)| v.elem_count()).sum::<usize>(),
        groups = n_groups,
        group_size = g,
        "DGPO on {} ({} train / {} test prompts) into {}",
        base.display(),
        train_items.len(),
        test_items.len(),
        out.display()
    );

    // Returns GenEval's overall score when the evaluation has GenEval verdicts.
    let do_eval = |epoch: usize, opt_step: u64, wall: f64, ema: &Shadow| -> Result<Option<f64>> {
        let r = ema.with(&vars, || {
            evaluate_prompts(
                pipe,
                &test_items,
                &settings,
                Weights::PolicyNoGrad,
                false,
                Some(&rewards),
            )
        })?;
        let sm = &r.summary;
        let geneval = r.geneval.then_some(sm.geneval_overall);
        append_metrics(
            &metrics,
            &serde_json::json!({
                "kind": "eval", "epoch": epoch, "opt_step": opt_step, "wall_s": wall,
                "eval_reward_mean": sm.reward_mean, "geneval_overall": geneval,
                "strict_accuracy": r.geneval.then_some(sm.strict_accuracy),
                "accuracy": r.geneval.then_some(sm.accuracy),
                "per_tag": sm.per_tag.iter().map(|(k, v)| (k.clone(), if r.geneval { serde_json::json!(v.accuracy) } else { serde_json::Value::Null })).collect::<serde_json::Map<_, _>>(),
                "eval_s": r.wall_s,
            }),
        )?;
        // Large images: the grid shows the first prompts only (at most 64 images).
        let shown = if res > 64 {
            r.images.len().min(64)
        } else {
            r.images.len()
        };
        let grid = crate::image::grid(&r.images[..shown], settings.images_per_prompt * 4, 1);
        grid.to_png(&out.join(format!("grids/eval-epoch-{epoch:05}.png")))?;
        println!(
            "eval  epoch {epoch:>4}  step {opt_step:>4}  {}reward {:.3}  ({:.0} s)",
            geneval
                .map(|g| format!("geneval_overall {g:.3}  "))
                .unwrap_or_default(),
            sm.reward_mean,
            r.wall_s
        );
        Ok(geneval)
    };

    let save =
        |epoch: usize, opt: &AdamW, ema_ref: &Shadow, ema: &Shadow, wall: f64| -> Result<()> {
            let dst = out.join("checkpoints").join(format!("epoch-{epoch:05}"));
            std::fs::create_dir_all(out.join("checkpoints"))?;
            let st = staging_dir(&dst)?;
            let mut tensors = opt.state();
            for (n, v) in &vars {
                tensors.insert(format!("raw.{n}"), v.as_tensor().clone());
            }
            tensors.extend(ema_ref.named(&vars, "ema_ref."));
            tensors.extend(ema.named(&vars, "ema."));
            save_safetensors(&st.join("train_state.safetensors"), &tensors, None)?;
            // The slow-EMA weights as the adapter / trained tensors users load (names as peft writes them).
            let meta = HashMap::from([
                ("dgpo_epoch".to_string(), epoch.to_string()),
                ("dgpo_weights".to_string(), "ema".to_string()),
                ("dgpo_base".to_string(), cfg.model.pretrained.clone()),
            ]);
            save_safetensors(
                &st.join("trainable_ema.safetensors"),
                &ema.named(&vars, ""),
                Some(meta),
            )?;
            let state = State {
                epoch,
                opt_step: opt.step,
                wall_s: wall,
                config: cfg.to_toml(),
            };
            write_atomic(
                &st.join("state.json"),
                serde_json::to_string_pretty(&state)?.as_bytes(),
            )?;
            replace_dir(&st, &dst)?;
            let all = checkpoint_dirs(out);
            let keep = cfg.run.keep_checkpoints.max(1);
            for (_, d) in all.iter().take(all.len().saturating_sub(keep)) {
                std::fs::remove_dir_all(d)
                    .with_context(|| format!("removing old {}", d.display()))?;
            }
            Ok(())
        };

    let mut first_above: Option<usize> = None;
    for epoch in start_epoch..cfg.run.num_epochs {
        let wall = wall0 + t0.elapsed().as_secs_f64();
        if epoch % cfg.run.eval_every == 0 {
            let score = do_eval(epoch, opt.step, wall, &ema)?.unwrap_or(0.0);
            if score >= 0.8 && first_above.is_none() {
                first_above = Some(epoch);
            }
        }
        // ---- rollouts ----
        let t_roll = Instant::now();
        let chosen = match cfg.prompts.sampling {
            PromptSampling::Uniform => {
                epoch_prompts(train_items.len(), n_groups, cfg.run.seed, epoch)
            }
            PromptSampling::ByTag => {
                let tags: Vec<&str> = train_items
                    .iter()
                    .map(|m| m.meta.as_ref().map_or("", |m| m.tag.as_str()))
                    .collect();
                epoch_prompts_by_tag(&tags, n_groups, cfg.run.seed, epoch)
            }
        };
        let order: Vec<usize> = chosen
            .iter()
            .flat_map(|&p| std::iter::repeat_n(p, g))
            .collect();
        let prompts: Vec<String> = order
            .iter()
            .map(|&i| train_items[i].prompt.clone())
            .collect();
        let metas: Vec<Option<Metadata>> =
            order.iter().map(|&i| train_items[i].meta.clone()).collect();
        let mut noise_rng = rng(cfg.run.seed, epoch, 2);
        let grpo = t.algorithm == Algorithm::FlowGrpo;
        let mut trajs: Vec<crate::train::flow_grpo::Trajectory> = vec![];
        let use_ref_weights = !grpo && opt.step as usize > t.switch_ema_ref;
        let mut x0s = vec![];
        let mut conds = vec![];
        let bar = stage_bar(per_epoch, &format!("epoch {epoch} rollout"), "images");
        // Each rollout batch is scored on a second thread while the next one is sampled (a remote
        // reward's latency hides behind the rollouts).
        let scored_batches = std::thread::scope(|sc| -> Result<_> {
            let (tx, rx) = std::sync::mpsc::channel::<(usize, Vec<crate::image::Image>)>();
            let (prompts, metas, rewards) = (&prompts, &metas, &rewards);
            let scorer = sc.spawn(move || {
                let mut outs = vec![];
                let mut busy = 0f64;
                for (start, imgs) in rx {
                    let t = Instant::now();
                    let end = start + imgs.len();
                    let failed = outs.last().is_some_and(|o: &Result<_>| o.is_err());
                    if !failed {
                        outs.push(rewards.score_parts(
                            &imgs,
                            &prompts[start..end],
                            &metas[start..end],
                        ));
                    }
                    busy += t.elapsed().as_secs_f64();
                }
                (outs, busy)
            });
            for b in 0..s.num_batches_per_epoch {
                let range = b * s.batch_size..(b + 1) * s.batch_size;
                let ps: Vec<&str> = prompts[range.clone()].iter().map(|p| p.as_str()).collect();
                let cond = pipe.encode(&ps)?;
                let noise = randn(&mut noise_rng, (ps.len(), shape.0, shape.1, shape.2), dev)?;
                let uncond = empty.repeat(ps.len())?;
                let roll = || {
                    sample(
                        pipe.transformer(),
                        s.sampler,
                        &sched,
                        &noise,
                        &cond,
                        Some(&uncond),
                        s.guidance_scale,
                        Weights::PolicyNoGrad,
                    )
                };
                let x0 = if grpo {
                    // Flow-GRPO: on-policy SDE rollouts, the trajectory and its log-probabilities kept.
                    let z = (0..sched.num_steps())
                        .map(|_| randn(&mut noise_rng, (ps.len(), shape.0, shape.1, shape.2), dev))
                        .collect::<Result<Vec<_>>>()?;
                    let tr = crate::train::flow_grpo::sde_rollout(
                        pipe.transformer(),
                        &sched,
                        &noise,
                        &z,
                        &cond,
                        Some(&uncond),
                        s.guidance_scale,
                        t.noise_level,
                        Weights::PolicyNoGrad,
                    )?;
                    let x0 = tr.latents[sched.num_steps()].clone();
                    trajs.push(tr);
                    x0
                } else if use_ref_weights {
                    ema_ref.with(&vars, roll)?
                } else {
                    roll()?
                };
                // A closed channel means the scorer is gone; its result says why.
                let _ = tx.send((range.start, pipe.decode(&x0)?));
                x0s.push(x0);
                conds.push(cond);
                bar.inc(s.batch_size as u64);
            }
            drop(tx);
            let t_wait = Instant::now();
            let (outs, busy) = scorer
                .join()
                .map_err(|_| anyhow::anyhow!("the reward thread panicked"))?;
            Ok((outs, busy, t_wait.elapsed().as_secs_f64()))
        })?;
        bar.finish_and_clear();
        let x0_all = Tensor::cat(&x0s, 0)?;
        let cond_all = Conditioning::cat(&conds.iter().collect::<Vec<_>>())?;
        let (scored, reward_busy_s, reward_wait_s) = scored_batches;
        let roll_s = t_roll.elapsed().as_secs_f64() - reward_wait_s;
        // ---- rewards (what is left after the rollouts) ----
        let t_rew = Instant::now();
        let scored = scored
            .into_iter()
            .collect::<Result<Vec<_>>>()
            .and_then(crate::reward::concat_scored);
        let (reward, named, parts) = match scored {
            Ok(x) => x,
            Err(e) => {
                // Nothing of this epoch is lost but its rollouts: keep the state before it.
                save(epoch, &opt, &ema_ref, &ema, wall)?;
                return Err(e.context(format!(
                    "epoch {epoch}: the rewards failed; a checkpoint of the state before this epoch is \
                     in {}; fix the reward (a server's address can be changed in the config) and \
                     continue with `dgpo train --config <config> --out {} --resume`",
                    out.join("checkpoints").display(),
                    out.display()
                )));
            }
        };
        let adv = match t.advantages {
            AdvantageMode::Sum => advantages(&reward, g, t.global_std, t.adv_clip_max as f32)?,
            AdvantageMode::Decoupled => crate::train::dgpo::decoupled_advantages(
                &parts,
                g,
                t.global_std,
                t.adv_clip_max as f32,
            )?,
        };
        let rew_s = reward_wait_s + t_rew.elapsed().as_secs_f64();
        // ---- update ----
        let t_upd = Instant::now();
        let mut trng = rng(cfg.run.seed, epoch, 3);
        let js = if grpo {
            let mut all: Vec<usize> = (0..sched.num_steps()).collect();
            all.shuffle(&mut trng);
            all.truncate(crate::train::flow_grpo::num_train_steps(
                sched.num_steps(),
                t.timestep_fraction,
            ));
            all.sort_unstable();
            all
        } else {
            draw_timestep_indices(&mut trng, t.trunc_steps, t.num_train_timesteps)
        };
        let traj = if grpo {
            Some(crate::train::flow_grpo::Trajectory::cat(&trajs)?)
        } else {
            None
        };
        let mut acc = opt.accum();
        let n_micro = per_epoch / t.batch_size;
        let passes = (n_micro * js.len()) as f64;
        let mut tot = PassTotals::default();
        let bar = stage_bar(
            n_micro * js.len(),
            &format!("epoch {epoch} update"),
            "passes",
        );
        for mb in 0..n_micro {
            let lo = mb * t.batch_size;
            let n = t.batch_size;
            let x0 = x0_all.narrow(0, lo, n)?;
            let cond = Conditioning {
                context: cond_all.context.narrow(0, lo, n)?,
                pooled: cond_all.pooled.narrow(0, lo, n)?,
            };
            let a = &adv.values[lo..lo + n];
            for &j in &js {
                if let Some(tr) = &traj {
                    let outs = grpo_pass(GrpoPass {
                        model: pipe.transformer(),
                        sched: &sched,
                        traj: tr,
                        j,
                        lo,
                        n,
                        cond: &cond,
                        empty: &empty,
                        adv: a,
                        group: g,
                        workers,
                        t,
                        guidance: s.guidance_scale,
                        passes,
                    })?;
                    tot.absorb(
                        &opt,
                        &mut acc,
                        outs,
                        epoch,
                        "Flow-GRPO",
                        "lower train.learning_rate",
                    )?;
                    bar.inc(1);
                    continue;
                }
                let sigma = sched.train_sigma(j);
                // One noise per group, shared by its members.
                let groups = n / g;
                let gn = randn(&mut trng, (groups, shape.0, shape.1, shape.2), dev)?;
                let idx: Vec<u32> = (0..n).map(|i| (i / g) as u32).collect();
                let eps = gn.index_select(&Tensor::new(idx.as_slice(), dev)?, 0)?;
                let xt = ((&x0 * (1.0 - sigma as f64))? + (&eps * sigma as f64)?)?;
                let target = (&eps - &x0)?;
                let tj = sched.timesteps[j];
                let m = pipe.transformer();
                // The frozen velocities over the whole micro-batch (sharded over worker threads
                // inside); v_old under the EMA-reference weights, swapped in once.
                let u = (t.kl_cfg > 1.0).then(|| empty.repeat(n)).transpose()?;
                let v_ref = crate::sampling::velocity_sharded(
                    m,
                    &xt,
                    tj,
                    &cond,
                    u.as_ref(),
                    t.kl_cfg,
                    Weights::Reference,
                )?;
                let v_old = ema_ref.with(&vars, || {
                    crate::sampling::velocity_sharded(
                        m,
                        &xt,
                        tj,
                        &cond,
                        None,
                        1.0,
                        Weights::PolicyNoGrad,
                    )
                })?;
                // The policy forward, loss and backward: one shard of whole groups per worker. The
                // loss is a mean over samples, so shard losses weighted by their share sum to it.
                let chunked =
                    t.gradient_checkpointing || (t.backward_chunk > 0 && t.backward_chunk < n);
                let parts = if chunked {
                    chunked_dgpo_pass(ChunkedPass {
                        model: m,
                        xt: &xt,
                        target: &target,
                        v_ref: &v_ref,
                        v_old: &v_old,
                        cond: &cond,
                        tj,
                        adv: a,
                        group: g,
                        params: &params,
                        passes,
                        chunk: match t.backward_chunk {
                            0 => n.div_ceil(workers.max(1)),
                            c => c,
                        },
                        checkpoint: t.gradient_checkpointing,
                        workers,
                    })?
                } else {
                    let ranges = crate::par::shards(n, workers, g);
                    crate::par::map_shards(&ranges, |r| {
                        let (lo, len) = (r.start, r.len());
                        let cond = cond.narrow(r.clone())?;
                        let xt = xt.narrow(0, lo, len)?;
                        let target = target.narrow(0, lo, len)?;
                        let v_ref = v_ref.narrow(0, lo, len)?;
                        let tt = Tensor::full(tj, len, dev)?;
                        let v =
                            m.forward(&xt, &tt, &cond.context, &cond.pooled, Weights::Policy)?;
                        let l_theta = per_sample_mse(&target, &v)?;
                        let l_ref = per_sample_mse(&target, &v_ref)?;
                        let l_old = per_sample_mse(&target, &v_old.narrow(0, lo, len)?)?;
                        let kl_i = per_sample_mse(&v, &v_ref.detach())?;
                        let terms = dgpo_loss(&l_theta, &l_ref, &l_old, &kl_i, &a[r], g, &params)?;
                        ShardPass::backprop(
                            m,
                            &terms.loss,
                            [
                                terms.policy_loss,
                                terms.kl,
                                terms.clip_frac,
                                terms.mean_weight(),
                            ],
                            len as f64 / n as f64,
                            passes,
                        )
                    })?
                };
                tot.absorb(
                    &opt,
                    &mut acc,
                    parts,
                    epoch,
                    "DGPO",
                    "lower train.learning_rate or train.beta_dpo",
                )?;
                bar.inc(1);
            }
        }
        bar.finish_and_clear();
        let gn = opt.step(acc, t.learning_rate, Some(t.max_grad_norm))?;
        let step = opt.step;
        ema_ref.update(&vars, (0.001 * step as f64).min(0.3))?;
        if step.is_multiple_of(t.ema_every as u64) {
            let d = t.ema_decay.min((1.0 + step as f64) / (10.0 + step as f64));
            ema.update(&vars, d)?;
        }
        let upd_s = t_upd.elapsed().as_secs_f64();
        let wall = wall0 + t0.elapsed().as_secs_f64();
        let rmean = mean(&reward);
        let mut line = serde_json::json!({
            "kind": "train", "epoch": epoch, "opt_step": step, "wall_s": wall,
            "reward_mean": rmean, "loss": tot.loss / passes, "policy_loss": tot.policy / passes,
            "kl": tot.kl / passes, "clip_frac": tot.clip / passes, "grad_norm": gn,
            "dpo_weight_mean": tot.weight / passes,
            "zero_std_ratio": adv.zero_std_groups as f64 / n_groups as f64,
            "adv_abs_mean": mean(&adv.values.iter().map(|a| a.abs()).collect::<Vec<_>>()),
            "timesteps": js.iter().map(|&j| sched.timesteps[j]).collect::<Vec<_>>(),
            "rollout_s": roll_s, "reward_s": rew_s, "reward_busy_s": reward_busy_s, "update_s": upd_s,
            "rollout_weights": if use_ref_weights { "ema_ref" } else { "policy" },
        });
        for (k, v) in &named {
            line[format!("reward/{k}")] = mean(v).into();
        }
        append_metrics(&metrics, &line)?;
        println!(
            "epoch {epoch:>4}  step {step:>4}  reward {rmean:.3}  loss {:+.4}  kl {:.4}  clip {:.2}  w {:.2}  |g| {gn:.3}  zero-std {}/{}  {:.0}+{:.0}+{:.0} s",
            tot.loss / passes,
            tot.kl / passes,
            tot.clip / passes,
            tot.weight / passes,
            adv.zero_std_groups,
            n_groups,
            roll_s,
            rew_s,
            upd_s
        );
        let done = epoch + 1;
        let out_of_time = cfg.run.max_minutes > 0.0 && wall >= cfg.run.max_minutes * 60.0;
        if out_of_time && done < cfg.run.num_epochs {
            save(done, &opt, &ema_ref, &ema, wall)?;
            let score = do_eval(done, opt.step, wall, &ema)?;
            println!(
                "time budget run.max_minutes = {} reached after epoch {epoch}: stopping{}{}",
                cfg.run.max_minutes,
                final_words(score),
                first_above
                    .map(|e| format!(", first ≥ 0.8 at epoch {e}"))
                    .unwrap_or_default()
            );
            return Ok(());
        }
        let interrupted = stop.load(Ordering::SeqCst) || Some(done) == stop_after;
        if done % cfg.run.save_every == 0 || done == cfg.run.num_epochs || interrupted {
            save(done, &opt, &ema_ref, &ema, wall)?;
        }
        if interrupted {
            println!("stopped after epoch {epoch}; continue with --resume");
            return Ok(());
        }
    }
    let wall = wall0 + t0.elapsed().as_secs_f64();
    let final_score = do_eval(cfg.run.num_epochs, opt.step, wall, &ema)?;
    println!(
        "done: {} epochs in {:.1} min{}{}",
        cfg.run.num_epochs,
        wall / 60.0,
        final_words(final_score),
        first_above
            .map(|e| format!(", first ≥ 0.8 at epoch {e}"))
            .unwrap_or_default()
    );
    Ok(())
}

/// ", final geneval_overall X" when the last evaluation had GenEval verdicts.
fn final_words(score: Option<f64>) -> String {
    score
        .map(|g| format!(", final geneval_overall {g:.3}"))
        .unwrap_or_default()
}

/// What one worker's shard of a training pass reports (DGPO or Flow-GRPO): its loss terms, its share
/// of the micro-batch, the loss value and the gradients (`None` when the loss is not finite).
struct ShardPass {
    policy_loss: f32,
    kl: f32,
    clip_frac: f32,
    /// DGPO: the mean group weight `σ(s_g)` of the shard's groups (0 for Flow-GRPO).
    weight: f32,
    share: f64,
    loss: f32,
    /// The trainable weights' gradients only ([`crate::model::MMDiT::trainable_grads`]).
    grads: Option<crate::model::VarGrads>,
}

impl ShardPass {
    fn new(
        [policy_loss, kl, clip_frac, weight]: [f32; 4],
        share: f64,
        loss: f32,
        grads: Option<crate::model::VarGrads>,
    ) -> Self {
        Self {
            policy_loss,
            kl,
            clip_frac,
            weight,
            share,
            loss,
            grads,
        }
    }
}

impl ShardPass {
    /// A shard's pass from its loss and `[policy loss, KL, clip fraction]`: the loss, when finite, is
    /// backpropagated with weight `share / passes` — gradients accumulate over all micro-batches and
    /// timestep indices into one step per epoch, the loss averaged over the passes as accelerate's
    /// accumulation does.
    fn backprop(
        model: &crate::model::MMDiT,
        loss: &Tensor,
        terms: [f32; 4],
        share: f64,
        passes: f64,
    ) -> Result<Self> {
        let lv = loss.to_dtype(DType::F32)?.to_scalar::<f32>()?;
        let grads = if lv.is_finite() {
            Some(model.trainable_grads(&(loss * (share / passes))?.backward()?))
        } else {
            None
        };
        Ok(Self::new(terms, share, lv, grads))
    }
}

/// An epoch's loss terms summed over its passes, weighted by shard share.
#[derive(Default)]
struct PassTotals {
    policy: f64,
    kl: f64,
    clip: f64,
    weight: f64,
    loss: f64,
}

impl PassTotals {
    /// Add the shards' gradients to the accumulator and their terms to the totals; a non-finite loss
    /// stops the run naming the epoch, the algorithm and its terms.
    fn absorb(
        &mut self,
        opt: &AdamW,
        acc: &mut crate::train::optim::GradAccum,
        shards: Vec<ShardPass>,
        epoch: usize,
        algorithm: &str,
        hint: &str,
    ) -> Result<()> {
        for p in shards {
            let Some(grads) = &p.grads else {
                bail!(
                    "epoch {epoch}: the {algorithm} loss is {} (policy {}, kl {}); the last good checkpoint is kept — {hint}",
                    p.loss,
                    p.policy_loss,
                    p.kl
                );
            };
            opt.add_var_grads(acc, grads)?;
            self.policy += p.share * p.policy_loss as f64;
            self.kl += p.share * p.kl as f64;
            self.clip += p.share * p.clip_frac as f64;
            self.weight += p.share * p.weight as f64;
            self.loss += p.share * p.loss as f64;
        }
        Ok(())
    }
}

/// Inputs of one DGPO pass differentiated `chunk` images at a time (`train.backward_chunk`).
struct ChunkedPass<'a> {
    model: &'a crate::model::MMDiT,
    xt: &'a Tensor,
    target: &'a Tensor,
    v_ref: &'a Tensor,
    v_old: &'a Tensor,
    cond: &'a Conditioning,
    tj: f32,
    adv: &'a [f32],
    group: usize,
    params: &'a DgpoParams,
    passes: f64,
    chunk: usize,
    /// Gradient checkpointing (`train.gradient_checkpointing`): each chunk's backward recomputes the
    /// transformer one block at a time.
    checkpoint: bool,
    workers: usize,
}

/// The DGPO pass of a micro-batch with bounded activation memory. The loss couples a group's images
/// only through their per-image errors `l_θ,i` and KL terms `kl_i`, so its gradient is
/// `Σ_i ∂L/∂l_θ,i · ∇l_θ,i + ∂L/∂kl_i · ∇kl_i`. A forward without graph gives every `l_θ,i` and
/// `kl_i`; the loss function itself, differentiated with respect to those numbers, gives the
/// coefficients; then each chunk's images are run with graph and `Σ coef · term` is differentiated
/// (chunks spread over the worker threads). Same gradient as one pass over the micro-batch, up to
/// summation order. The loss terms come from the first pass (reported with the first chunk).
fn chunked_dgpo_pass(p: ChunkedPass) -> Result<Vec<ShardPass>> {
    let n = p.adv.len();
    let dev = p.xt.device().clone();
    let m = p.model;
    let v_pol =
        crate::sampling::velocity_sharded(m, p.xt, p.tj, p.cond, None, 1.0, Weights::PolicyNoGrad)?;
    let l_theta = candle_core::Var::from_tensor(&per_sample_mse(p.target, &v_pol)?)?;
    let kl = candle_core::Var::from_tensor(&per_sample_mse(&v_pol, p.v_ref)?)?;
    let l_ref = per_sample_mse(p.target, p.v_ref)?;
    let l_old = per_sample_mse(p.target, p.v_old)?;
    let terms = dgpo_loss(
        l_theta.as_tensor(),
        &l_ref,
        &l_old,
        kl.as_tensor(),
        p.adv,
        p.group,
        p.params,
    )?;
    let lv = terms.loss.to_dtype(DType::F32)?.to_scalar::<f32>()?;
    if !lv.is_finite() {
        return Ok(vec![ShardPass::new(
            [
                terms.policy_loss,
                terms.kl,
                terms.clip_frac,
                terms.mean_weight(),
            ],
            1.0,
            lv,
            None,
        )]);
    }
    let coef = terms.loss.backward()?;
    let zeros = Tensor::zeros(n, DType::F32, &dev)?;
    let c_theta = coef.get(l_theta.as_tensor()).unwrap_or(&zeros).clone();
    let c_kl = coef.get(kl.as_tensor()).unwrap_or(&zeros).clone();
    let chunks: Vec<std::ops::Range<usize>> = (0..n)
        .step_by(p.chunk)
        .map(|s| s..(s + p.chunk).min(n))
        .collect();
    let mut out = vec![];
    for wave in chunks.chunks(p.workers.max(1)) {
        out.extend(crate::par::map_shards(wave, |r| {
            let (lo, len) = (r.start, r.len());
            let cond = p.cond.narrow(r.clone())?;
            let tt = Tensor::full(p.tj, len, &dev)?;
            let xt = p.xt.narrow(0, lo, len)?;
            let surrogate = |v: &Tensor| -> Result<Tensor> {
                let lt = per_sample_mse(&p.target.narrow(0, lo, len)?, v)?;
                let k = per_sample_mse(v, &p.v_ref.narrow(0, lo, len)?.detach())?;
                let s = ((lt * c_theta.narrow(0, lo, len)?)?.sum_all()?
                    + (k * c_kl.narrow(0, lo, len)?)?.sum_all()?)?;
                Ok((s / p.passes)?)
            };
            let grads = if p.checkpoint {
                // The gradient at the output, from the no-graph velocities computed above; then
                // the transformer's backward one recomputed block at a time.
                let v = candle_core::Var::from_tensor(&v_pol.narrow(0, lo, len)?)?;
                let mut g = surrogate(v.as_tensor())?.backward()?;
                let gv = g
                    .remove(v.as_tensor())
                    .context("the DGPO loss gave no gradient for the velocities")?;
                m.checkpointed_backward(&xt, &tt, &cond.context, &cond.pooled, &gv)?
            } else {
                let v = m.forward(&xt, &tt, &cond.context, &cond.pooled, Weights::Policy)?;
                m.trainable_grads(&surrogate(&v)?.backward()?)
            };
            // The loss terms, computed once above, travel with the first chunk.
            let first = lo == 0;
            let f = |x: f32| if first { x } else { 0.0 };
            Ok(ShardPass::new(
                [
                    f(terms.policy_loss),
                    f(terms.kl),
                    f(terms.clip_frac),
                    f(terms.mean_weight()),
                ],
                if first { 1.0 } else { 0.0 },
                f(lv),
                Some(grads),
            ))
        })?);
    }
    Ok(out)
}

/// Inputs of one Flow-GRPO training pass: rollout step `j` of the micro-batch `lo..lo + n`.
struct GrpoPass<'a> {
    model: &'a crate::model::MMDiT,
    sched: &'a crate::sampling::Schedule,
    traj: &'a crate::train::flow_grpo::Trajectory,
    j: usize,
    lo: usize,
    n: usize,
    cond: &'a Conditioning,
    empty: &'a Conditioning,
    adv: &'a [f32],
    group: usize,
    workers: usize,
    t: &'a crate::config::TrainConfig,
    guidance: f64,
    passes: f64,
}

/// One Flow-GRPO pass: the policy's SDE step log-probability of the stored transition `x_j → x_{j+1}`
/// (CFG as in the rollout when `grpo_train_cfg`), the reference's step mean for the KL term, the loss
/// of [`crate::train::flow_grpo::grpo_loss`] and its gradient (scaled by the shard's share over `passes`),
/// one shard of whole groups per worker thread.
fn grpo_pass(p: GrpoPass) -> Result<Vec<ShardPass>> {
    use crate::sampling::guided_velocity_at;
    use crate::train::flow_grpo::{grpo_loss, sde_step};
    let (j, n) = (p.j, p.n);
    let sig = &p.sched.sigmas;
    let (sigma, sigma_next) = (f64::from(sig[j]), f64::from(sig[j + 1]));
    let sigma_max = f64::from(sig[1.min(sig.len() - 1)]);
    let tj = p.sched.timesteps[j];
    let xj = p.traj.latents[j].narrow(0, p.lo, n)?;
    let xn = p.traj.latents[j + 1].narrow(0, p.lo, n)?;
    let old = p
        .traj
        .log_probs
        .narrow(0, p.lo, n)?
        .narrow(1, j, 1)?
        .squeeze(1)?;
    let uncond = p.empty.repeat(n)?;
    let w = if p.t.grpo_train_cfg { p.guidance } else { 1.0 };
    let ranges = crate::par::shards(n, p.workers, p.group);
    crate::par::map_shards(&ranges, |r| {
        let (lo, len) = (r.start, r.len());
        let c = p.cond.narrow(r.clone())?;
        let u = uncond.narrow(r.clone())?;
        let x = xj.narrow(0, lo, len)?;
        let xp = xn.narrow(0, lo, len)?;
        let v = guided_velocity_at(p.model, &x, tj, &c, Some(&u), w, Weights::Policy)?;
        let st = sde_step(
            &x,
            &v,
            sigma,
            sigma_next,
            sigma_max,
            p.t.noise_level,
            Some(&xp),
            None,
        )?;
        let mean_ref = if p.t.beta_kl > 0.0 {
            let vr = guided_velocity_at(p.model, &x, tj, &c, Some(&u), w, Weights::Reference)?;
            let sr = sde_step(
                &x,
                &vr,
                sigma,
                sigma_next,
                sigma_max,
                p.t.noise_level,
                Some(&xp),
                None,
            )?;
            Some(sr.mean.detach())
        } else {
            None
        };
        let terms = grpo_loss(
            &st.log_prob,
            &old.narrow(0, lo, len)?,
            &p.adv[r],
            p.t.clip_range,
            mean_ref.as_ref().map(|m| (&st.mean, m, st.std_dev_t)),
            p.t.beta_kl,
        )?;
        ShardPass::backprop(
            p.model,
            &terms.loss,
            [terms.policy_loss, terms.kl, terms.clip_frac, 0.0],
            len as f64 / n as f64,
            p.passes,
        )
    })
}

/// A progress bar for one stage of an epoch (drawn on stderr when it is a terminal).
fn stage_bar(len: usize, what: &str, unit: &str) -> indicatif::ProgressBar {
    let bar = indicatif::ProgressBar::new(len as u64);
    bar.set_style(
        indicatif::ProgressStyle::with_template(&format!(
            "{what} {{bar:30}} {{pos}}/{{len}} {unit} [{{elapsed_precise}}<{{eta_precise}}]"
        ))
        .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
    );
    bar
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn by_tag_sampling_balances_tags_whatever_the_file_holds() {
        // 1 prompt of tag "a", 2 of "b", 97 of "c": uniform sampling would almost never pick "a".
        let mut tags = vec!["a", "b", "b"];
        tags.extend(std::iter::repeat_n("c", 97));
        let mut count = [0usize; 3];
        for epoch in 0..20 {
            let chosen = epoch_prompts_by_tag(&tags, 6, 7, epoch);
            assert_eq!(chosen.len(), 6);
            // every complete cycle of 3 groups holds each tag once
            for cycle in chosen.chunks(3) {
                let mut seen: Vec<&str> = cycle.iter().map(|&i| tags[i]).collect();
                seen.sort();
                assert_eq!(seen, ["a", "b", "c"]);
            }
            for &i in &chosen {
                count[(tags[i].as_bytes()[0] - b'a') as usize] += 1;
            }
        }
        assert_eq!(count, [40, 40, 40]);
        // deterministic in (seed, epoch), different across epochs
        assert_eq!(
            epoch_prompts_by_tag(&tags, 6, 7, 3),
            epoch_prompts_by_tag(&tags, 6, 7, 3)
        );
        assert_ne!(
            epoch_prompts_by_tag(&tags, 9, 7, 3),
            epoch_prompts_by_tag(&tags, 9, 7, 4)
        );
    }
}
