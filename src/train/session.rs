//! Everything a training run reads and checks before its first epoch — prompt files, rewards, the
//! evaluation protocol, the pipeline and what it trains — so that a mistake in any of them is
//! reported before a file is written.

use crate::config::{Config, PromptSampling};
use crate::eval::EvalSettings;
use crate::model::{Trainable, TransformerConfig};
use crate::pipeline::shapes::codec::CellCodec;
use crate::pipeline::shapes::text::TextEncoderConfig;
use crate::pipeline::Pipeline;
use crate::prompt_file::{read_prompt_file, PromptItem};
use crate::reward::Rewards;
use anyhow::{bail, Context, Result};
use candle_core::{Device, Var};
use std::path::{Path, PathBuf};

pub struct Session {
    pub train_items: Vec<PromptItem>,
    pub test_items: Vec<PromptItem>,
    pub rewards: Rewards,
    pub eval: EvalSettings,
    /// The folder of the base model (`model.pretrained`, a hub id resolved).
    pub base: PathBuf,
    pub pipe: Box<dyn Pipeline>,
    /// The trainable variables, by name.
    pub vars: Vec<(String, Var)>,
}

impl Session {
    pub fn open(cfg: &Config, dev: &Device) -> Result<Self> {
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
        let eval = EvalSettings::from_config(cfg)?;
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
        let trainable = if cfg.lora.enabled {
            Trainable::Lora {
                spec: cfg.lora.spec(),
                seed: cfg.run.seed,
            }
        } else {
            Trainable::Full
        };
        let base = crate::pipeline::sd3::resolve_pretrained(cfg)?;
        check_fit(cfg, &base, dev)?;
        let mut texts: Vec<&str> = train_items
            .iter()
            .chain(&test_items)
            .map(|p| p.prompt.as_str())
            .collect();
        texts.push("");
        let pipe = crate::pipeline::load_for_training(cfg, &base, &trainable, &texts, dev)?;
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
        Ok(Self {
            train_items,
            test_items,
            rewards,
            eval,
            base,
            pipe,
            vars,
        })
    }
}

/// The sizes of `cfg` against the model in `base`, read from its config files before any weight is
/// loaded: the LoRA rank against the narrowest adapted layer, the resolution against what the model
/// works at, the text length against the shapes text encoder, and (on the CPU) the memory the weights,
/// the trainable state and an epoch's rollout latents take against the machine's RAM. A model without
/// a transformer `config.json` is left to the loader.
pub fn check_fit(cfg: &Config, base: &Path, dev: &Device) -> Result<()> {
    let problems = fit_problems(cfg, base, dev.is_cpu().then(mem_total_bytes).flatten())?;
    if !problems.is_empty() {
        bail!(
            "model.pretrained = {:?} ({}): {} setting{} the model cannot take:\n  - {}",
            cfg.model.pretrained,
            base.display(),
            problems.len(),
            if problems.len() == 1 { "" } else { "s" },
            problems.join("\n  - ")
        );
    }
    Ok(())
}

/// The problems [`check_fit`] reports; `ram` in bytes (None: memory is not checked).
pub fn fit_problems(cfg: &Config, base: &Path, ram: Option<u64>) -> Result<Vec<String>> {
    let Some(tpath) = crate::train::plan::locate_transformer_config(
        &base.to_string_lossy(),
        cfg.model.transformer_config.as_deref(),
    ) else {
        return Ok(vec![]);
    };
    let m = TransformerConfig::from_json_file(&tpath)?;
    let mut p = vec![];
    let lora = cfg.lora.spec();
    if cfg.lora.enabled {
        let narrowest = m
            .linear_shapes()
            .into_iter()
            .filter(|(n, _, _)| lora.targets_module(n))
            .min_by_key(|(_, i, o)| (*i).min(*o));
        if let Some((name, i, o)) = narrowest {
            if cfg.lora.rank > i.min(o) {
                p.push(format!(
                    "lora.rank = {} is above {}, the width of the narrowest adapted layer ({name}, \
                     {i} → {o}, in {}): a rank past a layer's width adds nothing",
                    cfg.lora.rank,
                    i.min(o),
                    tpath.display()
                ));
            }
        }
    }
    let mut latent = (m.in_channels, m.sample_size, m.sample_size);
    if crate::pipeline::shapes::is_shapes_pipeline(base) {
        let enc = base.join("text_encoder/config.json");
        let ecfg = TextEncoderConfig::from_json_file(&enc)?;
        if cfg.model.max_sequence_length > ecfg.max_length {
            p.push(format!(
                "model.max_sequence_length = {} is above {}, the tokens the shapes text encoder \
                 takes (max_length in {}): set model.max_sequence_length = {} (the default, 128, is \
                 for SD3's T5)",
                cfg.model.max_sequence_length,
                ecfg.max_length,
                enc.display(),
                ecfg.max_length
            ));
        }
        let codec_path = base.join("codec/config.json");
        let (works_at, why) = if codec_path.is_file() {
            let codec = CellCodec::from_file(&codec_path)?;
            let cell = codec.cfg.cell;
            latent.0 = codec.channels();
            (
                m.sample_size * cell,
                format!(
                    "sample_size = {} cells of {cell} pixels: {} and {}",
                    m.sample_size,
                    tpath.display(),
                    codec_path.display()
                ),
            )
        } else {
            (
                m.sample_size,
                format!(
                    "sample_size = {} pixels, no codec: {}",
                    m.sample_size,
                    tpath.display()
                ),
            )
        };
        if cfg.model.resolution != works_at {
            p.push(format!(
                "model.resolution = {} but this shapes model works at {works_at} pixels ({why})",
                cfg.model.resolution
            ));
        }
    }
    if let Some(ram) = ram {
        let s = &cfg.sample;
        let trainable = if cfg.lora.enabled {
            m.num_lora_params(cfg.lora.rank, |n| lora.targets_module(n))
        } else {
            m.num_params()
        } as u64;
        let frozen = m.num_params() as u64 * cfg.model.dtype.bytes() as u64;
        // values, gradients, two Adam moments, two EMAs (f32)
        let state = trainable.saturating_mul(4 * 6);
        let images = (s.batch_size * s.num_batches_per_epoch) as u64;
        let per_image = (latent.0 * latent.1 * latent.2) as u64 * 4;
        let rollouts = images
            .saturating_mul(s.num_steps as u64 + 1)
            .saturating_mul(per_image);
        let need = frozen.saturating_add(state).saturating_add(rollouts);
        if need > ram {
            let gib = |b: u64| b as f64 / (1u64 << 30) as f64;
            let (key, what) = if state >= rollouts && cfg.lora.enabled {
                ("lora.rank", format!("lora.rank = {}", cfg.lora.rank))
            } else if state >= rollouts {
                ("lora.enabled", "lora.enabled = false".into())
            } else {
                (
                    "sample.batch_size",
                    format!(
                        "sample.batch_size × sample.num_batches_per_epoch × (sample.num_steps + 1) = \
                         {} × {} × {} latents",
                        s.batch_size,
                        s.num_batches_per_epoch,
                        s.num_steps + 1
                    ),
                )
            };
            p.push(format!(
                "{what} needs about {:.1} GiB ({:.1} GiB frozen weights + {:.1} GiB trainable state \
                 + {:.1} GiB rollout latents), more than this machine's {:.1} GiB of RAM (MemTotal in \
                 /proc/meminfo): lower {key}",
                gib(need),
                gib(frozen),
                gib(state),
                gib(rollouts),
                gib(ram)
            ));
        }
    }
    Ok(p)
}

/// `MemTotal` of /proc/meminfo in bytes; None where it cannot be read.
fn mem_total_bytes() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = text.lines().find(|l| l.starts_with("MemTotal:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn shapes(sets: &[&str]) -> Config {
        let root = Path::new(env!("CARGO_MANIFEST_DIR"));
        let mut sets: Vec<String> = sets.iter().map(|s| s.to_string()).collect();
        sets.push(format!(
            "model.pretrained={:?}",
            root.join("configs/shapes/base").display().to_string()
        ));
        Config::load(&root.join("configs/shapes.toml"), &sets).unwrap()
    }

    fn fit(cfg: &Config, ram: Option<u64>) -> String {
        let base = PathBuf::from(&cfg.model.pretrained);
        fit_problems(cfg, &base, ram).unwrap().join("\n")
    }

    #[test]
    fn the_shipped_shapes_config_fits_its_model() {
        assert_eq!(fit(&shapes(&[]), Some(1 << 30)), "");
    }

    #[test]
    fn a_rank_wider_than_the_adapted_layers_is_refused_naming_the_layer() {
        let e = fit(&shapes(&["lora.rank=97"]), None);
        assert!(
            e.contains("lora.rank = 97 is above 96") && e.contains("attn.to_q"),
            "{e}"
        );
        assert_eq!(fit(&shapes(&["lora.rank=96"]), None), "");
    }

    #[test]
    fn what_does_not_fit_in_memory_is_refused_naming_the_key() {
        let e = fit(&shapes(&["lora.rank=96"]), Some(1 << 20));
        assert!(
            e.contains("lora.rank = 96 needs about") && e.contains("MemTotal"),
            "{e}"
        );
        let e = fit(
            &shapes(&["sample.batch_size=8192", "train.batch_size=8192"]),
            Some(64 << 20),
        );
        assert!(
            e.contains("sample.batch_size × sample.num_batches_per_epoch")
                && e.contains("lower sample.batch_size"),
            "{e}"
        );
    }

    #[test]
    fn shapes_text_length_and_resolution_are_checked_against_the_model() {
        let e = fit(&shapes(&["model.max_sequence_length=100"]), None);
        assert!(
            e.contains("model.max_sequence_length = 100 is above 16"),
            "{e}"
        );
        let e = fit(&shapes(&["model.max_sequence_length=17"]), None);
        assert!(e.contains("max_length"), "{e}");
        let e = fit(&shapes(&["model.resolution=64"]), None);
        assert!(
            e.contains("model.resolution = 64 but this shapes model works at 48 pixels")
                && e.contains("cells of 12 pixels")
                && !e.contains("VAE"),
            "{e}"
        );
    }
}
