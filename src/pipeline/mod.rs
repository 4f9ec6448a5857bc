//! What `dgpo train` and its evaluations need from a text-to-image pipeline, so that one loop serves
//! the shapes testbed (pixels, learned text encoder, exact detector) and SD3 / SD3.5 (latents, CLIP-L +
//! CLIP-G + T5, VAE, reward modules).

pub mod sd3;
pub mod shapes;

use crate::image::Image;
use crate::model::MMDiT;
use crate::pipeline::sd3::Sd3Pipeline;
use crate::pipeline::shapes::{tensor_to_images, ShapesPipeline};
use crate::sampling::Conditioning;
use anyhow::{Context, Result};
use candle_core::{Device, Tensor};

pub trait Generator: Sync {
    /// The MMDiT that is sampled and trained.
    fn transformer(&self) -> &MMDiT;
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

impl Generator for ShapesPipeline {
    fn transformer(&self) -> &MMDiT {
        &self.transformer
    }
    fn encode(&self, prompts: &[&str]) -> Result<Conditioning> {
        ShapesPipeline::encode(self, prompts)
    }
    fn latent_shape(&self) -> (usize, usize, usize) {
        self.image_shape()
    }
    fn decode(&self, latents: &Tensor) -> Result<Vec<Image>> {
        tensor_to_images(latents)
    }
    fn image_size(&self) -> usize {
        self.transformer.cfg.sample_size
    }
    fn check_prompt(&self, prompt: &str) -> Result<()> {
        self.tokenizer.encode(prompt).map(|_| ())
    }
    fn shapes_world(&self) -> bool {
        true
    }
}

impl Generator for Sd3Pipeline {
    fn transformer(&self) -> &MMDiT {
        &self.transformer
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
