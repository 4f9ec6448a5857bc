//! Where a model to sample, evaluate or export comes from: the base pipeline, a training run (its
//! last checkpoint or a given `checkpoints/epoch-N`), or a file written by `dgpo export` (a LoRA, a
//! merged pipeline folder, a StabilityAI single file). One resolver serves `dgpo sample`, `dgpo eval`
//! and `dgpo export`, so all three accept the same `--checkpoint` values.

use crate::config::Config;
use crate::model::lora::load_lora;
use crate::model::weights::{read_safetensors, sai_to_diffusers};
use crate::model::{LoraSpec, MMDiT, Trainable};
use crate::pipeline::sd3::Sd3Pipeline;
use crate::pipeline::shapes::{is_shapes_pipeline, ShapesPipeline};
use crate::pipeline::Pipeline;
use crate::train::run_dir::{checkpoint_of, read_trained, CheckpointState, WeightsChoice};
use anyhow::{bail, Context, Result};
use candle_core::{Device, Tensor};
use std::collections::HashMap;
use std::path::{Path, PathBuf};

/// A training run's checkpoint, read.
#[derive(Debug)]
pub struct RunCheckpoint {
    /// The `checkpoints/epoch-N` folder.
    pub dir: PathBuf,
    pub epoch: usize,
    pub opt_step: u64,
    /// The run's configuration (as saved in the checkpoint).
    pub config: Config,
    pub weights: WeightsChoice,
    /// Trainable tensors by name (`<module>.lora_A.weight` … for LoRA runs, parameter names for
    /// full fine-tuning).
    pub tensors: HashMap<String, Tensor>,
}

impl RunCheckpoint {
    /// The adapter shape of a LoRA run, `None` for full fine-tuning.
    pub fn lora_spec(&self) -> Option<LoraSpec> {
        self.config.lora.enabled.then(|| self.config.lora.spec())
    }

    /// The base model the run fine-tuned (`model.pretrained` of its config).
    pub fn base(&self) -> PathBuf {
        PathBuf::from(&self.config.model.pretrained)
    }

    /// Whether the run fine-tuned an SD3 / SD3.5 pipeline (rather than a shapes pipeline).
    pub fn is_sd3(&self) -> Result<bool> {
        Ok(crate::pipeline::sd3::is_sd3_pipeline(
            &crate::pipeline::sd3::resolve_pretrained(&self.config)?,
        ))
    }

    /// The transformer of an SD3 run's base with the checkpoint's trained tensors in place (no text
    /// encoders, no VAE): what exports need. Frozen weights in f32 on the CPU, `model.dtype` on CUDA.
    pub fn load_sd3_transformer(&self, dev: &Device) -> Result<MMDiT> {
        let base = crate::pipeline::sd3::resolve_pretrained(&self.config)?;
        let trainable = match self.lora_spec() {
            Some(spec) => Trainable::Lora { spec, seed: 0 },
            None => Trainable::Full,
        };
        let dtype = if dev.is_cpu() {
            candle_core::DType::F32
        } else {
            self.config.model.dtype.candle()
        };
        let m = crate::model::load_transformer(
            &crate::model::WeightSource::Diffusers(base.join("transformer")),
            &trainable,
            dtype,
            dev,
        )
        .with_context(|| format!("{}/transformer", base.display()))?;
        set_trainable(&m, &self.tensors).with_context(|| {
            format!(
                "checkpoint {} (on base {})",
                self.dir.display(),
                base.display()
            )
        })?;
        Ok(m)
    }

    /// Load the run's base pipeline with the checkpoint's trained tensors in place (adapters kept
    /// separate, not merged).
    pub fn load_pipeline<P: Pipeline>(&self, dev: &Device) -> Result<P> {
        let base = P::base_of(&self.config)?;
        let trainable = match self.lora_spec() {
            Some(spec) => Trainable::Lora { spec, seed: 0 },
            None => Trainable::Full,
        };
        let pipe = P::load_base(&self.config, &base, &trainable, dev).with_context(|| {
            format!(
                "loading the base model {} of the run checkpoint {}",
                base.display(),
                self.dir.display()
            )
        })?;
        set_trainable(pipe.transformer(), &self.tensors).with_context(|| {
            format!(
                "checkpoint {} (on base {})",
                self.dir.display(),
                base.display()
            )
        })?;
        Ok(pipe)
    }
}

/// Put `tensors` (by trainable name) into the transformer's trainable variables; every variable must
/// be given and nothing else.
pub fn set_trainable(transformer: &MMDiT, tensors: &HashMap<String, Tensor>) -> Result<()> {
    let vars = transformer.trainable_vars();
    for (name, var) in &vars {
        let t = tensors
            .get(name)
            .with_context(|| format!("no tensor {name:?} in the checkpoint"))?;
        if t.dims() != var.as_tensor().dims() {
            bail!(
                "{name}: the checkpoint holds shape {:?}, the model expects {:?} (was it trained for \
                 another base model?)",
                t.dims(),
                var.as_tensor().dims()
            );
        }
        var.set(&t.to_dtype(var.dtype())?.to_device(var.device())?)?;
    }
    if tensors.len() != vars.len() {
        let known: std::collections::HashSet<&str> = vars.iter().map(|(n, _)| n.as_str()).collect();
        let mut extra: Vec<&String> = tensors
            .keys()
            .filter(|k| !known.contains(k.as_str()))
            .collect();
        extra.sort();
        bail!("the checkpoint holds tensors this model does not train: {extra:?}");
    }
    Ok(())
}

/// Whether `--checkpoint` (or, without one, the config's base) is an SD3 / SD3.5 model rather than
/// a shapes-testbed one, decided without loading weights or contacting the hub: a pipeline folder
/// says what it is, a run folder by its saved config, anything else by `model.pretrained` (a hub
/// repo id counts as SD3).
pub fn targets_sd3(cfg: &Config, checkpoint: Option<&Path>) -> Result<bool> {
    let base_is_sd3 = |pretrained: &str| {
        crate::hub::is_repo_id(pretrained)
            || crate::pipeline::sd3::is_sd3_pipeline(Path::new(pretrained))
    };
    if let Some(p) = checkpoint {
        if is_shapes_pipeline(p) {
            return Ok(false);
        }
        if crate::pipeline::sd3::is_sd3_pipeline(p) {
            return Ok(true);
        }
        if let Some(dir) = checkpoint_of(p)? {
            let run_cfg = CheckpointState::read(&dir)?.config(&dir)?;
            return Ok(base_is_sd3(&run_cfg.model.pretrained));
        }
    }
    Ok(base_is_sd3(&cfg.model.pretrained))
}

/// Read a run checkpoint folder (`checkpoints/epoch-N`).
pub fn read_run_checkpoint(
    dir: &Path,
    weights: WeightsChoice,
    dev: &Device,
) -> Result<RunCheckpoint> {
    let st = CheckpointState::read(dir)?;
    Ok(RunCheckpoint {
        dir: dir.to_path_buf(),
        epoch: st.epoch,
        opt_step: st.opt_step,
        config: st.config(dir)?,
        weights,
        tensors: read_trained(dir, weights, dev)?,
    })
}

/// What a `--checkpoint` value turned out to be.
#[derive(Debug, Clone, PartialEq)]
pub enum SourceKind {
    Base,
    Run {
        epoch: usize,
        weights: WeightsChoice,
    },
    Pipeline,
    Lora,
    SingleFile,
    DiffusersTransformer,
}

/// A model ready to sample, with a description of where it came from.
pub struct Loaded<P> {
    pub pipe: P,
    pub kind: SourceKind,
    /// The path given (or the base model's).
    pub path: PathBuf,
    /// The base pipeline it builds on.
    pub base: PathBuf,
}

/// A shapes-testbed model ready to sample.
pub type LoadedModel = Loaded<ShapesPipeline>;

impl<P: Pipeline + 'static> Loaded<P> {
    /// The same model behind the [`Pipeline`] trait.
    pub fn boxed(self) -> Loaded<Box<dyn Pipeline>> {
        Loaded {
            pipe: Box::new(self.pipe),
            kind: self.kind,
            path: self.path,
            base: self.base,
        }
    }
}

/// The model a `--checkpoint` value names: an SD3 / SD3.5 or a shapes pipeline, as [`targets_sd3`]
/// decides.
pub fn load_pipeline(
    cfg: &Config,
    checkpoint: Option<&Path>,
    weights: WeightsChoice,
    dev: &Device,
) -> Result<Loaded<Box<dyn Pipeline>>> {
    Ok(if targets_sd3(cfg, checkpoint)? {
        load_sd3_model(cfg, checkpoint, weights, dev)?.boxed()
    } else {
        load_model(cfg, checkpoint, weights, dev)?.boxed()
    })
}

fn safetensors_keys(file: &Path) -> Result<Vec<String>> {
    let bytes = std::fs::read(file).with_context(|| format!("reading {}", file.display()))?;
    let st = safetensors::SafeTensors::deserialize(&bytes)
        .with_context(|| format!("{} is not a safetensors file", file.display()))?;
    Ok(st.names().into_iter().map(|s| s.to_string()).collect())
}

/// Load the model a `--checkpoint` value names, on the config's base (`model.pretrained`) where the
/// value does not carry its own:
///
/// * none: the base pipeline itself;
/// * a run folder or its `checkpoints/epoch-N`: the run's base with the `weights` copy of its trained
///   tensors (the run's own config names its base);
/// * a shapes pipeline folder (what pretraining and `export --format diffusers` write);
/// * a LoRA: a `.safetensors` with `lora_A` / `lora_B` keys (diffusers or peft names) or a peft
///   folder (`adapter_config.json`), applied to the config's base;
/// * a StabilityAI single file (`export --format single-file`): the transformer replaced, the text
///   encoder from the config's base;
/// * a diffusers transformer folder (`config.json` + safetensors): likewise.
pub fn load_model(
    cfg: &Config,
    checkpoint: Option<&Path>,
    weights: WeightsChoice,
    dev: &Device,
) -> Result<LoadedModel> {
    load_any(cfg, checkpoint, weights, dev)
}

/// As [`load_model`] on an SD3 / SD3.5 base: the base pipeline (a folder or a hub id), a run that
/// fine-tuned one, a LoRA, a single file or a diffusers transformer folder for the config's base, or
/// another SD3 pipeline folder.
pub fn load_sd3_model(
    cfg: &Config,
    checkpoint: Option<&Path>,
    weights: WeightsChoice,
    dev: &Device,
) -> Result<Loaded<Sd3Pipeline>> {
    load_any(cfg, checkpoint, weights, dev)
}

fn load_any<P: Pipeline>(
    cfg: &Config,
    checkpoint: Option<&Path>,
    weights: WeightsChoice,
    dev: &Device,
) -> Result<Loaded<P>> {
    let Some(path) = checkpoint else {
        let base = P::base_of(cfg)?;
        let pipe = P::load_base(cfg, &base, &Trainable::None, dev)
            .with_context(|| format!("model.pretrained = {:?}", cfg.model.pretrained))?;
        return Ok(Loaded {
            pipe,
            kind: SourceKind::Base,
            path: base.clone(),
            base,
        });
    };
    if !path.exists() {
        bail!("--checkpoint {}: no such file or folder", path.display());
    }
    if let Some(dir) = checkpoint_of(path)? {
        let ck = read_run_checkpoint(&dir, weights, dev)?;
        let pipe = ck.load_pipeline::<P>(dev)?;
        return Ok(Loaded {
            pipe,
            kind: SourceKind::Run {
                epoch: ck.epoch,
                weights,
            },
            path: dir,
            base: ck.base(),
        });
    }
    if P::is_pipeline(path) {
        let pipe = P::load_base(cfg, path, &Trainable::None, dev)?;
        return Ok(Loaded {
            pipe,
            kind: SourceKind::Pipeline,
            path: path.to_path_buf(),
            base: path.to_path_buf(),
        });
    }
    if path.is_dir()
        && !path.join("adapter_config.json").is_file()
        && !path.join("config.json").is_file()
    {
        bail!(
            "--checkpoint {}: this folder is not a dgpo run (checkpoints/epoch-N), a pipeline folder \
             (model_index.json), a peft LoRA (adapter_config.json) nor a diffusers transformer folder \
             (config.json)",
            path.display()
        );
    }
    // The config's base, for what applies to it (resolved only now: a hub id may download).
    let base = P::base_of(cfg)?;
    let load_base = |trainable: &Trainable| {
        P::load_base(cfg, &base, trainable, dev).with_context(|| {
            format!(
                "loading the base model {} (model.pretrained) for {}",
                base.display(),
                path.display()
            )
        })
    };
    let is_lora = if path.is_dir() {
        path.join("adapter_config.json").is_file()
    } else {
        safetensors_keys(path)?
            .iter()
            .any(|k| k.ends_with(".lora_A.weight") || k.ends_with(".lora_B.weight"))
    };
    if is_lora {
        let lf = load_lora(path, dev, None)?;
        let trainable = Trainable::Lora {
            spec: lf.spec.clone(),
            seed: 0,
        };
        let pipe = load_base(&trainable)?;
        pipe.transformer().set_lora(&lf.modules).with_context(|| {
            format!("applying the LoRA {} to {}", path.display(), base.display())
        })?;
        return Ok(Loaded {
            pipe,
            kind: SourceKind::Lora,
            path: path.to_path_buf(),
            base,
        });
    }
    let mut pipe = load_base(&Trainable::None)?;
    let tcfg = pipe.transformer().cfg.clone();
    let (kind, tensors) = if path.is_dir() {
        let src = crate::model::weights::WeightSource::from_path(path, None)?;
        (
            SourceKind::DiffusersTransformer,
            src.read(tcfg.num_layers, dev)?.1,
        )
    } else {
        let raw = read_safetensors(&[path.to_path_buf()], dev)?;
        let src = path.display().to_string();
        (
            SourceKind::SingleFile,
            sai_to_diffusers(raw, tcfg.num_layers, &src)?,
        )
    };
    // Frozen weights in the dtype the base was loaded in (f32 on the CPU, model.dtype on CUDA).
    let dtype = pipe.transformer().dtype();
    let m = crate::model::MMDiT::new(
        &tcfg,
        crate::model::weights::WeightStore::new(path.display().to_string(), tensors, dtype),
        &Trainable::None,
        dtype,
    )
    .with_context(|| {
        format!(
            "{} as a transformer for the base {} (architecture from its transformer/config.json)",
            path.display(),
            base.display()
        )
    })?;
    pipe.set_transformer(m);
    Ok(Loaded {
        pipe,
        kind,
        path: path.to_path_buf(),
        base,
    })
}
