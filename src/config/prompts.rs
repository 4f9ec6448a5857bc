//! `[prompts]`: the training and test prompt files and how an epoch draws its prompts.

use serde::{Deserialize, Serialize};
use std::path::PathBuf;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
#[serde(default, deny_unknown_fields)]
pub struct PromptsConfig {
    /// Training prompts: a GenEval-style `.jsonl` or a text file (one prompt a line).
    pub train: Option<PathBuf>,
    /// Evaluation prompts, same formats.
    pub test: Option<PathBuf>,
    /// How an epoch's training prompts are drawn.
    pub sampling: PromptSampling,
}

/// How `dgpo train` draws an epoch's prompts (one per group) from the training file.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum PromptSampling {
    /// Passes over the file in a fresh random order each epoch (every prompt equally likely).
    #[default]
    Uniform,
    /// Stratified by GenEval `tag`: each group's tag is taken in turn from a random order of the
    /// file's tags, then a prompt is drawn uniformly within the tag, so rare tags are trained as
    /// often as common ones (needs GenEval metadata).
    ByTag,
}
