//! The shapes testbed's text stack: a `tokenizers` WordLevel tokenizer and a small learned transformer
//! encoder that returns what SD3's text stack returns — per-token context embeddings `[B, L, ctx]` and a
//! pooled vector `[B, pooled]` — so the MMDiT is conditioned exactly as SD3.5 is.
//!
//! Sequence layout: `[BOS] w1 w2 … [PAD] …`, always `max_length` tokens; the pooled vector is read at
//! `[BOS]` (as CLIP reads its pooled output at one token). Like SD3's T5 branch there is no attention mask:
//! padding tokens are part of the context. The empty prompt (classifier-free guidance) is `[BOS] [PAD]…`.

use crate::model::nn::{attention, layer_norm_no_affine};
use anyhow::{bail, Context, Result};
use candle_core::{DType, Device, Tensor, Var};
use rand::SeedableRng;
use rand_distr::{Distribution, Normal, Uniform};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

pub const PAD: &str = "[PAD]";
pub const UNK: &str = "[UNK]";
pub const BOS: &str = "[BOS]";
const LN_EPS: f64 = 1e-5;

/// Build the WordLevel tokenizer for a vocabulary: ids 0, 1, 2 are `[PAD]`, `[UNK]`, `[BOS]`, then the
/// words in sorted order; lower-casing normaliser, whitespace pre-tokeniser.
pub fn build_tokenizer(words: &[String]) -> Result<tokenizers::Tokenizer> {
    use tokenizers::models::wordlevel::WordLevel;
    let mut sorted: Vec<&String> = words.iter().collect();
    sorted.sort();
    sorted.dedup();
    let mut vocab: HashMap<String, u32> = HashMap::new();
    for (i, w) in [PAD, UNK, BOS].iter().enumerate() {
        vocab.insert(w.to_string(), i as u32);
    }
    for w in sorted {
        let n = vocab.len() as u32;
        vocab.entry(w.to_lowercase()).or_insert(n);
    }
    let model = WordLevel::builder()
        .vocab(vocab.into_iter().collect())
        .unk_token(UNK.into())
        .build()
        .map_err(|e| anyhow::anyhow!("building the WordLevel tokenizer: {e}"))?;
    let mut tok = tokenizers::Tokenizer::new(model);
    tok.with_normalizer(Some(tokenizers::normalizers::utils::Lowercase))
        .map_err(|e| anyhow::anyhow!("tokenizer normaliser: {e}"))?;
    tok.with_pre_tokenizer(Some(tokenizers::pre_tokenizers::whitespace::Whitespace {}));
    Ok(tok)
}

/// A loaded tokenizer with the fixed sequence layout of the encoder.
#[derive(Clone)]
pub struct ShapesTokenizer {
    tok: tokenizers::Tokenizer,
    source: PathBuf,
    pub max_length: usize,
    pad: u32,
    unk: u32,
    bos: u32,
}

impl ShapesTokenizer {
    pub fn from_file(path: &Path, max_length: usize) -> Result<Self> {
        let tok = tokenizers::Tokenizer::from_file(path)
            .map_err(|e| anyhow::anyhow!("reading tokenizer {}: {e}", path.display()))?;
        Self::new(tok, path.to_path_buf(), max_length)
    }

    pub fn new(tok: tokenizers::Tokenizer, source: PathBuf, max_length: usize) -> Result<Self> {
        let id = |t: &str| {
            tok.token_to_id(t)
                .with_context(|| format!("tokenizer {} has no {t} token", source.display()))
        };
        Ok(Self {
            pad: id(PAD)?,
            unk: id(UNK)?,
            bos: id(BOS)?,
            tok: tok.clone(),
            source,
            max_length,
        })
    }

    pub fn vocab_size(&self) -> usize {
        self.tok.get_vocab_size(true)
    }

    pub fn inner(&self) -> &tokenizers::Tokenizer {
        &self.tok
    }

    /// Token ids of one prompt, `max_length` long. Unknown words and over-long prompts are errors: a
    /// model conditioned on `[UNK]` or on a cut prompt would silently draw something else.
    pub fn encode(&self, prompt: &str) -> Result<Vec<u32>> {
        let enc = self
            .tok
            .encode(prompt, false)
            .map_err(|e| anyhow::anyhow!("tokenizing {prompt:?}: {e}"))?;
        let mut ids = vec![self.bos];
        for (id, (a, b)) in enc.get_ids().iter().zip(enc.get_offsets()) {
            if *id == self.unk {
                let word = prompt.get(*a..*b).unwrap_or("?");
                bail!(
                    "prompt {prompt:?}: the word {word:?} is not in the vocabulary of {} \
                     ({} words; the shapes world knows only its own classes, colours, numbers \
                     and relations)",
                    self.source.display(),
                    self.vocab_size()
                );
            }
            ids.push(*id);
        }
        if ids.len() > self.max_length {
            bail!(
                "prompt {prompt:?} has {} tokens with [BOS]; the text encoder takes at most {}",
                ids.len(),
                self.max_length
            );
        }
        ids.resize(self.max_length, self.pad);
        Ok(ids)
    }

    /// `[B, L, PARSE_DIMS]` parse features of a batch of prompts (see
    /// [`crate::testbed::parse::parse_features`]), read from the tokenizer's own words.
    pub fn parse_batch(&self, prompts: &[&str], dev: &Device) -> Result<Tensor> {
        let k = crate::testbed::PARSE_DIMS;
        let mut all = Vec::with_capacity(prompts.len() * self.max_length * k);
        for p in prompts {
            let enc = self
                .tok
                .encode(*p, false)
                .map_err(|e| anyhow::anyhow!("tokenizing {p:?}: {e}"))?;
            let words = enc.get_tokens();
            all.extend(crate::testbed::parse_features(words, self.max_length).concat());
        }
        Ok(Tensor::from_vec(
            all,
            (prompts.len(), self.max_length, k),
            dev,
        )?)
    }

    /// `[B, L]` u32 ids of a batch of prompts.
    pub fn encode_batch(&self, prompts: &[&str], dev: &Device) -> Result<Tensor> {
        let mut all = Vec::with_capacity(prompts.len() * self.max_length);
        for p in prompts {
            all.extend(self.encode(p)?);
        }
        Ok(Tensor::from_vec(
            all,
            (prompts.len(), self.max_length),
            dev,
        )?)
    }
}

/// `text_encoder/config.json` of a shapes pipeline.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TextEncoderConfig {
    #[serde(rename = "_class_name")]
    pub class_name: String,
    pub vocab_size: usize,
    pub max_length: usize,
    pub width: usize,
    pub num_layers: usize,
    pub num_heads: usize,
    pub mlp_ratio: usize,
    /// Width of the per-token output (the MMDiT's `joint_attention_dim`).
    pub context_dim: usize,
    /// Width of the pooled output (the MMDiT's `pooled_projection_dim`).
    pub pooled_dim: usize,
    /// Add a learned embedding of each token's parse features
    /// ([`crate::testbed::parse::parse_features`]: at a class word, its colour and its side) to the
    /// context, so that it arrives parsed, as SD3's T5 output does. Absent: false.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub parse_embedding: bool,
}

pub const TEXT_ENCODER_CLASS: &str = "DgpoShapesTextEncoder";

impl TextEncoderConfig {
    pub fn from_json_file(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("reading text encoder config {}", path.display()))?;
        let c: Self = serde_json::from_str(&text)
            .with_context(|| format!("parsing text encoder config {}", path.display()))?;
        c.check()
            .with_context(|| format!("in {}", path.display()))?;
        Ok(c)
    }

    pub fn check(&self) -> Result<()> {
        if self.class_name != TEXT_ENCODER_CLASS {
            bail!(
                "_class_name = {:?}, expected {TEXT_ENCODER_CLASS:?}",
                self.class_name
            );
        }
        if self.num_heads == 0 || !self.width.is_multiple_of(self.num_heads) {
            bail!(
                "width = {} is not divisible by num_heads = {}",
                self.width,
                self.num_heads
            );
        }
        for (k, v) in [
            ("vocab_size", self.vocab_size),
            ("max_length", self.max_length),
            ("width", self.width),
            ("mlp_ratio", self.mlp_ratio),
            ("context_dim", self.context_dim),
            ("pooled_dim", self.pooled_dim),
        ] {
            if v == 0 {
                bail!("{k} must be positive");
            }
        }
        Ok(())
    }

    /// Every tensor name with its shape, in a fixed order.
    pub fn shapes(&self) -> Vec<(String, Vec<usize>)> {
        let w = self.width;
        let h = w * self.mlp_ratio;
        let mut v = vec![
            (
                "token_embedding.weight".to_string(),
                vec![self.vocab_size, w],
            ),
            (
                "position_embedding.weight".to_string(),
                vec![self.max_length, w],
            ),
        ];
        for i in 0..self.num_layers {
            let p = format!("layers.{i}");
            v.extend([
                (format!("{p}.ln1.weight"), vec![w]),
                (format!("{p}.ln1.bias"), vec![w]),
                (format!("{p}.attn.qkv.weight"), vec![3 * w, w]),
                (format!("{p}.attn.qkv.bias"), vec![3 * w]),
                (format!("{p}.attn.out.weight"), vec![w, w]),
                (format!("{p}.attn.out.bias"), vec![w]),
                (format!("{p}.ln2.weight"), vec![w]),
                (format!("{p}.ln2.bias"), vec![w]),
                (format!("{p}.mlp.fc1.weight"), vec![h, w]),
                (format!("{p}.mlp.fc1.bias"), vec![h]),
                (format!("{p}.mlp.fc2.weight"), vec![w, h]),
                (format!("{p}.mlp.fc2.bias"), vec![w]),
            ]);
        }
        if self.parse_embedding {
            v.push((
                "parse_embedding.weight".to_string(),
                vec![crate::testbed::PARSE_DIMS, self.context_dim],
            ));
        }
        v.extend([
            ("final_ln.weight".to_string(), vec![w]),
            ("final_ln.bias".to_string(), vec![w]),
            ("context_proj.weight".to_string(), vec![self.context_dim, w]),
            ("context_proj.bias".to_string(), vec![self.context_dim]),
            ("pooled_proj.weight".to_string(), vec![self.pooled_dim, w]),
            ("pooled_proj.bias".to_string(), vec![self.pooled_dim]),
        ]);
        v
    }
}

/// The learned text encoder. Its tensors are `Var`s so pretraining can train it; DGPO keeps it frozen.
#[derive(Debug, Clone)]
pub struct TextEncoder {
    pub cfg: TextEncoderConfig,
    params: BTreeMap<String, Var>,
}

impl TextEncoder {
    /// Fresh weights, deterministic in `seed`: N(0, 0.02) embeddings, Xavier linears, unit norms.
    pub fn init(cfg: &TextEncoderConfig, seed: u64, dev: &Device) -> Result<Self> {
        cfg.check()?;
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        let mut params = BTreeMap::new();
        for (name, shape) in cfg.shapes() {
            let n: usize = shape.iter().product();
            let data: Vec<f32> = if name == "parse_embedding.weight" {
                // unit-variance entries: each feature moves the context as much as a word does
                let d = Normal::new(0f32, 1.0)?;
                (0..n).map(|_| d.sample(&mut rng)).collect()
            } else if name.ends_with("embedding.weight") {
                let d = Normal::new(0f32, 0.02)?;
                (0..n).map(|_| d.sample(&mut rng)).collect()
            } else if name.contains("ln") && name.ends_with(".weight") {
                vec![1.0; n]
            } else if shape.len() == 2 {
                let bound = (6.0 / (shape[0] + shape[1]) as f32).sqrt();
                let u = Uniform::new(-bound, bound)?;
                (0..n).map(|_| u.sample(&mut rng)).collect()
            } else {
                vec![0.0; n]
            };
            params.insert(
                name,
                Var::from_tensor(&Tensor::from_vec(data, shape, dev)?)?,
            );
        }
        Ok(Self {
            cfg: cfg.clone(),
            params,
        })
    }

    /// From named tensors; every missing, unexpected or misshapen tensor is reported.
    pub fn from_tensors(
        cfg: &TextEncoderConfig,
        mut tensors: HashMap<String, Tensor>,
        source: &str,
    ) -> Result<Self> {
        cfg.check()?;
        let mut problems = vec![];
        let mut params = BTreeMap::new();
        for (name, shape) in cfg.shapes() {
            match tensors.remove(&name) {
                None => problems.push(format!("missing {name} {shape:?}")),
                Some(t) if t.dims() != shape.as_slice() => {
                    problems.push(format!("{name}: expected {shape:?}, found {:?}", t.dims()))
                }
                Some(t) => {
                    params.insert(name, Var::from_tensor(&t.to_dtype(DType::F32)?)?);
                }
            }
        }
        let mut extra: Vec<&String> = tensors.keys().collect();
        extra.sort();
        problems.extend(extra.iter().map(|k| format!("unexpected {k}")));
        if !problems.is_empty() {
            bail!(
                "text encoder weights {source} do not fit its config:\n  {}",
                problems.join("\n  ")
            );
        }
        Ok(Self {
            cfg: cfg.clone(),
            params,
        })
    }

    pub fn vars(&self) -> Vec<(String, Var)> {
        self.params
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect()
    }

    /// Current values by name (for saving).
    pub fn tensors(&self) -> HashMap<String, Tensor> {
        self.params
            .iter()
            .map(|(k, v)| (k.clone(), v.as_tensor().clone()))
            .collect()
    }

    pub fn num_params(&self) -> usize {
        self.params.values().map(|v| v.elem_count()).sum()
    }

    fn p(&self, name: &str, track: bool) -> Tensor {
        let t = self.params[name].as_tensor();
        if track {
            t.clone()
        } else {
            t.detach()
        }
    }

    fn linear(&self, x: &Tensor, name: &str, track: bool) -> Result<Tensor> {
        let w = self.p(&format!("{name}.weight"), track);
        let b = self.p(&format!("{name}.bias"), track);
        let mut dims = x.dims().to_vec();
        let last = dims.len() - 1;
        dims[last] = w.dim(0)?;
        let x2 = x.reshape(((), w.dim(1)?))?;
        Ok(x2.matmul(&w.t()?)?.broadcast_add(&b)?.reshape(dims)?)
    }

    fn ln(&self, x: &Tensor, name: &str, track: bool) -> Result<Tensor> {
        let y = layer_norm_no_affine(x, LN_EPS)?;
        Ok(y.broadcast_mul(&self.p(&format!("{name}.weight"), track))?
            .broadcast_add(&self.p(&format!("{name}.bias"), track))?)
    }

    /// `ids: [B, L]` u32 (and, with `parse_embedding`, `parse: [B, L, PARSE_DIMS]` from
    /// [`ShapesTokenizer::parse_batch`]) → (context `[B, L, context_dim]`, pooled `[B, pooled_dim]`).
    /// With `track` the graph is recorded for training.
    pub fn forward(
        &self,
        ids: &Tensor,
        parse: Option<&Tensor>,
        track: bool,
    ) -> Result<(Tensor, Tensor)> {
        let (b, l) = ids.dims2()?;
        let c = &self.cfg;
        if l != c.max_length {
            bail!(
                "text encoder input has {l} tokens; this encoder takes {}",
                c.max_length
            );
        }
        let (w, nh) = (c.width, c.num_heads);
        let emb = self.p("token_embedding.weight", track);
        let mut h = emb
            .index_select(&ids.flatten_all()?, 0)?
            .reshape((b, l, w))?
            .broadcast_add(&self.p("position_embedding.weight", track))?;
        for i in 0..c.num_layers {
            let p = format!("layers.{i}");
            let x = self.ln(&h, &format!("{p}.ln1"), track)?;
            let qkv = self
                .linear(&x, &format!("{p}.attn.qkv"), track)?
                .reshape((b, l, 3, nh, w / nh))?
                .permute((2, 0, 3, 1, 4))?;
            let (q, k, v) = (
                qkv.get(0)?.contiguous()?,
                qkv.get(1)?.contiguous()?,
                qkv.get(2)?.contiguous()?,
            );
            let a = attention(&q, &k, &v)?.transpose(1, 2)?.reshape((b, l, w))?;
            h = (h + self.linear(&a, &format!("{p}.attn.out"), track)?)?;
            let x = self.ln(&h, &format!("{p}.ln2"), track)?;
            let x = crate::model::nn::gelu(&self.linear(&x, &format!("{p}.mlp.fc1"), track)?)?;
            h = (h + self.linear(&x, &format!("{p}.mlp.fc2"), track)?)?;
        }
        let h = self.ln(&h, "final_ln", track)?;
        let mut context = self.linear(&h, "context_proj", track)?;
        if c.parse_embedding {
            let parse = parse.context("this text encoder adds parse features; none were given")?;
            let k = crate::testbed::PARSE_DIMS;
            let add = parse
                .reshape((b * l, k))?
                .matmul(&self.p("parse_embedding.weight", track))?
                .reshape((b, l, c.context_dim))?;
            context = (context + add)?;
        }
        let first = h.narrow(1, 0, 1)?.squeeze(1)?;
        let pooled = self.linear(&first, "pooled_proj", track)?;
        Ok((context, pooled))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn words() -> Vec<String> {
        "a photo of red blue circle circles square and two"
            .split(' ')
            .map(String::from)
            .collect()
    }

    fn tiny() -> TextEncoderConfig {
        TextEncoderConfig {
            class_name: TEXT_ENCODER_CLASS.into(),
            vocab_size: 13,
            max_length: 8,
            width: 8,
            num_layers: 2,
            num_heads: 2,
            mlp_ratio: 2,
            context_dim: 6,
            pooled_dim: 5,
            parse_embedding: false,
        }
    }

    #[test]
    fn parse_embedding_adds_each_tokens_parse_features_to_the_context() {
        let dev = Device::Cpu;
        let mut cfg = tiny();
        cfg.context_dim = crate::testbed::PARSE_DIMS + 1;
        cfg.max_length = 12;
        let plain = TextEncoder::init(&cfg, 3, &dev).unwrap();
        assert!(!serde_json::to_string(&cfg).unwrap().contains("parse"));
        cfg.parse_embedding = true;
        let json = serde_json::to_string(&cfg).unwrap();
        assert!(json.contains("\"parse_embedding\":true"), "{json}");
        let enc = TextEncoder::init(&cfg, 3, &dev).unwrap();
        assert_eq!(
            enc.num_params(),
            plain.num_params() + crate::testbed::PARSE_DIMS * cfg.context_dim
        );
        let words = "a photo of a red circle left square"
            .split(' ')
            .map(String::from);
        let tok = build_tokenizer(&words.collect::<Vec<_>>()).unwrap();
        let tok = ShapesTokenizer::new(tok, "t".into(), 12).unwrap();
        let prompts = [
            "a photo of a RED circle left of a square",
            "a photo of a circle",
        ];
        let ids = tok.encode_batch(&prompts, &dev).unwrap();
        let parse = tok.parse_batch(&prompts, &dev).unwrap();
        assert_eq!(parse.dims(), &[2, 12, crate::testbed::PARSE_DIMS]);
        let want: Vec<f32> = prompts
            .iter()
            .flat_map(|p| {
                let w: Vec<String> = p.split(' ').map(|w| w.to_lowercase()).collect();
                crate::testbed::parse_features(&w, 12).concat()
            })
            .collect();
        assert_eq!(parse.flatten_all().unwrap().to_vec1::<f32>().unwrap(), want);
        let e = enc.forward(&ids, None, false).unwrap_err().to_string();
        assert!(e.contains("parse features"), "{e}");
        let (with, _) = enc.forward(&ids, Some(&parse), false).unwrap();
        let (without, _) = enc
            .forward(&ids, Some(&parse.zeros_like().unwrap()), false)
            .unwrap();
        // The difference is the parse features times the embedding: zero where a token has none.
        let emb = enc.tensors()["parse_embedding.weight"].clone();
        let expect = parse
            .reshape((24, crate::testbed::PARSE_DIMS))
            .unwrap()
            .matmul(&emb)
            .unwrap();
        let got = (with - without)
            .unwrap()
            .reshape((24, cfg.context_dim))
            .unwrap();
        let err = (got - expect).unwrap().abs().unwrap().max_all().unwrap();
        assert!(err.to_scalar::<f32>().unwrap() < 1e-5);
        let (_, p_) = enc.forward(&ids, Some(&parse), true).unwrap();
        assert_eq!(p_.dims(), &[2, 5]);
    }

    #[test]
    fn tokenizer_layout_and_unknown_words() {
        let t =
            ShapesTokenizer::new(build_tokenizer(&words()).unwrap(), "t.json".into(), 8).unwrap();
        assert_eq!(t.vocab_size(), 13);
        let ids = t.encode("a photo of two RED circles").unwrap();
        assert_eq!(ids.len(), 8);
        assert_eq!(ids[0], 2);
        assert!(ids[1..7].iter().all(|&i| i > 2));
        assert_eq!(ids[7], 0);
        assert_eq!(t.encode("").unwrap(), vec![2, 0, 0, 0, 0, 0, 0, 0]);
        let e = t.encode("a photo of a cube").unwrap_err().to_string();
        assert!(e.contains("\"cube\"") && e.contains("t.json"), "{e}");
        let e = t
            .encode("a photo of a red circle and a blue square")
            .unwrap_err()
            .to_string();
        assert!(e.contains("at most 8"), "{e}");
    }

    #[test]
    fn encoder_shapes_and_prompt_dependence() {
        let dev = Device::Cpu;
        let tok = ShapesTokenizer::new(build_tokenizer(&words()).unwrap(), "t".into(), 8).unwrap();
        let enc = TextEncoder::init(&tiny(), 3, &dev).unwrap();
        let ids = tok
            .encode_batch(&["a red circle", "a blue circle", ""], &dev)
            .unwrap();
        let (c, p) = enc.forward(&ids, None, false).unwrap();
        assert_eq!(c.dims(), &[3, 8, 6]);
        assert_eq!(p.dims(), &[3, 5]);
        let d = (p.get(0).unwrap() - p.get(1).unwrap())
            .unwrap()
            .abs()
            .unwrap()
            .sum_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        assert!(d > 1e-4, "pooled output ignores the prompt");
        // Round trip through named tensors.
        let again = TextEncoder::from_tensors(&tiny(), enc.tensors(), "mem").unwrap();
        let (c2, _) = again.forward(&ids, None, false).unwrap();
        assert_eq!(crate::model::nn::max_abs_diff(&c, &c2).unwrap(), 0.0);
        let mut t = enc.tensors();
        t.remove("final_ln.bias");
        let e = TextEncoder::from_tensors(&tiny(), t, "x.safetensors")
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("missing final_ln.bias") && e.contains("x.safetensors"),
            "{e}"
        );
    }

    #[test]
    fn tracked_forward_gives_gradients_to_every_tensor() {
        let dev = Device::Cpu;
        let enc = TextEncoder::init(&tiny(), 3, &dev).unwrap();
        let ids = Tensor::new(&[[2u32, 5, 6, 7, 0, 0, 0, 0]], &dev).unwrap();
        let (c, p) = enc.forward(&ids, None, true).unwrap();
        let loss =
            (c.sqr().unwrap().sum_all().unwrap() + p.sqr().unwrap().sum_all().unwrap()).unwrap();
        let g = loss.backward().unwrap();
        for (name, v) in enc.vars() {
            assert!(g.get(v.as_tensor()).is_some(), "no gradient for {name}");
        }
    }
}
