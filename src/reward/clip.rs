//! The CLIP-family rewards, in process on Candle (`src/clip.rs`):
//!
//! - `clip_score`: `logit_scale · cos(image, text) / 30` with OpenAI's CLIP ViT-L/14 (Flow-GRPO's
//!   `ClipScorer` divides the logit by 30);
//! - `pickscore`: `logit_scale · cos(image, text) / 26` with PickScore_v1 (CLIP-H) and the
//!   `laion/CLIP-ViT-H-14-laion2B-s32B-b79K` processor, as Flow-GRPO's `PickScoreScorer`;
//! - `aesthetic`: the LAION improved-aesthetic-predictor head (`layers.0/2/4/6/7`, linear layers with
//!   dropout between them and no activations) over the L2-normalised CLIP ViT-L/14 image embedding.
//!
//! Images go through `CLIPImageProcessor`'s preprocessing (PIL bicubic resize, centre crop; the
//! processor transformers uses when given PIL images), prompts through the model's own tokenizer
//! truncated to its context length.

use crate::clip::{l2_normalize, load_tokenizer, tokenize, Clip, ClipProcessor};
use crate::config::RewardConfig;
use crate::geneval::Metadata;
use crate::image::Image;
use crate::reward::module::{Reward, RewardOutput};
use anyhow::{bail, ensure, Context, Result};
use candle_core::{Device, Module, Tensor};
use std::path::Path;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClipKind {
    ClipScore,
    PickScore,
    Aesthetic,
}

impl ClipKind {
    pub fn parse(kind: &str) -> Option<Self> {
        match kind {
            "clip_score" => Some(Self::ClipScore),
            "pickscore" => Some(Self::PickScore),
            "aesthetic" => Some(Self::Aesthetic),
            _ => None,
        }
    }

    fn name(&self) -> &'static str {
        match self {
            Self::ClipScore => "clip_score",
            Self::PickScore => "pickscore",
            Self::Aesthetic => "aesthetic",
        }
    }

    /// Default model and processor (tokenizer + preprocessing) repos.
    pub fn defaults(&self) -> (&'static str, &'static str) {
        match self {
            Self::ClipScore | Self::Aesthetic => (
                "openai/clip-vit-large-patch14",
                "openai/clip-vit-large-patch14",
            ),
            Self::PickScore => (
                "yuvalkirstain/PickScore_v1",
                "laion/CLIP-ViT-H-14-laion2B-s32B-b79K",
            ),
        }
    }
}

/// A CLIP-family reward.
pub struct ClipReward {
    kind: ClipKind,
    clip: Clip,
    processor: ClipProcessor,
    tokenizer: Option<tokenizers::Tokenizer>,
    head: Vec<candle_nn::Linear>,
    batch: usize,
    dev: Device,
}

impl ClipReward {
    pub fn from_config(kind: ClipKind, r: &RewardConfig, dev: &Device) -> Result<Self> {
        let (dm, dp) = kind.defaults();
        let model = r.model.as_deref().unwrap_or(dm);
        let proc_src = r
            .processor
            .as_deref()
            .or(r.model.as_deref().filter(|_| kind != ClipKind::PickScore))
            .unwrap_or(dp);
        let clip =
            Clip::load(model, dev).with_context(|| format!("{}: model {model}", kind.name()))?;
        let processor = ClipProcessor::load(proc_src)
            .with_context(|| format!("{}: processor {proc_src}", kind.name()))?;
        let tokenizer = match kind {
            ClipKind::Aesthetic => None,
            _ => Some(
                load_tokenizer(proc_src, clip.config.text_config.max_position_embeddings)
                    .with_context(|| format!("{}: tokenizer of {proc_src}", kind.name()))?,
            ),
        };
        let head = match (kind, &r.head) {
            (ClipKind::Aesthetic, Some(h)) => {
                load_head(Path::new(h), clip.config.projection_dim, dev)?
            }
            (ClipKind::Aesthetic, None) => bail!(
                "aesthetic needs head = \"path/to/sac+logos+ava1-l14-linearMSE.pth\" (the LAION \
                 improved-aesthetic-predictor weights; .pth or .safetensors)"
            ),
            (_, Some(_)) => bail!("head is only for kind = \"aesthetic\""),
            (_, None) => vec![],
        };
        Ok(Self {
            kind,
            clip,
            processor,
            tokenizer,
            head,
            batch: if r.batch_size == 0 { 16 } else { r.batch_size },
            dev: dev.clone(),
        })
    }

    /// Projected image embeddings of `images`, in batches.
    pub fn image_embeds(&self, images: &[Image]) -> Result<Tensor> {
        let parts = images
            .chunks(self.batch)
            .map(|c| {
                self.clip
                    .image_features(&self.processor.pixels(c, &self.dev)?)
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Tensor::cat(&parts, 0)?)
    }
}

/// The LAION aesthetic MLP: every `layers.<i>.weight` / `.bias` in index order.
fn load_head(path: &Path, input: usize, dev: &Device) -> Result<Vec<candle_nn::Linear>> {
    let tensors: Vec<(String, Tensor)> = match path.extension().and_then(|e| e.to_str()) {
        Some("safetensors") => candle_core::safetensors::load(path, dev)
            .with_context(|| format!("reading {}", path.display()))?
            .into_iter()
            .collect(),
        _ => candle_core::pickle::read_all(path)
            .with_context(|| format!("reading {} as a PyTorch state dict", path.display()))?,
    };
    let mut idx: Vec<usize> = tensors
        .iter()
        .filter_map(|(k, _)| {
            k.strip_prefix("layers.")?
                .strip_suffix(".weight")?
                .parse()
                .ok()
        })
        .collect();
    idx.sort_unstable();
    ensure!(
        !idx.is_empty(),
        "{}: no layers.<i>.weight tensors (expected the LAION aesthetic head)",
        path.display()
    );
    let get = |k: String| -> Result<Tensor> {
        let t = tensors
            .iter()
            .find(|(n, _)| *n == k)
            .with_context(|| format!("{}: no {k}", path.display()))?;
        Ok(t.1.to_dtype(candle_core::DType::F32)?.to_device(dev)?)
    };
    let mut dim = input;
    let mut out = vec![];
    for i in idx {
        let w = get(format!("layers.{i}.weight"))?;
        let (o, inp) = w.dims2()?;
        ensure!(
            inp == dim,
            "{}: layers.{i}.weight is {o}x{inp}, expected an input of {dim} (the CLIP projection)",
            path.display()
        );
        out.push(candle_nn::Linear::new(
            w,
            Some(get(format!("layers.{i}.bias"))?),
        ));
        dim = o;
    }
    ensure!(
        dim == 1,
        "{}: the head ends with {dim} outputs, expected 1",
        path.display()
    );
    Ok(out)
}

impl Reward for ClipReward {
    fn name(&self) -> &str {
        self.kind.name()
    }

    fn score(
        &self,
        images: &[Image],
        prompts: &[String],
        _metadata: &[Option<Metadata>],
    ) -> Result<RewardOutput> {
        let img = l2_normalize(&self.image_embeds(images)?)?;
        let scores = match self.kind {
            ClipKind::Aesthetic => {
                let mut x = img;
                for l in &self.head {
                    x = l.forward(&x)?;
                }
                x.flatten_all()?.to_vec1::<f32>()?
            }
            ClipKind::ClipScore | ClipKind::PickScore => {
                let tok = self.tokenizer.as_ref().context("no tokenizer")?;
                // A group repeats its prompt: encode each distinct prompt once.
                let mut uniq: Vec<String> = vec![];
                let mut at = Vec::with_capacity(prompts.len());
                for p in prompts {
                    let k = uniq.iter().position(|u| u == p).unwrap_or_else(|| {
                        uniq.push(p.clone());
                        uniq.len() - 1
                    });
                    at.push(k as u32);
                }
                let ids = tokenize(tok, &uniq)?;
                let txt = ids
                    .chunks(self.batch)
                    .map(|c| self.clip.text_features(c))
                    .collect::<Result<Vec<_>>>()?;
                let txt = Tensor::cat(&txt, 0)?.index_select(&Tensor::new(at, &self.dev)?, 0)?;
                let txt = l2_normalize(&txt)?;
                let cos = (img * txt)?.sum(1)?;
                let div = if self.kind == ClipKind::PickScore {
                    26.0
                } else {
                    30.0
                };
                (cos * (self.clip.logit_scale as f64 / div))?.to_vec1::<f32>()?
            }
        };
        Ok(RewardOutput {
            scores,
            ..Default::default()
        })
    }
}
