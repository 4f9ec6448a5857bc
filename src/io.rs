//! Crash-safe file output: everything is written to a temporary name in the destination folder and
//! renamed into place, so a kill or a full disk never leaves a half-written file under the real name.

use anyhow::{Context, Result};
use candle_core::Tensor;
use std::collections::HashMap;
use std::path::{Path, PathBuf};

fn tmp_name(path: &Path) -> PathBuf {
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().to_string())
        .unwrap_or_default();
    path.with_file_name(format!(".{name}.tmp-{}", std::process::id()))
}

/// Write `bytes` to `path` atomically (temp file, fsync, rename).
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    use std::io::Write;
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir)
            .with_context(|| format!("creating folder {}", dir.display()))?;
    }
    let tmp = tmp_name(path);
    let res = (|| -> Result<()> {
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)?;
        Ok(())
    })();
    if res.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    res.with_context(|| format!("writing {}", path.display()))
}

/// Save named tensors as safetensors atomically, with string metadata in the header.
pub fn save_safetensors(
    path: &Path,
    tensors: &HashMap<String, Tensor>,
    metadata: Option<HashMap<String, String>>,
) -> Result<()> {
    let mut sorted: Vec<(&String, &Tensor)> = tensors.iter().collect();
    sorted.sort_by(|a, b| a.0.cmp(b.0));
    let contiguous: Vec<(String, Tensor)> = sorted
        .into_iter()
        .map(|(k, t)| Ok((k.clone(), t.contiguous()?)))
        .collect::<Result<_>>()?;
    let bytes = safetensors::serialize(contiguous.iter().map(|(k, t)| (k.as_str(), t)), metadata)
        .with_context(|| format!("serialising {}", path.display()))?;
    let bytes = with_sorted_header(bytes)
        .with_context(|| format!("serialising {}: rewriting its header", path.display()))?;
    write_atomic(path, &bytes)
}

/// A serialised safetensors file with its JSON header rewritten in a fixed order — entries by name,
/// `__metadata__`'s keys sorted — so the same tensors and metadata always give the same bytes (the
/// metadata comes in a `HashMap`, whose order varies from run to run). The header stays padded with
/// spaces to a multiple of 8 bytes; the data and its offsets do not move.
fn with_sorted_header(bytes: Vec<u8>) -> Result<Vec<u8>> {
    use std::collections::BTreeMap;
    let n = u64::from_le_bytes(bytes[..8].try_into()?) as usize;
    let mut header: BTreeMap<String, serde_json::Value> = serde_json::from_slice(&bytes[8..8 + n])?;
    if let Some(meta) = header.remove("__metadata__") {
        let sorted: BTreeMap<String, serde_json::Value> = serde_json::from_value(meta)?;
        header.insert("__metadata__".into(), serde_json::to_value(sorted)?);
    }
    let mut text = serde_json::to_string(&header)?.into_bytes();
    text.resize(text.len().next_multiple_of(8), b' ');
    let mut out = Vec::with_capacity(8 + text.len() + bytes.len() - 8 - n);
    out.extend_from_slice(&(text.len() as u64).to_le_bytes());
    out.extend_from_slice(&text);
    out.extend_from_slice(&bytes[8 + n..]);
    Ok(out)
}

/// Write `tensors` into `dir` as diffusers does: one `<stem>.safetensors` when they fit in
/// `max_shard_bytes`, else shards `<stem>-0000i-of-0000n.safetensors` (filled in name order, each at
/// most `max_shard_bytes` unless a single tensor is larger) plus `<stem>.safetensors.index.json`
/// (`metadata.total_size`, `weight_map`). Every file is written atomically. Returns the files written.
pub fn save_safetensors_sharded(
    dir: &Path,
    stem: &str,
    tensors: &HashMap<String, Tensor>,
    max_shard_bytes: usize,
    metadata: Option<HashMap<String, String>>,
) -> Result<Vec<std::path::PathBuf>> {
    let size = |t: &Tensor| t.elem_count() * t.dtype().size_in_bytes();
    let total: usize = tensors.values().map(size).sum();
    if total <= max_shard_bytes {
        let p = dir.join(format!("{stem}.safetensors"));
        save_safetensors(&p, tensors, metadata)?;
        return Ok(vec![p]);
    }
    let mut names: Vec<&String> = tensors.keys().collect();
    names.sort();
    let mut shards: Vec<Vec<&String>> = vec![vec![]];
    let mut used = 0usize;
    for n in names {
        let s = size(&tensors[n]);
        if used > 0 && used + s > max_shard_bytes {
            shards.push(vec![]);
            used = 0;
        }
        shards.last_mut().expect("one shard").push(n);
        used += s;
    }
    let count = shards.len();
    let mut files = Vec::with_capacity(count + 1);
    let mut weight_map = serde_json::Map::new();
    for (i, shard) in shards.iter().enumerate() {
        let file = format!("{stem}-{:05}-of-{count:05}.safetensors", i + 1);
        let part: HashMap<String, Tensor> = shard
            .iter()
            .map(|n| ((*n).clone(), tensors[*n].clone()))
            .collect();
        save_safetensors(&dir.join(&file), &part, metadata.clone())?;
        for n in shard {
            weight_map.insert((*n).clone(), file.clone().into());
        }
        files.push(dir.join(file));
    }
    let index = serde_json::json!({
        "metadata": { "total_size": total },
        "weight_map": weight_map,
    });
    let ip = dir.join(format!("{stem}.safetensors.index.json"));
    write_atomic(&ip, serde_json::to_string_pretty(&index)?.as_bytes())?;
    files.push(ip);
    Ok(files)
}

/// Replace the folder `dst` by the fully written folder `staging` (same parent): the old folder is moved
/// aside first and removed only after the new one is in place.
pub fn replace_dir(staging: &Path, dst: &Path) -> Result<()> {
    let old = dst.with_file_name(format!(
        ".{}.old-{}",
        dst.file_name().unwrap_or_default().to_string_lossy(),
        std::process::id()
    ));
    if dst.exists() {
        std::fs::rename(dst, &old).with_context(|| format!("moving {} aside", dst.display()))?;
    }
    std::fs::rename(staging, dst)
        .with_context(|| format!("moving {} to {}", staging.display(), dst.display()))?;
    if old.exists() {
        std::fs::remove_dir_all(&old).with_context(|| format!("removing {}", old.display()))?;
    }
    Ok(())
}

/// A fresh staging folder next to `dst` for [`replace_dir`].
pub fn staging_dir(dst: &Path) -> Result<PathBuf> {
    let s = dst.with_file_name(format!(
        ".{}.staging-{}",
        dst.file_name().unwrap_or_default().to_string_lossy(),
        std::process::id()
    ));
    if s.exists() {
        std::fs::remove_dir_all(&s)?;
    }
    std::fs::create_dir_all(&s).with_context(|| format!("creating {}", s.display()))?;
    Ok(s)
}

/// Append one JSON object as a line of a JSON-lines file (created if missing).
pub fn append_jsonl(path: &Path, value: &serde_json::Value) -> Result<()> {
    use std::io::Write;
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .with_context(|| format!("opening {}", path.display()))?;
    writeln!(f, "{value}").with_context(|| format!("writing {}", path.display()))?;
    Ok(())
}

/// Keep only the lines of a JSON-lines file whose numeric field `key` passes `keep` (e.g. drop the
/// metrics written after the checkpoint a run resumes from). A missing file is fine.
pub fn retain_jsonl(path: &Path, key: &str, keep: impl Fn(u64) -> bool) -> Result<()> {
    let Ok(text) = std::fs::read_to_string(path) else {
        return Ok(());
    };
    let kept: Vec<&str> = text
        .lines()
        .filter(|l| {
            serde_json::from_str::<serde_json::Value>(l)
                .ok()
                .and_then(|v| v.get(key).and_then(|s| s.as_u64()))
                .is_some_and(&keep)
        })
        .collect();
    let mut out = kept.join("\n");
    if !out.is_empty() {
        out.push('\n');
    }
    write_atomic(path, out.as_bytes())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn atomic_writes_and_dir_replacement() {
        let d = std::env::temp_dir().join(format!("dgpo-io-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        let f = d.join("sub/a.txt");
        write_atomic(&f, b"one").unwrap();
        write_atomic(&f, b"two").unwrap();
        assert_eq!(std::fs::read(&f).unwrap(), b"two");
        let dst = d.join("ckpt");
        for v in ["1", "2"] {
            let s = staging_dir(&dst).unwrap();
            std::fs::write(s.join("v"), v).unwrap();
            replace_dir(&s, &dst).unwrap();
            assert_eq!(std::fs::read_to_string(dst.join("v")).unwrap(), v);
        }
        let leftovers: Vec<_> = std::fs::read_dir(&d).unwrap().collect();
        assert_eq!(leftovers.len(), 2, "only sub/ and ckpt/ remain");
        std::fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn same_tensors_and_metadata_give_the_same_bytes_and_still_load() {
        let d = std::env::temp_dir().join(format!("dgpo-io-st-{}", std::process::id()));
        let dev = candle_core::Device::Cpu;
        let tensors = HashMap::from([
            (
                "w".to_string(),
                Tensor::arange(0f32, 6., &dev)
                    .unwrap()
                    .reshape((2, 3))
                    .unwrap(),
            ),
            (
                "b".to_string(),
                Tensor::ones(5, candle_core::DType::F16, &dev).unwrap(),
            ),
        ]);
        let mut files = vec![];
        for i in 0..2 {
            // a fresh HashMap each time: its iteration order changes with its random state
            let meta: HashMap<String, String> = (0..24)
                .map(|k| (format!("key{k:02}"), format!("value {k}")))
                .collect();
            let f = d.join(format!("{i}.safetensors"));
            save_safetensors(&f, &tensors, Some(meta)).unwrap();
            files.push(std::fs::read(&f).unwrap());
        }
        assert_eq!(files[0], files[1], "two saves of the same content differ");
        let bytes = &files[0];
        let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
        assert_eq!(n % 8, 0, "header padded to a multiple of 8");
        let header = std::str::from_utf8(&bytes[8..8 + n]).unwrap();
        let pos: Vec<usize> = (0..24)
            .map(|k| header.find(&format!("\"key{k:02}\"")).unwrap())
            .collect();
        assert!(
            pos.windows(2).all(|w| w[0] < w[1]),
            "metadata sorted: {header}"
        );
        let st = safetensors::SafeTensors::deserialize(bytes).unwrap();
        assert_eq!(st.len(), 2);
        let (_, meta) = safetensors::SafeTensors::read_metadata(bytes).unwrap();
        assert_eq!(meta.metadata().as_ref().unwrap()["key07"], "value 7");
        let back = candle_core::safetensors::load(d.join("0.safetensors"), &dev).unwrap();
        assert_eq!(
            back["w"].to_vec2::<f32>().unwrap(),
            vec![vec![0., 1., 2.], vec![3., 4., 5.]]
        );
        assert_eq!(back["b"].dtype(), candle_core::DType::F16);
        std::fs::remove_dir_all(&d).unwrap();
    }
}
