//! dgpo: Direct Group Preference Optimization for SD3-family flow-matching models, on Candle.

pub mod cli;
pub mod clip;
pub mod config;
pub mod eval;
pub mod geneval;
pub mod hub;
pub mod image;
pub mod io;
pub mod model;
pub mod par;
pub mod pipeline;
pub mod prompt_file;
pub mod report;
pub mod reward;
pub mod sampling;
pub mod testbed;
pub mod train;

use anyhow::{bail, Result};
use candle_core::Device;

/// Parse `cpu`, `cuda` or `cuda:N`.
///
/// ```
/// assert!(dgpo::device("cpu").unwrap().is_cpu());
/// let err = dgpo::device("gpu").unwrap_err().to_string();
/// assert!(err.contains("expected cpu, cuda or cuda:N"));
/// ```
pub fn device(spec: &str) -> Result<Device> {
    let spec = spec.trim();
    if spec == "cpu" {
        return Ok(Device::Cpu);
    }
    let ordinal = match spec.strip_prefix("cuda") {
        Some("") => 0,
        Some(rest) => match rest.strip_prefix(':').and_then(|n| n.parse::<usize>().ok()) {
            Some(n) => n,
            None => bail!("--device {spec:?}: expected cpu, cuda or cuda:N"),
        },
        None => bail!("--device {spec:?}: expected cpu, cuda or cuda:N"),
    };
    if !candle_core::utils::cuda_is_available() {
        bail!("--device {spec}: this dgpo was built without CUDA; rebuild with `cargo build --release --features cuda`");
    }
    Ok(Device::new_cuda(ordinal)?)
}
