//! SD3 / SD3.5 text conditioning, exactly as diffusers' `StableDiffusion3Pipeline.encode_prompt`:
//!
//! - CLIP-L (`text_encoder`, `tokenizer`) and CLIP-G (`text_encoder_2`, `tokenizer_2`), each a
//!   `CLIPTextModelWithProjection`: prompts padded to 77 tokens with the tokenizer's pad token and
//!   truncated, run without an attention mask; the **penultimate** hidden states (before the final
//!   layer norm) are the context, the projected pooled outputs the pooled vector;
//! - the two contexts concatenated along the width and zero-padded to T5's width;
//! - T5 v1.1-XXL (`text_encoder_3`, `tokenizer_3`): `max_sequence_length` tokens (padded, truncated,
//!   EOS kept), the encoder's last hidden state appended along the sequence — or, with T5 off, zeros
//!   of `max_sequence_length` positions × the transformer's `joint_attention_dim`, as diffusers does;
//! - pooled = `[pooled_L, pooled_G]`.
//!
//! Tokenizers come from the repo's own files: `tokenizer.json` when present, else CLIP's `vocab.json`
//! + `merges.txt` (as the SD3.5 repos ship them) built into the same tokenizer transformers builds.

use crate::clip::{ClipText, TextConfig};
use anyhow::{bail, ensure, Context, Result};
use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;
use serde::Deserialize;
use std::path::Path;
use tokenizers::Tokenizer;

/// CLIP's context length.
pub const CLIP_LEN: usize = 77;

pub(crate) fn read_json<T: serde::de::DeserializeOwned>(p: &Path) -> Result<T> {
    let text = std::fs::read_to_string(p).with_context(|| format!("reading {}", p.display()))?;
    serde_json::from_str(&text).with_context(|| format!("parsing {}", p.display()))
}

/// Weights of a transformers component folder: `model.safetensors`, its sharded index, or
/// `pytorch_model.bin`.
fn component_weights(dir: &Path, dtype: DType, dev: &Device) -> Result<VarBuilder<'static>> {
    weights_named(dir, "model", "pytorch_model", dtype, dev)
}

/// Weights `<stem>.safetensors`, `<stem>.safetensors.index.json` (shards) or `<bin>.bin` in `dir`
/// (diffusers names its files `diffusion_pytorch_model.*`).
pub fn weights_named(
    dir: &Path,
    stem: &str,
    bin: &str,
    dtype: DType,
    dev: &Device,
) -> Result<VarBuilder<'static>> {
    let st = dir.join(format!("{stem}.safetensors"));
    let index = dir.join(format!("{stem}.safetensors.index.json"));
    let binf = dir.join(format!("{bin}.bin"));
    let files: Vec<std::path::PathBuf> = if st.exists() {
        vec![st]
    } else if index.exists() {
        #[derive(Deserialize)]
        struct Index {
            weight_map: std::collections::BTreeMap<String, String>,
        }
        let ix: Index = read_json(&index)?;
        let mut f: Vec<_> = ix.weight_map.values().map(|v| dir.join(v)).collect();
        f.sort();
        f.dedup();
        f
    } else if binf.exists() {
        return VarBuilder::from_pth(&binf, dtype, dev)
            .with_context(|| format!("reading {}", binf.display()));
    } else {
        bail!(
            "{}: no {stem}.safetensors, {stem}.safetensors.index.json or {bin}.bin",
            dir.display()
        );
    };
    for f in &files {
        ensure!(f.exists(), "{} is missing", f.display());
    }
    // SAFETY: the files are memory-mapped read-only and not modified while mapped.
    unsafe { VarBuilder::from_mmaped_safetensors(&files, dtype, dev) }
        .with_context(|| format!("reading the weights in {}", dir.display()))
}

/// A special token of `tokenizer_config.json` / `special_tokens_map.json` (a string or
/// `{"content": ...}`).
fn special_token(dir: &Path, key: &str) -> Result<Option<String>> {
    for f in ["tokenizer_config.json", "special_tokens_map.json"] {
        let p = dir.join(f);
        if p.exists() {
            let v: serde_json::Value = read_json(&p)?;
            match v.get(key) {
                Some(serde_json::Value::String(s)) => return Ok(Some(s.clone())),
                Some(serde_json::Value::Object(o)) => {
                    if let Some(serde_json::Value::String(s)) = o.get("content") {
                        return Ok(Some(s.clone()));
                    }
                }
                _ => {}
            }
        }
    }
    Ok(None)
}

/// CLIP's tokenizer from `vocab.json` + `merges.txt`, built as transformers builds `CLIPTokenizer`
/// (NFC, whitespace collapsed, lower case; CLIP's split regex; byte-level BPE with `</w>` word ends;
/// BOS/EOS added).
pub fn clip_tokenizer_from_bpe(dir: &Path) -> Result<Tokenizer> {
    use tokenizers::models::bpe::BPE;
    use tokenizers::normalizers::{Lowercase, Replace, Sequence as NSeq, NFC};
    use tokenizers::pre_tokenizers::byte_level::ByteLevel;
    use tokenizers::pre_tokenizers::sequence::Sequence as PSeq;
    use tokenizers::pre_tokenizers::split::{Split, SplitPattern};
    use tokenizers::processors::roberta::RobertaProcessing;
    use tokenizers::{PreTokenizerWrapper, SplitDelimiterBehavior};
    let (vocab, merges) = (dir.join("vocab.json"), dir.join("merges.txt"));
    let e = |e: tokenizers::Error| anyhow::anyhow!("{}: {e}", dir.display());
    let bos = special_token(dir, "bos_token")?.unwrap_or("<|startoftext|>".into());
    let eos = special_token(dir, "eos_token")?.unwrap_or("<|endoftext|>".into());
    let unk = special_token(dir, "unk_token")?.unwrap_or("<|endoftext|>".into());
    let bpe = BPE::from_file(
        vocab.to_str().context("path is not UTF-8")?,
        merges.to_str().context("path is not UTF-8")?,
    )
    .continuing_subword_prefix(String::new())
    .end_of_word_suffix("</w>".into())
    .unk_token(unk)
    .fuse_unk(false)
    .build()
    .map_err(e)?;
    let id = |t: &str| {
        bpe.get_vocab()
            .get(t)
            .copied()
            .with_context(|| format!("{}: {t} is not in vocab.json", dir.display()))
    };
    let (bos_id, eos_id) = (id(&bos)?, id(&eos)?);
    let mut tok = Tokenizer::new(bpe);
    tok.with_normalizer(Some(NSeq::new(vec![
        NFC.into(),
        Replace::new(
            tokenizers::normalizers::replace::ReplacePattern::Regex(r"\s+".into()),
            " ",
        )
        .map_err(e)?
        .into(),
        Lowercase.into(),
    ])))
    .map_err(e)?;
    let split = Split::new(
        SplitPattern::Regex(
            r"<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"
                .into(),
        ),
        SplitDelimiterBehavior::Removed,
        true,
    )
    .map_err(e)?;
    tok.with_pre_tokenizer(Some(PSeq::new(vec![
        PreTokenizerWrapper::Split(split),
        PreTokenizerWrapper::ByteLevel(ByteLevel::new(false, true, true)),
    ])));
    tok.with_decoder(Some(ByteLevel::default()));
    // transformers registers the special tokens (and `added_tokens_decoder`) as added tokens, matched
    // in the raw text before the model: CLIP-G's pad token "!" turns every "!" of a prompt into id 0.
    let mut specials: Vec<String> = vec![bos.clone(), eos.clone()];
    for k in ["unk_token", "pad_token"] {
        specials.extend(special_token(dir, k)?);
    }
    let cfg = dir.join("tokenizer_config.json");
    if cfg.exists() {
        let v: serde_json::Value = read_json(&cfg)?;
        if let Some(serde_json::Value::Object(m)) = v.get("added_tokens_decoder") {
            for t in m.values() {
                if let Some(c) = t.get("content").and_then(|c| c.as_str()) {
                    specials.push(c.to_string());
                }
            }
        }
    }
    specials.dedup();
    let added: Vec<tokenizers::AddedToken> = specials
        .iter()
        .filter(|t| tok.get_vocab(false).contains_key(t.as_str()))
        .map(|t| tokenizers::AddedToken::from(t.clone(), true))
        .collect();
    tok.add_special_tokens(added).map_err(e)?;
    tok.with_post_processor(Some(
        RobertaProcessing::new((eos, eos_id), (bos, bos_id))
            .trim_offsets(false)
            .add_prefix_space(false),
    ));
    Ok(tok)
}

/// Token ids of `prompts`, truncated to `len` (special tokens kept) and padded with `pad`.
fn ids_padded(tok: &Tokenizer, prompts: &[&str], len: usize, pad: u32) -> Result<Vec<Vec<u32>>> {
    prompts
        .iter()
        .map(|p| {
            let enc = tok
                .encode(*p, true)
                .map_err(|e| anyhow::anyhow!("tokenizing {p:?}: {e}"))?;
            let mut ids = enc.get_ids().to_vec();
            ensure!(ids.len() <= len, "tokenizer did not truncate to {len}");
            ids.resize(len, pad);
            Ok(ids)
        })
        .collect()
}

/// A tokenizer folder's tokenizer, truncating to `len` (special tokens included), and its pad id.
pub fn load_tokenizer(dir: &Path, len: usize, default_pad: &str) -> Result<(Tokenizer, u32)> {
    let mut tok = if dir.join("tokenizer.json").exists() {
        Tokenizer::from_file(dir.join("tokenizer.json"))
            .map_err(|e| anyhow::anyhow!("{}: {e}", dir.join("tokenizer.json").display()))?
    } else if dir.join("vocab.json").exists() && dir.join("merges.txt").exists() {
        clip_tokenizer_from_bpe(dir)?
    } else {
        bail!(
            "{}: no tokenizer.json, nor vocab.json + merges.txt",
            dir.display()
        );
    };
    tok.with_padding(None);
    tok.with_truncation(Some(tokenizers::TruncationParams {
        max_length: len,
        ..Default::default()
    }))
    .map_err(|e| anyhow::anyhow!("{}: {e}", dir.display()))?;
    let pad = special_token(dir, "pad_token")?.unwrap_or(default_pad.to_string());
    let pad_id = tok.token_to_id(&pad).with_context(|| {
        format!(
            "{}: pad token {pad:?} is not in the vocabulary",
            dir.display()
        )
    })?;
    Ok((tok, pad_id))
}

/// `CLIPTextModelWithProjection` + its tokenizer.
pub struct ClipEncoder {
    text: ClipText,
    tok: Tokenizer,
    pad: u32,
}

#[derive(Deserialize)]
struct ClipTextFile {
    #[serde(flatten)]
    text: TextConfig,
    projection_dim: usize,
}

impl ClipEncoder {
    pub fn load(model_dir: &Path, tok_dir: &Path, dtype: DType, dev: &Device) -> Result<Self> {
        let cfg: ClipTextFile = read_json(&model_dir.join("config.json"))?;
        let vb = component_weights(model_dir, dtype, dev)?;
        let text = ClipText::new(cfg.text, cfg.projection_dim, vb)
            .with_context(|| format!("loading {}", model_dir.display()))?;
        let (tok, pad) = load_tokenizer(tok_dir, CLIP_LEN, "<|endoftext|>")?;
        Ok(Self { text, tok, pad })
    }

    /// Token ids as the pipeline makes them: 77, padded, truncated.
    pub fn ids(&self, prompts: &[&str]) -> Result<Vec<Vec<u32>>> {
        ids_padded(&self.tok, prompts, CLIP_LEN, self.pad)
    }

    /// (penultimate hidden states `[n, 77, width]`, pooled `[n, projection_dim]`).
    pub fn encode(&self, prompts: &[&str]) -> Result<(Tensor, Tensor)> {
        let out = self.text.forward(&self.ids(prompts)?)?;
        let k = out.hidden_states.len();
        ensure!(k >= 2, "a CLIP text encoder without layers");
        Ok((out.hidden_states[k - 2].clone(), out.text_embeds))
    }
}

/// T5 v1.1 encoder + its tokenizer.
pub struct T5Encoder {
    model: std::sync::Mutex<candle_transformers::models::t5::T5EncoderModel>,
    tok: Tokenizer,
    pad: u32,
    len: usize,
    pub width: usize,
}

impl T5Encoder {
    pub fn load(
        model_dir: &Path,
        tok_dir: &Path,
        max_len: usize,
        dtype: DType,
        dev: &Device,
    ) -> Result<Self> {
        let cfg: candle_transformers::models::t5::Config =
            read_json(&model_dir.join("config.json"))?;
        let vb = component_weights(model_dir, dtype, dev)?;
        let width = cfg.d_model;
        let model = candle_transformers::models::t5::T5EncoderModel::load(vb, &cfg)
            .with_context(|| format!("loading {}", model_dir.display()))?;
        let (tok, pad) = load_tokenizer(tok_dir, max_len, "<pad>")?;
        Ok(Self {
            model: std::sync::Mutex::new(model),
            tok,
            pad,
            len: max_len,
            width,
        })
    }

    pub fn ids(&self, prompts: &[&str]) -> Result<Vec<Vec<u32>>> {
        ids_padded(&self.tok, prompts, self.len, self.pad)
    }

    /// The last hidden state `[n, max_len, d_model]` (no attention mask, as the pipeline calls it).
    pub fn encode(&self, prompts: &[&str], dev: &Device) -> Result<Tensor> {
        let ids = self.ids(prompts)?;
        let flat: Vec<u32> = ids.iter().flatten().copied().collect();
        let t = Tensor::from_vec(flat, (ids.len(), self.len), dev)?;
        let mut m = self
            .model
            .lock()
            .map_err(|_| anyhow::anyhow!("T5 lock poisoned"))?;
        m.clear_kv_cache();
        Ok(m.forward(&t)?)
    }
}

/// The three text encoders of an SD3 / SD3.5 pipeline folder.
pub struct Sd3TextEncoders {
    pub clip_l: ClipEncoder,
    pub clip_g: ClipEncoder,
    pub t5: Option<T5Encoder>,
    /// The transformer's `joint_attention_dim` (the width with T5 off).
    pub joint_dim: usize,
    /// T5's token count (`max_sequence_length`; also the zeros' length with T5 off).
    pub max_sequence_length: usize,
    dev: Device,
}

impl Sd3TextEncoders {
    /// From a diffusers pipeline folder; `with_t5 = false` leaves T5 unloaded (zeros, as diffusers
    /// does with `text_encoder_3 = None`).
    pub fn load(
        pipeline: &Path,
        max_sequence_length: usize,
        with_t5: bool,
        dtype: DType,
        dev: &Device,
    ) -> Result<Self> {
        let need = |sub: &str| -> Result<std::path::PathBuf> {
            let p = pipeline.join(sub);
            ensure!(
                p.is_dir(),
                "{}: no {sub}/ folder (expected a diffusers StableDiffusion3Pipeline folder)",
                pipeline.display()
            );
            Ok(p)
        };
        #[derive(Deserialize)]
        struct Tr {
            joint_attention_dim: usize,
        }
        let tr: Tr = read_json(&need("transformer")?.join("config.json"))?;
        let clip_l = ClipEncoder::load(&need("text_encoder")?, &need("tokenizer")?, dtype, dev)?;
        let clip_g =
            ClipEncoder::load(&need("text_encoder_2")?, &need("tokenizer_2")?, dtype, dev)?;
        let t5 = if with_t5 {
            Some(T5Encoder::load(
                &need("text_encoder_3")?,
                &need("tokenizer_3")?,
                max_sequence_length,
                dtype,
                dev,
            )?)
        } else {
            None
        };
        Ok(Self {
            clip_l,
            clip_g,
            t5,
            joint_dim: tr.joint_attention_dim,
            max_sequence_length,
            dev: dev.clone(),
        })
    }

    /// `(prompt_embeds [n, 77 + T, joint], pooled [n, pooled_L + pooled_G])`.
    pub fn encode(&self, prompts: &[&str]) -> Result<(Tensor, Tensor)> {
        let (hl, pl) = self.clip_l.encode(prompts)?;
        let (hg, pg) = self.clip_g.encode(prompts)?;
        let clip = Tensor::cat(&[hl, hg], 2)?;
        let t5 = match &self.t5 {
            Some(t) => t.encode(prompts, &self.dev)?.to_dtype(clip.dtype())?,
            None => Tensor::zeros(
                (prompts.len(), self.max_sequence_length, self.joint_dim),
                clip.dtype(),
                &self.dev,
            )?,
        };
        let width = t5.dim(2)?;
        let cw = clip.dim(2)?;
        ensure!(
            cw <= width,
            "CLIP contexts ({cw} wide) are wider than T5's {width}"
        );
        let clip = if cw < width {
            clip.pad_with_zeros(2, 0, width - cw)?
        } else {
            clip
        };
        Ok((Tensor::cat(&[clip, t5], 1)?, Tensor::cat(&[pl, pg], 1)?))
    }
}
