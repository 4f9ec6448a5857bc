//! `dgpo export`: a fine-tuned model as files other tools load unchanged.
//!
//! * `lora`: the adapter as diffusers writes it (`pytorch_lora_weights.safetensors`, keys
//!   `transformer.<module>.lora_A.weight` / `lora_B.weight`), what
//!   `StableDiffusion3Pipeline.load_lora_weights` and `SD3Transformer2DModel.load_lora_adapter` read.
//!   The LoRA scale `alpha / r` is folded into `lora_B` and the file says `lora_alpha = r` (in the
//!   `lora_adapter_metadata` header diffusers reads), so loaders that ignore that header (ComfyUI and
//!   older diffusers assume `alpha = r`) still apply the exact update.
//! * `diffusers`: the merged model as a pipeline folder whose `transformer/` is what
//!   `SD3Transformer2DModel.from_pretrained(dir, subfolder="transformer")` loads (`config.json`,
//!   `diffusion_pytorch_model.safetensors`, sharded with an index above `--max-shard-size`).
//! * `single-file`: the merged transformer in the StabilityAI layout (`model.diffusion_model.…`).
//!
//! Every file's safetensors header records the base model, the run's config, the epoch, optimizer
//! step and which weights (EMA or raw). Everything is written to a temporary name and renamed.

use crate::cli::source::read_run_checkpoint;
use crate::io::save_safetensors;
use crate::model::weights::diffusers_to_sai;
use crate::train::run_dir::{checkpoint_of, WeightsChoice};
use anyhow::{bail, Context, Result};
use candle_core::{DType, Device, Tensor};
use std::collections::HashMap;
use std::path::{Path, PathBuf};

/// Output layout of `dgpo export`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum ExportFormat {
    /// diffusers / peft LoRA safetensors (LoRA runs only).
    Lora,
    /// A merged model folder in the diffusers layout.
    Diffusers,
    /// The merged transformer as one StabilityAI-layout safetensors file.
    SingleFile,
}

/// Storage dtype of exported tensors.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum ExportDtype {
    F32,
    Bf16,
    F16,
}

impl ExportDtype {
    pub fn candle(self) -> DType {
        match self {
            ExportDtype::F32 => DType::F32,
            ExportDtype::Bf16 => DType::BF16,
            ExportDtype::F16 => DType::F16,
        }
    }
}

/// What to export.
#[derive(Debug, Clone)]
pub struct ExportArgs {
    /// A run folder (its last checkpoint) or one of its `checkpoints/epoch-N`.
    pub checkpoint: PathBuf,
    pub format: ExportFormat,
    pub dtype: ExportDtype,
    pub weights: WeightsChoice,
    /// Output file (`lora`, `single-file`) or folder (`diffusers`).
    pub out: PathBuf,
    /// Shard the diffusers transformer above this many bytes.
    pub max_shard_bytes: usize,
}

/// Parse a size such as `10GB`, `500MB`, `64KiB` or a plain byte count.
pub fn parse_size(s: &str) -> Result<usize> {
    let t = s.trim();
    let split = t
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let n: f64 = num
        .parse()
        .with_context(|| format!("{s:?}: expected a size such as 10GB, 500MB or 4096"))?;
    let mult: f64 = match unit.trim().to_ascii_uppercase().as_str() {
        "" | "B" => 1.0,
        "KB" => 1e3,
        "MB" => 1e6,
        "GB" => 1e9,
        "KIB" => 1024.0,
        "MIB" => 1024.0 * 1024.0,
        "GIB" => 1024.0 * 1024.0 * 1024.0,
        u => bail!("{s:?}: unknown size unit {u:?} (B, KB, MB, GB, KiB, MiB, GiB)"),
    };
    if n.is_nan() || n <= 0.0 {
        bail!("{s:?}: the size must be positive");
    }
    Ok((n * mult) as usize)
}

/// What an export wrote.
#[derive(Debug)]
pub struct ExportReport {
    pub files: Vec<PathBuf>,
    pub tensors: usize,
    pub bytes: u64,
}

fn header(ck: &crate::cli::source::RunCheckpoint, format: ExportFormat) -> HashMap<String, String> {
    HashMap::from([
        ("format".to_string(), "pt".to_string()),
        (
            "dgpo_version".to_string(),
            env!("CARGO_PKG_VERSION").to_string(),
        ),
        (
            "dgpo_base_model".to_string(),
            ck.config.model.pretrained.clone(),
        ),
        ("dgpo_epoch".to_string(), ck.epoch.to_string()),
        ("dgpo_step".to_string(), ck.opt_step.to_string()),
        ("dgpo_weights".to_string(), ck.weights.name().to_string()),
        (
            "dgpo_format".to_string(),
            format!("{format:?}").to_lowercase(),
        ),
        ("dgpo_config".to_string(), ck.config.to_toml()),
    ])
}

fn cast(m: HashMap<String, Tensor>, dtype: DType) -> Result<HashMap<String, Tensor>> {
    m.into_iter()
        .map(|(k, v)| Ok((k, v.to_dtype(dtype)?)))
        .collect()
}

fn file_size(p: &Path) -> u64 {
    std::fs::metadata(p).map(|m| m.len()).unwrap_or(0)
}

/// Export a run checkpoint.
pub fn export(args: &ExportArgs, dev: &Device) -> Result<ExportReport> {
    let dir = checkpoint_of(&args.checkpoint)?.with_context(|| {
        format!(
            "--checkpoint {}: expected a dgpo train run folder or one of its checkpoints/epoch-N \
             (state.json + train_state.safetensors)",
            args.checkpoint.display()
        )
    })?;
    let ck = read_run_checkpoint(&dir, args.weights, dev)?;
    // An SD3 run needs only its transformer (plus, for a pipeline folder, the base's other files); a
    // shapes run's pipeline is small and is written whole.
    let sd3_base = if ck.is_sd3()? {
        Some(crate::pipeline::sd3::resolve_pretrained(&ck.config)?)
    } else {
        None
    };
    let (shapes, sd3_transformer) = match &sd3_base {
        Some(_) => (None, Some(ck.load_sd3_transformer(dev)?)),
        None => (
            Some(ck.load_pipeline::<crate::pipeline::shapes::ShapesPipeline>(dev)?),
            None,
        ),
    };
    let transformer = match (&shapes, &sd3_transformer) {
        (Some(p), _) => &p.transformer,
        (None, Some(m)) => m,
        (None, None) => unreachable!("one of the two is loaded"),
    };
    let dtype = args.dtype.candle();
    let meta = header(&ck, args.format);
    if let Some(parent) = args.out.parent().filter(|p| !p.as_os_str().is_empty()) {
        std::fs::create_dir_all(parent)
            .with_context(|| format!("creating {}", parent.display()))?;
    }
    let (files, tensors) = match args.format {
        ExportFormat::Lora => {
            let spec = ck.lora_spec().with_context(|| {
                format!(
                    "{}: the run fine-tuned every weight (lora.enabled = false), so there is no adapter \
                     to export; use --format diffusers or single-file",
                    dir.display()
                )
            })?;
            let mut t = HashMap::new();
            let mut modules = vec![];
            for l in transformer.linears() {
                if let Some(ad) = &l.lora {
                    let a = ad.a.as_tensor().detach();
                    let b = (ad.b.as_tensor().detach() * ad.scale)?;
                    t.insert(format!("transformer.{}.lora_A.weight", l.name), a);
                    t.insert(format!("transformer.{}.lora_B.weight", l.name), b);
                    modules.push(l.name.clone());
                }
            }
            let mut meta = meta;
            let adapter = serde_json::json!({
                "transformer.r": spec.rank,
                "transformer.lora_alpha": spec.rank,
                "transformer.target_modules": modules,
                "transformer.use_rslora": false,
                "transformer.use_dora": false,
                "transformer.bias": "none",
            });
            meta.insert(
                "lora_adapter_metadata".into(),
                serde_json::to_string_pretty(&adapter)?,
            );
            meta.insert("dgpo_lora_rank".into(), spec.rank.to_string());
            meta.insert("dgpo_lora_alpha".into(), spec.alpha.to_string());
            meta.insert(
                "dgpo_lora_note".into(),
                format!(
                    "trained with alpha {} (scale {}); the scale is folded into lora_B, so the file's alpha is r",
                    spec.alpha,
                    spec.scale()
                ),
            );
            let n = t.len();
            save_safetensors(&args.out, &cast(t, dtype)?, Some(meta))?;
            (vec![args.out.clone()], n)
        }
        ExportFormat::Diffusers => {
            let n = match (&shapes, &sd3_base) {
                (Some(pipe), _) => {
                    pipe.save_with(&args.out, &meta, dtype, true, args.max_shard_bytes)?;
                    pipe.transformer.merged_state_dict()?.len() + pipe.text.tensors().len()
                }
                (None, Some(base)) => {
                    sd3_pipeline_folder(
                        base,
                        transformer,
                        &args.out,
                        &meta,
                        dtype,
                        args.max_shard_bytes,
                    )?;
                    transformer.merged_state_dict()?.len()
                }
                (None, None) => unreachable!("one of the two is loaded"),
            };
            let mut files = vec![];
            collect_files(&args.out, &mut files)?;
            files.sort();
            (files, n)
        }
        ExportFormat::SingleFile => {
            let merged = transformer.merged_state_dict()?;
            let sai = diffusers_to_sai(&merged, transformer.cfg.num_layers)?;
            let t: HashMap<String, Tensor> = sai.into_iter().collect();
            let n = t.len();
            save_safetensors(&args.out, &cast(t, dtype)?, Some(meta))?;
            (vec![args.out.clone()], n)
        }
    };
    let bytes = files.iter().map(|f| file_size(f)).sum();
    Ok(ExportReport {
        files,
        tensors,
        bytes,
    })
}

/// An SD3 pipeline folder with the fine-tuned (merged) transformer: `transformer/` written anew, every
/// other file of the base (text encoders, tokenizers, VAE, scheduler, `model_index.json`) hard-linked
/// where the file system allows it and copied otherwise. Written to a staging folder, then renamed.
fn sd3_pipeline_folder(
    base: &Path,
    transformer: &crate::model::MMDiT,
    out: &Path,
    meta: &HashMap<String, String>,
    dtype: DType,
    max_shard_bytes: usize,
) -> Result<()> {
    /// A file: hard link where the file system allows it, else a copy. Hub snapshots hold symlinks
    /// into the blob store, so the file they point to is linked.
    fn link_or_copy(from: &Path, to: &Path) -> Result<()> {
        let real = from
            .canonicalize()
            .with_context(|| format!("resolving {}", from.display()))?;
        if std::fs::hard_link(&real, to).is_err() {
            std::fs::copy(&real, to)
                .with_context(|| format!("copying {} to {}", real.display(), to.display()))?;
        }
        Ok(())
    }
    /// Everything in `src` but `skip`, into `dst`.
    fn link_tree(src: &Path, dst: &Path, skip: &str) -> Result<()> {
        std::fs::create_dir_all(dst).with_context(|| format!("creating {}", dst.display()))?;
        for e in std::fs::read_dir(src).with_context(|| format!("listing {}", src.display()))? {
            let e = e?;
            let name = e.file_name();
            if name == skip || name.to_string_lossy().starts_with('.') {
                continue;
            }
            let (from, to) = (e.path(), dst.join(&name));
            if from.is_dir() {
                link_tree(&from, &to, "")?;
            } else {
                link_or_copy(&from, &to)?;
            }
        }
        Ok(())
    }
    if let Some(parent) = out.parent().filter(|p| !p.as_os_str().is_empty()) {
        std::fs::create_dir_all(parent)?;
    }
    let stage = crate::io::staging_dir(out)?;
    link_tree(base, &stage, "transformer")?;
    crate::pipeline::shapes::write_transformer_folder(
        &stage.join("transformer"),
        transformer,
        true,
        dtype,
        max_shard_bytes,
        meta,
    )?;
    crate::io::replace_dir(&stage, out)
}

fn collect_files(dir: &Path, out: &mut Vec<PathBuf>) -> Result<()> {
    for e in std::fs::read_dir(dir).with_context(|| format!("listing {}", dir.display()))? {
        let p = e?.path();
        if p.is_dir() {
            collect_files(&p, out)?;
        } else {
            out.push(p);
        }
    }
    Ok(())
}
