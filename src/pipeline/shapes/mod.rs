//! The shapes-testbed pipeline: tokenizer + learned text encoder + MMDiT, stored in a diffusers-style
//! folder so the transformer part is an ordinary `SD3Transformer2DModel` folder:
//!
//! ```text
//! model_index.json                 {"_class_name": "DgpoShapesPipeline", …}
//! transformer/config.json          diffusers SD3Transformer2DModel config
//! transformer/diffusion_pytorch_model.safetensors
//! text_encoder/config.json         DgpoShapesTextEncoder config
//! text_encoder/model.safetensors
//! tokenizer/tokenizer.json         tokenizers WordLevel
//! ```
//! With a `codec/config.json` ([`codec::CellCodec`]) the model works on latents of one pixel per grid
//! cell; without one, images live directly in the model's input space: `in_channels = 3`, RGB scaled
//! to `[-1, 1]`.

pub mod codec;
pub mod text;

use crate::image::Image;
use crate::io::{replace_dir, save_safetensors, staging_dir, write_atomic};
use crate::model::weights::{diffusers_weight_files, read_safetensors};
use crate::model::{MMDiT, Trainable, TransformerConfig, WeightStore};
use crate::pipeline::shapes::codec::CellCodec;
use crate::pipeline::shapes::text::{ShapesTokenizer, TextEncoder, TextEncoderConfig};
use crate::sampling::Conditioning;
use anyhow::{bail, Context, Result};
use candle_core::{DType, Device, Tensor};
use std::collections::HashMap;
use std::path::Path;

pub const PIPELINE_CLASS: &str = "DgpoShapesPipeline";

pub struct ShapesPipeline {
    pub tokenizer: ShapesTokenizer,
    pub text: TextEncoder,
    pub transformer: MMDiT,
    /// The latent space, when not pixels.
    pub codec: Option<CellCodec>,
}

/// Is `dir` a shapes pipeline folder?
pub fn is_shapes_pipeline(dir: &Path) -> bool {
    std::fs::read_to_string(dir.join("model_index.json"))
        .map(|s| s.contains(PIPELINE_CLASS))
        .unwrap_or(false)
}

impl ShapesPipeline {
    /// A freshly initialised pipeline (pretraining from scratch): every transformer tensor trainable.
    pub fn from_scratch(
        tcfg: &TransformerConfig,
        ecfg: &TextEncoderConfig,
        tokenizer: ShapesTokenizer,
        codec: Option<CellCodec>,
        seed: u64,
        dev: &Device,
    ) -> Result<Self> {
        check_fit(tcfg, ecfg, &tokenizer, codec.as_ref())?;
        let w = crate::model::init::init_weights(tcfg, seed, dev)?;
        let transformer = MMDiT::new(
            tcfg,
            WeightStore::new("fresh init", w, DType::F32),
            &Trainable::Full,
            DType::F32,
        )?;
        let text = TextEncoder::init(ecfg, seed.wrapping_add(1), dev)?;
        Ok(Self {
            tokenizer,
            text,
            transformer,
            codec,
        })
    }

    /// Load a pipeline folder; `trainable` decides what of the transformer is trained.
    pub fn load(dir: &Path, trainable: &Trainable, dev: &Device) -> Result<Self> {
        if !is_shapes_pipeline(dir) {
            bail!(
                "{} is not a shapes pipeline folder (expected model_index.json with \
                 \"_class_name\": \"{PIPELINE_CLASS}\")",
                dir.display()
            );
        }
        let tdir = dir.join("transformer");
        let tcfg = TransformerConfig::from_json_file(&tdir.join("config.json"))?;
        let files = diffusers_weight_files(&tdir)?;
        let tensors = read_safetensors(&files, dev)?;
        let transformer = MMDiT::new(
            &tcfg,
            WeightStore::new(tdir.display().to_string(), tensors, DType::F32),
            trainable,
            DType::F32,
        )?;
        let edir = dir.join("text_encoder");
        let ecfg = TextEncoderConfig::from_json_file(&edir.join("config.json"))?;
        let efile = edir.join("model.safetensors");
        let et = read_safetensors(std::slice::from_ref(&efile), dev)?;
        let text = TextEncoder::from_tensors(&ecfg, et, &efile.display().to_string())?;
        let tokenizer =
            ShapesTokenizer::from_file(&dir.join("tokenizer/tokenizer.json"), ecfg.max_length)?;
        let cdir = dir.join("codec");
        let codec = cdir
            .join("config.json")
            .exists()
            .then(|| CellCodec::load(&cdir))
            .transpose()?;
        check_fit(&tcfg, &ecfg, &tokenizer, codec.as_ref())
            .with_context(|| format!("in {}", dir.display()))?;
        Ok(Self {
            tokenizer,
            text,
            transformer,
            codec,
        })
    }

    /// Write the pipeline folder atomically (staging folder, then rename over `dir`), tensors stored in
    /// `dtype` (loading converts back to f32).
    pub fn save(&self, dir: &Path, metadata: &HashMap<String, String>, dtype: DType) -> Result<()> {
        self.save_with(dir, metadata, dtype, false, usize::MAX)
    }

    /// As [`ShapesPipeline::save`], with the adapters merged into the transformer's weights when
    /// `merge_lora` (the folder then loads as a plain pipeline anywhere) and the transformer's weights
    /// sharded above `max_shard_bytes` as diffusers shards them.
    pub fn save_with(
        &self,
        dir: &Path,
        metadata: &HashMap<String, String>,
        dtype: DType,
        merge_lora: bool,
        max_shard_bytes: usize,
    ) -> Result<()> {
        let cast = |m: HashMap<String, Tensor>| -> Result<HashMap<String, Tensor>> {
            m.into_iter()
                .map(|(k, v)| Ok((k, v.to_dtype(dtype)?)))
                .collect()
        };
        if let Some(parent) = dir.parent().filter(|p| !p.as_os_str().is_empty()) {
            std::fs::create_dir_all(parent)?;
        }
        let s = staging_dir(dir)?;
        let mut index = serde_json::json!({
            "_class_name": PIPELINE_CLASS,
            "_dgpo_version": env!("CARGO_PKG_VERSION"),
            "transformer": ["dgpo", "SD3Transformer2DModel"],
            "text_encoder": ["dgpo", crate::pipeline::shapes::text::TEXT_ENCODER_CLASS],
            "tokenizer": ["tokenizers", "WordLevel"],
        });
        if let Some(c) = &self.codec {
            index["codec"] = serde_json::json!(["dgpo", codec::CODEC_CLASS]);
            write_atomic(
                &s.join("codec/config.json"),
                serde_json::to_string_pretty(&c.cfg)?.as_bytes(),
            )?;
        }
        write_atomic(
            &s.join("model_index.json"),
            serde_json::to_string_pretty(&index)?.as_bytes(),
        )?;
        write_transformer_folder(
            &s.join("transformer"),
            &self.transformer,
            merge_lora,
            dtype,
            max_shard_bytes,
            metadata,
        )?;
        write_atomic(
            &s.join("text_encoder/config.json"),
            serde_json::to_string_pretty(&self.text.cfg)?.as_bytes(),
        )?;
        save_safetensors(
            &s.join("text_encoder/model.safetensors"),
            &cast(self.text.tensors())?,
            Some(metadata.clone()),
        )?;
        let tok = self
            .tokenizer
            .inner()
            .to_string(true)
            .map_err(|e| anyhow::anyhow!("serialising the tokenizer: {e}"))?;
        write_atomic(&s.join("tokenizer/tokenizer.json"), tok.as_bytes())?;
        replace_dir(&s, dir)
    }

    /// Text conditioning of prompts (no gradient).
    pub fn encode(&self, prompts: &[&str]) -> Result<Conditioning> {
        let (context, pooled) = self.text_forward(prompts, false)?;
        Ok(Conditioning { context, pooled })
    }

    /// The text encoder's (context, pooled) for prompts; with `track` the graph is recorded.
    pub fn text_forward(&self, prompts: &[&str], track: bool) -> Result<(Tensor, Tensor)> {
        let dev = self.device();
        let ids = self.tokenizer.encode_batch(prompts, &dev)?;
        let parse = match self.text.cfg.parse_embedding {
            true => Some(self.tokenizer.parse_batch(prompts, &dev)?),
            false => None,
        };
        self.text.forward(&ids, parse.as_ref(), track)
    }

    pub fn device(&self) -> Device {
        self.transformer
            .params()
            .first()
            .map(|(_, p)| p.value().device().clone())
            .unwrap_or(Device::Cpu)
    }

    /// `[C, H, W]` of one latent (of one image when there is no codec).
    pub fn latent_shape(&self) -> (usize, usize, usize) {
        let c = &self.transformer.cfg;
        (c.in_channels, c.sample_size, c.sample_size)
    }

    /// Side in pixels of the images the pipeline draws.
    pub fn image_size(&self) -> usize {
        let s = self.transformer.cfg.sample_size;
        self.codec.as_ref().map_or(s, |c| s * c.cfg.cell)
    }

    /// Images → the model's latents.
    pub fn encode_images(&self, images: &[Image], dev: &Device) -> Result<Tensor> {
        encode_images(self.codec.as_ref(), images, dev)
    }

    /// The model's latents → images.
    pub fn decode_images(&self, z: &Tensor) -> Result<Vec<Image>> {
        match &self.codec {
            Some(c) => c.decode(z),
            None => tensor_to_images(z),
        }
    }
}

/// Images → latents: through `codec`, or as RGB in `[-1, 1]` without one.
pub fn encode_images(codec: Option<&CellCodec>, images: &[Image], dev: &Device) -> Result<Tensor> {
    match codec {
        Some(c) => c.encode(images, dev),
        None => images_to_tensor(images, dev),
    }
}

/// A diffusers `SD3Transformer2DModel` folder: `config.json` and the weights (adapters merged when
/// `merge_lora`), stored in `dtype` and sharded above `max_shard_bytes` as diffusers shards them.
pub fn write_transformer_folder(
    dir: &Path,
    m: &MMDiT,
    merge_lora: bool,
    dtype: DType,
    max_shard_bytes: usize,
    metadata: &HashMap<String, String>,
) -> Result<()> {
    let mut tc = serde_json::to_value(&m.cfg)?;
    tc["_class_name"] = "SD3Transformer2DModel".into();
    write_atomic(
        &dir.join("config.json"),
        serde_json::to_string_pretty(&tc)?.as_bytes(),
    )?;
    let weights = if merge_lora {
        m.merged_state_dict()?
    } else {
        m.state_dict()?
    };
    let weights = weights
        .into_iter()
        .map(|(k, v)| Ok((k, v.to_dtype(dtype)?)))
        .collect::<Result<HashMap<_, _>>>()?;
    crate::io::save_safetensors_sharded(
        dir,
        "diffusion_pytorch_model",
        &weights,
        max_shard_bytes,
        Some(metadata.clone()),
    )?;
    Ok(())
}

fn check_fit(
    t: &TransformerConfig,
    e: &TextEncoderConfig,
    tok: &ShapesTokenizer,
    codec: Option<&CellCodec>,
) -> Result<()> {
    if e.context_dim != t.joint_attention_dim || e.pooled_dim != t.pooled_projection_dim {
        bail!(
            "text encoder outputs context {} / pooled {}, the transformer expects \
             joint_attention_dim {} / pooled_projection_dim {}",
            e.context_dim,
            e.pooled_dim,
            t.joint_attention_dim,
            t.pooled_projection_dim
        );
    }
    if tok.vocab_size() != e.vocab_size {
        bail!(
            "the tokenizer has {} tokens, the text encoder's vocab_size is {}",
            tok.vocab_size(),
            e.vocab_size
        );
    }
    let (want, space) = match codec {
        Some(c) => (c.channels(), "the cell codec's latents"),
        None => (3, "RGB"),
    };
    if t.in_channels != want || t.out_channels != want {
        bail!(
            "a shapes transformer works on {space} (in_channels = out_channels = {want}), found {} / {}",
            t.in_channels,
            t.out_channels
        );
    }
    Ok(())
}

/// RGB images → `[B, 3, H, W]` in `[-1, 1]`.
pub fn images_to_tensor(images: &[Image], dev: &Device) -> Result<Tensor> {
    let Some(first) = images.first() else {
        bail!("no images")
    };
    let (w, h) = (first.width, first.height);
    let mut data = Vec::with_capacity(images.len() * 3 * w * h);
    for im in images {
        if im.width != w || im.height != h {
            bail!("images of different sizes in one batch");
        }
        for c in 0..3 {
            for i in 0..w * h {
                data.push(im.data[i * 3 + c] as f32 / 127.5 - 1.0);
            }
        }
    }
    Ok(Tensor::from_vec(data, (images.len(), 3, h, w), dev)?)
}

/// `[B, 3, H, W]` in `[-1, 1]` → RGB images (clamped, rounded).
pub fn tensor_to_images(x: &Tensor) -> Result<Vec<Image>> {
    let (b, c, h, w) = x.dims4()?;
    if c != 3 {
        bail!("expected 3 channels, found {c}");
    }
    let v: Vec<f32> = x
        .to_dtype(DType::F32)?
        .to_device(&Device::Cpu)?
        .flatten_all()?
        .to_vec1()?;
    let mut out = Vec::with_capacity(b);
    for n in 0..b {
        let mut data = vec![0u8; h * w * 3];
        for ch in 0..3 {
            for i in 0..h * w {
                let val = v[((n * 3 + ch) * h * w) + i];
                data[i * 3 + ch] = ((val + 1.0) * 127.5).round().clamp(0.0, 255.0) as u8;
            }
        }
        out.push(Image {
            width: w,
            height: h,
            data,
        });
    }
    Ok(out)
}
