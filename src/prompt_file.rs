//! Prompt files: GenEval-style `.jsonl` metadata (one prompt and its metadata per line) or plain text
//! (one prompt per line). Read by training, evaluation and `dgpo sample`.

use crate::geneval::{read_metadata, Metadata};
use anyhow::{bail, Context, Result};
use std::path::Path;

/// One prompt with its metadata when the prompt file carried it.
#[derive(Debug, Clone)]
pub struct PromptItem {
    pub prompt: String,
    pub meta: Option<Metadata>,
}

/// Read a prompt file: `.jsonl` as GenEval metadata (a broken line is an error naming the line),
/// anything else as plain text with one prompt per non-empty line.
pub fn read_prompt_file(path: &Path) -> Result<Vec<PromptItem>> {
    let is_jsonl = path
        .extension()
        .is_some_and(|e| e.eq_ignore_ascii_case("jsonl"));
    let items: Vec<PromptItem> = if is_jsonl {
        read_metadata(path)?
            .into_iter()
            .map(|m| PromptItem {
                prompt: m.prompt.clone(),
                meta: Some(m),
            })
            .collect()
    } else {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("reading prompt file {}", path.display()))?;
        text.lines()
            .map(str::trim)
            .filter(|l| !l.is_empty())
            .map(|l| PromptItem {
                prompt: l.to_string(),
                meta: None,
            })
            .collect()
    };
    if items.is_empty() {
        bail!("prompt file {} holds no prompts", path.display());
    }
    Ok(items)
}
