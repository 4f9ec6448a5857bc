//! Watching a run: the scalars of `metrics.jsonl` rows under stable tag names, written live as
//! TensorBoard event files (`<run>/tb/`), and `report.html` — curves, grids and config of one run or
//! several overlaid (`dgpo report`). Everything here is derived from the run folder's own files.

pub mod html;
pub mod plot;
pub mod rows;
pub mod tb;
pub mod tfevents;

pub use rows::{read_rows, scalars, step_of};
pub use tb::{png_size, TbLog};

use crate::io::write_atomic;
use anyhow::Result;
use std::path::{Path, PathBuf};

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
