//! The SD3 / SD3.5 VAE (diffusers `AutoencoderKL`, 16 latent channels) for rewards and sampling:
//! `decode` undoes the latent scaling and shift from the VAE's own `config.json`
//! (`latents / scaling_factor + shift_factor`), runs Candle's KL decoder in chunks of `chunk` latents
//! (one by default, see [`Sd3Vae::chunk`]), and turns the result into 8-bit images as diffusers' image processor does
//! (`(x / 2 + 0.5)` clamped to [0, 1], times 255, rounded).
//!
//!
//! `encode` gives the latent distribution's mean (diffusers' `latent_dist.mode()`), scaled and
//! shifted for the transformer. Candle's KL encoder only offers a random sample `mean + std·ε`, so the
//! weights that produce the log-variance are replaced at load time by zeros with bias −10⁴: the
//! standard deviation is then exactly 0 and the sample is the mean. Decoding never reads them.

use crate::image::Image;
use crate::pipeline::sd3::text::{read_json, weights_named};
use anyhow::{ensure, Context, Result};
use candle_core::{DType, Device, Tensor};
use candle_transformers::models::stable_diffusion::vae::{AutoEncoderKL, AutoEncoderKLConfig};
use serde::Deserialize;
use std::path::Path;

fn yes() -> bool {
    true
}

/// diffusers' `AutoencoderKL` `config.json`, the fields used.
#[derive(Debug, Clone, Deserialize)]
pub struct VaeConfig {
    pub in_channels: usize,
    pub out_channels: usize,
    pub latent_channels: usize,
    pub block_out_channels: Vec<usize>,
    pub layers_per_block: usize,
    pub norm_num_groups: usize,
    #[serde(default = "yes")]
    pub use_quant_conv: bool,
    #[serde(default = "yes")]
    pub use_post_quant_conv: bool,
    #[serde(default = "yes")]
    pub mid_block_add_attention: bool,
    pub scaling_factor: f64,
    #[serde(default)]
    pub shift_factor: Option<f64>,
    #[serde(default)]
    pub act_fn: Option<String>,
}

pub struct Sd3Vae {
    vae: AutoEncoderKL,
    pub config: VaeConfig,
    /// Latents decoded at once. 1 by default: Candle 0.11's KL decoder returns wrong values for every
    /// latent but the first of a batch (found by `tests/sd3_pipeline.rs`: 0.4 off on the tiny pipeline).
    pub chunk: usize,
}

impl Sd3Vae {
    /// From a `vae/` folder (`config.json`, `diffusion_pytorch_model.safetensors`).
    pub fn load(dir: &Path, dtype: DType, dev: &Device) -> Result<Self> {
        let config: VaeConfig = read_json(&dir.join("config.json"))?;
        ensure!(
            config.mid_block_add_attention,
            "{}: mid_block_add_attention = false is not supported",
            dir.display()
        );
        ensure!(
            config.act_fn.as_deref().is_none_or(|a| a == "silu"),
            "{}: act_fn = {:?}: only silu is supported",
            dir.display(),
            config.act_fn
        );
        let vb = if dir.join("diffusion_pytorch_model.bin").exists()
            && crate::model::weights::diffusers_weight_files(dir).is_err()
        {
            // A PyTorch-only VAE decodes; it cannot encode (its log-variance weights stay).
            weights_named(
                dir,
                "diffusion_pytorch_model",
                "diffusion_pytorch_model",
                dtype,
                dev,
            )?
        } else {
            let files = crate::model::weights::diffusers_weight_files(dir)?;
            let mut t = crate::model::weights::read_safetensors(&files, dev)?;
            // The layer whose output is (mean, log-variance): quant_conv, or the encoder's conv_out.
            let last = if config.use_quant_conv {
                "quant_conv"
            } else {
                "encoder.conv_out"
            };
            zero_log_variance(&mut t, last, config.latent_channels)
                .with_context(|| format!("{}: the VAE encoder's {last}", dir.display()))?;
            candle_nn::VarBuilder::from_tensors(t, dtype, dev)
        };
        let vae = AutoEncoderKL::new(
            vb,
            config.in_channels,
            config.out_channels,
            AutoEncoderKLConfig {
                block_out_channels: config.block_out_channels.clone(),
                layers_per_block: config.layers_per_block,
                latent_channels: config.latent_channels,
                norm_num_groups: config.norm_num_groups,
                use_quant_conv: config.use_quant_conv,
                use_post_quant_conv: config.use_post_quant_conv,
            },
        )
        .with_context(|| format!("loading the VAE in {}", dir.display()))?;
        Ok(Self {
            vae,
            config,
            chunk: 1,
        })
    }

    /// The latent mean of images `[n, 3, H, W]` in [-1, 1], as diffusers'
    /// `vae.encode(x).latent_dist.mode()` (unscaled), one image at a time.
    pub fn encode_mean(&self, images: &Tensor) -> Result<Tensor> {
        let n = images.dim(0)?;
        let mut out = Vec::with_capacity(n);
        for i in 0..n {
            out.push(self.vae.encode(&images.narrow(0, i, 1)?)?.sample()?);
        }
        Ok(Tensor::cat(&out, 0)?)
    }

    /// Latents for the transformer of images in [-1, 1]: `(mean − shift_factor) · scaling_factor`.
    pub fn encode(&self, images: &Tensor) -> Result<Tensor> {
        let m = self.encode_mean(images)?;
        Ok(((m - self.config.shift_factor.unwrap_or(0.0))? * self.config.scaling_factor)?)
    }

    /// Pixels per latent along each side: 2 per down block after the first (8 for SD3's VAE).
    pub fn scale_factor(&self) -> usize {
        1 << self.config.block_out_channels.len().saturating_sub(1)
    }

    /// The decoder's output (about [-1, 1]) for denoised latents `[n, C, h, w]`.
    pub fn decode(&self, latents: &Tensor) -> Result<Tensor> {
        let n = latents.dim(0)?;
        ensure!(
            latents.dim(1)? == self.config.latent_channels,
            "latents with {} channels for a VAE of {}",
            latents.dim(1)?,
            self.config.latent_channels
        );
        let z =
            ((latents / self.config.scaling_factor)? + self.config.shift_factor.unwrap_or(0.0))?;
        let mut out = vec![];
        let mut i = 0;
        while i < n {
            let k = self.chunk.max(1).min(n - i);
            out.push(self.vae.decode(&z.narrow(0, i, k)?)?);
            i += k;
        }
        Ok(Tensor::cat(&out, 0)?)
    }

    /// 8-bit RGB images of denoised latents.
    pub fn decode_images(&self, latents: &Tensor) -> Result<Vec<Image>> {
        let x = ((self.decode(latents)?.to_dtype(DType::F32)? / 2.0)? + 0.5)?.clamp(0f32, 1f32)?;
        let x = (x * 255.0)?.round()?;
        let (n, c, h, w) = x.dims4()?;
        ensure!(c == 3, "the VAE decodes {c} channels, expected RGB");
        let v = x.permute((0, 2, 3, 1))?.flatten_all()?.to_vec1::<f32>()?;
        Ok((0..n)
            .map(|i| Image {
                width: w,
                height: h,
                data: v[i * h * w * 3..(i + 1) * h * w * 3]
                    .iter()
                    .map(|&p| p as u8)
                    .collect(),
            })
            .collect())
    }
}

/// Make `<layer>`'s log-variance half (output channels `latent..2·latent`) give −10⁴ everywhere.
fn zero_log_variance(
    t: &mut std::collections::HashMap<String, Tensor>,
    layer: &str,
    latent: usize,
) -> Result<()> {
    let (wk, bk) = (format!("{layer}.weight"), format!("{layer}.bias"));
    let w = t.get(&wk).with_context(|| format!("no {wk}"))?;
    let b = t.get(&bk).with_context(|| format!("no {bk}"))?;
    ensure!(
        w.dim(0)? == 2 * latent && b.dim(0)? == 2 * latent,
        "{wk} has {} output channels, expected 2 × {latent} (mean and log-variance)",
        w.dim(0)?
    );
    let w = Tensor::cat(
        &[
            w.narrow(0, 0, latent)?,
            w.narrow(0, latent, latent)?.zeros_like()?,
        ],
        0,
    )?;
    let b = Tensor::cat(
        &[
            b.narrow(0, 0, latent)?,
            (b.narrow(0, latent, latent)?.zeros_like()? - 1e4)?,
        ],
        0,
    )?;
    t.insert(wk, w);
    t.insert(bk, b);
    Ok(())
}
