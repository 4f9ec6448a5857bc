//! A diffusers `StableDiffusion3Pipeline` folder as one object: the MMDiT (`transformer/`), the three
//! text encoders (`src/sd3_text.rs`), the VAE (`src/sd3_vae.rs`) and the scheduler's `shift`;
//! `generate` samples images from given initial noise as the diffusers pipeline does (CFG on the
//! prompt and the empty negative prompt, the flow-matching ODE, VAE decode).

use crate::config::Sampler;
use crate::model::weights::WeightSource;
use crate::model::{load_transformer, MMDiT, Trainable, Weights};
use crate::sampling::{sample, schedule, Conditioning};
use crate::sd3_text::{read_json, Sd3TextEncoders};
use crate::sd3_vae::Sd3Vae;
use crate::shapes::Image;
use anyhow::{ensure, Context, Result};
use candle_core::{DType, Device, Tensor};
use std::path::Path;

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

pub struct Sd3Pipeline {
    pub transformer: MMDiT,
    pub text: Sd3TextEncoders,
    pub vae: Sd3Vae,
    /// The scheduler's `shift` (`scheduler/scheduler_config.json`).
    pub shift: f64,
    /// Prompt embeddings on disk ([`Sd3Pipeline::with_cache`]).
    pub cache: Option<crate::embed_cache::EmbeddingCache>,
    dir: std::path::PathBuf,
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
        let text = Sd3TextEncoders::load(dir, max_sequence_length, with_t5, dtype, dev)?;
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
        let id = crate::embed_cache::sd3_identity(
            &self.dir,
            self.max_sequence_length,
            self.with_t5,
            self.dtype,
        );
        self.cache = Some(crate::embed_cache::EmbeddingCache::new(root, &id)?);
        Ok(self)
    }

    /// Prompt embeddings: from the cache where present, the rest encoded (in one batch) and stored.
    pub fn encode(&self, prompts: &[&str]) -> Result<Conditioning> {
        let Some(cache) = &self.cache else {
            let (context, pooled) = self.text.encode(prompts)?;
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
            let (c, pl) = self.text.encode(&todo)?;
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
