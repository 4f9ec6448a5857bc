//! A diffusers `StableDiffusion3Pipeline` folder as one object: the MMDiT (`transformer/`), the three
//! text encoders ([`text`]), the VAE ([`vae`]) and the scheduler's `shift`;
//! `generate` samples images from given initial noise as the diffusers pipeline does (CFG on the
//! prompt and the empty negative prompt, the flow-matching ODE, VAE decode).

pub mod embed_cache;
pub mod text;
pub mod vae;

use crate::config::{Config, Sampler};
use crate::image::Image;
use crate::model::weights::WeightSource;
use crate::model::{load_transformer, MMDiT, Trainable, Weights};
use crate::pipeline::sd3::text::{read_json, Sd3TextEncoders};
use crate::pipeline::sd3::vae::Sd3Vae;
use crate::sampling::{sample, schedule, Conditioning};
use anyhow::{ensure, Context, Result};
use candle_core::{DType, Device, Tensor};
use std::path::{Path, PathBuf};

/// Is `dir` a diffusers SD3 pipeline folder (`model_index.json` naming `StableDiffusion3Pipeline`)?
pub fn is_sd3_pipeline(dir: &Path) -> bool {
    read_json::<serde_json::Value>(&dir.join("model_index.json"))
        .ok()
        .and_then(|v| {
            v.get("_class_name")?
                .as_str()
                .map(|s| s.starts_with("StableDiffusion3"))
        })
        .unwrap_or(false)
}

/// `model.pretrained` as a folder: a Hugging Face repo id is resolved through the cache (downloading
/// what is missing unless `HF_HUB_OFFLINE=1`), anything else is taken as a path.
pub fn resolve_pretrained(cfg: &Config) -> Result<PathBuf> {
    if crate::hub::is_repo_id(&cfg.model.pretrained) {
        crate::hub::pipeline_dir(&cfg.model.pretrained, cfg.model.t5)
            .with_context(|| format!("model.pretrained = {:?}", cfg.model.pretrained))
    } else {
        Ok(PathBuf::from(&cfg.model.pretrained))
    }
}

/// The SD3 / SD3.5 pipeline in `dir` as a config asks for it: frozen weights in `model.dtype` on CUDA
/// (f32 on the CPU), `max_sequence_length` T5 tokens (or zeros with `model.t5 = false`), and with `model.embedding_cache` the text
/// encoders left on disk until [`Sd3Pipeline::prepare_prompts`] needs them.
pub fn load_from_config(
    cfg: &Config,
    dir: &Path,
    trainable: &Trainable,
    dev: &Device,
) -> Result<Sd3Pipeline> {
    let dtype = if dev.is_cpu() {
        DType::F32
    } else {
        cfg.model.dtype.candle()
    };
    let len = cfg.model.max_sequence_length;
    match &cfg.model.embedding_cache {
        Some(root) => Sd3Pipeline::load_cached(dir, trainable, len, cfg.model.t5, dtype, dev, root),
        None => Sd3Pipeline::load(dir, trainable, len, cfg.model.t5, dtype, dev),
    }
    .with_context(|| format!("model.pretrained = {:?}", cfg.model.pretrained))
}

pub struct Sd3Pipeline {
    pub transformer: MMDiT,
    /// `None` while freed ([`Sd3Pipeline::free_text_encoders`]) or not yet needed
    /// ([`Sd3Pipeline::load_cached`]): prompts are then served by the embedding cache alone.
    pub text: Option<Sd3TextEncoders>,
    pub vae: Sd3Vae,
    /// The scheduler's `shift` (`scheduler/scheduler_config.json`).
    pub shift: f64,
    /// Prompt embeddings on disk ([`Sd3Pipeline::with_cache`]).
    pub cache: Option<crate::pipeline::sd3::embed_cache::EmbeddingCache>,
    dir: PathBuf,
    max_sequence_length: usize,
    with_t5: bool,
    dtype: DType,
    dev: Device,
}

impl Sd3Pipeline {
    /// Load every component of `dir`; text encoders and VAE frozen in `dtype`.
    pub fn load(
        dir: &Path,
        trainable: &Trainable,
        max_sequence_length: usize,
        with_t5: bool,
        dtype: DType,
        dev: &Device,
    ) -> Result<Self> {
        Self::load_parts(
            dir,
            trainable,
            max_sequence_length,
            with_t5,
            dtype,
            dev,
            true,
        )
    }

    /// As [`Sd3Pipeline::load`] with prompt embeddings kept under `cache_root`, and the text encoders
    /// left on disk: [`Sd3Pipeline::prepare_prompts`] loads them only when a prompt is missing from
    /// the cache, and frees them again afterwards.
    pub fn load_cached(
        dir: &Path,
        trainable: &Trainable,
        max_sequence_length: usize,
        with_t5: bool,
        dtype: DType,
        dev: &Device,
        cache_root: &Path,
    ) -> Result<Self> {
        Self::load_parts(
            dir,
            trainable,
            max_sequence_length,
            with_t5,
            dtype,
            dev,
            false,
        )?
        .with_cache(cache_root)
    }

    #[allow(clippy::too_many_arguments)]
    fn load_parts(
        dir: &Path,
        trainable: &Trainable,
        max_sequence_length: usize,
        with_t5: bool,
        dtype: DType,
        dev: &Device,
        text_now: bool,
    ) -> Result<Self> {
        ensure!(
            is_sd3_pipeline(dir),
            "{}: not a diffusers StableDiffusion3Pipeline folder (its model_index.json should name \
             StableDiffusion3Pipeline)",
            dir.display()
        );
        let transformer = load_transformer(
            &WeightSource::Diffusers(dir.join("transformer")),
            trainable,
            dtype,
            dev,
        )
        .with_context(|| format!("{}/transformer", dir.display()))?;
        let text = if text_now {
            Some(Sd3TextEncoders::load(
                dir,
                max_sequence_length,
                with_t5,
                dtype,
                dev,
            )?)
        } else {
            None
        };
        let vae = Sd3Vae::load(&dir.join("vae"), dtype, dev)?;
        let sched: serde_json::Value = read_json(&dir.join("scheduler/scheduler_config.json"))?;
        let shift = sched.get("shift").and_then(|v| v.as_f64()).unwrap_or(1.0);
        Ok(Self {
            transformer,
            text,
            vae,
            shift,
            cache: None,
            dir: dir.to_path_buf(),
            max_sequence_length,
            with_t5,
            dtype,
            dev: dev.clone(),
        })
    }

    /// Keep prompt embeddings under `root` (an entry per prompt, for these encoders and settings).
    pub fn with_cache(mut self, root: &Path) -> Result<Self> {
        let id = crate::pipeline::sd3::embed_cache::sd3_identity(
            &self.dir,
            self.max_sequence_length,
            self.with_t5,
            self.dtype,
        );
        self.cache = Some(crate::pipeline::sd3::embed_cache::EmbeddingCache::new(
            root, &id,
        )?);
        Ok(self)
    }

    fn text_encoders(&self) -> Result<&Sd3TextEncoders> {
        self.text.as_ref().with_context(|| {
            format!(
                "the text encoders of {} are not loaded: every prompt must be in the embedding cache \
                 first (Sd3Pipeline::prepare_prompts)",
                self.dir.display()
            )
        })
    }

    /// Drop the text encoders (T5-XXL alone is 9.5 GB in bf16); prompts are then served by the cache.
    pub fn free_text_encoders(&mut self) {
        self.text = None;
    }

    /// Make sure every prompt of `prompts` is in the embedding cache: the missing ones (counted by
    /// the return value) are encoded in batches of `batch_size`, with a progress bar, by text encoders
    /// loaded for the purpose and freed afterwards unless they were loaded before. Without a cache
    /// nothing is done (the encoders stay loaded).
    pub fn prepare_prompts(&mut self, prompts: &[&str], batch_size: usize) -> Result<usize> {
        let Some(cache) = &self.cache else {
            return Ok(0);
        };
        let mut todo: Vec<&str> = vec![];
        let mut seen = std::collections::HashSet::new();
        for p in prompts {
            if seen.insert(*p) && !cache.contains(p)? {
                todo.push(p);
            }
        }
        if todo.is_empty() {
            return Ok(0);
        }
        let loaded_here = self.text.is_none();
        if loaded_here {
            tracing::info!(
                missing = todo.len(),
                "loading the text encoders of {} for the embedding cache",
                self.dir.display()
            );
            self.text = Some(Sd3TextEncoders::load(
                &self.dir,
                self.max_sequence_length,
                self.with_t5,
                self.dtype,
                &self.dev,
            )?);
        }
        let bar = indicatif::ProgressBar::new(todo.len() as u64);
        bar.set_style(
            indicatif::ProgressStyle::with_template(
                "encoding prompts {bar:30} {pos}/{len} [{elapsed_precise}<{eta_precise}]",
            )
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
        );
        for chunk in todo.chunks(batch_size.max(1)) {
            self.encode(chunk)?;
            bar.inc(chunk.len() as u64);
        }
        bar.finish_and_clear();
        if loaded_here {
            self.free_text_encoders();
        }
        Ok(todo.len())
    }

    /// Prompt embeddings: from the cache where present, the rest encoded (in one batch) and stored.
    pub fn encode(&self, prompts: &[&str]) -> Result<Conditioning> {
        let Some(cache) = &self.cache else {
            let (context, pooled) = self.text_encoders()?.encode(prompts)?;
            return Ok(Conditioning { context, pooled });
        };
        let dev = self.dev.clone();
        let mut rows: Vec<Option<(Tensor, Tensor)>> = prompts
            .iter()
            .map(|p| cache.get(p, &dev))
            .collect::<Result<_>>()?;
        let mut todo: Vec<&str> = vec![];
        for (p, r) in prompts.iter().zip(&rows) {
            if r.is_none() && !todo.contains(p) {
                todo.push(p);
            }
        }
        if !todo.is_empty() {
            let (c, pl) = self.text_encoders()?.encode(&todo)?;
            for (i, p) in todo.iter().enumerate() {
                let (ci, pi) = (c.narrow(0, i, 1)?, pl.narrow(0, i, 1)?);
                cache.put(p, &ci, &pi)?;
                for (q, r) in prompts.iter().zip(rows.iter_mut()) {
                    if q == p && r.is_none() {
                        *r = Some((ci.clone(), pi.clone()));
                    }
                }
            }
        }
        let (cs, ps): (Vec<Tensor>, Vec<Tensor>) = rows.into_iter().flatten().unzip();
        Ok(Conditioning {
            context: Tensor::cat(&cs, 0)?,
            pooled: Tensor::cat(&ps, 0)?,
        })
    }

    /// Side of the images in pixels (latent side × the VAE's scale factor).
    pub fn image_size(&self) -> usize {
        self.transformer.cfg.sample_size * self.vae.scale_factor()
    }

    /// `(channels, height, width)` of the latents.
    pub fn latent_shape(&self) -> (usize, usize, usize) {
        let c = &self.transformer.cfg;
        (c.in_channels, c.sample_size, c.sample_size)
    }

    /// Images for `prompts` from `noise` `[n, C, h, w]`: CFG `guidance` against the empty prompt
    /// (none when `guidance <= 1`, as diffusers), `steps` of `sampler` on the grid shifted by `shift`
    /// (the pipeline's own is [`Sd3Pipeline::shift`]).
    pub fn generate(
        &self,
        prompts: &[&str],
        noise: &Tensor,
        sampler: Sampler,
        steps: usize,
        shift: f64,
        guidance: f64,
    ) -> Result<Vec<Image>> {
        ensure!(
            noise.dim(0)? == prompts.len(),
            "{} noise samples for {} prompts",
            noise.dim(0)?,
            prompts.len()
        );
        let cond = self.encode(prompts)?;
        let empty = vec![""; prompts.len()];
        let uncond = if guidance > 1.0 {
            Some(self.encode(&empty)?)
        } else {
            None
        };
        let sched = schedule(sampler, steps, shift);
        let x0 = sample(
            &self.transformer,
            sampler,
            &sched,
            noise,
            &cond,
            uncond.as_ref(),
            guidance,
            Weights::PolicyNoGrad,
        )?;
        self.vae.decode_images(&x0)
    }
}
