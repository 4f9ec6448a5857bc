//! `[run]`: where a run writes, its seed, length, time budget, and how often it saves and evaluates.

use super::problems::Problems;
use serde::{Deserialize, Serialize};
use std::path::PathBuf;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RunConfig {
    /// Run directory (checkpoints, metrics.jsonl); `--out` overrides it.
    pub out_dir: PathBuf,
    pub seed: u64,
    pub num_epochs: usize,
    /// Epochs between checkpoints.
    pub save_every: usize,
    /// Epochs between evaluations on the test prompts.
    pub eval_every: usize,
    /// Checkpoints kept (older ones are deleted once a newer one is complete).
    pub keep_checkpoints: usize,
    /// Stop after the first epoch that ends past this many minutes of training wall time (checkpoint
    /// and final evaluation as at the last epoch); 0 = no limit. Gives two runs the same time budget.
    pub max_minutes: f64,
    /// Write TensorBoard event files to `<run>/tb/` as the run goes (`--no-tensorboard` turns it off).
    pub tensorboard: bool,
}

impl Default for RunConfig {
    fn default() -> Self {
        Self {
            out_dir: PathBuf::from("runs/dgpo"),
            seed: 42,
            num_epochs: 1000,
            save_every: 20,
            eval_every: 10,
            keep_checkpoints: 2,
            max_minutes: 0.0,
            tensorboard: true,
        }
    }
}

impl RunConfig {
    pub(super) fn check(&self, p: &mut Problems) {
        p.need(
            self.max_minutes >= 0.0,
            format!(
                "run.max_minutes = {} must be ≥ 0 (0 = no limit)",
                self.max_minutes
            ),
        );
        p.need(
            self.num_epochs >= 1,
            "run.num_epochs must be at least 1".into(),
        );
        p.need(
            self.save_every >= 1,
            "run.save_every must be at least 1".into(),
        );
        p.need(
            self.eval_every >= 1,
            "run.eval_every must be at least 1".into(),
        );
    }
}
