//! Text-to-image pipelines behind one trait, [`Pipeline`]: what training, evaluation, sampling and
//! export need of a model, so that one loop serves the shapes testbed ([`shapes`]: pixels, learned
//! text encoder, exact detector) and SD3 / SD3.5 ([`sd3`]: latents, CLIP-L + CLIP-G + T5, VAE).

pub mod sd3;
pub mod shapes;

use crate::config::Config;
use crate::image::Image;
use crate::model::MMDiT;
use crate::model::Trainable;
use crate::pipeline::sd3::Sd3Pipeline;
use crate::pipeline::shapes::ShapesPipeline;
use crate::sampling::Conditioning;
use anyhow::{Context, Result};
use candle_core::{Device, Tensor};
use std::path::{Path, PathBuf};

pub trait Pipeline: Sync {
    /// The base folder a config names (`model.pretrained`; a hub id resolved for SD3).
    fn base_of(cfg: &Config) -> Result<PathBuf>
    where
        Self: Sized;
    /// Whether `path` is a whole pipeline of this kind (a checkpoint value that is its own base).
    fn is_pipeline(path: &Path) -> bool
    where
        Self: Sized;
    /// Load the pipeline in `dir` with `trainable` adapters / weights, as `cfg` asks.
    fn load_base(cfg: &Config, dir: &Path, trainable: &Trainable, dev: &Device) -> Result<Self>
    where
        Self: Sized;
    /// The MMDiT that is sampled and trained.
    fn transformer(&self) -> &MMDiT;
    fn set_transformer(&mut self, m: MMDiT);
    /// Encode `prompts` ahead of use, `batch_size` at a time, where the pipeline caches embeddings
    /// (SD3 with `model.embedding_cache`, whose text encoders are then freed). Returns how many
    /// were encoded.
    fn prepare_prompts(&mut self, _prompts: &[&str], _batch_size: usize) -> Result<usize> {
        Ok(0)
    }
    /// Text conditioning of prompts (no gradient).
    fn encode(&self, prompts: &[&str]) -> Result<Conditioning>;
    /// `(channels, height, width)` of what the transformer denoises (the initial noise).
    fn latent_shape(&self) -> (usize, usize, usize);
    /// 8-bit images of denoised latents.
    fn decode(&self, latents: &Tensor) -> Result<Vec<Image>>;
    /// Side of the images in pixels.
    fn image_size(&self) -> usize;
    /// An error when the pipeline cannot take `prompt` (e.g. a word outside a closed vocabulary).
    fn check_prompt(&self, prompt: &str) -> Result<()>;
    /// Whether evaluations score with the shapes world's exact detector (rather than the configured
    /// reward modules).
    fn shapes_world(&self) -> bool;
    fn device(&self) -> Device {
        self.transformer()
            .params()
            .first()
            .map(|(_, p)| p.value().device().clone())
            .unwrap_or(Device::Cpu)
    }
}

impl Pipeline for ShapesPipeline {
    fn base_of(cfg: &Config) -> Result<PathBuf> {
        Ok(PathBuf::from(&cfg.model.pretrained))
    }
    fn is_pipeline(path: &Path) -> bool {
        shapes::is_shapes_pipeline(path)
    }
    fn load_base(_cfg: &Config, dir: &Path, trainable: &Trainable, dev: &Device) -> Result<Self> {
        ShapesPipeline::load(dir, trainable, dev)
    }
    fn transformer(&self) -> &MMDiT {
        &self.transformer
    }
    fn set_transformer(&mut self, m: MMDiT) {
        self.transformer = m;
    }
    fn encode(&self, prompts: &[&str]) -> Result<Conditioning> {
        ShapesPipeline::encode(self, prompts)
    }
    fn latent_shape(&self) -> (usize, usize, usize) {
        ShapesPipeline::latent_shape(self)
    }
    fn decode(&self, latents: &Tensor) -> Result<Vec<Image>> {
        self.decode_images(latents)
    }
    fn image_size(&self) -> usize {
        ShapesPipeline::image_size(self)
    }
    fn check_prompt(&self, prompt: &str) -> Result<()> {
        self.tokenizer.encode(prompt).map(|_| ())
    }
    fn shapes_world(&self) -> bool {
        true
    }
}

impl Pipeline for Sd3Pipeline {
    fn base_of(cfg: &Config) -> Result<PathBuf> {
        sd3::resolve_pretrained(cfg)
    }
    fn is_pipeline(path: &Path) -> bool {
        sd3::is_sd3_pipeline(path)
    }
    fn load_base(cfg: &Config, dir: &Path, trainable: &Trainable, dev: &Device) -> Result<Self> {
        sd3::load_from_config(cfg, dir, trainable, dev)
    }
    fn transformer(&self) -> &MMDiT {
        &self.transformer
    }
    fn set_transformer(&mut self, m: MMDiT) {
        self.transformer = m;
    }
    fn prepare_prompts(&mut self, prompts: &[&str], batch_size: usize) -> Result<usize> {
        Sd3Pipeline::prepare_prompts(self, prompts, batch_size)
    }
    fn encode(&self, prompts: &[&str]) -> Result<Conditioning> {
        Sd3Pipeline::encode(self, prompts)
    }
    fn latent_shape(&self) -> (usize, usize, usize) {
        Sd3Pipeline::latent_shape(self)
    }
    fn decode(&self, latents: &Tensor) -> Result<Vec<Image>> {
        self.vae
            .decode_images(latents)
            .context("decoding latents with the VAE")
    }
    fn image_size(&self) -> usize {
        Sd3Pipeline::image_size(self)
    }
    /// CLIP and T5 tokenizers take any text (truncating it).
    fn check_prompt(&self, _prompt: &str) -> Result<()> {
        Ok(())
    }
    fn shapes_world(&self) -> bool {
        false
    }
}

/// The pipeline in `base` (`model.pretrained`) with `trainable` adapters / weights, ready to train
/// on `prompts`: an SD3 / SD3.5 pipeline encodes each of them once, up front (with
/// `model.embedding_cache` its text encoders are then freed and the run reads the cache).
pub fn load_for_training(
    cfg: &Config,
    base: &Path,
    trainable: &Trainable,
    prompts: &[&str],
    dev: &Device,
) -> Result<Box<dyn Pipeline>> {
    if sd3::is_sd3_pipeline(base) {
        let mut p = sd3::load_from_config(cfg, base, trainable, dev)?;
        let n = p.prepare_prompts(prompts, cfg.sample.batch_size)?;
        if cfg.model.embedding_cache.is_some() {
            tracing::info!(
                encoded = n,
                "prompt embeddings ready; text encoders not in memory"
            );
        }
        Ok(Box::new(p))
    } else {
        let p = ShapesPipeline::load(base, trainable, dev)
            .with_context(|| format!("model.pretrained = {:?}", cfg.model.pretrained))?;
        Ok(Box::new(p))
    }
}
