//! `[[reward]]`: one table per reward module — its kind and weight, and the settings of remote and
//! CLIP-family rewards. Which kinds exist is the reward module's table.

use super::problems::Problems;
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RewardConfig {
    /// Reward module name (see the README's reward table).
    pub kind: String,
    #[serde(default = "one")]
    pub weight: f64,
    /// Server address for remote rewards (`kind = "remote"`: the JSON protocol of Flow-Factory's
    /// reward servers, `POST <url>/compute`).
    #[serde(default)]
    pub url: Option<String>,
    /// Remote rewards: seconds before a request is abandoned (and retried).
    #[serde(default = "default_timeout")]
    pub timeout_s: f64,
    /// Remote rewards: further attempts after a failed request, with doubling back-off.
    #[serde(default = "default_retries")]
    pub retries: u32,
    /// Remote rewards: seconds before the first retry (doubling each time).
    #[serde(default = "one")]
    pub backoff_s: f64,
    /// Remote rewards: `json` (Flow-Factory's `POST <url>/compute`) or `flow_grpo_pickle` (the
    /// pickle-over-HTTP protocol of Flow-GRPO's GenEval server, `POST <url>` with JPEG bytes).
    #[serde(default = "default_protocol")]
    pub protocol: String,
    /// Remote rewards: images per request (0: all images of a call in one request).
    #[serde(default)]
    pub batch_size: usize,
    /// Remote rewards: requests in flight at once.
    #[serde(default = "default_concurrency")]
    pub max_concurrency: usize,
    /// CLIP-family rewards: the CLIP model (a local folder or a Hugging Face repo id; default per kind).
    #[serde(default)]
    pub model: Option<String>,
    /// CLIP-family rewards: where the tokenizer and `preprocessor_config.json` come from (default per
    /// kind: the model itself, or the CLIP-H processor for pickscore).
    #[serde(default)]
    pub processor: Option<String>,
    /// `aesthetic`: the LAION head (`sac+logos+ava1-l14-linearMSE.pth` or a .safetensors of it).
    #[serde(default)]
    pub head: Option<String>,
}

impl Default for RewardConfig {
    fn default() -> Self {
        Self {
            kind: "shapes_geneval".into(),
            weight: 1.0,
            url: None,
            timeout_s: default_timeout(),
            retries: default_retries(),
            backoff_s: 1.0,
            protocol: default_protocol(),
            batch_size: 0,
            max_concurrency: default_concurrency(),
            model: None,
            processor: None,
            head: None,
        }
    }
}

fn default_protocol() -> String {
    "json".into()
}

fn default_concurrency() -> usize {
    4
}

fn default_timeout() -> f64 {
    120.0
}

fn default_retries() -> u32 {
    3
}

fn one() -> f64 {
    1.0
}

impl RewardConfig {
    /// The checks of table `i`.
    pub(super) fn check(&self, i: usize, p: &mut Problems) {
        p.need(
            self.weight.is_finite(),
            format!(
                "reward[{i}] ({}) has weight {} (must be finite)",
                self.kind, self.weight
            ),
        );
        p.need(!self.kind.is_empty(), format!("reward[{i}].kind is empty"));
        p.need(
            ["json", "flow_grpo_pickle"].contains(&self.protocol.as_str()),
            format!(
                "reward[{i}].protocol = {:?}: expected \"json\" or \"flow_grpo_pickle\"",
                self.protocol
            ),
        );
        p.need(
            self.max_concurrency >= 1,
            format!("reward[{i}].max_concurrency must be at least 1"),
        );
        p.need(
            self.backoff_s >= 0.0 && self.backoff_s.is_finite(),
            format!(
                "reward[{i}].backoff_s = {} must be a non-negative number of seconds",
                self.backoff_s
            ),
        );
    }
}
