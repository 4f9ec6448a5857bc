//! Remote rewards over HTTP, in two protocols.
//!
//! - `json`, the protocol of Flow-Factory's reward servers: `GET <url>/health`; `POST <url>/compute`
//!   with `{"prompt": [...], "image": [base64 PNG, ...], "metadata": [...]}` (we add `metadata`, GenEval
//!   needs it) answered by `{"rewards": [...]}`, optionally with further lists of one number per image,
//!   which become named sub-metrics.
//! - `flow_grpo_pickle`, the protocol of Flow-GRPO's GenEval server (`reward-server/app_geneval.py`):
//!   `POST <url>` with a pickled dict `{"images": [JPEG bytes, quality 75 as PIL saves them],
//!   "meta_datas": [...], "only_strict": false}`, answered by a pickled dict whose `scores` are the
//!   reward and whose `rewards` / `strict_rewards` become the `accuracy` / `strict_accuracy`
//!   sub-metrics (the per-tag group dicts are ignored: dgpo groups by tag itself). The reply is decoded
//!   by a pickle reader that builds plain values only and refuses anything that would import or call.
//!
//! A call is split into requests of `batch_size` images, at most `max_concurrency` in flight. A reply
//! of the wrong length, a non-finite value or a malformed body is an error, never a zero. Transport
//! failures and HTTP errors are retried with doubling back-off up to `retries` times; then the error
//! names the server, the attempts and the last failure.

use crate::config::RewardConfig;
use crate::geneval::Metadata;
use crate::image::Image;
use crate::reward::module::{Reward, RewardOutput};
use anyhow::{bail, Context, Result};
use base64::Engine;
use serde_pickle::{HashableValue, Value as Pickle};
use std::collections::BTreeMap;
use std::io::Read;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::Duration;

/// Wire protocol of a reward server.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Protocol {
    Json,
    FlowGrpoPickle,
}

/// A reward computed by a server.
pub struct RemoteReward {
    pub url: String,
    pub timeout: Duration,
    pub retries: u32,
    /// First back-off delay (doubles each retry).
    pub backoff: Duration,
    pub protocol: Protocol,
    /// Images per request (0: one request per call).
    pub batch_size: usize,
    /// Requests in flight at once.
    pub max_concurrency: usize,
}

impl RemoteReward {
    /// A JSON-protocol server, whole calls per request, 1 s first back-off.
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
            protocol: Protocol::Json,
            batch_size: 0,
            max_concurrency: 4,
        })
    }

    /// From a `[[reward]] kind = "remote"` table.
    pub fn from_config(r: &RewardConfig) -> Result<Self> {
        let url = r
            .url
            .as_deref()
            .context("kind = \"remote\" needs url = \"http://host:port\"")?;
        let mut me = Self::new(url, r.timeout_s, r.retries)?;
        me.backoff = Duration::from_secs_f64(r.backoff_s);
        me.protocol = match r.protocol.as_str() {
            "json" => Protocol::Json,
            "flow_grpo_pickle" => Protocol::FlowGrpoPickle,
            p => bail!("protocol = {p:?}: expected \"json\" or \"flow_grpo_pickle\""),
        };
        me.batch_size = r.batch_size;
        me.max_concurrency = r.max_concurrency.max(1);
        Ok(me)
    }

    fn agent(&self) -> ureq::Agent {
        ureq::AgentBuilder::new().timeout(self.timeout).build()
    }

    /// Where scoring requests go.
    pub fn endpoint(&self) -> String {
        match self.protocol {
            Protocol::Json => format!("{}/compute", self.url),
            Protocol::FlowGrpoPickle => self.url.clone(),
        }
    }

    /// Is the server there? JSON: `GET <url>/health` answers 200. Pickle (Flow-GRPO's server has no
    /// health route): `GET <url>` gets any HTTP answer (its Flask app says 405).
    pub fn health(&self) -> Result<()> {
        match self.protocol {
            Protocol::Json => {
                let url = format!("{}/health", self.url);
                match self.agent().get(&url).call() {
                    Ok(_) => Ok(()),
                    Err(ureq::Error::Status(code, _)) => bail!(
                        "reward server {url} answered HTTP {code} to the health check (expected 200; is \
                         it a server of the JSON protocol? set protocol = \"flow_grpo_pickle\" for \
                         Flow-GRPO's GenEval server)"
                    ),
                    Err(e) => bail!("reward server {} is not reachable: {e}", self.url),
                }
            }
            Protocol::FlowGrpoPickle => match self.agent().get(&self.url).call() {
                Ok(_) | Err(ureq::Error::Status(..)) => Ok(()),
                Err(e) => bail!("reward server {} is not reachable: {e}", self.url),
            },
        }
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
            format!(
                "reward server {url}: the reply is not JSON: {}",
                quoted(text, 200)
            )
        })?;
        let obj = v
            .as_object()
            .with_context(|| format!("reward server {url}: the reply is not a JSON object"))?;
        let list = |key: &str, val: &serde_json::Value| -> Result<Vec<f32>> {
            let arr = val
                .as_array()
                .with_context(|| format!("reward server {url}: {key:?} is not a list"))?;
            per_image(url, key, n, arr, |x| x.as_f64(), |x| x.to_string())
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

    /// The pickled body of a Flow-GRPO GenEval request: JPEG bytes (quality 75, PIL's default),
    /// metadata dicts, `only_strict = false`.
    pub fn pickle_request(images: &[Image], metadata: &[Option<Metadata>]) -> Result<Vec<u8>> {
        let jpegs = images
            .iter()
            .map(|im| Ok(Pickle::Bytes(crate::reward::jpeg::jpeg_bytes(im, 75)?)))
            .collect::<Result<Vec<_>>>()?;
        let metas = metadata
            .iter()
            .enumerate()
            .map(|(i, m)| {
                let m = m.as_ref().with_context(|| {
                    format!(
                        "protocol flow_grpo_pickle needs GenEval metadata for every prompt; image {i} \
                         has none (use a .jsonl prompt file)"
                    )
                })?;
                Ok(json_to_pickle(&serde_json::to_value(m)?))
            })
            .collect::<Result<Vec<_>>>()?;
        let dict = BTreeMap::from([
            (HashableValue::String("images".into()), Pickle::List(jpegs)),
            (
                HashableValue::String("meta_datas".into()),
                Pickle::List(metas),
            ),
            (
                HashableValue::String("only_strict".into()),
                Pickle::Bool(false),
            ),
        ]);
        Ok(serde_pickle::value_to_vec(
            &Pickle::Dict(dict),
            serde_pickle::SerOptions::new(),
        )?)
    }

    /// Parse a Flow-GRPO GenEval reply for `n` images.
    pub fn parse_pickle_reply(bytes: &[u8], n: usize, url: &str) -> Result<RewardOutput> {
        let v =
            serde_pickle::value_from_slice(bytes, serde_pickle::DeOptions::new()).map_err(|e| {
                // Show the start of a text reply (an HTML error page, say); not of binary pickles.
                let text = match bytes.first() {
                    Some(0x80) | None => String::new(),
                    _ => format!(": {}", quoted(&String::from_utf8_lossy(bytes), 200)),
                };
                anyhow::anyhow!(
                    "reward server {url}: the reply is not a plain pickled dict ({e}){text}"
                )
            })?;
        let Pickle::Dict(d) = v else {
            bail!("reward server {url}: the reply is not a pickled dict");
        };
        let get = |key: &str| d.get(&HashableValue::String(key.into()));
        let list = |key: &str, val: &Pickle| -> Result<Vec<f32>> {
            let (Pickle::List(arr) | Pickle::Tuple(arr)) = val else {
                bail!("reward server {url}: {key:?} is not a list");
            };
            per_image(
                url,
                key,
                n,
                arr,
                |x| match x {
                    Pickle::F64(f) => Some(*f),
                    Pickle::I64(k) => Some(*k as f64),
                    Pickle::Bool(b) => Some(*b as u8 as f64),
                    _ => None,
                },
                |x| format!("{x:?}"),
            )
        };
        let scores = get("scores")
            .with_context(|| format!("reward server {url}: the reply has no \"scores\" list"))?;
        let mut out = RewardOutput {
            scores: list("scores", scores)?,
            ..Default::default()
        };
        for (key, name) in [
            ("rewards", "accuracy"),
            ("strict_rewards", "strict_accuracy"),
        ] {
            if let Some(v) = get(key) {
                out.sub.insert(name.into(), list(key, v)?);
            }
        }
        Ok(out)
    }

    /// POST `body` with retries and back-off; the reply's bytes.
    fn post(&self, body: &[u8], content_type: &str) -> Result<Vec<u8>> {
        let url = self.endpoint();
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
                .set("Content-Type", content_type)
                .send_bytes(body)
            {
                Ok(resp) => {
                    let mut buf = vec![];
                    match resp.into_reader().read_to_end(&mut buf) {
                        Ok(_) => return Ok(buf),
                        Err(e) => last = format!("reading the reply: {e}"),
                    }
                }
                Err(ureq::Error::Status(code, resp)) => {
                    let text = resp.into_string().unwrap_or_default();
                    last = format!("HTTP {code}: {}", quoted(&text, 300));
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

    /// One request.
    fn score_chunk(
        &self,
        images: &[Image],
        prompts: &[String],
        metadata: &[Option<Metadata>],
    ) -> Result<RewardOutput> {
        let url = self.endpoint();
        match self.protocol {
            Protocol::Json => {
                let body = Self::request_body(images, prompts, metadata)?;
                let reply = self.post(body.as_bytes(), "application/json")?;
                let text = String::from_utf8(reply)
                    .map_err(|_| anyhow::anyhow!("reward server {url}: the reply is not UTF-8"))?;
                Self::parse_reply(&text, images.len(), &url)
            }
            Protocol::FlowGrpoPickle => {
                let body = Self::pickle_request(images, metadata)?;
                let reply = self.post(&body, "application/octet-stream")?;
                Self::parse_pickle_reply(&reply, images.len(), &url)
            }
        }
    }
}

/// One finite number per image from a reply's list `key`: a wrong length or a value that is not a
/// finite number is an error naming the server, the key and the index.
fn per_image<T>(
    url: &str,
    key: &str,
    n: usize,
    arr: &[T],
    number: impl Fn(&T) -> Option<f64>,
    show: impl Fn(&T) -> String,
) -> Result<Vec<f32>> {
    if arr.len() != n {
        bail!(
            "reward server {url}: {key:?} has {} values for {n} images",
            arr.len()
        );
    }
    arr.iter()
        .enumerate()
        .map(|(i, x)| match number(x) {
            Some(f) if f.is_finite() => Ok(f as f32),
            _ => bail!(
                "reward server {url}: {key}[{i}] = {} is not a finite number",
                show(x)
            ),
        })
        .collect()
}

/// A JSON value as the same pickled Python value.
fn json_to_pickle(v: &serde_json::Value) -> Pickle {
    use serde_json::Value as J;
    match v {
        J::Null => Pickle::None,
        J::Bool(b) => Pickle::Bool(*b),
        J::Number(x) => match x.as_i64() {
            Some(k) => Pickle::I64(k),
            None => Pickle::F64(x.as_f64().unwrap_or(f64::NAN)),
        },
        J::String(t) => Pickle::String(t.clone()),
        J::Array(a) => Pickle::List(a.iter().map(json_to_pickle).collect()),
        J::Object(o) => Pickle::Dict(
            o.iter()
                .map(|(k, v)| (HashableValue::String(k.clone()), json_to_pickle(v)))
                .collect(),
        ),
    }
}

/// Outputs of consecutive chunks as one; a sub-metric is kept when every chunk has it.
fn concat(parts: Vec<RewardOutput>) -> RewardOutput {
    let mut out = RewardOutput::default();
    let keep: Vec<String> = parts
        .first()
        .map(|p| {
            p.sub
                .keys()
                .filter(|k| parts.iter().all(|q| q.sub.contains_key(*k)))
                .cloned()
                .collect()
        })
        .unwrap_or_default();
    for p in parts {
        out.scores.extend(p.scores);
        for k in &keep {
            out.sub.entry(k.clone()).or_default().extend(&p.sub[k]);
        }
    }
    out
}

impl Reward for RemoteReward {
    fn name(&self) -> &str {
        "remote"
    }

    fn check(&self) -> Result<()> {
        self.health()
    }

    fn score(
        &self,
        images: &[Image],
        prompts: &[String],
        metadata: &[Option<Metadata>],
    ) -> Result<RewardOutput> {
        let n = images.len();
        let size = if self.batch_size == 0 {
            n.max(1)
        } else {
            self.batch_size
        };
        let ranges: Vec<std::ops::Range<usize>> =
            (0..n).step_by(size).map(|a| a..(a + size).min(n)).collect();
        if ranges.len() <= 1 {
            return self.score_chunk(images, prompts, metadata);
        }
        let results: Mutex<Vec<Option<Result<RewardOutput>>>> =
            Mutex::new((0..ranges.len()).map(|_| None).collect());
        let next = AtomicUsize::new(0);
        std::thread::scope(|sc| {
            for _ in 0..self.max_concurrency.min(ranges.len()) {
                sc.spawn(|| loop {
                    let k = next.fetch_add(1, Ordering::SeqCst);
                    let Some(r) = ranges.get(k) else { break };
                    let o = self.score_chunk(
                        &images[r.clone()],
                        &prompts[r.clone()],
                        &metadata[r.clone()],
                    );
                    let failed = o.is_err();
                    results.lock().unwrap()[k] = Some(o);
                    if failed {
                        // No new requests after a failure: the call fails anyway.
                        next.store(ranges.len(), Ordering::SeqCst);
                    }
                });
            }
        });
        let mut parts = vec![];
        for (k, r) in results.into_inner().unwrap().into_iter().enumerate() {
            match r {
                Some(Ok(o)) => parts.push(o),
                Some(Err(e)) => {
                    return Err(e.context(format!(
                        "images {}..{} of {n}",
                        ranges[k].start, ranges[k].end
                    )))
                }
                None => {}
            }
        }
        Ok(concat(parts))
    }
}
/// A server's bytes as they may appear in a message: control characters and non-ASCII escaped (a
/// log stays text), cut after `max` characters.
pub fn quoted(text: &str, max: usize) -> String {
    let mut out: String = text
        .chars()
        .take(max)
        .flat_map(char::escape_default)
        .collect();
    if text.chars().nth(max).is_some() {
        out.push('…');
    }
    format!("\"{out}\"")
}
