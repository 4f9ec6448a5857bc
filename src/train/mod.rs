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
use crate::sampling::{Conditioning, Schedule};
use crate::train::metrics::{final_words, record_epoch, record_eval, At, EpochReport, RunLog};
use crate::train::objective::{MicroBatch, Objective};
use crate::train::optim::TrainState;
use crate::train::policy::{Policies, Policy};
use crate::train::rollout::{rollout_epoch, EpochPrompts};
use crate::train::run_dir::RunDir;
use crate::train::seeds::{epoch_rng, ROLLOUT_NOISE, UPDATE};
use crate::train::session::Session;
use crate::train::update::Updated;
use anyhow::{Context, Result};
use candle_core::{Device, Tensor};
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
    let mut t = Trainer::start(cfg, out, opts, dev)?;
    for epoch in t.start_epoch..cfg.run.num_epochs {
        if epoch % cfg.run.eval_every == 0 {
            t.evaluate(epoch)?;
        }
        t.epoch(epoch)?;
        if t.end_of_epoch(epoch, opts.stop_after)? {
            return Ok(());
        }
    }
    t.finish()
}

/// A run in progress: what it loaded, where it writes, and the state it carries between epochs.
struct Trainer<'a> {
    cfg: &'a Config,
    session: Session,
    run: RunDir,
    /// Where rows go: metrics.jsonl and the TensorBoard log.
    log: RunLog,
    state: TrainState,
    start_epoch: usize,
    sched: Schedule,
    /// The empty prompt's conditioning: CFG's unconditional branch.
    empty: Conditioning,
    workers: usize,
    wall0: f64,
    t0: Instant,
    stop: Arc<AtomicBool>,
    /// The first epoch whose evaluation reached 0.8.
    first_above: Option<usize>,
}

impl<'a> Trainer<'a> {
    /// Everything checked and loaded, the run folder opened, the state fresh or resumed.
    fn start(cfg: &'a Config, out: &Path, opts: &RunOptions, dev: &Device) -> Result<Self> {
        let (sample, train) = (&cfg.sample, &cfg.train);
        let session = Session::open(cfg, dev)?;
        let run = RunDir::open(out, cfg, opts.resume, &opts.allow_config_change)?;
        let mut state = TrainState::new(session.vars.clone(), train)?;
        let (start_epoch, wall0) = if opts.resume {
            run.resume(&mut state, dev)?
        } else {
            (0, 0.0)
        };
        let empty = session.pipe.encode(&[""])?;
        let tb = cfg
            .run
            .tensorboard
            .then(|| crate::report::TbLog::open(&run.out, &run.metrics(), &|e| run.grid(e)))
            .transpose()?;
        let log = RunLog {
            metrics: run.metrics(),
            tb,
        };
        tracing::info!(
            trainable = session
                .vars
                .iter()
                .map(|(_, v)| v.elem_count())
                .sum::<usize>(),
            groups = sample.batch_size * sample.num_batches_per_epoch / sample.group_size,
            group_size = sample.group_size,
            "{} on {} ({} train / {} test prompts) into {}",
            train.algorithm.name(),
            session.base.display(),
            session.train_items.len(),
            session.test_items.len(),
            out.display()
        );
        Ok(Self {
            cfg,
            run,
            log,
            state,
            start_epoch,
            sched: crate::sampling::schedule(sample.sampler, sample.num_steps, sample.flow_shift),
            empty,
            workers: crate::par::workers_for(dev),
            wall0,
            t0: Instant::now(),
            stop: interrupt_flag(),
            first_above: None,
            session,
        })
    }

    /// One epoch of the algorithm, stage by stage.
    fn epoch(&mut self, epoch: usize) -> Result<()> {
        let (cfg, sample, train) = (self.cfg, &self.cfg.sample, &self.cfg.train);
        let pipe = self.session.pipe.as_ref();
        let g = sample.group_size;
        let per_epoch = sample.batch_size * sample.num_batches_per_epoch;
        let wall_before = self.wall();
        // 1. prompts: n_groups training prompts, each repeated group_size times
        let (prompts, metas) = prompts::epoch_groups(
            &self.session.train_items,
            cfg.prompts.sampling,
            per_epoch / g,
            g,
            cfg.run.seed,
            epoch,
        );
        // 2. rollouts, each batch scored on a second thread while the next is sampled
        let mut objective = objective::for_epoch(train, sample, self.state.opt.step);
        let policies = Policies::of(&self.state);
        let epoch_prompts = EpochPrompts {
            policies: &policies,
            prompts: &prompts,
            metas: &metas,
            empty: &self.empty,
            batch_size: sample.batch_size,
            guidance: sample.guidance_scale,
        };
        let rolled = rollout_epoch(
            pipe,
            objective.as_mut(),
            &self.sched,
            &epoch_prompts,
            &self.session.rewards,
            &mut epoch_rng(cfg.run.seed, epoch, ROLLOUT_NOISE),
            &format!("epoch {epoch} rollout"),
        )?;
        // 3. rewards → group-relative advantages
        let t_rew = Instant::now();
        let scored = match rolled.scored {
            Ok(scored) => scored,
            Err(e) => return Err(self.reward_failure(e, epoch, wall_before)),
        };
        let adv = group_advantages(train, &scored, g)?;
        let reward_s = rolled.reward_wait_s + t_rew.elapsed().as_secs_f64();
        // 4.–5. update and optimizer steps
        let t_upd = Instant::now();
        let upd = self.update(
            epoch,
            objective.as_ref(),
            (&rolled.x0, &rolled.cond),
            &adv.values,
        )?;
        // 6. metrics
        let report = EpochReport {
            reward: &scored.total,
            named: &scored.named,
            adv: &adv,
            totals: &upd.totals,
            passes: upd.passes,
            n_groups: per_epoch / g,
            grad_norm: upd.grad_norm,
            timesteps: upd.timesteps,
            rollout_weights: objective.rollout_weights(),
            rollout_s: rolled.rollout_s,
            reward_s,
            reward_busy_s: rolled.reward_busy_s,
            update_s: t_upd.elapsed().as_secs_f64(),
        };
        let at = self.at(epoch);
        record_epoch(&mut self.log, &at, &report)
    }

    /// The update of an epoch, `train.num_inner_epochs` times over its rollouts: each time every
    /// micro-batch (whole groups) at freshly drawn step indices, the gradients accumulated into one
    /// AdamW step, then the EMA-reference and the slow EMA. One inner epoch is the algorithm's
    /// one optimizer step per epoch.
    fn update(
        &mut self,
        epoch: usize,
        objective: &dyn Objective,
        (x0, cond): (&Tensor, &Conditioning),
        adv: &[f32],
    ) -> Result<Updated> {
        let (train, sample) = (&self.cfg.train, &self.cfg.sample);
        let per_epoch = sample.batch_size * sample.num_batches_per_epoch;
        let mut draws = epoch_rng(self.cfg.run.seed, epoch, UPDATE);
        let mut upd = Updated::default();
        for _ in 0..train.num_inner_epochs {
            let steps = objective.train_steps(&mut draws, &self.sched);
            let passes = (per_epoch / train.batch_size * steps.len()) as f64;
            let policies = Policies::of(&self.state);
            let micro_batches = (0..per_epoch)
                .step_by(train.batch_size)
                .map(|lo| -> Result<MicroBatch> {
                    Ok(MicroBatch {
                        model: self.session.pipe.transformer(),
                        policies: &policies,
                        sched: &self.sched,
                        x0: x0.narrow(0, lo, train.batch_size)?,
                        cond: cond.narrow(lo..lo + train.batch_size)?,
                        empty: &self.empty,
                        adv: &adv[lo..lo + train.batch_size],
                        lo,
                        group: sample.group_size,
                        workers: self.workers,
                        passes,
                    })
                })
                .collect::<Result<Vec<_>>>()?;
            let (acc, totals) = update::accumulate(
                objective,
                &self.state.opt,
                &micro_batches,
                &steps,
                &mut draws,
                epoch,
            )?;
            drop(micro_batches);
            let grad_norm = self
                .state
                .step(acc, train)
                .with_context(|| format!("epoch {epoch}"))?;
            upd.add(
                totals,
                passes,
                grad_norm,
                steps.iter().map(|&j| self.sched.timesteps[j]),
            );
        }
        upd.grad_norm /= train.num_inner_epochs as f64;
        Ok(upd)
    }

    /// Training wall time so far, resumed runs included.
    fn wall(&self) -> f64 {
        self.wall0 + self.t0.elapsed().as_secs_f64()
    }

    fn at(&self, epoch: usize) -> At {
        At {
            epoch,
            opt_step: self.state.opt.step,
            wall: self.wall(),
        }
    }

    /// Evaluate the slow EMA on the test prompts as of `epoch`, then rewrite `report.html`;
    /// GenEval's overall score when the evaluation has GenEval verdicts.
    fn evaluate_at(&mut self, at: &At) -> Result<Option<f64>> {
        let s = &self.session;
        let r = Policies::of(&self.state).no_grad(Policy::SlowEma, |w| {
            crate::eval::evaluate_prompts(
                s.pipe.as_ref(),
                &s.test_items,
                &s.eval,
                w,
                false,
                Some(&s.rewards),
            )
        })?;
        let per_row = s.eval.images_per_prompt * 4;
        let score = record_eval(&mut self.log, &self.run.grid(at.epoch), per_row, at, &r)?;
        // The page is derived from the run folder (`dgpo report` redraws it): a failure is not the run's.
        let page = self.run.out.join("report.html");
        if let Err(e) = crate::report::write_report(std::slice::from_ref(&self.run.out), &page) {
            tracing::warn!("could not write {}: {e:#}", page.display());
        }
        Ok(score)
    }

    /// The evaluation before `epoch`, noting the first that reaches 0.8.
    fn evaluate(&mut self, epoch: usize) -> Result<()> {
        let at = self.at(epoch);
        let score = self.evaluate_at(&at)?.unwrap_or(0.0);
        if score >= 0.8 && self.first_above.is_none() {
            self.first_above = Some(epoch);
        }
        Ok(())
    }

    fn save(&self, epoch: usize, wall: f64) -> Result<()> {
        let keep = self.cfg.run.keep_checkpoints;
        self.run.save(epoch, &self.state, wall, self.cfg, keep)
    }

    /// The rewards of `epoch` failed: nothing is lost but its rollouts — the state before it is
    /// saved, and the error says how to continue.
    fn reward_failure(&self, e: anyhow::Error, epoch: usize, wall: f64) -> anyhow::Error {
        if let Err(s) = self.save(epoch, wall) {
            return e.context(format!(
                "epoch {epoch}: the rewards failed, and so did the checkpoint: {s:#}"
            ));
        }
        let out = &self.run.out;
        e.context(format!(
            "epoch {epoch}: the rewards failed; a checkpoint of the state before this epoch is \
             in {}; fix the reward (a server's address can be changed in the config) and \
             continue with `dgpo train --config <config> --out {} --resume`",
            out.join("checkpoints").display(),
            out.display()
        ))
    }

    /// After `epoch`: the time budget (checkpoint and final evaluation), Ctrl-C or `stop_after`
    /// (checkpoint), the regular checkpoint. Returns whether the run stops here.
    fn end_of_epoch(&mut self, epoch: usize, stop_after: Option<usize>) -> Result<bool> {
        let run_cfg = &self.cfg.run;
        let (done, now) = (epoch + 1, self.at(epoch + 1));
        let out_of_time = run_cfg.max_minutes > 0.0 && now.wall >= run_cfg.max_minutes * 60.0;
        if out_of_time && done < run_cfg.num_epochs {
            self.save(done, now.wall)?;
            let score = self.evaluate_at(&now)?;
            println!(
                "time budget run.max_minutes = {} reached after epoch {epoch}: stopping{}{}",
                run_cfg.max_minutes,
                final_words(score),
                first_above_words(self.first_above)
            );
            return Ok(true);
        }
        let interrupted = self.stop.load(Ordering::SeqCst) || Some(done) == stop_after;
        if done % run_cfg.save_every == 0 || done == run_cfg.num_epochs || interrupted {
            self.save(done, now.wall)?;
        }
        if interrupted {
            println!("stopped after epoch {epoch}; continue with --resume");
        }
        Ok(interrupted)
    }

    /// The final evaluation after the last epoch.
    fn finish(&mut self) -> Result<()> {
        let end = self.at(self.cfg.run.num_epochs);
        let final_score = self.evaluate_at(&end)?;
        println!(
            "done: {} epochs in {:.1} min{}{}",
            self.cfg.run.num_epochs,
            end.wall / 60.0,
            final_words(final_score),
            first_above_words(self.first_above)
        );
        Ok(())
    }
}

/// Group-relative advantages of the epoch's rewards (`train.advantages`: of the weighted sum, or
/// of each module on its own).
fn group_advantages(
    train: &crate::config::TrainConfig,
    scored: &crate::reward::Scored,
    group: usize,
) -> Result<dgpo::Advantages> {
    let clip_max = train.adv_clip_max as f32;
    match train.advantages {
        AdvantageMode::Sum => dgpo::advantages(&scored.total, group, train.global_std, clip_max),
        AdvantageMode::Decoupled => {
            dgpo::decoupled_advantages(&scored.modules, group, train.global_std, clip_max)
        }
    }
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
