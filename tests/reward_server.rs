//! Remote rewards against real HTTP servers on the loopback interface: the request carries prompts,
//! base64 PNGs and metadata; replies of the wrong length or with non-numbers are errors; HTTP errors
//! are retried with back-off; a dead server fails with a message naming it.

use base64::Engine;
use dgpo::config::RewardConfig;
use dgpo::geneval::Metadata;
use dgpo::image::Image;
use dgpo::reward::remote::RemoteReward;
use dgpo::reward::{Reward, Rewards};
use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpListener;
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// A one-thread HTTP/1.1 server answering the given (status, body) replies in order, one per
/// connection; returns its base URL and the request bodies it received.
fn serve(replies: Vec<(u16, Vec<u8>)>) -> (String, Arc<Mutex<Vec<Vec<u8>>>>) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let seen = Arc::new(Mutex::new(vec![]));
    let log = seen.clone();
    std::thread::spawn(move || {
        for (status, body) in replies {
            let (mut stream, _) = listener.accept().unwrap();
            let mut reader = BufReader::new(stream.try_clone().unwrap());
            let mut len = 0usize;
            loop {
                let mut line = String::new();
                reader.read_line(&mut line).unwrap();
                if line == "\r\n" || line.is_empty() {
                    break;
                }
                let l = line.to_ascii_lowercase();
                if let Some(v) = l.strip_prefix("content-length:") {
                    len = v.trim().parse().unwrap();
                }
            }
            let mut buf = vec![0u8; len];
            reader.read_exact(&mut buf).unwrap();
            log.lock().unwrap().push(buf);
            let head = format!(
                "HTTP/1.1 {status} X\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
                body.len()
            );
            stream.write_all(head.as_bytes()).unwrap();
            stream.write_all(&body).unwrap();
        }
    });
    (url, seen)
}

fn inputs() -> (Vec<Image>, Vec<String>, Vec<Option<Metadata>>) {
    let meta = dgpo::testbed::prompts::colors("circle", "red");
    (
        vec![
            Image::new(32, 32, [10, 20, 30]),
            Image::new(32, 32, [200, 0, 0]),
        ],
        vec![meta.prompt.clone(), meta.prompt.clone()],
        vec![Some(meta.clone()), None],
    )
}

fn remote(url: &str, retries: u32) -> RemoteReward {
    let mut r = RemoteReward::new(url, 5.0, retries).unwrap();
    r.backoff = Duration::from_millis(10);
    r
}

#[test]
fn the_request_carries_everything_and_the_reply_becomes_scores_and_sub_metrics() {
    let (url, seen) = serve(vec![(
        200,
        r#"{"rewards": [0.5, 0.25], "strict": [1, 0], "note": "ok"}"#.into(),
    )]);
    let (im, p, m) = inputs();
    let out = remote(&url, 0).score(&im, &p, &m).unwrap();
    assert_eq!(out.scores, vec![0.5, 0.25]);
    assert_eq!(out.sub["strict"], vec![1.0, 0.0]);
    assert!(!out.sub.contains_key("note"));
    let req: serde_json::Value = serde_json::from_slice(&seen.lock().unwrap()[0]).unwrap();
    assert_eq!(req["prompt"][1], "a photo of a red circle");
    assert_eq!(req["metadata"][0]["tag"], "colors");
    assert!(req["metadata"][1].is_null());
    let png = base64::engine::general_purpose::STANDARD
        .decode(req["image"][1].as_str().unwrap())
        .unwrap();
    assert_eq!(&png[1..4], b"PNG");
    assert_eq!(png, im[1].png_bytes().unwrap());
}

#[test]
fn http_errors_are_retried_then_succeed() {
    let (url, seen) = serve(vec![
        (503, "busy".into()),
        (500, "oops".into()),
        (200, r#"{"rewards": [1, 2]}"#.into()),
    ]);
    let (im, p, m) = inputs();
    let out = remote(&url, 2).score(&im, &p, &m).unwrap();
    assert_eq!(out.scores, vec![1.0, 2.0]);
    assert_eq!(seen.lock().unwrap().len(), 3);
}

#[test]
fn bad_replies_are_errors_not_zeros() {
    let (im, p, m) = inputs();
    for (body, want) in [
        (r#"{"rewards": [1]}"#, "has 1 values for 2 images"),
        (
            r#"{"rewards": [1, null]}"#,
            "rewards[1] = null is not a finite number",
        ),
        (r#"{"scores": [1, 2]}"#, "no \"rewards\" list"),
        ("<html>", "not JSON"),
    ] {
        let (url, _) = serve(vec![(200, body.into())]);
        let e = format!("{:#}", remote(&url, 3).score(&im, &p, &m).unwrap_err());
        assert!(e.contains(want) && e.contains(&url), "{body}: {e}");
    }
}

#[test]
fn a_dead_server_fails_after_the_retries_naming_it() {
    let url = {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        format!("http://{}", l.local_addr().unwrap())
    };
    let (im, p, m) = inputs();
    let e = format!("{:#}", remote(&url, 1).score(&im, &p, &m).unwrap_err());
    assert!(e.contains(&url) && e.contains("failed 2 times"), "{e}");
    // configuration errors are caught when the rewards are built
    let bad = [RewardConfig {
        kind: "remote".into(),
        ..Default::default()
    }];
    let e = format!("{:#}", Rewards::from_config(&bad).err().unwrap());
    assert!(e.contains("needs url"), "{e}");
    let bad = [RewardConfig {
        kind: "remote".into(),
        url: Some("localhost:1".into()),
        ..Default::default()
    }];
    let e = format!("{:#}", Rewards::from_config(&bad).err().unwrap());
    assert!(e.contains("http://"), "{e}");
}

// ---------------------------------------------------------------------------------------------------
// dgpo's own reward server, the Flow-GRPO pickle protocol, timeouts, and training against servers.

mod common;

use dgpo::reward::serve::{RewardServer, ServeOptions};

fn shapes_rewards() -> Rewards {
    Rewards::from_config(&[RewardConfig::default()]).unwrap()
}

/// Ground-truth scenes of six test prompts, one of them recoloured so that scores differ.
fn scenes() -> (Vec<Image>, Vec<String>, Vec<Option<Metadata>>) {
    let metas = dgpo::geneval::read_metadata(
        &common::tiny::root().join("configs/shapes/test_metadata.jsonl"),
    )
    .unwrap();
    let pick: Vec<_> = metas.iter().step_by(13).take(6).cloned().collect();
    let mut images: Vec<Image> = pick
        .iter()
        .enumerate()
        .map(|(i, m)| {
            let mut rng = <rand::rngs::StdRng as rand::SeedableRng>::seed_from_u64(i as u64);
            dgpo::testbed::scene_for(m, &mut rng).unwrap().render()
        })
        .collect();
    images[2] = Image::new(32, 32, [0, 0, 0]);
    (
        images,
        pick.iter().map(|m| m.prompt.clone()).collect(),
        pick.into_iter().map(Some).collect(),
    )
}

#[test]
fn dgpo_reward_server_gives_the_in_process_scores_also_in_concurrent_chunks() {
    let server =
        RewardServer::start("127.0.0.1:0", shapes_rewards(), ServeOptions::default()).unwrap();
    let (im, p, m) = scenes();
    let (want, want_named) = shapes_rewards().score(&im, &p, &m).unwrap();
    assert!(
        want.iter().any(|&s| s < 1.0) && want.contains(&1.0),
        "{want:?}"
    );
    let mut r = remote(server.url(), 0);
    r.check().unwrap();
    let whole = r.score(&im, &p, &m).unwrap();
    assert_eq!(whole.scores, want);
    assert_eq!(
        whole.sub["shapes_geneval/strict_accuracy"],
        want_named["shapes_geneval/strict_accuracy"]
    );
    r.batch_size = 4; // 6 images: requests of 4 and 2, both in flight
    r.max_concurrency = 2;
    let chunked = r.score(&im, &p, &m).unwrap();
    assert_eq!(chunked, whole);
    assert_eq!(server.served(), 3);
    // Malformed requests are 400s naming the field, and the client reports them.
    let e = ureq::post(&format!("{}/compute", server.url()))
        .send_string(r#"{"prompt": ["a"], "image": [1]}"#)
        .unwrap_err();
    let ureq::Error::Status(400, resp) = e else {
        panic!("{e}")
    };
    assert!(resp
        .into_string()
        .unwrap()
        .contains("must be a list of base64 strings"));
    server.stop();
}

/// What Python's `pickle.dumps` (protocol 4) makes of a Flow-GRPO GenEval reply for 3 images.
const PY_REPLY: &str = "800495fc000000000000007d94288c0673636f726573945d9428473fe0000000000000473ff0000000000000473fe8000000000000658c0772657761726473945d9428470000000000000000473ff0000000000000473ff0000000000000658c0e7374726963745f72657761726473945d9428470000000000000000473ff0000000000000470000000000000000658c0d67726f75705f72657761726473947d948c06636f6c6f7273945d9428470000000000000000473ff000000000000047c02400000000000065738c1467726f75705f7374726963745f72657761726473947d9468095d9428470000000000000000473ff000000000000047c0240000000000006573752e";

fn unhex(s: &str) -> Vec<u8> {
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap())
        .collect()
}

#[test]
fn the_flow_grpo_pickle_protocol_sends_jpegs_and_metadata_and_reads_python_replies() {
    let (url, seen) = serve(vec![(200, unhex(PY_REPLY))]);
    let (im, p, m) = scenes();
    let mut r = remote(&url, 0);
    r.protocol = dgpo::reward::remote::Protocol::FlowGrpoPickle;
    let out = r.score(&im[..3], &p[..3], &m[..3]).unwrap();
    assert_eq!(out.scores, vec![0.5, 1.0, 0.75]);
    assert_eq!(out.sub["accuracy"], vec![0.0, 1.0, 1.0]);
    assert_eq!(out.sub["strict_accuracy"], vec![0.0, 1.0, 0.0]);
    // The request: a pickled dict of JPEG bytes, metadata dicts and only_strict = False.
    let body = seen.lock().unwrap()[0].clone();
    let v = serde_pickle::value_from_slice(&body, Default::default()).unwrap();
    let serde_pickle::Value::Dict(d) = v else {
        panic!("{v:?}")
    };
    let key = |k: &str| d[&serde_pickle::HashableValue::String(k.into())].clone();
    let serde_pickle::Value::List(jpegs) = key("images") else {
        panic!()
    };
    assert_eq!(jpegs.len(), 3);
    let serde_pickle::Value::Bytes(j0) = &jpegs[0] else {
        panic!()
    };
    assert_eq!(&j0[..2], &[0xff, 0xd8], "JPEG bytes");
    assert_eq!(key("only_strict"), serde_pickle::Value::Bool(false));
    let serde_pickle::Value::List(metas) = key("meta_datas") else {
        panic!()
    };
    let serde_pickle::Value::Dict(m0) = &metas[0] else {
        panic!()
    };
    assert_eq!(
        m0[&serde_pickle::HashableValue::String("prompt".into())],
        serde_pickle::Value::String(p[0].clone())
    );
    // Wrong length, and a reply that would import and call something, are errors.
    for (reply, want) in [
        (unhex(PY_REPLY), "has 3 values for 2 images"),
        // pickle.dumps({"scores": [decimal.Decimal(1), 1]}): a GLOBAL and a REDUCE
        (
            b"\x80\x04\x95*\x00\x00\x00\x00\x00\x00\x00}\x94\x8c\x06scores\x94]\x94(\x8c\x07decimal\x94\x8c\x07Decimal\x94\x93\x94\x8c\x011\x94\x85\x94R\x94K\x01es.".to_vec(),
            "unresolved global",
        ),
        (b"<html>".to_vec(), "not a plain pickled dict"),
    ] {
        let (url, _) = serve(vec![(200, reply)]);
        let mut r = remote(&url, 0);
        r.protocol = dgpo::reward::remote::Protocol::FlowGrpoPickle;
        let e = format!("{:#}", r.score(&im[..2], &p[..2], &m[..2]).unwrap_err());
        assert!(e.contains(want) && e.contains(&url), "{want}: {e}");
    }
}

#[test]
fn a_hung_server_times_out_and_a_missing_server_fails_the_health_check() {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}", l.local_addr().unwrap());
    // accepts connections, never answers
    let _hold = std::thread::spawn(move || {
        let _conns: Vec<_> = l.incoming().take(4).collect();
        std::thread::sleep(Duration::from_secs(30));
    });
    let (im, p, m) = inputs();
    let mut r = RemoteReward::new(&url, 0.3, 1).unwrap();
    r.backoff = Duration::from_millis(10);
    let t = std::time::Instant::now();
    let e = format!("{:#}", r.score(&im, &p, &m).unwrap_err());
    assert!(e.contains("failed 2 times") && e.contains("timeout"), "{e}");
    assert!(t.elapsed() < Duration::from_secs(10));
    let dead = {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        format!("http://{}", l.local_addr().unwrap())
    };
    let e = format!("{:#}", remote(&dead, 3).check().unwrap_err());
    assert!(e.contains("not reachable") && e.contains(&dead), "{e}");
}

fn remote_config(cfg: &dgpo::config::Config, url: &str) -> dgpo::config::Config {
    let mut c = cfg.clone();
    c.reward = vec![RewardConfig {
        kind: "remote".into(),
        url: Some(url.into()),
        timeout_s: 10.0,
        retries: 1,
        backoff_s: 0.01,
        ..Default::default()
    }];
    c
}

/// Train lines of metrics.jsonl, the fields that do not depend on where the reward was computed.
fn train_lines(out: &std::path::Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(out.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .filter(|v| v["kind"] == "train")
        .map(|v| {
            serde_json::json!([
                v["epoch"],
                v["reward_mean"],
                v["loss"],
                v["kl"],
                v["grad_norm"]
            ])
        })
        .collect()
}

#[test]
fn training_with_a_remote_reward_survives_a_dead_server_and_matches_in_process() {
    let dir = common::tiny::tmp("remote-train");
    let mut cfg = common::tiny::setup(&dir);
    cfg.sample.batch_size = 2; // two rollout batches per epoch: two requests, scored while sampling
    cfg.sample.num_batches_per_epoch = 2;
    let dev = candle_core::Device::Cpu;

    // A server that is down at the start: refused before any rollout.
    let dead = {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        format!("http://{}", l.local_addr().unwrap())
    };
    let out = dir.join("dead");
    let e = format!(
        "{:#}",
        dgpo::train::run(&remote_config(&cfg, &dead), &out, false, &dev).unwrap_err()
    );
    assert!(e.contains(&dead) && e.contains("not reachable"), "{e}");
    assert!(!out.join("metrics.jsonl").exists());

    // In process.
    let a = dir.join("a");
    dgpo::train::run(&cfg, &a, false, &dev).unwrap();

    // Remote, the server dying after epoch 0's two requests; resumed against a new server.
    let s1 = RewardServer::start(
        "127.0.0.1:0",
        shapes_rewards(),
        ServeOptions {
            max_requests: Some(2),
            ..Default::default()
        },
    )
    .unwrap();
    let b = dir.join("b");
    let e = format!(
        "{:#}",
        dgpo::train::run(&remote_config(&cfg, s1.url()), &b, false, &dev).unwrap_err()
    );
    assert!(
        e.contains("epoch 1") && e.contains(s1.url()) && e.contains("--resume"),
        "{e}"
    );
    assert!(b.join("checkpoints/epoch-00001/state.json").exists());
    s1.wait();
    let s2 = RewardServer::start("127.0.0.1:0", shapes_rewards(), ServeOptions::default()).unwrap();
    dgpo::train::run(&remote_config(&cfg, s2.url()), &b, true, &dev).unwrap();
    s2.stop();
    let (ta, tb) = (train_lines(&a), train_lines(&b));
    assert_eq!(ta.len(), 3);
    assert_eq!(ta, tb);
}

/// `python3 scripts/reward_server.py --backend stub` on a free port, killed on drop.
struct PyServer {
    child: std::process::Child,
    url: String,
}

impl Drop for PyServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn python_server() -> PyServer {
    let script = common::tiny::root().join("scripts/reward_server.py");
    let mut child = std::process::Command::new("python3")
        .arg(&script)
        .args(["--backend", "stub", "--port", "0"])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("python3 is needed for the reference reward server's test (.ci/run installs it)");
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    let url = line
        .trim()
        .rsplit(' ')
        .next()
        .filter(|u| u.starts_with("http://"))
        .unwrap_or_else(|| panic!("reward_server.py printed {line:?}"))
        .to_string();
    PyServer { child, url }
}

#[test]
fn the_python_reference_server_speaks_both_protocols_and_its_scoring_rules_hold() {
    let st = std::process::Command::new("python3")
        .arg(common::tiny::root().join("scripts/reward_server.py"))
        .arg("--self-test")
        .output()
        .expect("python3");
    assert!(
        st.status.success(),
        "{}",
        String::from_utf8_lossy(&st.stderr)
    );
    let server = python_server();
    let (im, p, m) = scenes();
    // JSON: the stub's reward is (file size mod 1000) / 1000 of the PNG it received.
    let mut r = remote(&server.url, 0);
    r.check().unwrap();
    r.batch_size = 4;
    let out = r.score(&im, &p, &m).unwrap();
    let want: Vec<f32> = im
        .iter()
        .map(|i| ((i.png_bytes().unwrap().len() % 1000) as f64 / 1000.0) as f32)
        .collect();
    assert_eq!(out.scores, want);
    let chars: Vec<f32> = p.iter().map(|s| s.len() as f32).collect();
    assert_eq!(out.sub["prompt_chars"], chars);
    // Flow-GRPO pickle: the same of the JPEG it received, through Python's pickle both ways.
    r.protocol = dgpo::reward::remote::Protocol::FlowGrpoPickle;
    r.check().unwrap();
    let out = r.score(&im, &p, &m).unwrap();
    let want: Vec<f32> = im
        .iter()
        .map(|i| ((dgpo::reward::jpeg_bytes(i, 75).unwrap().len() % 1000) as f64 / 1000.0) as f32)
        .collect();
    assert_eq!(out.scores, want);
    assert_eq!(out.sub["strict_accuracy"], vec![0.0; im.len()]);
    // A bad request is a 400 that the client reports with the server's words.
    r.protocol = dgpo::reward::remote::Protocol::Json;
    let e = format!("{:#}", r.score(&im[..1], &p[..2], &m[..1]).unwrap_err());
    assert!(
        e.contains("HTTP 400") && e.contains("1 images, 2 prompts"),
        "{e}"
    );
}

#[test]
fn a_servers_raw_bytes_reach_messages_escaped_and_cut() {
    let reply = format!("\0\u{1b}[2Jbinary{}", "x".repeat(1000));
    let e = format!(
        "{:#}",
        dgpo::reward::remote::RemoteReward::parse_reply(&reply, 1, "http://h:1").unwrap_err()
    );
    assert!(!e.chars().any(|c| c.is_control()), "{e:?}");
    assert!(e.contains("\\u{0}") && e.contains("…"), "{e}");
    assert!(e.len() < 400, "{} bytes", e.len());
}
