//! Remote rewards against real HTTP servers on the loopback interface: the request carries prompts,
//! base64 PNGs and metadata; replies of the wrong length or with non-numbers are errors; HTTP errors
//! are retried with back-off; a dead server fails with a message naming it.

use base64::Engine;
use dgpo::config::RewardConfig;
use dgpo::geneval::Metadata;
use dgpo::reward::{Reward, Rewards};
use dgpo::reward_remote::RemoteReward;
use dgpo::shapes::Image;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpListener;
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// A one-thread HTTP/1.1 server answering the given (status, body) replies in order, one per
/// connection; returns its base URL and the request bodies it received.
fn serve(replies: Vec<(u16, String)>) -> (String, Arc<Mutex<Vec<String>>>) {
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
            log.lock().unwrap().push(String::from_utf8(buf).unwrap());
            let reply = format!(
                "HTTP/1.1 {status} X\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                body.len()
            );
            stream.write_all(reply.as_bytes()).unwrap();
        }
    });
    (url, seen)
}

fn inputs() -> (Vec<Image>, Vec<String>, Vec<Option<Metadata>>) {
    let meta = dgpo::shapes::prompts::colors("circle", "red");
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
    let req: serde_json::Value = serde_json::from_str(&seen.lock().unwrap()[0]).unwrap();
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
