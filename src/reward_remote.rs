//! Remote rewards over HTTP, in the JSON protocol of Flow-Factory's reward servers: `GET <url>/health`;
//! `POST <url>/compute` with `{"prompt": [...], "image": [base64 PNG, ...], "metadata": [...]}` (we add
//! `metadata`, GenEval needs it) answered by `{"rewards": [...]}`, optionally with further lists of one
//! number per image, which become named sub-metrics. A reply of the wrong length, a non-finite value or
//! a malformed body is an error, never a zero. Transport failures and HTTP errors are retried with
//! doubling back-off (1 s, 2 s, …) up to `retries` times; then the error names the server, the
//! attempts and the last failure.

use crate::geneval::Metadata;
use crate::reward::{Reward, RewardOutput};
use crate::shapes::Image;
use anyhow::{bail, Context, Result};
use base64::Engine;
use std::time::Duration;

/// A reward computed by a server.
pub struct RemoteReward {
    pub url: String,
    pub timeout: Duration,
    pub retries: u32,
    /// First back-off delay (doubles each retry).
    pub backoff: Duration,
}

impl RemoteReward {
    pub fn new(url: &str, timeout_s: f64, retries: u32) -> Result<Self> {
        if !(url.starts_with("http://") || url.starts_with("https://")) {
            bail!("reward url {url:?}: expected http://host:port or https://…");
        }
        if !(timeout_s > 0.0 && timeout_s.is_finite()) {
            bail!("reward timeout_s = {timeout_s} must be a positive number of seconds");
        }
        Ok(Self {
            url: url.trim_end_matches('/').to_string(),
            timeout: Duration::from_secs_f64(timeout_s),
            retries,
            backoff: Duration::from_secs(1),
        })
    }

    fn agent(&self) -> ureq::Agent {
        ureq::AgentBuilder::new().timeout(self.timeout).build()
    }

    /// `GET <url>/health`: Ok when the server answers 200.
    pub fn health(&self) -> Result<()> {
        let url = format!("{}/health", self.url);
        self.agent()
            .get(&url)
            .call()
            .map(|_| ())
            .map_err(|e| anyhow::anyhow!("reward server {url}: {e}"))
    }

    /// The JSON body of a `/compute` request.
    pub fn request_body(
        images: &[Image],
        prompts: &[String],
        metadata: &[Option<Metadata>],
    ) -> Result<String> {
        let b64 = base64::engine::general_purpose::STANDARD;
        let imgs = images
            .iter()
            .map(|im| Ok(b64.encode(im.png_bytes()?)))
            .collect::<Result<Vec<_>>>()?;
        let body = serde_json::json!({
            "prompt": prompts,
            "image": imgs,
            "metadata": metadata,
        });
        Ok(body.to_string())
    }

    /// Parse a `/compute` reply for `n` images.
    pub fn parse_reply(text: &str, n: usize, url: &str) -> Result<RewardOutput> {
        let v: serde_json::Value = serde_json::from_str(text).with_context(|| {
            format!("reward server {url}: the reply is not JSON: {:.200}", text)
        })?;
        let obj = v
            .as_object()
            .with_context(|| format!("reward server {url}: the reply is not a JSON object"))?;
        let list = |key: &str, val: &serde_json::Value| -> Result<Vec<f32>> {
            let arr = val
                .as_array()
                .with_context(|| format!("reward server {url}: {key:?} is not a list"))?;
            if arr.len() != n {
                bail!(
                    "reward server {url}: {key:?} has {} values for {n} images",
                    arr.len()
                );
            }
            arr.iter()
                .enumerate()
                .map(|(i, x)| match x.as_f64() {
                    Some(f) if f.is_finite() => Ok(f as f32),
                    _ => bail!("reward server {url}: {key}[{i}] = {x} is not a finite number"),
                })
                .collect()
        };
        let rewards = obj
            .get("rewards")
            .with_context(|| format!("reward server {url}: the reply has no \"rewards\" list"))?;
        let mut out = RewardOutput {
            scores: list("rewards", rewards)?,
            ..Default::default()
        };
        for (k, val) in obj {
            if k != "rewards" && val.as_array().is_some_and(|a| a.len() == n) {
                if let Ok(v) = list(k, val) {
                    out.sub.insert(k.clone(), v);
                }
            }
        }
        Ok(out)
    }
}

impl Reward for RemoteReward {
    fn name(&self) -> &str {
        "remote"
    }

    fn score(
        &self,
        images: &[Image],
        prompts: &[String],
        metadata: &[Option<Metadata>],
    ) -> Result<RewardOutput> {
        let body = Self::request_body(images, prompts, metadata)?;
        let url = format!("{}/compute", self.url);
        let agent = self.agent();
        let mut delay = self.backoff;
        let mut last = String::new();
        for attempt in 0..=self.retries {
            if attempt > 0 {
                tracing::warn!(
                    "reward server {url}: {last}; retry {attempt}/{} in {:.1} s",
                    self.retries,
                    delay.as_secs_f64()
                );
                std::thread::sleep(delay);
                delay *= 2;
            }
            match agent
                .post(&url)
                .set("Content-Type", "application/json")
                .send_string(&body)
            {
                Ok(resp) => {
                    let text = resp
                        .into_string()
                        .with_context(|| format!("reward server {url}: reading the reply"))?;
                    return Self::parse_reply(&text, images.len(), &url);
                }
                Err(ureq::Error::Status(code, resp)) => {
                    let text = resp.into_string().unwrap_or_default();
                    last = format!("HTTP {code}: {:.200}", text);
                }
                Err(e) => last = e.to_string(),
            }
        }
        bail!(
            "reward server {url} failed {} times (timeout {:.0} s); last error: {last}",
            self.retries + 1,
            self.timeout.as_secs_f64()
        )
    }
}
