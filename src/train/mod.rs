//! `dgpo train`: the epoch loop of DGPO (and of Flow-GRPO, the baseline), read top to bottom below —
//! prompts → rollouts → rewards → group advantages → update → optimizer step and EMAs → metrics,
//! evaluation, checkpoint. The stages live beside it; docs/algorithm.md gives the equations.
//!
//! Determinism: everything random is drawn from streams seeded by `(run.seed, epoch, purpose)`, so
//! a resumed run repeats an uninterrupted one (its metrics match, timings aside).

pub mod dgpo;
pub mod flow_grpo;
pub mod metrics;
pub mod objective;
pub mod optim;
pub mod plan;
pub mod policy;
pub mod pretrain;
pub mod prompts;
pub mod rollout;
pub mod run_dir;
pub mod seeds;
pub mod session;
pub mod update;

pub use prompts::{epoch_prompts, epoch_prompts_by_tag};

use crate::config::{AdvantageMode, Config};
use crate::train::metrics::{final_words, record_epoch, record_eval, At, EpochReport};
use crate::train::objective::MicroBatch;
use crate::train::optim::TrainState;
use crate::train::policy::{Policies, Policy};
use crate::train::rollout::{rollout_epoch, EpochPrompts};
use crate::train::run_dir::RunDir;
use crate::train::seeds::{epoch_rng, ROLLOUT_NOISE, UPDATE};
use crate::train::session::Session;
use anyhow::{Context, Result};
use candle_core::Device;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Instant;

/// How a run starts and stops.
#[derive(Debug, Clone, Default)]
pub struct RunOptions {
    /// Continue from the run folder's newest checkpoint.
    pub resume: bool,
    /// Config keys `--resume` may change although they define the run (`--allow-config-change`).
    pub allow_config_change: Vec<String>,
    /// Stop after this many epochs with a checkpoint, as a kill would (tests).
    pub stop_after: Option<usize>,
}

/// Run (or resume) training into `out`.
pub fn run(cfg: &Config, out: &Path, resume: bool, dev: &Device) -> Result<()> {
    let opts = RunOptions {
        resume,
        ..Default::default()
    };
    run_with(cfg, out, &opts, dev)
}

/// As [`run`], stopping after epoch `stop_after` (exclusive count) with a checkpoint, as a kill would.
pub fn run_until(
    cfg: &Config,
    out: &Path,
    resume: bool,
    dev: &Device,
    stop_after: Option<usize>,
) -> Result<()> {
    let opts = RunOptions {
        resume,
        stop_after,
        ..Default::default()
    };
    run_with(cfg, out, &opts, dev)
}

/// Run (or resume) training into `out` as `opts` say.
pub fn run_with(cfg: &Config, out: &Path, opts: &RunOptions, dev: &Device) -> Result<()> {
    let (resume, stop_after) = (opts.resume, opts.stop_after);
    let (sample, train) = (&cfg.sample, &cfg.train);
    let session = Session::open(cfg, dev)?;
    let run = RunDir::open(out, cfg, resume, &opts.allow_config_change)?;
    let pipe = session.pipe.as_ref();
    let mut state = TrainState::new(session.vars.clone(), train)?;
    let (start_epoch, wall0) = if resume {
        run.resume(&mut state, dev)?
    } else {
        (0, 0.0)
    };
    let stop = interrupt_flag();
    let g = sample.group_size;
    let per_epoch = sample.batch_size * sample.num_batches_per_epoch;
    let n_groups = per_epoch / g;
    let sched = crate::sampling::schedule(sample.sampler, sample.num_steps, sample.flow_shift);
    let empty = pipe.encode(&[""])?;
    let t0 = Instant::now();
    let wall = || wall0 + t0.elapsed().as_secs_f64();
    tracing::info!(
        trainable = session
            .vars
            .iter()
            .map(|(_, v)| v.elem_count())
            .sum::<usize>(),
        groups = n_groups,
        group_size = g,
        "{} on {} ({} train / {} test prompts) into {}",
        train.algorithm.name(),
        session.base.display(),
        session.train_items.len(),
        session.test_items.len(),
        out.display()
    );
    // The slow EMA on the test prompts; GenEval's overall score when it has GenEval verdicts.
    let evaluate = |at: &At, state: &TrainState| -> Result<Option<f64>> {
        let r = Policies::of(state).no_grad(Policy::SlowEma, |w| {
            let rw = Some(&session.rewards);
            crate::eval::evaluate_prompts(pipe, &session.test_items, &session.eval, w, false, rw)
        })?;
        let per_row = session.eval.images_per_prompt * 4;
        record_eval(&run.metrics(), &run.grid(at.epoch), per_row, at, &r)
    };
    let save = |epoch: usize, state: &TrainState, wall: f64| {
        run.save(epoch, state, wall, cfg, cfg.run.keep_checkpoints)
    };

    let mut first_above: Option<usize> = None;
    for epoch in start_epoch..cfg.run.num_epochs {
        let at = |state: &TrainState| At {
            epoch,
            opt_step: state.opt.step,
            wall: wall(),
        };
        if epoch % cfg.run.eval_every == 0 {
            let score = evaluate(&at(&state), &state)?.unwrap_or(0.0);
            if score >= 0.8 && first_above.is_none() {
                first_above = Some(epoch);
            }
        }
        let epoch_wall = wall();
        // 1. prompts: n_groups training prompts, each repeated group_size times
        let (prompts, metas) = prompts::epoch_groups(
            &session.train_items,
            cfg.prompts.sampling,
            n_groups,
            g,
            cfg.run.seed,
            epoch,
        );
        // 2. rollouts, each batch scored on a second thread while the next is sampled
        let policies = Policies::of(&state);
        let mut objective = objective::for_epoch(train, sample, policies, state.opt.step);
        let epoch_prompts = EpochPrompts {
            prompts: &prompts,
            metas: &metas,
            empty: &empty,
            batch_size: sample.batch_size,
            guidance: sample.guidance_scale,
        };
        let mut noise = epoch_rng(cfg.run.seed, epoch, ROLLOUT_NOISE);
        let label = format!("epoch {epoch} rollout");
        let rolled = rollout_epoch(
            pipe,
            objective.as_mut(),
            &sched,
            &epoch_prompts,
            &session.rewards,
            &mut noise,
            &label,
        )?;
        // 3. rewards → group-relative advantages
        let t_rew = Instant::now();
        let scored = match rolled.scored {
            Ok(x) => x,
            Err(e) => {
                // Nothing of this epoch is lost but its rollouts: keep the state before it.
                save(epoch, &state, epoch_wall)?;
                return Err(e.context(format!(
                    "epoch {epoch}: the rewards failed; a checkpoint of the state before this epoch is \
                     in {}; fix the reward (a server's address can be changed in the config) and \
                     continue with `dgpo train --config <config> --out {} --resume`",
                    out.join("checkpoints").display(),
                    out.display()
                )));
            }
        };
        let clip_max = train.adv_clip_max as f32;
        let adv = match train.advantages {
            AdvantageMode::Sum => dgpo::advantages(&scored.total, g, train.global_std, clip_max)?,
            AdvantageMode::Decoupled => {
                dgpo::decoupled_advantages(&scored.modules, g, train.global_std, clip_max)?
            }
        };
        let reward_s = rolled.reward_wait_s + t_rew.elapsed().as_secs_f64();
        // 4. update: every micro-batch (whole groups) at every drawn step index
        let t_upd = Instant::now();
        let mut draws = epoch_rng(cfg.run.seed, epoch, UPDATE);
        let steps = objective.train_steps(&mut draws, &sched);
        let workers = crate::par::workers_for(dev);
        let passes = (per_epoch / train.batch_size * steps.len()) as f64;
        let micro_batches = (0..per_epoch)
            .step_by(train.batch_size)
            .map(|lo| -> Result<MicroBatch> {
                Ok(MicroBatch {
                    model: pipe.transformer(),
                    sched: &sched,
                    x0: rolled.x0.narrow(0, lo, train.batch_size)?,
                    cond: rolled.cond.narrow(lo..lo + train.batch_size)?,
                    empty: &empty,
                    adv: &adv.values[lo..lo + train.batch_size],
                    lo,
                    group: g,
                    workers,
                    passes,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        let (acc, totals) = update::accumulate(
            objective.as_ref(),
            &state.opt,
            &micro_batches,
            &steps,
            &mut draws,
            epoch,
        )?;
        let rollout_weights = objective.rollout_weights();
        drop((micro_batches, objective));
        // 5. one AdamW step per epoch, then the EMA-reference and the slow EMA
        let grad_norm = state
            .step(acc, train)
            .with_context(|| format!("epoch {epoch}"))?;
        // 6. metrics, time budget, checkpoint
        let report = EpochReport {
            reward: &scored.total,
            named: &scored.named,
            adv: &adv,
            totals: &totals,
            passes,
            n_groups,
            grad_norm,
            timesteps: steps.iter().map(|&j| sched.timesteps[j]).collect(),
            rollout_weights,
            rollout_s: rolled.rollout_s,
            reward_s,
            reward_busy_s: rolled.reward_busy_s,
            update_s: t_upd.elapsed().as_secs_f64(),
        };
        let now = at(&state);
        record_epoch(&run.metrics(), &now, &report)?;
        let done = epoch + 1;
        let out_of_time = cfg.run.max_minutes > 0.0 && now.wall >= cfg.run.max_minutes * 60.0;
        if out_of_time && done < cfg.run.num_epochs {
            save(done, &state, now.wall)?;
            let at_done = At { epoch: done, ..now };
            let score = evaluate(&at_done, &state)?;
            println!(
                "time budget run.max_minutes = {} reached after epoch {epoch}: stopping{}{}",
                cfg.run.max_minutes,
                final_words(score),
                first_above_words(first_above)
            );
            return Ok(());
        }
        let interrupted = stop.load(Ordering::SeqCst) || Some(done) == stop_after;
        if done % cfg.run.save_every == 0 || done == cfg.run.num_epochs || interrupted {
            save(done, &state, now.wall)?;
        }
        if interrupted {
            println!("stopped after epoch {epoch}; continue with --resume");
            return Ok(());
        }
    }
    let end = At {
        epoch: cfg.run.num_epochs,
        opt_step: state.opt.step,
        wall: wall(),
    };
    let final_score = evaluate(&end, &state)?;
    println!(
        "done: {} epochs in {:.1} min{}{}",
        cfg.run.num_epochs,
        end.wall / 60.0,
        final_words(final_score),
        first_above_words(first_above)
    );
    Ok(())
}

fn first_above_words(epoch: Option<usize>) -> String {
    epoch
        .map(|e| format!(", first ≥ 0.8 at epoch {e}"))
        .unwrap_or_default()
}

/// Ctrl-C sets the flag (the epoch finishes with a checkpoint); a second Ctrl-C exits at once.
fn interrupt_flag() -> Arc<AtomicBool> {
    let stop = Arc::new(AtomicBool::new(false));
    let flag = stop.clone();
    // A second handler cannot be installed (tests run several loops in one process): ignore that.
    let _ = ctrlc::set_handler(move || {
        if flag.swap(true, Ordering::SeqCst) {
            std::process::exit(130);
        }
        eprintln!(
            "\ninterrupt: finishing this epoch's checkpoint, then exiting (Ctrl-C again to abort)"
        );
    });
    stop
}
