//! Models named by Hugging Face repo id: the standard cache (`HF_HOME`, else `~/.cache/huggingface`),
//! `HF_HUB_OFFLINE=1` (cache only), a token from `HF_TOKEN` or the cache's token file (sent, never
//! logged), and messages that say what to do for a gated repo or a missing file.

use anyhow::{bail, Context, Result};
use std::path::{Path, PathBuf};

/// `HF_HUB_OFFLINE=1` (or `true`)?
pub fn offline() -> bool {
    std::env::var("HF_HUB_OFFLINE").is_ok_and(|v| v == "1" || v.eq_ignore_ascii_case("true"))
}

/// A hub client with the user's token.
pub fn api() -> Result<hf_hub::api::sync::Api> {
    let token = std::env::var("HF_TOKEN")
        .ok()
        .filter(|t| !t.is_empty())
        .or_else(|| hf_hub::Cache::from_env().token());
    hf_hub::api::sync::ApiBuilder::from_env()
        .with_progress(true)
        .with_token(token)
        .build()
        .context("setting up the Hugging Face hub client")
}

/// Does `name` look like a repo id (`org/name`) rather than a path?
pub fn is_repo_id(name: &str) -> bool {
    let parts: Vec<&str> = name.split('/').collect();
    parts.len() == 2
        && parts
            .iter()
            .all(|p| !p.is_empty() && *p != "." && *p != "..")
        && !name.starts_with('.')
        && !Path::new(name).exists()
}

/// Explain a download failure: gated / private repos need a token and accepted terms.
pub fn explain(repo: &str, file: &str, e: &hf_hub::api::sync::ApiError) -> String {
    let s = e.to_string();
    if s.contains("401") || s.contains("403") {
        format!(
            "{repo}/{file}: access denied ({s}); the repo is gated or private: accept its terms on \
             huggingface.co and set HF_TOKEN (or run `huggingface-cli login`)"
        )
    } else if s.contains("404") {
        format!("{repo}/{file}: not found on the hub ({s})")
    } else {
        format!("{repo}/{file}: download failed ({s}); with no network, set HF_HUB_OFFLINE=1 and use the cache or a local folder")
    }
}

/// The files of a diffusers SD3 pipeline dgpo reads, relative to its root, that `dir` lacks.
pub fn missing_pipeline_files(dir: &Path, with_t5: bool) -> Vec<String> {
    let mut missing = vec![];
    let mut need = |rel: String| {
        if !dir.join(&rel).exists() {
            missing.push(rel);
        }
    };
    need("model_index.json".into());
    need("scheduler/scheduler_config.json".into());
    let mut comps = vec![
        ("transformer", "diffusion_pytorch_model"),
        ("vae", "diffusion_pytorch_model"),
        ("text_encoder", "model"),
        ("text_encoder_2", "model"),
    ];
    if with_t5 {
        comps.push(("text_encoder_3", "model"));
    }
    for (c, stem) in comps {
        need(format!("{c}/config.json"));
        let single = dir.join(format!("{c}/{stem}.safetensors"));
        let index = dir.join(format!("{c}/{stem}.safetensors.index.json"));
        if index.exists() {
            let shards: Vec<String> = std::fs::read_to_string(&index)
                .ok()
                .and_then(|t| serde_json::from_str::<serde_json::Value>(&t).ok())
                .and_then(|v| {
                    v.get("weight_map")?.as_object().map(|m| {
                        m.values()
                            .filter_map(|f| f.as_str().map(String::from))
                            .collect()
                    })
                })
                .unwrap_or_default();
            for s in shards {
                need(format!("{c}/{s}"));
            }
        } else if !single.exists() {
            need(format!("{c}/{stem}.safetensors"));
        }
    }
    let toks: &[&str] = if with_t5 {
        &["tokenizer", "tokenizer_2", "tokenizer_3"]
    } else {
        &["tokenizer", "tokenizer_2"]
    };
    for t in toks {
        let json = dir.join(format!("{t}/tokenizer.json"));
        let bpe = dir.join(format!("{t}/vocab.json")).exists()
            && dir.join(format!("{t}/merges.txt")).exists();
        if !json.exists() && !bpe {
            need(format!("{t}/tokenizer.json"));
        }
    }
    missing
}

/// Which repo files a pipeline download fetches: the diffusers components' configs, safetensors
/// weights and tokenizer files (not the single-file checkpoints at the root, `.bin` duplicates or
/// other formats).
fn wanted(f: &str, with_t5: bool) -> bool {
    if f == "model_index.json" {
        return true;
    }
    let Some((dir, name)) = f.split_once('/') else {
        return false;
    };
    let comps = [
        "transformer",
        "vae",
        "scheduler",
        "text_encoder",
        "text_encoder_2",
        "tokenizer",
        "tokenizer_2",
    ];
    let t5 = ["text_encoder_3", "tokenizer_3"];
    (comps.contains(&dir) || (with_t5 && t5.contains(&dir)))
        && !name.contains('/')
        && (name.ends_with(".json")
            || name.ends_with(".txt")
            || name.ends_with(".model")
            || (name.ends_with(".safetensors") && !name.contains(".fp16.")))
}

/// A diffusers pipeline folder for `name`: a local folder as it is, or a repo id resolved through
/// the cache (complete snapshots only) or, unless offline, downloaded.
pub fn pipeline_dir(name: &str, with_t5: bool) -> Result<PathBuf> {
    let p = Path::new(name);
    if p.is_dir() {
        return Ok(p.to_path_buf());
    }
    if !is_repo_id(name) {
        bail!("{name}: no such folder (expected a diffusers pipeline folder or a repo id like stabilityai/stable-diffusion-3.5-medium)");
    }
    let cache = hf_hub::Cache::from_env();
    if let Some(index) = cache.model(name.to_string()).get("model_index.json") {
        let snap = index
            .parent()
            .context("a cache path without a parent")?
            .to_path_buf();
        let missing = missing_pipeline_files(&snap, with_t5);
        if missing.is_empty() {
            return Ok(snap);
        }
        if offline() {
            bail!(
                "{name}: the cached snapshot {} lacks {} (HF_HUB_OFFLINE=1, so nothing is downloaded): \
                 run `huggingface-cli download {name}` where there is network",
                snap.display(),
                missing.join(", ")
            );
        }
    } else if offline() {
        bail!(
            "{name} is not in the Hugging Face cache ({}) and HF_HUB_OFFLINE=1: run \
             `huggingface-cli download {name}` where there is network, or pass a local folder",
            cache.path().display()
        );
    }
    let api = api()?;
    let repo = api.model(name.to_string());
    let info = repo
        .info()
        .map_err(|e| anyhow::anyhow!(explain(name, "(repo info)", &e)))?;
    let mut root = None;
    for s in info
        .siblings
        .iter()
        .filter(|s| wanted(&s.rfilename, with_t5))
    {
        tracing::info!("{name}: fetching {}", s.rfilename);
        let path = repo
            .get(&s.rfilename)
            .map_err(|e| anyhow::anyhow!(explain(name, &s.rfilename, &e)))?;
        if s.rfilename == "model_index.json" {
            root = path.parent().map(Path::to_path_buf);
        }
    }
    let root = root.with_context(|| {
        format!("{name}: the repo has no model_index.json (not a diffusers pipeline)")
    })?;
    let missing = missing_pipeline_files(&root, with_t5);
    if !missing.is_empty() {
        bail!("{name}: the repo lacks {}", missing.join(", "));
    }
    Ok(root)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_pipeline_files_are_fetched() {
        assert!(wanted("model_index.json", true));
        assert!(wanted(
            "transformer/diffusion_pytorch_model.safetensors",
            true
        ));
        assert!(wanted(
            "text_encoder_3/model-00001-of-00002.safetensors",
            true
        ));
        assert!(!wanted(
            "text_encoder_3/model-00001-of-00002.safetensors",
            false
        ));
        assert!(wanted("tokenizer_2/merges.txt", true));
        assert!(wanted("tokenizer_3/spiece.model", true));
        assert!(!wanted("sd3.5_medium.safetensors", true));
        assert!(!wanted("text_encoders/t5xxl_fp16.safetensors", true));
        assert!(!wanted(
            "vae/diffusion_pytorch_model.fp16.safetensors",
            true
        ));
        assert!(!wanted("transformer/diffusion_pytorch_model.bin", true));
        assert!(is_repo_id("stabilityai/stable-diffusion-3.5-medium"));
        assert!(!is_repo_id("./a/b") && !is_repo_id("a/b/c") && !is_repo_id("/abs"));
    }
}
