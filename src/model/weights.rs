//! Reading transformer weights: diffusers folders (one file or shards with an index), StabilityAI single
//! files through one explicit name map, and a ledger that reports every missing, unexpected or misshapen
//! tensor at once instead of failing on the first.

use anyhow::{bail, Context, Result};
use candle_core::{DType, Device, Tensor};
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::{Path, PathBuf};

/// Tensors by diffusers name, and a record of what the model asked for.
pub struct WeightStore {
    source: String,
    tensors: HashMap<String, Tensor>,
    dtype: DType,
    used: BTreeSet<String>,
    missing: Vec<String>,
    wrong_shape: Vec<(String, Vec<usize>, Vec<usize>)>,
}

impl WeightStore {
    /// `dtype` is the storage dtype the model computes with; tensors are converted on `take`.
    pub fn new(source: impl Into<String>, tensors: HashMap<String, Tensor>, dtype: DType) -> Self {
        Self {
            source: source.into(),
            tensors,
            dtype,
            used: BTreeSet::new(),
            missing: vec![],
            wrong_shape: vec![],
        }
    }

    pub fn contains(&self, name: &str) -> bool {
        self.tensors.contains_key(name)
    }

    pub fn device(&self) -> Device {
        self.tensors
            .values()
            .next()
            .map(|t| t.device().clone())
            .unwrap_or(Device::Cpu)
    }

    /// The tensor `name` with `shape`. A missing or misshapen tensor is recorded and zeros are returned,
    /// so that [`WeightStore::finish`] can list every problem in one message.
    pub fn take(&mut self, name: &str, shape: &[usize]) -> Result<Tensor> {
        let dev = self.device();
        match self.tensors.get(name) {
            Some(t) if t.dims() == shape => {
                self.used.insert(name.to_string());
                Ok(t.to_dtype(self.dtype)?)
            }
            Some(t) => {
                self.used.insert(name.to_string());
                self.wrong_shape
                    .push((name.to_string(), shape.to_vec(), t.dims().to_vec()));
                Ok(Tensor::zeros(shape, self.dtype, &dev)?)
            }
            None => {
                self.missing.push(name.to_string());
                Ok(Tensor::zeros(shape, self.dtype, &dev)?)
            }
        }
    }

    /// Fail with the complete list of problems, if any.
    pub fn finish(self) -> Result<()> {
        let unexpected: Vec<&String> = self
            .tensors
            .keys()
            .filter(|k| !self.used.contains(*k))
            .collect::<BTreeSet<_>>()
            .into_iter()
            .collect();
        if self.missing.is_empty() && self.wrong_shape.is_empty() && unexpected.is_empty() {
            return Ok(());
        }
        let mut msg = format!(
            "the weights in {} do not match the transformer config:",
            self.source
        );
        let list = |msg: &mut String, title: &str, items: Vec<String>| {
            if items.is_empty() {
                return;
            }
            msg.push_str(&format!("\n  {title} ({}):", items.len()));
            for it in items.iter().take(20) {
                msg.push_str(&format!("\n    {it}"));
            }
            if items.len() > 20 {
                msg.push_str(&format!("\n    … and {} more", items.len() - 20));
            }
        };
        list(&mut msg, "missing keys", self.missing.clone());
        list(
            &mut msg,
            "unexpected keys",
            unexpected.iter().map(|s| s.to_string()).collect(),
        );
        list(
            &mut msg,
            "wrong shapes",
            self.wrong_shape
                .iter()
                .map(|(n, want, got)| format!("{n}: expected {want:?}, found {got:?}"))
                .collect(),
        );
        msg.push_str(
            "\n  (is config.json the one that belongs to these weights? the architecture is read from it)",
        );
        bail!(msg)
    }
}

/// Read every tensor of a set of safetensors files onto `dev` (in their stored dtype).
pub fn read_safetensors(files: &[PathBuf], dev: &Device) -> Result<HashMap<String, Tensor>> {
    let mut out = HashMap::new();
    for f in files {
        let t = load_safetensors_file(f, dev)?;
        for (k, v) in t {
            if out.insert(k.clone(), v).is_some() {
                bail!("tensor {k} appears twice (again in {})", f.display());
            }
        }
    }
    Ok(out)
}

/// The tensors of one safetensors file; a file the reader refuses is explained with the first tensor
/// whose header entry does not match its data (shape × dtype against its byte range), by name.
pub fn load_safetensors_file(f: &Path, dev: &Device) -> Result<HashMap<String, Tensor>> {
    candle_core::safetensors::load(f, dev).map_err(|e| {
        let what = std::fs::read(f)
            .ok()
            .and_then(|bytes| misshapen_tensor(&bytes))
            .map(|w| format!(": {w}"))
            .unwrap_or_default();
        anyhow::anyhow!(e).context(format!("reading safetensors file {}{what}", f.display()))
    })
}

/// The first tensor of a safetensors file whose header does not match its data, explained.
pub fn misshapen_tensor(bytes: &[u8]) -> Option<String> {
    #[derive(serde::Deserialize)]
    struct Info {
        dtype: String,
        shape: Vec<usize>,
        data_offsets: (usize, usize),
    }
    let n = u64::from_le_bytes(bytes.get(..8)?.try_into().ok()?) as usize;
    let header = bytes.get(8..8usize.checked_add(n)?)?;
    let mut entries: BTreeMap<String, serde_json::Value> = serde_json::from_slice(header).ok()?;
    entries.remove("__metadata__");
    let data_len = bytes.len() - 8 - n;
    let mut infos = vec![];
    for (name, v) in entries {
        match serde_json::from_value::<Info>(v) {
            Ok(i) => infos.push((name, i)),
            Err(e) => return Some(format!("tensor {name:?}: malformed header entry ({e})")),
        }
    }
    for (name, i) in infos {
        let width = match i.dtype.as_str() {
            "F64" | "I64" | "U64" => 8,
            "F32" | "I32" | "U32" => 4,
            "F16" | "BF16" | "I16" | "U16" => 2,
            "BOOL" | "U8" | "I8" | "F8_E4M3" | "F8_E5M2" => 1,
            other => return Some(format!("tensor {name:?}: unknown dtype {other:?}")),
        };
        let (start, end) = i.data_offsets;
        let want = i
            .shape
            .iter()
            .try_fold(width, |a: usize, d| a.checked_mul(*d));
        if want != end.checked_sub(start) {
            return Some(format!(
                "tensor {name:?}: shape {:?} of {} is {} bytes, but its data_offsets [{start}, {end}] \
                 hold {}",
                i.shape,
                i.dtype,
                want.map_or("too many".to_string(), |w| w.to_string()),
                end.saturating_sub(start)
            ));
        }
        if end > data_len {
            return Some(format!(
                "tensor {name:?}: its data_offsets [{start}, {end}] end past the {data_len} bytes of \
                 data (a truncated file?)"
            ));
        }
    }
    None
}

/// The weight files of a diffusers model folder: `*.safetensors.index.json` with shards, or one file.
pub fn diffusers_weight_files(dir: &Path) -> Result<Vec<PathBuf>> {
    let entries: Vec<PathBuf> = std::fs::read_dir(dir)
        .with_context(|| format!("listing model folder {}", dir.display()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .collect();
    let name = |p: &PathBuf| {
        p.file_name()
            .map(|s| s.to_string_lossy().to_string())
            .unwrap_or_default()
    };
    let mut indexes: Vec<&PathBuf> = entries
        .iter()
        .filter(|p| name(p).ends_with(".safetensors.index.json"))
        .collect();
    indexes.sort();
    if let Some(index) = indexes.first() {
        if indexes.len() > 1 {
            bail!(
                "{} holds several shard indexes ({}); keep one",
                dir.display(),
                indexes
                    .iter()
                    .map(|p| name(p))
                    .collect::<Vec<_>>()
                    .join(", ")
            );
        }
        let text = std::fs::read_to_string(index)
            .with_context(|| format!("reading {}", index.display()))?;
        let v: serde_json::Value = serde_json::from_str(&text)
            .with_context(|| format!("{} is not valid JSON", index.display()))?;
        let map = v
            .get("weight_map")
            .and_then(|m| m.as_object())
            .with_context(|| format!("{} has no \"weight_map\" object", index.display()))?;
        let shards: BTreeSet<&str> = map.values().filter_map(|s| s.as_str()).collect();
        let files: Vec<PathBuf> = shards.iter().map(|s| dir.join(s)).collect();
        for f in &files {
            if !f.exists() {
                bail!(
                    "{} lists shard {} which does not exist",
                    index.display(),
                    f.display()
                );
            }
        }
        return Ok(files);
    }
    let mut singles: Vec<PathBuf> = entries
        .into_iter()
        .filter(|p| name(p).ends_with(".safetensors"))
        .collect();
    singles.sort();
    match singles.len() {
        0 => bail!("no .safetensors weights in {}", dir.display()),
        1 => Ok(singles),
        _ => {
            // diffusers' default name wins over variants such as `.fp16.safetensors`.
            if let Some(p) = singles
                .iter()
                .find(|p| name(p) == "diffusion_pytorch_model.safetensors")
            {
                Ok(vec![p.clone()])
            } else {
                bail!(
                    "{} holds several .safetensors files and no index: {}",
                    dir.display(),
                    singles.iter().map(name).collect::<Vec<_>>().join(", ")
                )
            }
        }
    }
}

/// How a StabilityAI tensor becomes diffusers tensors.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Xform {
    Same,
    /// Fused `qkv` rows split into three equal parts.
    SplitQkv,
    /// The final adaLN holds (shift, scale) in SAI order, (scale, shift) in diffusers order.
    SwapScaleShift,
}

/// The one explicit name map between the StabilityAI single-file layout and diffusers names.
/// Returns, for a SAI key (without `model.diffusion_model.`), the diffusers names and the transform.
fn sai_rule(key: &str, num_layers: usize) -> Option<(Vec<String>, Xform)> {
    if key == "pos_embed" {
        return Some((vec!["pos_embed.pos_embed".into()], Xform::Same));
    }
    let (stem, suffix) = key.rsplit_once('.')?; // suffix: weight | bias
    let one = |n: &str| Some((vec![format!("{n}.{suffix}")], Xform::Same));
    let global = [
        ("x_embedder.proj", "pos_embed.proj"),
        (
            "t_embedder.mlp.0",
            "time_text_embed.timestep_embedder.linear_1",
        ),
        (
            "t_embedder.mlp.2",
            "time_text_embed.timestep_embedder.linear_2",
        ),
        ("y_embedder.mlp.0", "time_text_embed.text_embedder.linear_1"),
        ("y_embedder.mlp.2", "time_text_embed.text_embedder.linear_2"),
        ("context_embedder", "context_embedder"),
        ("final_layer.linear", "proj_out"),
    ];
    if stem == "final_layer.adaLN_modulation.1" {
        return Some((
            vec![format!("norm_out.linear.{suffix}")],
            Xform::SwapScaleShift,
        ));
    }
    if let Some((_, d)) = global.iter().find(|(s, _)| *s == stem) {
        return one(d);
    }
    let rest = stem.strip_prefix("joint_blocks.")?;
    let (i, rest) = rest.split_once('.')?;
    let i: usize = i.parse().ok()?;
    let p = format!("transformer_blocks.{i}");
    let qkv = |a: &str, names: [&str; 3]| {
        Some((
            names
                .iter()
                .map(|n| format!("{p}.{a}.{n}.{suffix}"))
                .collect(),
            Xform::SplitQkv,
        ))
    };
    let to = |n: &str| Some((vec![format!("{p}.{n}.{suffix}")], Xform::Same));
    match rest {
        "x_block.attn.qkv" => qkv("attn", ["to_q", "to_k", "to_v"]),
        "x_block.attn2.qkv" => qkv("attn2", ["to_q", "to_k", "to_v"]),
        "context_block.attn.qkv" => qkv("attn", ["add_q_proj", "add_k_proj", "add_v_proj"]),
        "x_block.attn.proj" => to("attn.to_out.0"),
        "x_block.attn2.proj" => to("attn2.to_out.0"),
        "context_block.attn.proj" => to("attn.to_add_out"),
        "x_block.attn.ln_q" => to("attn.norm_q"),
        "x_block.attn.ln_k" => to("attn.norm_k"),
        "x_block.attn2.ln_q" => to("attn2.norm_q"),
        "x_block.attn2.ln_k" => to("attn2.norm_k"),
        "context_block.attn.ln_q" => to("attn.norm_added_q"),
        "context_block.attn.ln_k" => to("attn.norm_added_k"),
        "x_block.mlp.fc1" => to("ff.net.0.proj"),
        "x_block.mlp.fc2" => to("ff.net.2"),
        "context_block.mlp.fc1" => to("ff_context.net.0.proj"),
        "context_block.mlp.fc2" => to("ff_context.net.2"),
        "x_block.adaLN_modulation.1" => to("norm1.linear"),
        "context_block.adaLN_modulation.1" => {
            // The last block's context stream only needs (shift, scale) for its attention input.
            let x = if i + 1 == num_layers {
                Xform::SwapScaleShift
            } else {
                Xform::Same
            };
            Some((vec![format!("{p}.norm1_context.linear.{suffix}")], x))
        }
        _ => None,
    }
}

fn swap_halves(t: &Tensor) -> Result<Tensor> {
    let n = t.dim(0)?;
    if n % 2 != 0 {
        bail!("cannot swap scale/shift halves of a tensor with {n} rows");
    }
    Ok(Tensor::cat(
        &[t.narrow(0, n / 2, n / 2)?, t.narrow(0, 0, n / 2)?],
        0,
    )?)
}

/// Rename a StabilityAI single-file state dict (`model.diffusion_model.joint_blocks.N.x_block…`) to
/// diffusers names. Keys outside the transformer (VAE, text encoders in "all-in-one" files) are dropped;
/// an unknown transformer key is an error.
pub fn sai_to_diffusers(
    sai: HashMap<String, Tensor>,
    num_layers: usize,
    source: &str,
) -> Result<HashMap<String, Tensor>> {
    let mut out = HashMap::new();
    let mut unknown = vec![];
    for (k, t) in sai {
        let key = match k.strip_prefix("model.diffusion_model.") {
            Some(s) => s.to_string(),
            None if k.starts_with("first_stage_model.")
                || k.starts_with("text_encoders.")
                || k.starts_with("conditioner.") =>
            {
                continue
            }
            None => k.clone(),
        };
        let Some((names, xf)) = sai_rule(&key, num_layers) else {
            unknown.push(k);
            continue;
        };
        match xf {
            Xform::Same => {
                out.insert(names[0].clone(), t);
            }
            Xform::SwapScaleShift => {
                out.insert(names[0].clone(), swap_halves(&t)?);
            }
            Xform::SplitQkv => {
                let n = t.dim(0)?;
                if n % 3 != 0 {
                    bail!("{source}: {k} has {n} rows, not divisible into q, k, v");
                }
                for (j, name) in names.iter().enumerate() {
                    out.insert(name.clone(), t.narrow(0, j * n / 3, n / 3)?.contiguous()?);
                }
            }
        }
    }
    if !unknown.is_empty() {
        unknown.sort();
        bail!(
            "{source}: {} tensors have no diffusers name in the SD3 single-file map, e.g. {}",
            unknown.len(),
            unknown
                .iter()
                .take(5)
                .cloned()
                .collect::<Vec<_>>()
                .join(", ")
        );
    }
    Ok(out)
}

/// The reverse map, diffusers → StabilityAI single file (for export and for tests of the map).
pub fn diffusers_to_sai(
    diff: &HashMap<String, Tensor>,
    num_layers: usize,
) -> Result<BTreeMap<String, Tensor>> {
    // Walk all SAI names the forward map knows by building candidates from the diffusers keys.
    let mut out = BTreeMap::new();
    let mut used = BTreeSet::new();
    let mut candidates: BTreeSet<String> = BTreeSet::new();
    for k in diff.keys() {
        candidates.extend(sai_candidates(k));
    }
    for sai in candidates {
        let Some((names, xf)) = sai_rule(&sai, num_layers) else {
            continue;
        };
        if !names.iter().all(|n| diff.contains_key(n)) {
            continue;
        }
        let t = match xf {
            Xform::Same => diff[&names[0]].clone(),
            Xform::SwapScaleShift => swap_halves(&diff[&names[0]])?,
            Xform::SplitQkv => {
                let parts: Vec<&Tensor> = names.iter().map(|n| &diff[n]).collect();
                Tensor::cat(&parts, 0)?
            }
        };
        used.extend(names);
        out.insert(format!("model.diffusion_model.{sai}"), t);
    }
    if let Some(k) = diff.keys().find(|k| !used.contains(*k)) {
        bail!("diffusers tensor {k} has no StabilityAI single-file name");
    }
    Ok(out)
}

/// SAI names that could map onto a diffusers key (inverse lookup of `sai_rule`'s table).
fn sai_candidates(diffusers_key: &str) -> Vec<String> {
    let Some((stem, suffix)) = diffusers_key.rsplit_once('.') else {
        return vec![];
    };
    if diffusers_key == "pos_embed.pos_embed" {
        return vec!["pos_embed".into()];
    }
    let global = [
        ("pos_embed.proj", "x_embedder.proj"),
        (
            "time_text_embed.timestep_embedder.linear_1",
            "t_embedder.mlp.0",
        ),
        (
            "time_text_embed.timestep_embedder.linear_2",
            "t_embedder.mlp.2",
        ),
        ("time_text_embed.text_embedder.linear_1", "y_embedder.mlp.0"),
        ("time_text_embed.text_embedder.linear_2", "y_embedder.mlp.2"),
        ("context_embedder", "context_embedder"),
        ("proj_out", "final_layer.linear"),
        ("norm_out.linear", "final_layer.adaLN_modulation.1"),
    ];
    if let Some((_, s)) = global.iter().find(|(d, _)| *d == stem) {
        return vec![format!("{s}.{suffix}")];
    }
    let Some(rest) = stem.strip_prefix("transformer_blocks.") else {
        return vec![];
    };
    let Some((i, rest)) = rest.split_once('.') else {
        return vec![];
    };
    let sai = match rest {
        "attn.to_q" | "attn.to_k" | "attn.to_v" => "x_block.attn.qkv",
        "attn2.to_q" | "attn2.to_k" | "attn2.to_v" => "x_block.attn2.qkv",
        "attn.add_q_proj" | "attn.add_k_proj" | "attn.add_v_proj" => "context_block.attn.qkv",
        "attn.to_out.0" => "x_block.attn.proj",
        "attn2.to_out.0" => "x_block.attn2.proj",
        "attn.to_add_out" => "context_block.attn.proj",
        "attn.norm_q" => "x_block.attn.ln_q",
        "attn.norm_k" => "x_block.attn.ln_k",
        "attn2.norm_q" => "x_block.attn2.ln_q",
        "attn2.norm_k" => "x_block.attn2.ln_k",
        "attn.norm_added_q" => "context_block.attn.ln_q",
        "attn.norm_added_k" => "context_block.attn.ln_k",
        "ff.net.0.proj" => "x_block.mlp.fc1",
        "ff.net.2" => "x_block.mlp.fc2",
        "ff_context.net.0.proj" => "context_block.mlp.fc1",
        "ff_context.net.2" => "context_block.mlp.fc2",
        "norm1.linear" => "x_block.adaLN_modulation.1",
        "norm1_context.linear" => "context_block.adaLN_modulation.1",
        _ => return vec![],
    };
    vec![format!("joint_blocks.{i}.{sai}.{suffix}")]
}

/// Where a transformer's weights and config live.
#[derive(Debug, Clone)]
pub enum WeightSource {
    /// A diffusers model folder with `config.json` (a pipeline root with `transformer/` also works).
    Diffusers(PathBuf),
    /// A StabilityAI single `.safetensors` file; the architecture still comes from a `config.json`.
    SingleFile { file: PathBuf, config: PathBuf },
}

impl WeightSource {
    /// Resolve a path: a folder is a diffusers model (or pipeline root), a file a single file whose
    /// config must be given.
    pub fn from_path(path: &Path, config: Option<&Path>) -> Result<Self> {
        if path.is_dir() {
            let sub = path.join("transformer");
            let dir = if path.join("config.json").exists() {
                path.to_path_buf()
            } else if sub.join("config.json").exists() {
                sub
            } else {
                bail!(
                    "{} is neither a diffusers transformer folder (config.json) nor a pipeline \
                     folder (transformer/config.json)",
                    path.display()
                );
            };
            Ok(WeightSource::Diffusers(dir))
        } else if path.is_file() {
            let config = config.with_context(|| {
                format!(
                    "{} is a single file: give the diffusers transformer config.json for it \
                     (model.transformer_config); the architecture is never guessed from a file name",
                    path.display()
                )
            })?;
            Ok(WeightSource::SingleFile {
                file: path.to_path_buf(),
                config: config.to_path_buf(),
            })
        } else {
            bail!("model path {} does not exist", path.display())
        }
    }

    pub fn config_path(&self) -> PathBuf {
        match self {
            WeightSource::Diffusers(d) => d.join("config.json"),
            WeightSource::SingleFile { config, .. } => config.clone(),
        }
    }

    /// Read the tensors, renamed to diffusers names.
    pub fn read(
        &self,
        num_layers: usize,
        dev: &Device,
    ) -> Result<(String, HashMap<String, Tensor>)> {
        match self {
            WeightSource::Diffusers(d) => {
                let files = diffusers_weight_files(d)?;
                Ok((d.display().to_string(), read_safetensors(&files, dev)?))
            }
            WeightSource::SingleFile { file, .. } => {
                let src = file.display().to_string();
                let raw = read_safetensors(std::slice::from_ref(file), dev)?;
                Ok((src.clone(), sai_to_diffusers(raw, num_layers, &src)?))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn a_tensor_whose_shape_does_not_match_its_bytes_is_named() {
        let d = std::env::temp_dir().join(format!("dgpo-weights-bad-{}", std::process::id()));
        std::fs::create_dir_all(&d).unwrap();
        let f = d.join("bad.safetensors");
        let header = br#"{"fine":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},"blocks.3.weight":{"dtype":"F32","shape":[4,4],"data_offsets":[8,24]}}"#;
        let mut bytes = (header.len() as u64).to_le_bytes().to_vec();
        bytes.extend_from_slice(header);
        bytes.extend_from_slice(&[0u8; 24]);
        std::fs::write(&f, &bytes).unwrap();
        let e = format!(
            "{:#}",
            read_safetensors(std::slice::from_ref(&f), &Device::Cpu).unwrap_err()
        );
        assert!(
            e.contains("bad.safetensors")
                && e.contains("tensor \"blocks.3.weight\": shape [4, 4] of F32 is 64 bytes")
                && e.contains("[8, 24] hold 16"),
            "{e}"
        );
        std::fs::remove_dir_all(&d).unwrap();
    }

    use super::*;

    #[test]
    fn sai_map_round_trips_and_swaps_final_scale_shift() {
        let dev = Device::Cpu;
        let mut d = HashMap::new();
        let t = |n: usize| Tensor::arange(0f32, n as f32, &dev).unwrap();
        d.insert("norm_out.linear.bias".to_string(), t(4));
        d.insert("transformer_blocks.0.attn.to_q.bias".to_string(), t(2));
        d.insert(
            "transformer_blocks.0.attn.to_k.bias".to_string(),
            (t(2) + 10.).unwrap(),
        );
        d.insert(
            "transformer_blocks.0.attn.to_v.bias".to_string(),
            (t(2) + 20.).unwrap(),
        );
        d.insert(
            "transformer_blocks.0.norm1_context.linear.bias".to_string(),
            t(4),
        );
        d.insert("pos_embed.pos_embed".to_string(), t(3));
        let sai = diffusers_to_sai(&d, 1).unwrap();
        let qkv: Vec<f32> = sai["model.diffusion_model.joint_blocks.0.x_block.attn.qkv.bias"]
            .to_vec1()
            .unwrap();
        assert_eq!(qkv, vec![0., 1., 10., 11., 20., 21.]);
        let fin: Vec<f32> = sai["model.diffusion_model.final_layer.adaLN_modulation.1.bias"]
            .to_vec1()
            .unwrap();
        assert_eq!(fin, vec![2., 3., 0., 1.]);
        let back = sai_to_diffusers(sai.into_iter().collect(), 1, "test").unwrap();
        assert_eq!(back.len(), d.len());
        for (k, v) in &d {
            let a: Vec<f32> = v.to_vec1().unwrap();
            let b: Vec<f32> = back[k].to_vec1().unwrap();
            assert_eq!(a, b, "{k}");
        }
    }

    #[test]
    fn ledger_lists_every_problem() {
        let dev = Device::Cpu;
        let mut m = HashMap::new();
        m.insert(
            "a".to_string(),
            Tensor::zeros((2, 3), DType::F32, &dev).unwrap(),
        );
        m.insert(
            "extra".to_string(),
            Tensor::zeros(1, DType::F32, &dev).unwrap(),
        );
        let mut w = WeightStore::new("test.safetensors", m, DType::F32);
        w.take("a", &[3, 2]).unwrap();
        w.take("b", &[1]).unwrap();
        let e = w.finish().unwrap_err().to_string();
        assert!(e.contains("missing keys (1)") && e.contains("    b"), "{e}");
        assert!(
            e.contains("unexpected keys (1)") && e.contains("extra"),
            "{e}"
        );
        assert!(e.contains("a: expected [3, 2], found [2, 3]"), "{e}");
    }
}
