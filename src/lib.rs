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

/// cudarc's runtime settings for a process that runs every kernel on one CUDA stream, as dgpo does:
/// event tracking off (cudarc otherwise records an event per buffer and launch, to order streams)
/// and the device's default memory pool kept across synchronisations instead of released to the
/// driver (its release threshold at the maximum). Behind `--cuda-single-stream`, off by default
/// until it is measured on a GPU. On the CPU it is an error.
pub fn cuda_single_stream(device: &Device) -> Result<()> {
    #[cfg(feature = "cuda")]
    {
        if let Device::Cuda(d) = device {
            use candle_core::cuda_backend::cudarc::driver::{result, sys};
            let ctx = d.cuda_stream().context().clone();
            // SAFETY: dgpo creates one stream per device and runs all its work there, so no buffer is
            // shared between streams (the condition for turning event tracking off).
            unsafe { ctx.disable_event_tracking() };
            if ctx.has_async_alloc() {
                let mut threshold = u64::MAX;
                // SAFETY: the device comes from the live context; the release threshold is a u64.
                unsafe {
                    let pool = result::device::get_default_mem_pool(ctx.cu_device())?;
                    result::mem_pool::set_attribute(
                        pool,
                        sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_RELEASE_THRESHOLD,
                        (&mut threshold as *mut u64).cast(),
                    )?;
                }
            }
            tracing::info!(
                async_alloc = ctx.has_async_alloc(),
                "CUDA single-stream settings: event tracking off, memory pool kept"
            );
            return Ok(());
        }
    }
    bail!("--cuda-single-stream needs --device cuda, got {device:?}")
}
