//! What a run reports: one `metrics.jsonl` row per epoch (`"kind": "train"`) and per evaluation
//! (`"kind": "eval"`), the same as one line on stdout and as TensorBoard scalars, evaluation grids,
//! `report.html`, and the progress bars of an epoch's stages.

use crate::eval::EvalResult;
use crate::reward::NamedScores;
use crate::train::dgpo::Advantages;
use anyhow::Result;
use std::path::{Path, PathBuf};

/// Where a run's rows go: `metrics.jsonl`, and the TensorBoard log when the run keeps one.
pub struct RunLog {
    pub metrics: PathBuf,
    pub tb: Option<crate::report::TbLog>,
}

impl RunLog {
    fn append(&mut self, row: &serde_json::Value) -> Result<()> {
        crate::io::append_jsonl(&self.metrics, row)?;
        if let Some(tb) = &mut self.tb {
            tb.row(row)?;
        }
        Ok(())
    }
}

pub fn mean(v: &[f32]) -> f64 {
    if v.is_empty() {
        0.0
    } else {
        v.iter().map(|x| *x as f64).sum::<f64>() / v.len() as f64
    }
}

/// A progress bar for one stage of an epoch (drawn on stderr when it is a terminal).
pub fn stage_bar(len: usize, what: &str, unit: &str) -> indicatif::ProgressBar {
    let bar = indicatif::ProgressBar::new(len as u64);
    bar.set_style(
        indicatif::ProgressStyle::with_template(&format!(
            "{what} {{bar:30}} {{pos}}/{{len}} {unit} [{{elapsed_precise}}<{{eta_precise}}]"
        ))
        .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
    );
    bar
}

/// Where an evaluation happened in the run.
pub struct At {
    pub epoch: usize,
    pub opt_step: u64,
    pub wall: f64,
}

/// Record an evaluation: its row, its grid (`grid` PNG, `per_row` images a row) and its line.
/// Returns GenEval's overall score when the evaluation has GenEval verdicts.
pub fn record_eval(
    log: &mut RunLog,
    grid: &Path,
    per_row: usize,
    at: &At,
    r: &EvalResult,
) -> Result<Option<f64>> {
    let sm = &r.summary;
    let geneval = r.geneval.then_some(sm.geneval_overall);
    let per_tag: serde_json::Map<_, _> = sm
        .per_tag
        .iter()
        .map(|(k, v)| {
            let acc = if r.geneval {
                serde_json::json!(v.accuracy)
            } else {
                serde_json::Value::Null
            };
            (k.clone(), acc)
        })
        .collect();
    let row = serde_json::json!({
        "kind": "eval", "epoch": at.epoch, "opt_step": at.opt_step, "wall_s": at.wall,
        "unix_s": crate::report::tfevents::unix_now(),
        "eval_reward_mean": sm.reward_mean, "geneval_overall": geneval,
        "strict_accuracy": r.geneval.then_some(sm.strict_accuracy),
        "accuracy": r.geneval.then_some(sm.accuracy),
        "per_tag": per_tag,
        "eval_s": r.wall_s,
    });
    log.append(&row)?;
    // Large images: the grid shows the first prompts only (at most 64 images).
    let shown = if r.images.first().is_some_and(|im| im.width > 64) {
        r.images.len().min(64)
    } else {
        r.images.len()
    };
    let png = crate::image::grid(&r.images[..shown], per_row, 1).png_bytes()?;
    crate::io::write_atomic(grid, &png)?;
    if let Some(tb) = &mut log.tb {
        tb.grid(&row, png)?;
    }
    println!(
        "eval  epoch {:>4}  step {:>4}  {}reward {:.3}  ({:.0} s)",
        at.epoch,
        at.opt_step,
        geneval
            .map(|g| format!("geneval_overall {g:.3}  "))
            .unwrap_or_default(),
        sm.reward_mean,
        r.wall_s
    );
    Ok(geneval)
}

/// An epoch's loss terms summed over its passes, weighted by shard share.
#[derive(Default)]
pub struct PassTotals {
    pub policy: f64,
    pub kl: f64,
    pub clip: f64,
    pub weight: f64,
    pub loss: f64,
}

/// The measurements of one epoch.
pub struct EpochReport<'a> {
    pub reward: &'a [f32],
    pub named: &'a NamedScores,
    pub adv: &'a Advantages,
    pub totals: &'a PassTotals,
    pub passes: f64,
    pub n_groups: usize,
    pub grad_norm: f64,
    pub timesteps: Vec<f32>,
    pub rollout_weights: &'static str,
    pub rollout_s: f64,
    pub reward_s: f64,
    pub reward_busy_s: f64,
    pub update_s: f64,
}

/// Record an epoch: its `metrics.jsonl` row and its line.
pub fn record_epoch(log: &mut RunLog, at: &At, e: &EpochReport) -> Result<()> {
    let (tot, passes) = (e.totals, e.passes);
    let rmean = mean(e.reward);
    let mut line = serde_json::json!({
        "kind": "train", "epoch": at.epoch, "opt_step": at.opt_step, "wall_s": at.wall,
        "unix_s": crate::report::tfevents::unix_now(),
        "reward_mean": rmean, "loss": tot.loss / passes, "policy_loss": tot.policy / passes,
        "kl": tot.kl / passes, "clip_frac": tot.clip / passes, "grad_norm": e.grad_norm,
        "dpo_weight_mean": tot.weight / passes,
        "zero_std_ratio": e.adv.zero_std_groups as f64 / e.n_groups as f64,
        "adv_abs_mean": mean(&e.adv.values.iter().map(|a| a.abs()).collect::<Vec<_>>()),
        "timesteps": e.timesteps,
        "rollout_s": e.rollout_s, "reward_s": e.reward_s, "reward_busy_s": e.reward_busy_s,
        "update_s": e.update_s,
        "rollout_weights": e.rollout_weights,
    });
    for (k, v) in e.named {
        line[format!("reward/{k}")] = mean(v).into();
    }
    log.append(&line)?;
    println!(
        "epoch {:>4}  step {:>4}  reward {rmean:.3}  loss {:+.4}  kl {:.4}  clip {:.2}  w {:.2}  |g| {:.3}  zero-std {}/{}  {:.0}+{:.0}+{:.0} s",
        at.epoch,
        at.opt_step,
        tot.loss / passes,
        tot.kl / passes,
        tot.clip / passes,
        tot.weight / passes,
        e.grad_norm,
        e.adv.zero_std_groups,
        e.n_groups,
        e.rollout_s,
        e.reward_s,
        e.update_s
    );
    Ok(())
}

/// ", final geneval_overall X" when the last evaluation had GenEval verdicts.
pub fn final_words(score: Option<f64>) -> String {
    score
        .map(|g| format!(", final geneval_overall {g:.3}"))
        .unwrap_or_default()
}
