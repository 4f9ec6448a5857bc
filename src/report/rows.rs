//! The rows of `metrics.jsonl` and their scalars under stable tag names (`train/…`, `eval/…`): what
//! the TensorBoard log and the report both read.

use anyhow::{Context, Result};
use serde_json::Value;
use std::path::Path;

/// Fields of a row that place it (step, time) rather than measure something.
const PLACE: [&str; 5] = ["kind", "epoch", "opt_step", "wall_s", "unix_s"];

/// The tag of a row's field: `train/…` or `eval/…`; loss terms under `loss/`, timings under `time/`.
fn tag_of(kind: &str, key: &str) -> String {
    let name = match key {
        "loss" => "loss/total".to_string(),
        "policy_loss" => "loss/policy".to_string(),
        "eval_reward_mean" => "reward_mean".to_string(),
        k if k.ends_with("_s") => format!("time/{k}"),
        k => k.to_string(),
    };
    format!("{kind}/{name}")
}

/// The scalars of a `metrics.jsonl` row as `(tag, value)`: every finite number, nested objects
/// (`per_tag`) flattened with `/`; lists, strings and nulls skipped.
pub fn scalars(row: &Value) -> Vec<(String, f64)> {
    let kind = row["kind"].as_str().unwrap_or("other");
    let mut out = Vec::new();
    let Some(obj) = row.as_object() else {
        return out;
    };
    for (k, v) in obj {
        if PLACE.contains(&k.as_str()) {
            continue;
        }
        match v {
            Value::Number(n) => {
                if let Some(x) = n.as_f64().filter(|x| x.is_finite()) {
                    out.push((tag_of(kind, k), x));
                }
            }
            Value::Object(inner) => {
                for (ik, iv) in inner {
                    if let Some(x) = iv.as_f64().filter(|x| x.is_finite()) {
                        out.push((format!("{}/{ik}", tag_of(kind, k)), x));
                    }
                }
            }
            _ => {}
        }
    }
    out
}

/// The TensorBoard step of a row: the optimizer step.
pub fn step_of(row: &Value) -> i64 {
    row["opt_step"].as_i64().unwrap_or(0)
}

/// The rows of a `metrics.jsonl` (a missing file has none).
pub fn read_rows(path: &Path) -> Result<Vec<Value>> {
    let text = match std::fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(e).with_context(|| format!("reading {}", path.display())),
    };
    text.lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty())
        .map(|(i, l)| {
            serde_json::from_str(l)
                .with_context(|| format!("{} line {}: not a JSON row", path.display(), i + 1))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rows_become_stable_tags() {
        let train = serde_json::json!({"kind": "train", "epoch": 2, "opt_step": 3, "wall_s": 1.0,
            "reward_mean": 0.5, "loss": -0.1, "policy_loss": 0.2, "kl": 0.01, "rollout_s": 2.0,
            "timesteps": [1.0], "rollout_weights": "raw", "reward/shapes_geneval": 0.5,
            "grad_norm": null});
        let mut s = scalars(&train);
        s.sort_by(|a, b| a.0.cmp(&b.0));
        let tags: Vec<&str> = s.iter().map(|(t, _)| t.as_str()).collect();
        assert_eq!(
            tags,
            [
                "train/kl",
                "train/loss/policy",
                "train/loss/total",
                "train/reward/shapes_geneval",
                "train/reward_mean",
                "train/time/rollout_s"
            ]
        );
        let eval = serde_json::json!({"kind": "eval", "epoch": 0, "opt_step": 0,
            "geneval_overall": 0.6, "eval_reward_mean": 0.7, "per_tag": {"position": 0.25, "x": null}});
        let mut s = scalars(&eval);
        s.sort_by(|a, b| a.0.cmp(&b.0));
        assert_eq!(
            s,
            [
                ("eval/geneval_overall".to_string(), 0.6),
                ("eval/per_tag/position".to_string(), 0.25),
                ("eval/reward_mean".to_string(), 0.7)
            ]
        );
        assert_eq!(step_of(&train), 3);
    }
}
