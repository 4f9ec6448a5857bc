//! Watching a run: the scalars of `metrics.jsonl` rows under stable tag names, written live as
//! TensorBoard event files (`<run>/tb/`), and `report.html` — curves, grids and config of one run or
//! several overlaid (`dgpo report`). Everything here is derived from the run folder's own files.

pub mod html;
pub mod plot;
pub mod tfevents;

use crate::io::write_atomic;
use anyhow::{Context, Result};
use serde_json::Value;
use std::path::{Path, PathBuf};
use tfevents::EventWriter;

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

/// The TensorBoard log of a run: one event file in `<run>/tb/`, rebuilt from `metrics.jsonl` and
/// the evaluation grids when the run opens (so a resumed run holds each step once), then appended
/// to as rows are recorded.
pub struct TbLog {
    writer: EventWriter,
}

impl TbLog {
    /// Start `<run>/tb/` afresh from the rows already in `metrics` (those a resume kept); `grid`
    /// gives an evaluation's grid PNG from its epoch.
    pub fn open(run: &Path, metrics: &Path, grid: &dyn Fn(usize) -> PathBuf) -> Result<Self> {
        let dir = run.join("tb");
        if dir.exists() {
            std::fs::remove_dir_all(&dir)
                .with_context(|| format!("clearing {} to rebuild it", dir.display()))?;
        }
        let mut me = Self {
            writer: EventWriter::create(&dir)?,
        };
        for row in read_rows(metrics)? {
            me.row(&row)?;
            if row["kind"] == "eval" {
                let epoch = row["epoch"].as_u64().unwrap_or(0) as usize;
                if let Ok(png) = std::fs::read(grid(epoch)) {
                    me.grid(&row, png)?;
                }
            }
        }
        Ok(me)
    }

    /// The scalars of one row.
    pub fn row(&mut self, row: &Value) -> Result<()> {
        let values: Vec<(String, f32)> = scalars(row)
            .into_iter()
            .map(|(t, v)| (t, v as f32))
            .collect();
        self.writer.scalars(step_of(row), wall_of(row), &values)
    }

    /// An evaluation's grid (PNG bytes) as the image `eval/grid` at the row's step.
    pub fn grid(&mut self, row: &Value, png: Vec<u8>) -> Result<()> {
        let size = png_size(&png).context("an evaluation grid that is not a PNG")?;
        self.writer
            .image(step_of(row), wall_of(row), "eval/grid", png, size)
    }

    pub fn path(&self) -> &Path {
        self.writer.path()
    }
}

/// A row's Unix time (`unix_s`), or now for rows written before the field existed.
fn wall_of(row: &Value) -> f64 {
    row["unix_s"].as_f64().unwrap_or_else(tfevents::unix_now)
}

/// Width and height from a PNG's IHDR chunk.
pub fn png_size(png: &[u8]) -> Option<(u32, u32)> {
    if png.len() < 24 || &png[1..4] != b"PNG" || &png[12..16] != b"IHDR" {
        return None;
    }
    let be = |i: usize| u32::from_be_bytes([png[i], png[i + 1], png[i + 2], png[i + 3]]);
    Some((be(16), be(20)))
}

/// Write `report.html` for `runs` to `out` atomically.
pub fn write_report(runs: &[PathBuf], out: &Path) -> Result<()> {
    write_atomic(out, html::render(&load_runs(runs)?)?.as_bytes())
}

/// The runs, named by folder name — or by path where two folder names are the same.
fn load_runs(runs: &[PathBuf]) -> Result<Vec<html::RunData>> {
    let mut loaded = runs
        .iter()
        .map(|r| html::RunData::load(r))
        .collect::<Result<Vec<_>>>()?;
    let names: Vec<String> = loaded.iter().map(|r| r.name.clone()).collect();
    for r in &mut loaded {
        if names.iter().filter(|n| **n == r.name).count() > 1 {
            r.name = r.dir.display().to_string();
        }
    }
    Ok(loaded)
}

/// `dgpo report RUN…`: the page, and with several runs the time each needs to reach each score.
pub fn cli(runs: &[PathBuf], out: Option<PathBuf>, json: Option<&Path>) -> Result<()> {
    let out = out.unwrap_or_else(|| match runs {
        [one] => one.join("report.html"),
        _ => PathBuf::from("report.html"),
    });
    let loaded = load_runs(runs)?;
    write_atomic(&out, html::render(&loaded)?.as_bytes())?;
    println!("wrote {}", out.display());
    if loaded.len() > 1 {
        let table = html::time_to_targets(&loaded);
        print!("{}", html::targets_text(&loaded, &table));
        if let Some(j) = json {
            write_atomic(j, serde_json::to_string_pretty(&table)?.as_bytes())?;
            println!("wrote {}", j.display());
        }
    }
    Ok(())
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

    #[test]
    fn png_size_reads_ihdr() {
        let im = crate::image::Image::new(5, 3, [0, 0, 0]);
        let p = std::env::temp_dir().join(format!("dgpo-pngsize-{}.png", std::process::id()));
        im.to_png(&p).unwrap();
        assert_eq!(png_size(&std::fs::read(&p).unwrap()), Some((5, 3)));
        assert_eq!(png_size(b"not a png at all, really not"), None);
        let _ = std::fs::remove_file(&p);
    }
}
