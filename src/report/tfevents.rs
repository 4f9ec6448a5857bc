//! TensorBoard event files: TFRecord framing (length, masked CRC-32C of the length, payload, masked
//! CRC-32C of the payload) around `tensorflow.Event` protobufs holding scalar and PNG image
//! summaries — what `tensorboard --logdir` and wandb's TensorBoard sync read.

use anyhow::{bail, Context, Result};
use prost::Message;
use std::io::Write;
use std::path::{Path, PathBuf};

/// `tensorflow.Event` (the fields dgpo writes).
#[derive(Clone, PartialEq, prost::Message)]
pub struct Event {
    #[prost(double, tag = "1")]
    pub wall_time: f64,
    #[prost(int64, tag = "2")]
    pub step: i64,
    #[prost(string, optional, tag = "3")]
    pub file_version: Option<String>,
    #[prost(message, optional, tag = "5")]
    pub summary: Option<Summary>,
}

/// `tensorflow.Summary`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct Summary {
    #[prost(message, repeated, tag = "1")]
    pub value: Vec<SummaryValue>,
}

/// `tensorflow.Summary.Value`: a scalar (`simple_value`) or an image.
#[derive(Clone, PartialEq, prost::Message)]
pub struct SummaryValue {
    #[prost(string, tag = "1")]
    pub tag: String,
    #[prost(float, optional, tag = "2")]
    pub simple_value: Option<f32>,
    #[prost(message, optional, tag = "4")]
    pub image: Option<SummaryImage>,
}

/// `tensorflow.Summary.Image`: an encoded PNG.
#[derive(Clone, PartialEq, prost::Message)]
pub struct SummaryImage {
    #[prost(int32, tag = "1")]
    pub height: i32,
    #[prost(int32, tag = "2")]
    pub width: i32,
    #[prost(int32, tag = "3")]
    pub colorspace: i32,
    #[prost(bytes = "vec", tag = "4")]
    pub encoded_image_string: Vec<u8>,
}

const CASTAGNOLI: crc::Crc<u32> = crc::Crc::<u32>::new(&crc::CRC_32_ISCSI);

/// TFRecord's masked CRC-32C.
pub fn masked_crc(data: &[u8]) -> u32 {
    let c = CASTAGNOLI.checksum(data);
    c.rotate_right(15).wrapping_add(0xa282_ead8)
}

/// One TFRecord: `u64` length, its masked CRC, the payload, its masked CRC (little-endian).
pub fn frame(payload: &[u8]) -> Vec<u8> {
    let len = (payload.len() as u64).to_le_bytes();
    let mut out = Vec::with_capacity(payload.len() + 16);
    out.extend_from_slice(&len);
    out.extend_from_slice(&masked_crc(&len).to_le_bytes());
    out.extend_from_slice(payload);
    out.extend_from_slice(&masked_crc(payload).to_le_bytes());
    out
}

/// Every event of a file, each record's framing and both CRCs checked.
pub fn read_events(path: &Path) -> Result<Vec<Event>> {
    let data = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
    let mut events = Vec::new();
    let mut at = 0usize;
    let u32_at = |i: usize| u32::from_le_bytes([data[i], data[i + 1], data[i + 2], data[i + 3]]);
    while at < data.len() {
        if data.len() - at < 12 {
            bail!("{}: truncated record header at byte {at}", path.display());
        }
        let len_bytes = &data[at..at + 8];
        if u32_at(at + 8) != masked_crc(len_bytes) {
            bail!("{}: bad length CRC at byte {at}", path.display());
        }
        let len = u64::from_le_bytes(len_bytes.try_into()?) as usize;
        let start = at + 12;
        if data.len() < start + len + 4 {
            bail!("{}: truncated record at byte {at}", path.display());
        }
        let payload = &data[start..start + len];
        if u32_at(start + len) != masked_crc(payload) {
            bail!("{}: bad payload CRC at byte {at}", path.display());
        }
        events.push(
            Event::decode(payload).with_context(|| {
                format!("{}: record at byte {at} is not an Event", path.display())
            })?,
        );
        at = start + len + 4;
    }
    Ok(events)
}

/// An open event file; every event is flushed as it is written, so a live TensorBoard sees it and
/// a kill loses nothing already written.
pub struct EventWriter {
    path: PathBuf,
    file: std::fs::File,
}

impl EventWriter {
    /// A new `events.out.tfevents.<unix time>.<host>.<pid>` in `dir`, opened with its version record.
    pub fn create(dir: &Path) -> Result<Self> {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        let now = unix_now();
        let host = std::env::var("HOSTNAME").unwrap_or_else(|_| "dgpo".into());
        let name = format!(
            "events.out.tfevents.{}.{}.{}",
            now as u64,
            host.replace(['/', '\\'], "_"),
            std::process::id()
        );
        let path = dir.join(name);
        let file =
            std::fs::File::create(&path).with_context(|| format!("creating {}", path.display()))?;
        let mut w = Self { path, file };
        w.write(&Event {
            wall_time: now,
            step: 0,
            file_version: Some("brain.Event:2".into()),
            summary: None,
        })?;
        Ok(w)
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Scalars `(tag, value)` at `step`, one event.
    pub fn scalars(&mut self, step: i64, wall_time: f64, values: &[(String, f32)]) -> Result<()> {
        if values.is_empty() {
            return Ok(());
        }
        let value = values
            .iter()
            .map(|(tag, v)| SummaryValue {
                tag: tag.clone(),
                simple_value: Some(*v),
                image: None,
            })
            .collect();
        self.summary(step, wall_time, Summary { value })
    }

    /// A PNG image `(width, height)` under `tag` at `step`.
    pub fn image(
        &mut self,
        step: i64,
        wall_time: f64,
        tag: &str,
        png: Vec<u8>,
        size: (u32, u32),
    ) -> Result<()> {
        let image = SummaryImage {
            height: size.1 as i32,
            width: size.0 as i32,
            colorspace: 3,
            encoded_image_string: png,
        };
        let value = vec![SummaryValue {
            tag: tag.into(),
            simple_value: None,
            image: Some(image),
        }];
        self.summary(step, wall_time, Summary { value })
    }

    fn summary(&mut self, step: i64, wall_time: f64, summary: Summary) -> Result<()> {
        self.write(&Event {
            wall_time,
            step,
            file_version: None,
            summary: Some(summary),
        })
    }

    fn write(&mut self, e: &Event) -> Result<()> {
        self.file
            .write_all(&frame(&e.encode_to_vec()))
            .and_then(|_| self.file.flush())
            .with_context(|| format!("writing {}", self.path.display()))
    }
}

/// Seconds since the Unix epoch.
pub fn unix_now() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn masked_crc_matches_tensorflow() {
        // CRC-32C check value of "123456789" is 0xE3069283 (RFC 3720); masked as TFRecord masks it.
        assert_eq!(CASTAGNOLI.checksum(b"123456789"), 0xE306_9283);
        assert_eq!(
            masked_crc(b"123456789"),
            0xE306_9283u32.rotate_right(15).wrapping_add(0xa282_ead8)
        );
        // An empty payload's masked CRC, as TensorFlow's `masked_crc32c(b"")` gives.
        assert_eq!(masked_crc(b""), 0xa282_ead8);
    }

    #[test]
    fn events_round_trip_and_corruption_is_caught() {
        let dir = std::env::temp_dir().join(format!("dgpo-tfevents-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let mut w = EventWriter::create(&dir).unwrap();
        w.scalars(
            3,
            10.5,
            &[("train/kl".into(), 0.25), ("train/reward_mean".into(), 0.5)],
        )
        .unwrap();
        w.image(3, 11.0, "eval/grid", vec![137, 80, 78, 71], (4, 2))
            .unwrap();
        let path = w.path().to_path_buf();
        drop(w);
        let ev = read_events(&path).unwrap();
        assert_eq!(ev.len(), 3);
        assert_eq!(ev[0].file_version.as_deref(), Some("brain.Event:2"));
        let s = ev[1].summary.as_ref().unwrap();
        assert_eq!((ev[1].step, ev[1].wall_time), (3, 10.5));
        assert_eq!(s.value[0].tag, "train/kl");
        assert_eq!(s.value[1].simple_value, Some(0.5));
        let img = ev[2].summary.as_ref().unwrap().value[0]
            .image
            .clone()
            .unwrap();
        assert_eq!((img.width, img.height), (4, 2));
        let mut bytes = std::fs::read(&path).unwrap();
        let n = bytes.len();
        bytes[n - 6] ^= 1;
        std::fs::write(&path, &bytes).unwrap();
        let e = read_events(&path).unwrap_err().to_string();
        assert!(e.contains("CRC"), "{e}");
        let _ = std::fs::remove_dir_all(&dir);
    }
}
