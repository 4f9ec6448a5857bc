//! LoRA adapters with peft's conventions: `W x + (alpha / r) · B A x`, A Gaussian (std 1/r) or
//! Kaiming-uniform, B zero; module matching and file layout as peft and diffusers write them.

use anyhow::{bail, Context, Result};
use candle_core::{DType, Device, Tensor, Var};
use rand::{Rng, SeedableRng};
use rand_distr::{Distribution, Normal, Uniform};
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::path::Path;

/// The eight attention projections trained in the DGPO paper (diffusers names).
pub const DEFAULT_TARGETS: [&str; 8] = [
    "attn.to_q",
    "attn.to_k",
    "attn.to_v",
    "attn.to_out.0",
    "attn.add_q_proj",
    "attn.add_k_proj",
    "attn.add_v_proj",
    "attn.to_add_out",
];

/// How the `A` matrix starts (`B` always starts at zero, so the adapted model equals the base).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LoraInit {
    /// peft `init_lora_weights="gaussian"`: A ~ N(0, (1/r)²). The paper's choice.
    Gaussian,
    /// peft's default: Kaiming-uniform with a = √5, i.e. U(−1/√in, 1/√in).
    Kaiming,
}

/// Shape of an adapter set.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LoraSpec {
    pub rank: usize,
    pub alpha: f64,
    pub targets: Vec<String>,
    pub init: LoraInit,
    /// rsLoRA scaling `alpha / √r` instead of `alpha / r`.
    pub use_rslora: bool,
}

impl LoraSpec {
    pub fn paper_default() -> Self {
        Self {
            rank: 64,
            alpha: 128.0,
            targets: DEFAULT_TARGETS.iter().map(|s| s.to_string()).collect(),
            init: LoraInit::Gaussian,
            use_rslora: false,
        }
    }

    pub fn scale(&self) -> f64 {
        if self.use_rslora {
            self.alpha / (self.rank as f64).sqrt()
        } else {
            self.alpha / self.rank as f64
        }
    }

    /// peft's rule: a target matches the module whose name equals it or ends with `.` + it.
    pub fn targets_module(&self, module: &str) -> bool {
        self.targets
            .iter()
            .any(|t| module == t || module.ends_with(&format!(".{t}")))
    }
}

/// One adapter: `A` is `[r, in]`, `B` is `[out, r]`, both trainable f32.
#[derive(Debug, Clone)]
pub struct LoraAdapter {
    pub a: Var,
    pub b: Var,
    pub scale: f64,
}

impl LoraAdapter {
    /// A fresh adapter drawn from `rng`.
    pub fn init(
        spec: &LoraSpec,
        in_f: usize,
        out_f: usize,
        rng: &mut rand::rngs::StdRng,
        dev: &Device,
        dtype: DType,
    ) -> Result<Self> {
        let r = spec.rank;
        let a: Vec<f32> = match spec.init {
            LoraInit::Gaussian => {
                let n = Normal::new(0.0f32, 1.0 / r as f32)?;
                (0..r * in_f).map(|_| n.sample(rng)).collect()
            }
            LoraInit::Kaiming => {
                let bound = 1.0 / (in_f as f32).sqrt();
                let u = Uniform::new(-bound, bound)?;
                (0..r * in_f).map(|_| rng.sample(u)).collect()
            }
        };
        let a = Var::from_tensor(&Tensor::from_vec(a, (r, in_f), dev)?.to_dtype(dtype)?)?;
        let b = Var::zeros((out_f, r), dtype, dev)?;
        Ok(Self {
            a,
            b,
            scale: spec.scale(),
        })
    }

    /// `scale · (x Aᵀ) Bᵀ` for a 2-D `x`; `track` records the graph for backward.
    pub fn forward(&self, x: &Tensor, track: bool) -> candle_core::Result<Tensor> {
        let (a, b) = if track {
            (self.a.as_tensor().clone(), self.b.as_tensor().clone())
        } else {
            (self.a.as_tensor().detach(), self.b.as_tensor().detach())
        };
        let x = x.to_dtype(a.dtype())?;
        x.matmul(&a.t()?)?.matmul(&b.t()?)? * self.scale
    }

    pub fn rank(&self) -> usize {
        self.a.as_tensor().dim(0).unwrap_or(0)
    }

    /// The dense update `scale · B A` (`[out, in]`), for merging.
    pub fn delta(&self) -> candle_core::Result<Tensor> {
        self.b.as_tensor().matmul(self.a.as_tensor())? * self.scale
    }
}

pub fn rng(seed: u64) -> rand::rngs::StdRng {
    rand::rngs::StdRng::seed_from_u64(seed)
}

/// A LoRA read from disk: tensors by module name (`lora_A`, `lora_B` weights) and the spec.
#[derive(Debug)]
pub struct LoraFile {
    pub spec: LoraSpec,
    /// module name → (A, B)
    pub modules: HashMap<String, (Tensor, Tensor)>,
}

#[derive(Deserialize)]
struct PeftAdapterConfig {
    r: usize,
    lora_alpha: f64,
    #[serde(default)]
    target_modules: Option<serde_json::Value>,
    #[serde(default)]
    use_rslora: bool,
    #[serde(default)]
    rank_pattern: HashMap<String, serde_json::Value>,
    #[serde(default)]
    alpha_pattern: HashMap<String, serde_json::Value>,
    #[serde(default)]
    use_dora: bool,
}

/// `lora_alpha` from the `lora_adapter_metadata` header diffusers writes (`transformer.lora_alpha`, or
/// un-prefixed), checked against the tensors' rank; `None` when the file has no such header.
fn header_alpha(path: &Path, rank: usize) -> Result<Option<f64>> {
    let bytes = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
    let (_, meta) = safetensors::SafeTensors::read_metadata(&bytes)
        .with_context(|| format!("{} is not a safetensors file", path.display()))?;
    let Some(raw) = meta
        .metadata()
        .as_ref()
        .and_then(|m| m.get("lora_adapter_metadata"))
    else {
        return Ok(None);
    };
    let v: serde_json::Value = serde_json::from_str(raw).with_context(|| {
        format!(
            "{}: lora_adapter_metadata is not valid JSON",
            path.display()
        )
    })?;
    let get = |k: &str| {
        v.get(format!("transformer.{k}"))
            .or_else(|| v.get(k))
            .cloned()
    };
    if let Some(r) = get("r").and_then(|r| r.as_u64()) {
        if r as usize != rank {
            bail!(
                "{}: lora_adapter_metadata says r = {r} but the tensors have rank {rank}",
                path.display()
            );
        }
    }
    Ok(get("lora_alpha").and_then(|a| a.as_f64()))
}

/// Load a LoRA saved by peft (`adapter_config.json` + `adapter_model.safetensors` in a folder) or a
/// diffusers `pytorch_lora_weights.safetensors` (keys `transformer.<module>.lora_A.weight`, with `alpha`
/// given by the caller or, failing that, taken equal to the rank as diffusers does).
pub fn load_lora(path: &Path, dev: &Device, alpha_if_missing: Option<f64>) -> Result<LoraFile> {
    let (weights_path, cfg) = if path.is_dir() {
        let cfg_path = path.join("adapter_config.json");
        let text = std::fs::read_to_string(&cfg_path)
            .with_context(|| format!("reading peft adapter config {}", cfg_path.display()))?;
        let cfg: PeftAdapterConfig = serde_json::from_str(&text)
            .with_context(|| format!("{} is not a peft LoRA config", cfg_path.display()))?;
        (path.join("adapter_model.safetensors"), Some(cfg))
    } else {
        (path.to_path_buf(), None)
    };
    let raw = crate::model::weights::load_safetensors_file(&weights_path, dev)
        .with_context(|| format!("reading LoRA weights {}", weights_path.display()))?;
    let mut a_of: HashMap<String, Tensor> = HashMap::new();
    let mut b_of: HashMap<String, Tensor> = HashMap::new();
    for (k, t) in raw {
        let k = k
            .strip_prefix("base_model.model.")
            .or_else(|| k.strip_prefix("transformer."))
            .unwrap_or(&k)
            .to_string();
        let t = t.to_dtype(DType::F32)?;
        if let Some(m) = k.strip_suffix(".lora_A.weight") {
            a_of.insert(m.to_string(), t);
        } else if let Some(m) = k.strip_suffix(".lora_B.weight") {
            b_of.insert(m.to_string(), t);
        } else {
            bail!(
                "{}: unexpected tensor {k:?} (a LoRA file holds only `<module>.lora_A.weight` and \
                 `<module>.lora_B.weight`)",
                weights_path.display()
            );
        }
    }
    let mut modules = HashMap::new();
    let mut rank = None;
    for (m, a) in a_of {
        let b = b_of
            .remove(&m)
            .with_context(|| format!("{}: {m}.lora_A has no lora_B", weights_path.display()))?;
        let r = a.dim(0)?;
        if b.dim(1)? != r {
            bail!(
                "{}: {m} has lora_A of rank {r} but lora_B of rank {}",
                weights_path.display(),
                b.dim(1)?
            );
        }
        if *rank.get_or_insert(r) != r {
            bail!(
                "{}: mixed ranks are not supported ({m} has rank {r})",
                weights_path.display()
            );
        }
        modules.insert(m, (a, b));
    }
    if let Some(m) = b_of.keys().next() {
        bail!("{}: {m}.lora_B has no lora_A", weights_path.display());
    }
    let rank = rank.with_context(|| format!("{}: no LoRA tensors", weights_path.display()))?;
    let mut targets: Vec<String> = modules.keys().cloned().collect();
    targets.sort();
    let spec = match cfg {
        Some(c) => {
            if !c.rank_pattern.is_empty() || !c.alpha_pattern.is_empty() || c.use_dora {
                bail!(
                    "{}: rank_pattern, alpha_pattern and DoRA are not supported",
                    path.display()
                );
            }
            if c.r != rank {
                bail!(
                    "{}: adapter_config.json says r = {} but the tensors have rank {rank}",
                    path.display(),
                    c.r
                );
            }
            let _ = c.target_modules;
            LoraSpec {
                rank,
                alpha: c.lora_alpha,
                targets,
                init: LoraInit::Gaussian,
                use_rslora: c.use_rslora,
            }
        }
        None => LoraSpec {
            rank,
            alpha: match header_alpha(&weights_path, rank)? {
                Some(a) => a,
                None => alpha_if_missing.unwrap_or(rank as f64),
            },
            targets,
            init: LoraInit::Gaussian,
            use_rslora: false,
        },
    };
    Ok(LoraFile { spec, modules })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn target_matching_follows_peft_suffix_rule() {
        let s = LoraSpec::paper_default();
        assert!(s.targets_module("transformer_blocks.0.attn.to_q"));
        assert!(s.targets_module("transformer_blocks.11.attn.to_out.0"));
        assert!(!s.targets_module("transformer_blocks.0.attn2.to_q"));
        assert!(!s.targets_module("transformer_blocks.0.ff.net.2"));
        assert_eq!(s.scale(), 2.0);
    }

    #[test]
    fn gaussian_init_has_std_one_over_rank_and_zero_b() {
        let spec = LoraSpec {
            rank: 8,
            ..LoraSpec::paper_default()
        };
        let a = LoraAdapter::init(&spec, 500, 16, &mut rng(0), &Device::Cpu, DType::F32).unwrap();
        let v: Vec<f32> = a.a.as_tensor().flatten_all().unwrap().to_vec1().unwrap();
        let n = v.len() as f32;
        let mean = v.iter().sum::<f32>() / n;
        let std = (v.iter().map(|x| (x - mean).powi(2)).sum::<f32>() / n).sqrt();
        assert!((std - 0.125).abs() < 0.005, "std {std}");
        assert_eq!(
            a.b.as_tensor()
                .abs()
                .unwrap()
                .sum_all()
                .unwrap()
                .to_scalar::<f32>()
                .unwrap(),
            0.0
        );
    }
}
