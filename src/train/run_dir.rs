//! The run folder of `dgpo train`, written and read here only: `config.toml`, `metrics.jsonl`,
//! `grids/`, and `checkpoints/epoch-N/` — `state.json` (epoch, optimizer step, wall time, config),
//! `train_state.safetensors` (raw weights, EMA-reference, slow EMA, AdamW moments) and
//! `trainable_ema.safetensors` (the slow-EMA weights under the names peft writes, what users load).
//! A checkpoint is staged in a hidden folder and renamed into place, so it is complete or absent.

use crate::config::Config;
use crate::io::{replace_dir, save_safetensors, staging_dir, write_atomic};
use crate::model::weights::read_safetensors;
use crate::train::optim::TrainState;
use anyhow::{bail, Context, Result};
use candle_core::{Device, Tensor, Var};
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::path::{Path, PathBuf};

const STATE: &str = "state.json";
const TRAIN_STATE: &str = "train_state.safetensors";
const TRAINABLE_EMA: &str = "trainable_ema.safetensors";

/// Which copy of a run's trained weights: the slow EMA (what evaluation uses and the reference code
/// saves) or the raw optimizer weights.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "snake_case")]
pub enum WeightsChoice {
    Ema,
    Raw,
}

impl WeightsChoice {
    pub fn name(self) -> &'static str {
        match self {
            WeightsChoice::Ema => "ema",
            WeightsChoice::Raw => "raw",
        }
    }

    fn prefix(self) -> &'static str {
        match self {
            WeightsChoice::Ema => EMA,
            WeightsChoice::Raw => RAW,
        }
    }
}

/// Name prefixes of the three copies in `train_state.safetensors`.
const RAW: &str = "raw.";
const EMA_REF: &str = "ema_ref.";
const EMA: &str = "ema.";

/// `state.json` of a checkpoint.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct CheckpointState {
    pub epoch: usize,
    pub opt_step: u64,
    pub wall_s: f64,
    /// The run's resolved configuration as TOML.
    pub config: String,
}

impl CheckpointState {
    /// Read `dir/state.json`.
    pub fn read(dir: &Path) -> Result<Self> {
        let sp = dir.join(STATE);
        let text =
            std::fs::read_to_string(&sp).with_context(|| format!("reading {}", sp.display()))?;
        serde_json::from_str(&text)
            .with_context(|| format!("{} is not a dgpo train checkpoint state", sp.display()))
    }

    /// The configuration saved with the checkpoint in `dir`.
    pub fn config(&self, dir: &Path) -> Result<Config> {
        let origin = format!("the config saved in {}", dir.join(STATE).display());
        Config::from_toml(&self.config, &origin, &[])
    }
}

/// Whether `dir` is a complete checkpoint.
pub fn is_checkpoint(dir: &Path) -> bool {
    dir.join(STATE).is_file() && dir.join(TRAIN_STATE).is_file()
}

/// The complete checkpoints of the run folder `out`, oldest first (none when it has no
/// `checkpoints/`).
pub fn checkpoints(out: &Path) -> Result<Vec<(usize, PathBuf)>> {
    let ck = out.join("checkpoints");
    if !ck.is_dir() {
        return Ok(vec![]);
    }
    let mut found: Vec<(usize, PathBuf)> = std::fs::read_dir(&ck)
        .with_context(|| format!("listing {}", ck.display()))?
        .filter_map(|e| e.ok())
        .filter_map(|e| {
            let name = e.file_name().to_string_lossy().to_string();
            let n = name.strip_prefix("epoch-")?.parse().ok()?;
            is_checkpoint(&e.path()).then(|| (n, e.path()))
        })
        .collect();
    found.sort();
    Ok(found)
}

/// The checkpoint folder a path names: `checkpoints/epoch-N` itself, or a run folder (its last
/// checkpoint). `None` when the path is neither.
pub fn checkpoint_of(path: &Path) -> Result<Option<PathBuf>> {
    if is_checkpoint(path) {
        return Ok(Some(path.to_path_buf()));
    }
    if !path.join("checkpoints").is_dir() {
        return Ok(None);
    }
    match checkpoints(path)?.pop() {
        Some((_, p)) => Ok(Some(p)),
        None => bail!(
            "{} is a run folder without a complete checkpoint (no checkpoints/epoch-N with state.json \
             and train_state.safetensors)",
            path.display()
        ),
    }
}

/// One copy of the trained tensors of the checkpoint `dir`, by trainable name.
pub fn read_trained(
    dir: &Path,
    weights: WeightsChoice,
    dev: &Device,
) -> Result<HashMap<String, Tensor>> {
    let file = dir.join(TRAIN_STATE);
    let prefix = weights.prefix();
    let tensors: HashMap<String, Tensor> = read_safetensors(std::slice::from_ref(&file), dev)?
        .into_iter()
        .filter_map(|(k, v)| k.strip_prefix(prefix).map(|n| (n.to_string(), v)))
        .collect();
    if tensors.is_empty() {
        bail!(
            "{}: no `{prefix}*` tensors (a dgpo train checkpoint holds {RAW}*, {EMA}* and {EMA_REF}*)",
            file.display()
        );
    }
    Ok(tensors)
}

/// The run folder of one `dgpo train`.
pub struct RunDir {
    pub out: PathBuf,
}

impl RunDir {
    /// Check `out` against `resume` (a folder with checkpoints needs `--resume`, `--resume` needs
    /// one), then create it and write the resolved `config.toml`.
    pub fn open(out: &Path, cfg: &Config, resume: bool) -> Result<Self> {
        let ckpts = checkpoints(out).unwrap_or_default();
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
        Ok(Self {
            out: out.to_path_buf(),
        })
    }

    pub fn metrics(&self) -> PathBuf {
        self.out.join("metrics.jsonl")
    }

    pub fn grid(&self, epoch: usize) -> PathBuf {
        self.out.join(format!("grids/eval-epoch-{epoch:05}.png"))
    }

    fn checkpoints_dir(&self) -> PathBuf {
        self.out.join("checkpoints")
    }

    /// Load the newest checkpoint into `state`; the rows of `metrics.jsonl` past it are dropped.
    /// Returns `(epoch, wall time)` to continue from.
    pub fn resume(&self, state: &mut TrainState, dev: &Device) -> Result<(usize, f64)> {
        let (_, dir) = checkpoints(&self.out)?.pop().context("no checkpoint")?;
        let st = CheckpointState::read(&dir)?;
        let f = dir.join(TRAIN_STATE);
        let mut tensors = read_safetensors(std::slice::from_ref(&f), dev)?;
        let vars = state.opt.vars().to_vec();
        for (i, (name, var)) in vars.iter().enumerate() {
            let mut take = |prefix: &str| -> Result<Tensor> {
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
                Ok(v)
            };
            var.set(&take(RAW)?)?;
            state.ema_ref.values[i] = take(EMA_REF)?;
            state.ema.values[i] = take(EMA)?;
        }
        state.opt.load_state(tensors, st.opt_step)?;
        crate::io::retain_jsonl(&self.metrics(), "epoch", |e| (e as usize) < st.epoch)?;
        tracing::info!(epoch = st.epoch, "resumed from {}", dir.display());
        Ok((st.epoch, st.wall_s))
    }

    /// Write the checkpoint of `epoch` (complete or not at all), then delete all but the newest
    /// `keep`.
    pub fn save(
        &self,
        epoch: usize,
        state: &TrainState,
        wall: f64,
        cfg: &Config,
        keep: usize,
    ) -> Result<()> {
        let dst = self.checkpoints_dir().join(format!("epoch-{epoch:05}"));
        std::fs::create_dir_all(self.checkpoints_dir())?;
        let st = staging_dir(&dst)?;
        let vars = state.opt.vars();
        let mut tensors = state.opt.state();
        for (n, v) in vars {
            tensors.insert(format!("{RAW}{n}"), v.as_tensor().clone());
        }
        tensors.extend(state.ema_ref.named(vars, EMA_REF));
        tensors.extend(state.ema.named(vars, EMA));
        save_safetensors(&st.join(TRAIN_STATE), &tensors, None)?;
        save_trainable_ema(&st.join(TRAINABLE_EMA), epoch, state, vars, cfg)?;
        let cs = CheckpointState {
            epoch,
            opt_step: state.opt.step,
            wall_s: wall,
            config: cfg.to_toml(),
        };
        write_atomic(
            &st.join(STATE),
            serde_json::to_string_pretty(&cs)?.as_bytes(),
        )?;
        replace_dir(&st, &dst)?;
        let all = checkpoints(&self.out)?;
        for (_, d) in all.iter().take(all.len().saturating_sub(keep.max(1))) {
            std::fs::remove_dir_all(d).with_context(|| format!("removing old {}", d.display()))?;
        }
        Ok(())
    }
}

/// The slow-EMA weights as the adapter / trained tensors users load (names as peft writes them).
fn save_trainable_ema(
    path: &Path,
    epoch: usize,
    state: &TrainState,
    vars: &[(String, Var)],
    cfg: &Config,
) -> Result<()> {
    let meta = HashMap::from([
        ("dgpo_epoch".to_string(), epoch.to_string()),
        ("dgpo_weights".to_string(), "ema".to_string()),
        ("dgpo_base".to_string(), cfg.model.pretrained.clone()),
    ]);
    save_safetensors(path, &state.ema.named(vars, ""), Some(meta))
}
