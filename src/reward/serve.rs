//! `dgpo reward-server`: dgpo's in-process rewards served over the JSON protocol that
//! [`crate::reward::remote`] speaks (`GET /health`, `POST /compute`), so a trainer on another machine,
//! or another framework, can score with them; and the loopback server of the remote-reward tests.
//!
//! A `/compute` body is `{"prompt": [...], "image": [base64 PNG, ...], "metadata": [... or null]}`;
//! the reply is `{"rewards": [weighted total per image], "<module>": [...], "<module>/<sub>": [...]}`.
//! Malformed requests get HTTP 400 with a message naming the field; scoring errors get 500.

use crate::geneval::Metadata;
use crate::image::Image;
use crate::reward::Rewards;
use anyhow::{bail, Context, Result};
use base64::Engine;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;

/// Server settings.
#[derive(Debug, Clone)]
pub struct ServeOptions {
    /// Worker threads answering requests.
    pub threads: usize,
    /// Close the listening socket after this many `/compute` requests (tests: a server that dies
    /// mid-run).
    pub max_requests: Option<usize>,
}

impl Default for ServeOptions {
    fn default() -> Self {
        Self {
            threads: 2,
            max_requests: None,
        }
    }
}

/// A running reward server.
pub struct RewardServer {
    url: String,
    server: Arc<tiny_http::Server>,
    workers: Vec<JoinHandle<()>>,
    served: Arc<AtomicUsize>,
}

impl RewardServer {
    /// Listen on `addr` (`host:port`; port 0 picks a free one) and serve `rewards`.
    pub fn start(addr: &str, rewards: Rewards, opts: ServeOptions) -> Result<Self> {
        let server = tiny_http::Server::http(addr)
            .map_err(|e| anyhow::anyhow!("reward server: cannot listen on {addr}: {e}"))?;
        let url = match server.server_addr() {
            tiny_http::ListenAddr::IP(a) => format!("http://{a}"),
            #[allow(unreachable_patterns)]
            _ => bail!("reward server: {addr} is not an IP address"),
        };
        let server = Arc::new(server);
        let rewards = Arc::new(rewards);
        let served = Arc::new(AtomicUsize::new(0));
        let threads = opts.threads.max(1);
        let workers = (0..threads)
            .map(|_| {
                let (server, rewards, served) = (server.clone(), rewards.clone(), served.clone());
                let max = opts.max_requests;
                std::thread::spawn(move || {
                    while let Ok(req) = server.recv() {
                        // Counted before the reply goes out, so that a client holding its
                        // answer always sees it counted (counting after raced with the client).
                        let n = (req.url() == "/compute")
                            .then(|| served.fetch_add(1, Ordering::SeqCst) + 1);
                        handle(req, &rewards);
                        if let Some(n) = n {
                            if max.is_some_and(|m| n >= m) {
                                for _ in 0..threads {
                                    server.unblock();
                                }
                                break;
                            }
                        }
                    }
                })
            })
            .collect();
        Ok(Self {
            url,
            server,
            workers,
            served,
        })
    }

    /// `http://host:port`.
    pub fn url(&self) -> &str {
        &self.url
    }

    /// `/compute` requests taken so far (each counted before its answer is sent).
    pub fn served(&self) -> usize {
        self.served.load(Ordering::SeqCst)
    }

    /// Serve until the workers stop (forever, unless `max_requests` was set).
    pub fn wait(self) {
        for w in self.workers {
            let _ = w.join();
        }
    }

    /// Stop answering and close the socket.
    pub fn stop(self) {
        for _ in 0..self.workers.len() {
            self.server.unblock();
        }
        for w in self.workers {
            let _ = w.join();
        }
    }
}

fn reply(req: tiny_http::Request, code: u16, body: String) {
    let header =
        tiny_http::Header::from_bytes("Content-Type", "application/json").expect("a valid header");
    let resp = tiny_http::Response::from_string(body)
        .with_status_code(code)
        .with_header(header);
    if let Err(e) = req.respond(resp) {
        tracing::warn!("reward server: writing a reply: {e}");
    }
}

fn error(req: tiny_http::Request, code: u16, msg: String) {
    tracing::warn!("reward server: {code}: {msg}");
    reply(req, code, serde_json::json!({ "error": msg }).to_string());
}

fn handle(mut req: tiny_http::Request, rewards: &Rewards) {
    match (req.method(), req.url()) {
        (tiny_http::Method::Get, "/health") => {
            reply(req, 200, r#"{"status": "ok"}"#.into());
        }
        (tiny_http::Method::Post, "/compute") => {
            let mut body = String::new();
            if let Err(e) = req.as_reader().read_to_string(&mut body) {
                return error(req, 400, format!("reading the body: {e}"));
            }
            let parsed = match parse_request(&body) {
                Ok(p) => p,
                Err(e) => return error(req, 400, format!("{e:#}")),
            };
            let (images, prompts, metas) = parsed;
            let t = std::time::Instant::now();
            match rewards.score(&images, &prompts, &metas) {
                Ok((total, named)) => {
                    let mut out = serde_json::json!({ "rewards": total });
                    for (k, v) in named {
                        out[k] = serde_json::json!(v);
                    }
                    tracing::info!(
                        images = images.len(),
                        ms = t.elapsed().as_millis() as u64,
                        "reward server: scored"
                    );
                    reply(req, 200, out.to_string());
                }
                Err(e) => error(req, 500, format!("scoring: {e:#}")),
            }
        }
        (m, u) => {
            let msg =
                format!("no route {m} {u}: this server answers GET /health and POST /compute");
            error(req, 404, msg)
        }
    }
}

/// The images, prompts and metadata of a request.
pub type Batch = (Vec<Image>, Vec<String>, Vec<Option<Metadata>>);

/// The images, prompts and metadata of a `/compute` body.
pub fn parse_request(body: &str) -> Result<Batch> {
    let v: serde_json::Value = serde_json::from_str(body).context("the body is not JSON")?;
    let prompts: Vec<String> = serde_json::from_value(
        v.get("prompt")
            .cloned()
            .context("the body has no \"prompt\" list")?,
    )
    .context("\"prompt\" must be a list of strings")?;
    let imgs: Vec<String> = serde_json::from_value(
        v.get("image")
            .cloned()
            .context("the body has no \"image\" list")?,
    )
    .context("\"image\" must be a list of base64 strings")?;
    if imgs.len() != prompts.len() {
        bail!(
            "{} images for {} prompts: one prompt per image expected",
            imgs.len(),
            prompts.len()
        );
    }
    let metas: Vec<Option<Metadata>> = match v.get("metadata") {
        None | Some(serde_json::Value::Null) => vec![None; prompts.len()],
        Some(m) => serde_json::from_value(m.clone())
            .context("\"metadata\" must be a list of GenEval metadata objects or nulls")?,
    };
    if metas.len() != prompts.len() {
        bail!(
            "{} metadata entries for {} prompts",
            metas.len(),
            prompts.len()
        );
    }
    let b64 = base64::engine::general_purpose::STANDARD;
    let images = imgs
        .iter()
        .enumerate()
        .map(|(i, s)| {
            let bytes = b64
                .decode(s)
                .with_context(|| format!("image[{i}] is not base64"))?;
            Image::from_png_bytes(&bytes).with_context(|| format!("image[{i}] is not a PNG"))
        })
        .collect::<Result<Vec<_>>>()?;
    Ok((images, prompts, metas))
}
