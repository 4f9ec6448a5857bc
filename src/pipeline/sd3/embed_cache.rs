//! On-disk cache of prompt embeddings, so a run's text encoders (SD3.5's T5-XXL alone is 9.5 GB in
//! bf16) encode each prompt once. Entries live in `<dir>/<identity>/<hash of the prompt>.safetensors`,
//! where the identity hashes what the embeddings depend on: the encoders' weight files (path, size,
//! modification time), the T5 length, T5 on or off, and the dtype. Each entry stores its prompt, so a
//! hash collision is a miss, never a wrong embedding. Writes are atomic.

use crate::io::save_safetensors;
use anyhow::{Context, Result};
use candle_core::{Device, Tensor};
use std::collections::HashMap;
use std::path::{Path, PathBuf};

/// FNV-1a, 64 bit: stable across Rust versions and platforms (std's hashers are not promised to be).
pub fn fnv64(bytes: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in bytes {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    h
}

pub struct EmbeddingCache {
    dir: PathBuf,
}

impl EmbeddingCache {
    /// A cache under `root` for encoders identified by `identity` (any text that changes when the
    /// embeddings would).
    pub fn new(root: &Path, identity: &str) -> Result<Self> {
        let dir = root.join(format!("{:016x}", fnv64(identity.as_bytes())));
        std::fs::create_dir_all(&dir)
            .with_context(|| format!("creating the embedding cache {}", dir.display()))?;
        std::fs::write(dir.join("identity.txt"), identity)
            .with_context(|| format!("writing {}", dir.join("identity.txt").display()))?;
        Ok(Self { dir })
    }

    fn path(&self, prompt: &str) -> PathBuf {
        self.dir
            .join(format!("{:016x}.safetensors", fnv64(prompt.as_bytes())))
    }

    /// `(context [1, L, D], pooled [1, P])` of `prompt`, if cached.
    pub fn get(&self, prompt: &str, dev: &Device) -> Result<Option<(Tensor, Tensor)>> {
        let p = self.path(prompt);
        if !p.exists() {
            return Ok(None);
        }
        let bytes = std::fs::read(&p).with_context(|| format!("reading {}", p.display()))?;
        let (_, meta) = safetensors::SafeTensors::read_metadata(&bytes)
            .with_context(|| format!("{} is not a safetensors file", p.display()))?;
        let stored = meta
            .metadata()
            .as_ref()
            .and_then(|m| m.get("prompt").cloned());
        if stored.as_deref() != Some(prompt) {
            return Ok(None); // another prompt with the same hash
        }
        let mut t = candle_core::safetensors::load_buffer(&bytes, dev)
            .with_context(|| format!("reading {}", p.display()))?;
        match (t.remove("context"), t.remove("pooled")) {
            (Some(c), Some(pl)) => Ok(Some((c, pl))),
            _ => Ok(None),
        }
    }

    /// Whether `prompt` has an entry (reads only the entry's header, not its tensors).
    pub fn contains(&self, prompt: &str) -> Result<bool> {
        use std::io::Read;
        let p = self.path(prompt);
        let Ok(mut f) = std::fs::File::open(&p) else {
            return Ok(false);
        };
        let mut len = [0u8; 8];
        if f.read_exact(&mut len).is_err() {
            return Ok(false); // truncated: rewritten on the next miss
        }
        let n = u64::from_le_bytes(len);
        if n > 100_000_000 {
            return Ok(false);
        }
        let mut header = vec![0u8; n as usize];
        if f.read_exact(&mut header).is_err() {
            return Ok(false);
        }
        let v: serde_json::Value = serde_json::from_slice(&header)
            .with_context(|| format!("{}: unreadable safetensors header", p.display()))?;
        Ok(v["__metadata__"]["prompt"].as_str() == Some(prompt))
    }

    pub fn put(&self, prompt: &str, context: &Tensor, pooled: &Tensor) -> Result<()> {
        save_safetensors(
            &self.path(prompt),
            &HashMap::from([
                ("context".to_string(), context.clone()),
                ("pooled".to_string(), pooled.clone()),
            ]),
            Some(HashMap::from([("prompt".to_string(), prompt.to_string())])),
        )
    }
}

/// The identity of an SD3 pipeline's text encoders: weight files with size and modification time,
/// the T5 length, T5 on or off, and the dtype.
pub fn sd3_identity(
    pipeline: &Path,
    max_sequence_length: usize,
    with_t5: bool,
    dtype: candle_core::DType,
) -> String {
    let mut s = format!(
        "sd3 text encoders v1\nmax_sequence_length {max_sequence_length}\nt5 {with_t5}\ndtype {dtype:?}\n"
    );
    let root = pipeline
        .canonicalize()
        .unwrap_or_else(|_| pipeline.to_path_buf());
    for sub in [
        "text_encoder",
        "text_encoder_2",
        "text_encoder_3",
        "tokenizer",
        "tokenizer_2",
        "tokenizer_3",
    ] {
        let Ok(rd) = std::fs::read_dir(root.join(sub)) else {
            continue;
        };
        let mut files: Vec<_> = rd.filter_map(|e| e.ok()).collect();
        files.sort_by_key(|e| e.file_name());
        for e in files {
            if let Ok(m) = e.metadata() {
                let mtime = m
                    .modified()
                    .ok()
                    .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
                    .map(|d| d.as_secs())
                    .unwrap_or(0);
                s.push_str(&format!("{} {} {mtime}\n", e.path().display(), m.len()));
            }
        }
    }
    s
}
