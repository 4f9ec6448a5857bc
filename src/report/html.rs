//! `report.html`: one self-contained page (inline SVG charts, base64 PNG grids) for one run or
//! several overlaid — evaluation and training curves, per-tag curves, loss terms, stage timings,
//! first and latest evaluation grids with their prompts, and each run's resolved config.

use super::plot::{colour, line_chart, Series};
use super::rows::{read_rows, scalars, step_of};
use anyhow::{bail, Result};
use base64::Engine;
use serde_json::Value;
use std::collections::BTreeSet;
use std::fmt::Write;
use std::path::{Path, PathBuf};

/// GenEval scores whose first crossing the comparison table reports.
pub const TARGETS: [f64; 6] = [0.5, 0.6, 0.7, 0.8, 0.85, 0.9];

const CHART: (u32, u32) = (440, 270);

/// Widest grid embedded as is; wider ones (SD3.5's 1024-px images) are shrunk by a whole factor.
pub const MAX_GRID_WIDTH: usize = 2048;

/// What the page shows of one run folder.
pub struct RunData {
    pub name: String,
    pub dir: PathBuf,
    pub rows: Vec<Value>,
    pub config: String,
    /// `train.algorithm` of the config ("?" when it cannot be read).
    pub algorithm: String,
    /// Test prompts in grid order (empty when the config's prompt file cannot be read).
    pub prompts: Vec<String>,
    /// Prompts per grid row.
    pub prompts_per_row: usize,
}

impl RunData {
    /// Read `dir/metrics.jsonl` and `dir/config.toml`; a folder with neither is refused.
    pub fn load(dir: &Path) -> Result<Self> {
        let rows = read_rows(&dir.join("metrics.jsonl"))?;
        let config = std::fs::read_to_string(dir.join("config.toml")).unwrap_or_default();
        if rows.is_empty() && config.is_empty() {
            bail!(
                "{}: no metrics.jsonl or config.toml; is it a `dgpo train` run folder?",
                dir.display()
            );
        }
        let cfg: toml::Value = toml::from_str(&config).unwrap_or(toml::Value::Integer(0));
        let test = cfg
            .get("prompts")
            .and_then(|p| p.get("test"))
            .and_then(|t| t.as_str());
        let prompts = test
            .and_then(|t| crate::prompt_file::read_prompt_file(Path::new(t)).ok())
            .map(|items| items.into_iter().map(|i| i.prompt).collect())
            .unwrap_or_default();
        let name = dir
            .file_name()
            .map(|n| n.to_string_lossy().to_string())
            .unwrap_or_else(|| dir.display().to_string());
        let algorithm = cfg
            .get("train")
            .and_then(|t| t.get("algorithm")?.as_str().map(String::from))
            .unwrap_or_else(|| "?".into());
        Ok(Self {
            name,
            dir: dir.to_path_buf(),
            rows,
            config,
            algorithm,
            prompts,
            // The training loop's grids hold four prompts a row.
            prompts_per_row: 4,
        })
    }

    fn evals(&self) -> impl Iterator<Item = &Value> {
        self.rows.iter().filter(|r| r["kind"] == "eval")
    }

    /// The first evaluation reaching `target`: (wall seconds, epoch).
    pub fn first_reaching(&self, target: f64) -> Option<(f64, u64)> {
        self.evals()
            .find(|r| r["geneval_overall"].as_f64().is_some_and(|g| g >= target))
            .map(|r| {
                (
                    r["wall_s"].as_f64().unwrap_or(0.0),
                    r["epoch"].as_u64().unwrap_or(0),
                )
            })
    }
}

/// The (x, y) points of `tag` over a run's rows of `kind`, x = optimizer step or wall minutes.
fn points(run: &RunData, tag: &str, by_minutes: bool) -> Vec<(f64, f64)> {
    run.rows
        .iter()
        .filter_map(|r| {
            let v = scalars(r).into_iter().find(|(t, _)| t == tag)?.1;
            let x = if by_minutes {
                r["wall_s"].as_f64()? / 60.0
            } else {
                step_of(r) as f64
            };
            Some((x, v))
        })
        .collect()
}

/// A trailing mean over `w` points (training scalars are noisy epoch by epoch).
fn smooth(p: &[(f64, f64)], w: usize) -> Vec<(f64, f64)> {
    (0..p.len())
        .map(|i| {
            let lo = (i + 1).saturating_sub(w);
            let ys = &p[lo..=i];
            (
                p[i].0,
                ys.iter().map(|q| q.1).sum::<f64>() / ys.len() as f64,
            )
        })
        .collect()
}

/// The trailing-mean window of a series of `n` points of `tag`: training scalars are noisy epoch
/// by epoch, so from 80 points on they are averaged over n / 40 (at most 50).
fn window(tag: &str, n: usize) -> usize {
    if tag.starts_with("train/") {
        (n / 40).clamp(1, 50)
    } else {
        1
    }
}

/// One chart of `tag` with a line per run; `None` when no run has it.
fn chart(runs: &[RunData], tag: &str, by_minutes: bool) -> Result<Option<String>> {
    let series: Vec<Series> = runs
        .iter()
        .map(|r| {
            let p = points(r, tag, by_minutes);
            Series {
                name: r.name.clone(),
                points: smooth(&p, window(tag, p.len())),
            }
        })
        .collect();
    let x = if by_minutes {
        "wall-clock minutes"
    } else {
        "optimizer step"
    };
    let n = series.iter().map(|s| s.points.len()).max().unwrap_or(0);
    let title = match window(tag, n) {
        w if w > 1 => format!("{tag} (mean over {w} epochs)"),
        _ => tag.to_string(),
    };
    line_chart(&title, x, &series, CHART)
}

/// Every scalar tag of the runs, sorted.
fn all_tags(runs: &[RunData]) -> BTreeSet<String> {
    runs.iter()
        .flat_map(|r| {
            r.rows
                .iter()
                .flat_map(|row| scalars(row).into_iter().map(|(t, _)| t))
        })
        .collect()
}

fn esc(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

/// A section of charts for `tags`.
fn section(
    out: &mut String,
    runs: &[RunData],
    title: &str,
    tags: &[String],
    minutes: bool,
) -> Result<()> {
    let mut charts = String::new();
    for t in tags {
        if let Some(svg) = chart(runs, t, false)? {
            charts += &format!("<div class=chart>{svg}</div>\n");
        }
        if minutes {
            if let Some(svg) = chart(runs, t, true)? {
                charts += &format!("<div class=chart>{svg}</div>\n");
            }
        }
    }
    if !charts.is_empty() {
        writeln!(
            out,
            "<h2>{}</h2>\n<div class=charts>\n{charts}</div>",
            esc(title)
        )?;
    }
    Ok(())
}

/// The page for `runs`.
pub fn render(runs: &[RunData]) -> Result<String> {
    let mut out = String::new();
    let names: Vec<String> = runs.iter().map(|r| r.name.clone()).collect();
    writeln!(
        out,
        "<!doctype html>\n<html><head><meta charset=utf-8><title>dgpo report: {}</title>\n<style>{STYLE}</style></head><body>",
        esc(&names.join(", "))
    )?;
    writeln!(out, "<h1>dgpo report</h1>")?;
    summary_table(&mut out, runs)?;
    if runs.len() > 1 {
        targets_table(&mut out, runs)?;
    }
    let tags = all_tags(runs);
    let pick = |f: &dyn Fn(&str) -> bool| -> Vec<String> {
        tags.iter().filter(|t| f(t)).cloned().collect()
    };
    let headline = pick(&|t| t == "eval/geneval_overall" || t == "eval/reward_mean");
    section(
        &mut out,
        runs,
        "Evaluation (test prompts, slow-EMA weights)",
        &headline,
        true,
    )?;
    section(
        &mut out,
        runs,
        "Evaluation per tag",
        &pick(&|t| t.starts_with("eval/per_tag/")),
        false,
    )?;
    let reward = pick(&|t| t == "train/reward_mean" || t.starts_with("train/reward/"));
    section(&mut out, runs, "Training reward (rollouts)", &reward, false)?;
    let loss = pick(&|t| {
        t.starts_with("train/") && !t.starts_with("train/time/") && !t.starts_with("train/reward")
    });
    section(
        &mut out,
        runs,
        "Loss terms and update statistics",
        &loss,
        false,
    )?;
    section(
        &mut out,
        runs,
        "Timings per stage (seconds)",
        &pick(&|t| t.contains("/time/")),
        false,
    )?;
    grids(&mut out, runs)?;
    for (i, r) in runs.iter().enumerate() {
        writeln!(
            out,
            "<details><summary>resolved config of <b style='color:{}'>{}</b> ({})</summary><pre>{}</pre></details>",
            css(i),
            esc(&r.name),
            esc(&r.dir.display().to_string()),
            esc(&r.config)
        )?;
    }
    writeln!(out, "</body></html>")?;
    Ok(out)
}

fn css(i: usize) -> String {
    let c = colour(i);
    format!("rgb({},{},{})", c.0, c.1, c.2)
}

fn summary_table(out: &mut String, runs: &[RunData]) -> Result<()> {
    writeln!(out, "<table><tr><th>run</th><th>algorithm</th><th>epochs</th><th>wall min</th><th>first geneval_overall</th><th>last</th><th>best (epoch)</th></tr>")?;
    for (i, r) in runs.iter().enumerate() {
        let g: Vec<(f64, u64)> = r
            .evals()
            .filter_map(|e| Some((e["geneval_overall"].as_f64()?, e["epoch"].as_u64()?)))
            .collect();
        let epochs = r.rows.iter().filter(|x| x["kind"] == "train").count();
        let wall = r
            .rows
            .last()
            .and_then(|x| x["wall_s"].as_f64())
            .unwrap_or(0.0)
            / 60.0;
        let f = |x: Option<&(f64, u64)>| x.map(|p| format!("{:.3}", p.0)).unwrap_or("–".into());
        let best = g
            .iter()
            .copied()
            .fold(None, |b: Option<(f64, u64)>, p| match b {
                Some(b) if b.0 >= p.0 => Some(b),
                _ => Some(p),
            });
        writeln!(
            out,
            "<tr><td style='color:{}'><b>{}</b></td><td>{}</td><td>{epochs}</td><td>{wall:.1}</td><td>{}</td><td>{}</td><td>{}</td></tr>",
            css(i),
            esc(&r.name),
            esc(&r.algorithm),
            f(g.first()),
            f(g.last()),
            best.map(|b| format!("{:.3} ({})", b.0, b.1)).unwrap_or("–".into())
        )?;
    }
    writeln!(out, "</table>")?;
    Ok(())
}

/// For each target: each run's first evaluation reaching it (`{"wall_s", "epoch"}` or null), and
/// how many times sooner (wall clock) the first run got there than each other run.
pub fn time_to_targets(runs: &[RunData]) -> Value {
    let rows: Vec<Value> = TARGETS
        .iter()
        .map(|&t| {
            let hits: Vec<Option<(f64, u64)>> = runs.iter().map(|r| r.first_reaching(t)).collect();
            let per_run: serde_json::Map<String, Value> = runs
                .iter()
                .zip(&hits)
                .map(|(r, h)| {
                    let v = h.map(|(s, e)| serde_json::json!({"wall_s": s, "epoch": e}));
                    (r.name.clone(), v.unwrap_or(Value::Null))
                })
                .collect();
            let speedup: Vec<Value> = hits
                .iter()
                .skip(1)
                .map(|h| match (hits[0], h) {
                    (Some(a), Some(b)) if a.0 > 0.0 => serde_json::json!(b.0 / a.0),
                    _ => Value::Null,
                })
                .collect();
            serde_json::json!({"target": t, "runs": per_run, "speedup_of_first": speedup})
        })
        .collect();
    Value::Array(rows)
}

fn cell(v: &Value) -> String {
    match (v["wall_s"].as_f64(), v["epoch"].as_u64()) {
        (Some(s), Some(e)) => format!("{:.1} min (epoch {e})", s / 60.0),
        _ => "never".into(),
    }
}

/// The time-to-score table as text (what `dgpo report` prints).
pub fn targets_text(runs: &[RunData], table: &Value) -> String {
    let mut out = format!("{:>18}", "geneval_overall ≥");
    for r in runs {
        out += &format!(" {:>22}", r.name);
    }
    out += "\n";
    for row in table.as_array().into_iter().flatten() {
        out += &format!("{:>18}", row["target"].to_string());
        for r in runs {
            out += &format!(" {:>22}", cell(&row["runs"][&r.name]));
        }
        out += "\n";
    }
    out
}

/// The time-to-score table as HTML.
fn targets_table(out: &mut String, runs: &[RunData]) -> Result<()> {
    write!(
        out,
        "<h2>Time to reach a GenEval score</h2><table><tr><th>geneval_overall ≥</th>"
    )?;
    for r in runs {
        write!(out, "<th>{}</th>", esc(&r.name))?;
    }
    if runs.len() > 1 {
        write!(out, "<th>{} sooner by</th>", esc(&runs[0].name))?;
    }
    writeln!(out, "</tr>")?;
    for row in time_to_targets(runs).as_array().into_iter().flatten() {
        write!(out, "<tr><td>{}</td>", row["target"])?;
        for r in runs {
            write!(out, "<td>{}</td>", cell(&row["runs"][&r.name]))?;
        }
        let sp: Vec<String> = row["speedup_of_first"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|v| v.as_f64().map(|x| format!("{x:.1}×")).unwrap_or("–".into()))
            .collect();
        writeln!(out, "<td>{}</td></tr>", sp.join(", "))?;
    }
    writeln!(out, "</table>")?;
    Ok(())
}

/// Each run's first and latest evaluation grids side by side, with the prompts of the grid rows.
fn grids(out: &mut String, runs: &[RunData]) -> Result<()> {
    writeln!(out, "<h2>Evaluation grids: first and latest</h2>")?;
    for (i, r) in runs.iter().enumerate() {
        let evals: Vec<u64> = r.evals().filter_map(|e| e["epoch"].as_u64()).collect();
        let shown: Vec<u64> = match (evals.first(), evals.last()) {
            (Some(a), Some(b)) if a != b => vec![*a, *b],
            (Some(a), _) => vec![*a],
            _ => vec![],
        };
        writeln!(
            out,
            "<h3 style='color:{}'>{}</h3><div class=grids>",
            css(i),
            esc(&r.name)
        )?;
        for e in shown {
            let p = crate::train::run_dir::grid_path(&r.dir, e as usize);
            match std::fs::read(&p).map(|png| crate::image::png_at_most(png, MAX_GRID_WIDTH)) {
                Ok(png) => writeln!(
                    out,
                    "<figure><img alt='evaluation grid, epoch {e}' src='data:image/png;base64,{}'><figcaption>epoch {e}</figcaption></figure>",
                    base64::engine::general_purpose::STANDARD.encode(png)
                )?,
                Err(_) => writeln!(out, "<p>(no grid file {})</p>", esc(&p.display().to_string()))?,
            }
        }
        writeln!(out, "</div>")?;
        if !r.prompts.is_empty() {
            writeln!(out, "<details><summary>prompts of the grid rows ({} prompts, {} a row, left to right)</summary><ol start=0>", r.prompts.len(), r.prompts_per_row)?;
            for row in r.prompts.chunks(r.prompts_per_row) {
                let ps: Vec<String> = row.iter().map(|p| esc(p)).collect();
                writeln!(out, "<li>{}</li>", ps.join(" · "))?;
            }
            writeln!(out, "</ol></details>")?;
        }
    }
    Ok(())
}

const STYLE: &str = "body{font-family:sans-serif;margin:1.5em;color:#222}\
table{border-collapse:collapse;margin:.5em 0}td,th{border:1px solid #ccc;padding:3px 8px;text-align:left}\
.charts{display:flex;flex-wrap:wrap;gap:6px}.chart svg{display:block}\
.grids{display:flex;flex-wrap:wrap;gap:16px}figure{margin:0}\
img{image-rendering:pixelated;max-width:100%}pre{background:#f6f6f6;padding:8px;font-size:12px}";

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn smoothing_is_a_trailing_mean() {
        let p = [(0.0, 1.0), (1.0, 3.0), (2.0, 5.0)];
        assert_eq!(smooth(&p, 2), vec![(0.0, 1.0), (1.0, 2.0), (2.0, 4.0)]);
        assert_eq!(smooth(&p, 1), p.to_vec());
    }
}
