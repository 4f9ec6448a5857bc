//! The TensorBoard log of a run (`<run>/tb/`): rebuilt from the run's rows and grids when it opens,
//! appended to as rows are recorded.

use super::rows::{read_rows, scalars, step_of};
use super::tfevents::{unix_now, EventWriter};
use anyhow::{Context, Result};
use serde_json::Value;
use std::path::{Path, PathBuf};

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
        let png = crate::image::png_at_most(png, super::html::MAX_GRID_WIDTH);
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
    row["unix_s"].as_f64().unwrap_or_else(unix_now)
}

/// Width and height from a PNG's IHDR chunk.
pub fn png_size(png: &[u8]) -> Option<(u32, u32)> {
    if png.len() < 24 || &png[1..4] != b"PNG" || &png[12..16] != b"IHDR" {
        return None;
    }
    let be = |i: usize| u32::from_be_bytes([png[i], png[i + 1], png[i + 2], png[i + 3]]);
    Some((be(16), be(20)))
}

#[cfg(test)]
mod tests {
    use super::*;

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
