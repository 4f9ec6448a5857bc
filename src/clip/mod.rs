//! CLIP for the CLIP-family rewards (`clip_score`, `pickscore`, `aesthetic`): the transformers
//! `CLIPModel` (text and vision towers, projections, `logit_scale`) in Candle, its tokenizer
//! (`tokenizer.json`), and `CLIPImageProcessor`'s preprocessing — shortest edge resized with PIL's
//! bicubic filter in PIL's 8-bit fixed-point arithmetic, centre crop, rescale, normalise — so that the
//! pixels match the reference processors'.
//!
//! Candle's own `clip` module knows only `quick_gelu` (OpenAI's CLIPs); CLIP-H (PickScore) uses
//! `gelu`, hence this implementation. Weights come from `model.safetensors` or `pytorch_model.bin` in
//! a local folder or a Hugging Face repo (the local cache under `HF_HOME`; downloaded when missing
//! unless `HF_HUB_OFFLINE=1`; [`files`]). The image preprocessing is [`processor`].

pub mod files;
pub mod processor;

use files::need_file;
pub use files::{load_tokenizer, resolve_file, tokenize, weights};
pub use processor::{resize_bicubic, ClipProcessor};

use anyhow::{bail, ensure, Context, Result};
use candle_core::{Device, Module, Tensor, D};
use candle_nn::{layer_norm, linear, linear_no_bias, LayerNorm, Linear, VarBuilder};
use serde::Deserialize;

fn default_eps() -> f64 {
    1e-5
}

fn default_channels() -> usize {
    3
}

#[derive(Debug, Clone, Deserialize)]
pub struct TextConfig {
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub max_position_embeddings: usize,
    pub hidden_act: String,
    #[serde(default = "default_eps")]
    pub layer_norm_eps: f64,
    #[serde(default)]
    pub eos_token_id: Option<u32>,
}

#[derive(Debug, Clone, Deserialize)]
pub struct VisionConfig {
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub image_size: usize,
    pub patch_size: usize,
    pub hidden_act: String,
    #[serde(default = "default_eps")]
    pub layer_norm_eps: f64,
    #[serde(default = "default_channels")]
    pub num_channels: usize,
}

/// transformers' `CLIPConfig` (`config.json`), the fields used here.
#[derive(Debug, Clone, Deserialize)]
pub struct ClipConfig {
    pub text_config: TextConfig,
    pub vision_config: VisionConfig,
    pub projection_dim: usize,
}

#[derive(Debug, Clone, Copy)]
enum Act {
    QuickGelu,
    Gelu,
    GeluTanh,
}

impl Act {
    fn parse(s: &str) -> Result<Self> {
        Ok(match s {
            "quick_gelu" => Act::QuickGelu,
            "gelu" => Act::Gelu,
            "gelu_new" | "gelu_pytorch_tanh" | "gelu_fast" => Act::GeluTanh,
            _ => bail!("hidden_act = {s:?}: expected quick_gelu, gelu or gelu_new"),
        })
    }

    fn apply(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        match self {
            Act::QuickGelu => x * candle_nn::ops::sigmoid(&(x * 1.702)?)?,
            Act::Gelu => x.gelu_erf(),
            Act::GeluTanh => x.gelu(),
        }
    }
}

struct Layer {
    ln1: LayerNorm,
    ln2: LayerNorm,
    q: Linear,
    k: Linear,
    v: Linear,
    o: Linear,
    fc1: Linear,
    fc2: Linear,
    heads: usize,
    act: Act,
}

impl Layer {
    fn new(
        vb: VarBuilder,
        width: usize,
        inter: usize,
        heads: usize,
        eps: f64,
        act: Act,
    ) -> Result<Self> {
        let a = vb.pp("self_attn");
        Ok(Self {
            ln1: layer_norm(width, eps, vb.pp("layer_norm1"))?,
            ln2: layer_norm(width, eps, vb.pp("layer_norm2"))?,
            q: linear(width, width, a.pp("q_proj"))?,
            k: linear(width, width, a.pp("k_proj"))?,
            v: linear(width, width, a.pp("v_proj"))?,
            o: linear(width, width, a.pp("out_proj"))?,
            fc1: linear(width, inter, vb.pp("mlp.fc1"))?,
            fc2: linear(inter, width, vb.pp("mlp.fc2"))?,
            heads,
            act,
        })
    }

    fn forward(&self, x: &Tensor, mask: Option<&Tensor>) -> Result<Tensor> {
        let (b, n, w) = x.dims3()?;
        let hd = w / self.heads;
        let h = self.ln1.forward(x)?;
        let split = |t: Tensor| -> candle_core::Result<Tensor> {
            t.reshape((b, n, self.heads, hd))?
                .transpose(1, 2)?
                .contiguous()
        };
        let q = split((self.q.forward(&h)? * (hd as f64).powf(-0.5))?)?;
        let k = split(self.k.forward(&h)?)?;
        let v = split(self.v.forward(&h)?)?;
        let mut att = q.matmul(&k.t()?)?;
        if let Some(m) = mask {
            att = att.broadcast_add(m)?;
        }
        let att = candle_nn::ops::softmax_last_dim(&att)?;
        let o = att.matmul(&v)?.transpose(1, 2)?.reshape((b, n, w))?;
        let x = (x + self.o.forward(&o)?)?;
        let h = self.ln2.forward(&x)?;
        let h = self.fc2.forward(&self.act.apply(&self.fc1.forward(&h)?)?)?;
        Ok((x + h)?)
    }
}

fn layers(
    vb: VarBuilder,
    n: usize,
    width: usize,
    inter: usize,
    heads: usize,
    eps: f64,
    act: &str,
) -> Result<Vec<Layer>> {
    let act = Act::parse(act)?;
    ensure!(
        width.is_multiple_of(heads),
        "hidden_size {width} is not a multiple of {heads} heads"
    );
    (0..n)
        .map(|i| {
            Layer::new(
                vb.pp(format!("encoder.layers.{i}")),
                width,
                inter,
                heads,
                eps,
                act,
            )
        })
        .collect()
}

/// transformers' `CLIPTextTransformer` with its projection (`text_projection`): the text tower of
/// `CLIPModel` and `CLIPTextModelWithProjection`.
pub struct ClipText {
    pub config: TextConfig,
    tok_emb: candle_nn::Embedding,
    pos: Tensor,
    layers: Vec<Layer>,
    final_ln: LayerNorm,
    proj: Linear,
}

/// What the text tower returns for rows of token ids.
pub struct TextOutput {
    /// The embeddings' output and every layer's (`hidden_states` of transformers), `[n, len, width]`.
    pub hidden_states: Vec<Tensor>,
    /// The projected pooled embedding `[n, projection_dim]` (`text_embeds`).
    pub text_embeds: Tensor,
}

impl ClipText {
    /// `vb` at the model root (holding `text_model.*` and `text_projection`).
    pub fn new(config: TextConfig, projection_dim: usize, vb: VarBuilder) -> Result<Self> {
        let t = &config;
        let tv = vb.pp("text_model");
        Ok(Self {
            tok_emb: candle_nn::embedding(
                t.vocab_size,
                t.hidden_size,
                tv.pp("embeddings.token_embedding"),
            )?,
            pos: tv.get(
                (t.max_position_embeddings, t.hidden_size),
                "embeddings.position_embedding.weight",
            )?,
            layers: layers(
                tv.clone(),
                t.num_hidden_layers,
                t.hidden_size,
                t.intermediate_size,
                t.num_attention_heads,
                t.layer_norm_eps,
                &t.hidden_act,
            )?,
            final_ln: layer_norm(t.hidden_size, t.layer_norm_eps, tv.pp("final_layer_norm"))?,
            proj: linear_no_bias(t.hidden_size, projection_dim, vb.pp("text_projection"))?,
            config,
        })
    }

    /// The pooled position of a row: the first EOS (`eos_token_id`), or the first occurrence of the
    /// largest id for configs that say 2 (transformers' legacy rule).
    fn pooled_at(&self, row: &[u32]) -> usize {
        let eos = match self.config.eos_token_id {
            Some(e) if e != 2 => row.iter().position(|&x| x == e),
            _ => None,
        };
        let max = row.iter().copied().max().unwrap_or(0);
        eos.unwrap_or_else(|| row.iter().position(|&x| x == max).unwrap_or(0))
    }

    /// Rows of equal length, causal attention over every position (no padding mask, as SD3's
    /// pipeline calls the encoders).
    pub fn forward(&self, ids: &[Vec<u32>]) -> Result<TextOutput> {
        let dev = self.pos.device();
        let len = ids.first().map(|r| r.len()).unwrap_or(0);
        ensure!(
            len >= 1 && len <= self.config.max_position_embeddings,
            "token rows of length {len}: expected 1..={}",
            self.config.max_position_embeddings
        );
        ensure!(
            ids.iter().all(|r| r.len() == len),
            "token rows of different lengths"
        );
        let flat: Vec<u32> = ids.iter().flatten().copied().collect();
        let ids_t = Tensor::from_vec(flat, (ids.len(), len), dev)?;
        let mut x = self
            .tok_emb
            .forward(&ids_t)?
            .broadcast_add(&self.pos.narrow(0, 0, len)?)?;
        let mask: Vec<f32> = (0..len)
            .flat_map(|i| (0..len).map(move |j| if j > i { f32::NEG_INFINITY } else { 0.0 }))
            .collect();
        let mask = Tensor::from_vec(mask, (1, 1, len, len), dev)?;
        let mut hidden_states = vec![x.clone()];
        for l in &self.layers {
            x = l.forward(&x, Some(&mask))?;
            hidden_states.push(x.clone());
        }
        let x = self.final_ln.forward(&x)?;
        let rows = ids
            .iter()
            .enumerate()
            .map(|(b, r)| x.get(b)?.get(self.pooled_at(r)))
            .collect::<candle_core::Result<Vec<_>>>()?;
        let text_embeds = self.proj.forward(&Tensor::stack(&rows, 0)?)?;
        Ok(TextOutput {
            hidden_states,
            text_embeds,
        })
    }

    /// Projected text embeddings of rows of any lengths (each with its BOS/EOS): rows are padded with
    /// their last token (EOS), which the causal mask hides from the pooled one; the pooled position
    /// stays the first EOS.
    pub fn features(&self, ids: &[Vec<u32>]) -> Result<Tensor> {
        let len = ids.iter().map(|r| r.len()).max().unwrap_or(0);
        let rows: Vec<Vec<u32>> = ids
            .iter()
            .map(|r| {
                let mut r = r.clone();
                let last = *r.last().unwrap_or(&0);
                r.resize(len, last);
                r
            })
            .collect();
        Ok(self.forward(&rows)?.text_embeds)
    }
}

/// transformers' `CLIPModel`.
pub struct Clip {
    pub config: ClipConfig,
    text: ClipText,
    patch: candle_nn::Conv2d,
    cls: Tensor,
    img_pos: Tensor,
    pre_ln: LayerNorm,
    img_layers: Vec<Layer>,
    post_ln: LayerNorm,
    img_proj: Linear,
    /// `exp(logit_scale)`.
    pub logit_scale: f32,
}

impl Clip {
    /// From a folder or repo id with `config.json` and weights.
    pub fn load(model: &str, dev: &Device) -> Result<Self> {
        let cfg_path = need_file(model, "config.json")?;
        let config: ClipConfig = serde_json::from_str(
            &std::fs::read_to_string(&cfg_path)
                .with_context(|| format!("reading {}", cfg_path.display()))?,
        )
        .with_context(|| format!("{}: not a CLIPModel config", cfg_path.display()))?;
        let vb = weights(model, dev)?;
        Self::new(config, vb).with_context(|| format!("{model}: loading the CLIP weights"))
    }

    pub fn new(config: ClipConfig, vb: VarBuilder) -> Result<Self> {
        let (t, v) = (&config.text_config, &config.vision_config);
        let vv = vb.pp("vision_model");
        let num_patches = (v.image_size / v.patch_size).pow(2);
        let logit_scale = vb.get((), "logit_scale")?.to_scalar::<f32>()?.exp();
        Ok(Self {
            text: ClipText::new(t.clone(), config.projection_dim, vb.clone())?,
            patch: candle_nn::conv2d_no_bias(
                v.num_channels,
                v.hidden_size,
                v.patch_size,
                candle_nn::Conv2dConfig {
                    stride: v.patch_size,
                    ..Default::default()
                },
                vv.pp("embeddings.patch_embedding"),
            )?,
            cls: vv.get(v.hidden_size, "embeddings.class_embedding")?,
            img_pos: vv.get(
                (num_patches + 1, v.hidden_size),
                "embeddings.position_embedding.weight",
            )?,
            pre_ln: layer_norm(v.hidden_size, v.layer_norm_eps, vv.pp("pre_layrnorm"))?,
            img_layers: layers(
                vv.clone(),
                v.num_hidden_layers,
                v.hidden_size,
                v.intermediate_size,
                v.num_attention_heads,
                v.layer_norm_eps,
                &v.hidden_act,
            )?,
            post_ln: layer_norm(v.hidden_size, v.layer_norm_eps, vv.pp("post_layernorm"))?,
            img_proj: linear_no_bias(
                v.hidden_size,
                config.projection_dim,
                vb.pp("visual_projection"),
            )?,
            logit_scale,
            config,
        })
    }

    /// Projected text embeddings `[n, projection_dim]` of token id rows (each with its BOS/EOS).
    pub fn text_features(&self, ids: &[Vec<u32>]) -> Result<Tensor> {
        self.text.features(ids)
    }

    /// Projected image embeddings `[n, projection_dim]` of preprocessed pixels `[n, 3, S, S]`.
    pub fn image_features(&self, pixels: &Tensor) -> Result<Tensor> {
        let (b, _, _, _) = pixels.dims4()?;
        let p = self
            .patch
            .forward(pixels)?
            .flatten_from(2)?
            .transpose(1, 2)?;
        let w = self.config.vision_config.hidden_size;
        let cls = self.cls.reshape((1, 1, w))?.repeat((b, 1, 1))?;
        let x = Tensor::cat(&[cls, p], 1)?.broadcast_add(&self.img_pos)?;
        let mut x = self.pre_ln.forward(&x)?;
        for l in &self.img_layers {
            x = l.forward(&x, None)?;
        }
        let pooled = self.post_ln.forward(&x.narrow(1, 0, 1)?.squeeze(1)?)?;
        Ok(self.img_proj.forward(&pooled)?)
    }
}

/// Rows divided by their L2 norm.
pub fn l2_normalize(x: &Tensor) -> Result<Tensor> {
    Ok(x.broadcast_div(&x.sqr()?.sum_keepdim(D::Minus1)?.sqrt()?)?)
}

// ---------------------------------------------------------------------------------------------------
// Preprocessing
