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

/// The evaluation grid of `epoch` in the run folder `out`.
pub fn grid_path(out: &Path, epoch: usize) -> PathBuf {
    out.join(format!("grids/eval-epoch-{epoch:05}.png"))
}

/// The run folder of one `dgpo train`.
pub struct RunDir {
    pub out: PathBuf,
}

impl RunDir {
    /// Check `out` against `resume` (a folder with checkpoints needs `--resume`, `--resume` needs
    /// one, and may not change what defines the run unless `allowed` names the key), clear what an
    /// interrupted run left behind, then create the folder and write the resolved `config.toml`.
    pub fn open(out: &Path, cfg: &Config, resume: bool, allowed: &[String]) -> Result<Self> {
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
        if let Some((_, dir)) = ckpts.last() {
            let saved = CheckpointState::read(dir)?.config(dir)?;
            check_resumable(&saved, cfg, allowed, dir)?;
        }
        let me = Self {
            out: out.to_path_buf(),
        };
        me.clear_leftovers(resume)?;
        std::fs::create_dir_all(out).with_context(|| format!("creating {}", out.display()))?;
        write_atomic(&out.join("config.toml"), cfg.to_toml().as_bytes())?;
        Ok(me)
    }

    /// Remove what a killed run leaves: staging and half-replaced folders, incomplete checkpoint
    /// folders, and — for a fresh run, which has no complete checkpoint to continue — the rows and
    /// grids of the run that never reached one (a fresh run never appends to them).
    fn clear_leftovers(&self, resume: bool) -> Result<()> {
        let ck = self.checkpoints_dir();
        if let Ok(rd) = std::fs::read_dir(&ck) {
            for e in rd.filter_map(|e| e.ok()) {
                let name = e.file_name().to_string_lossy().to_string();
                let staging = name.starts_with(".epoch-")
                    && (name.contains(".staging-") || name.contains(".old-"));
                let incomplete = name.starts_with("epoch-") && !is_checkpoint(&e.path());
                if staging || incomplete {
                    tracing::warn!(
                        "removing {}, left by an interrupted run",
                        e.path().display()
                    );
                    remove_any(&e.path())?;
                }
            }
        }
        if !resume {
            for leftover in [self.metrics(), self.out.join("grids")] {
                if leftover.exists() {
                    tracing::warn!(
                        "removing {}: its run ended before its first checkpoint",
                        leftover.display()
                    );
                    remove_any(&leftover)?;
                }
            }
        }
        Ok(())
    }

    pub fn metrics(&self) -> PathBuf {
        self.out.join("metrics.jsonl")
    }

    pub fn grid(&self, epoch: usize) -> PathBuf {
        grid_path(&self.out, epoch)
    }

    fn checkpoints_dir(&self) -> PathBuf {
        self.out.join("checkpoints")
    }

    /// Load the newest checkpoint into `state`; the rows of `metrics.jsonl` past it are dropped.
    /// Returns `(epoch, wall time)` to continue from.
    pub fn resume(&self, state: &mut TrainState, dev: &Device) -> Result<(usize, f64)> {
        let mut all = checkpoints(&self.out)?;
        let (_, dir) = all.pop().context("no checkpoint")?;
        self.load(&dir, state, dev).map_err(|e| match all.last() {
            Some((_, older)) => e.context(format!(
                "the newest checkpoint {} cannot be used; the older {} is complete: move the newest \
                 out of checkpoints/ (e.g. `mv {} {}/`) and --resume again to continue from the older one",
                dir.display(),
                older.display(),
                dir.display(),
                self.out.display()
            )),
            None => e.context(format!("the checkpoint {} cannot be used", dir.display())),
        })
    }

    /// Load the checkpoint `dir` into `state`; see [`RunDir::resume`].
    fn load(&self, dir: &Path, state: &mut TrainState, dev: &Device) -> Result<(usize, f64)> {
        let st = CheckpointState::read(dir)?;
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
        let vars = state.opt.vars();
        let mut tensors = state.opt.state();
        for (n, v) in vars {
            tensors.insert(format!("{RAW}{n}"), v.as_tensor().clone());
        }
        tensors.extend(state.ema_ref.named(vars, EMA_REF));
        tensors.extend(state.ema.named(vars, EMA));
        std::fs::create_dir_all(self.checkpoints_dir())?;
        let st = staging_dir(&dst)?;
        let staged = (|| -> Result<()> {
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
            replace_dir(&st, &dst)
        })();
        if let Err(e) = staged {
            // A full disk: give the space of the partial checkpoint back and say what is left.
            let _ = std::fs::remove_dir_all(&st);
            let last = checkpoints(&self.out)
                .ok()
                .and_then(|all| all.last().map(|(_, d)| d.display().to_string()));
            return Err(e.context(format!(
                "saving the checkpoint of epoch {epoch} (nothing of it kept; {})",
                match last {
                    Some(d) => format!("the newest complete checkpoint is {d}: --resume from it"),
                    None => "no complete checkpoint yet".into(),
                }
            )));
        }
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

fn remove_any(p: &Path) -> Result<()> {
    if p.is_dir() {
        std::fs::remove_dir_all(p)
    } else {
        std::fs::remove_file(p)
    }
    .with_context(|| format!("removing {}", p.display()))
}

/// Keys whose change does not change what a run is: its length and time budget, how often it
/// evaluates and saves, where reward servers are and how they are called, the embedding cache and
/// the update's memory knobs (same gradient, up to summation order).
fn safe_to_change(key: &str) -> bool {
    const SAFE: [&str; 11] = [
        "run.out_dir",
        "run.tensorboard",
        "run.num_epochs",
        "run.max_minutes",
        "run.eval_every",
        "run.save_every",
        "run.keep_checkpoints",
        "sample.eval_batch_size",
        "model.embedding_cache",
        "train.backward_chunk",
        "train.gradient_checkpointing",
    ];
    const REWARD_SAFE: [&str; 6] = [
        "url",
        "timeout_s",
        "retries",
        "backoff_s",
        "max_concurrency",
        "batch_size",
    ];
    SAFE.contains(&key)
        || key.starts_with("pretrain.")
        || (key.starts_with("reward.")
            && REWARD_SAFE.iter().any(|k| key.ends_with(&format!(".{k}"))))
}

/// Refuse a `--resume` whose config differs from the checkpoint's in what defines the run (the
/// algorithm, model, adapters, seed, prompts, rewards, hyperparameters), unless `allowed` names
/// each such key; log the safe differences.
fn check_resumable(saved: &Config, new: &Config, allowed: &[String], dir: &Path) -> Result<()> {
    let (a, b) = (saved.leaves()?, new.leaves()?);
    let keys: std::collections::BTreeSet<&String> = a.keys().chain(b.keys()).collect();
    let none = toml::Value::String("(unset)".into());
    let mut refused = vec![];
    for k in keys {
        let (old, new) = (a.get(k).unwrap_or(&none), b.get(k).unwrap_or(&none));
        if old == new {
            continue;
        }
        let line = format!("{k}: {old} → {new}");
        if safe_to_change(k) || allowed.iter().any(|x| x == k) {
            tracing::info!("--resume with a changed setting: {line}");
        } else {
            refused.push(line);
        }
    }
    if !refused.is_empty() {
        bail!(
            "--resume: the config differs from the one {} was trained with in what defines the run:\n  \
             {}\nresume with the saved config (its config.toml), or pass --allow-config-change KEY for \
             each change you mean",
            dir.display(),
            refused.join("\n  ")
        );
    }
    Ok(())
}
