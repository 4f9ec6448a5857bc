//! Where a CLIP model's files come from: a local folder or a Hugging Face repo id (the local cache,
//! downloaded when missing unless `HF_HUB_OFFLINE=1`), and its tokenizer.

use anyhow::{bail, Context, Result};
use candle_core::{DType, Device};
use candle_nn::VarBuilder;
use std::path::{Path, PathBuf};

/// A file of a model given as a local folder or a Hugging Face repo id.
pub fn resolve_file(model: &str, file: &str) -> Result<Option<PathBuf>> {
    let local = Path::new(model);
    if local.is_dir() {
        let p = local.join(file);
        return Ok(p.exists().then_some(p));
    }
    if local.exists() || model.starts_with('.') || model.starts_with('/') {
        bail!("{model}: expected a model folder or a Hugging Face repo id like openai/clip-vit-large-patch14");
    }
    if let Some(p) = hf_hub::Cache::from_env().model(model.to_string()).get(file) {
        return Ok(Some(p));
    }
    if crate::hub::offline() {
        return Ok(None);
    }
    match crate::hub::api()?.model(model.to_string()).get(file) {
        Ok(p) => Ok(Some(p)),
        Err(e) if e.to_string().contains("404") => Ok(None),
        Err(e) => bail!(
            "{} (it is not in the Hugging Face cache either)",
            crate::hub::explain(model, file, &e)
        ),
    }
}

pub(crate) fn need_file(model: &str, file: &str) -> Result<PathBuf> {
    resolve_file(model, file)?.with_context(|| {
        format!("{model}: no {file} (a CLIP folder as transformers saves it has config.json, model.safetensors, tokenizer.json and preprocessor_config.json)")
    })
}

/// A variable builder over `model.safetensors` or else `pytorch_model.bin`.
pub fn weights(model: &str, dev: &Device) -> Result<VarBuilder<'static>> {
    if let Some(p) = resolve_file(model, "model.safetensors")? {
        // SAFETY: the file is memory-mapped read-only and not modified while mapped.
        return unsafe { VarBuilder::from_mmaped_safetensors(&[&p], DType::F32, dev) }
            .with_context(|| format!("reading {}", p.display()));
    }
    if let Some(p) = resolve_file(model, "pytorch_model.bin")? {
        return VarBuilder::from_pth(&p, DType::F32, dev)
            .with_context(|| format!("reading {}", p.display()));
    }
    bail!("{model}: neither model.safetensors nor pytorch_model.bin")
}

/// A CLIP tokenizer (`tokenizer.json`), truncating to `max_len` tokens with BOS/EOS kept.
pub fn load_tokenizer(model: &str, max_len: usize) -> Result<tokenizers::Tokenizer> {
    let p = need_file(model, "tokenizer.json")?;
    let mut tok = tokenizers::Tokenizer::from_file(&p)
        .map_err(|e| anyhow::anyhow!("{}: {e}", p.display()))?;
    tok.with_truncation(Some(tokenizers::TruncationParams {
        max_length: max_len,
        ..Default::default()
    }))
    .map_err(|e| anyhow::anyhow!("{}: {e}", p.display()))?;
    tok.with_padding(None);
    Ok(tok)
}

/// Token id rows of `prompts`, with the tokenizer's special tokens.
pub fn tokenize(tok: &tokenizers::Tokenizer, prompts: &[String]) -> Result<Vec<Vec<u32>>> {
    prompts
        .iter()
        .map(|p| {
            tok.encode(p.as_str(), true)
                .map(|e| e.get_ids().to_vec())
                .map_err(|e| anyhow::anyhow!("tokenizing {p:?}: {e}"))
        })
        .collect()
}
