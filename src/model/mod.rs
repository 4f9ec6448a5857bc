//! The SD3-family transformer and everything needed to load, adapt and train it.
//! Knows nothing about rewards or RL.

mod block;
pub mod coarse;
pub mod config;
pub mod fused;
pub mod init;
pub mod linear;
pub mod lora;
pub mod mmdit;
pub mod nn;
pub mod weights;

pub use config::TransformerConfig;
pub use linear::{Linear, Param, Trainable, Weights};
pub use lora::{LoraInit, LoraSpec};
pub use mmdit::{MMDiT, VarGrads};
pub use weights::{WeightSource, WeightStore};

use anyhow::Result;
use candle_core::{DType, Device};

/// Load a transformer from a diffusers folder or a StabilityAI single file.
pub fn load_transformer(
    src: &WeightSource,
    trainable: &Trainable,
    dtype: DType,
    dev: &Device,
) -> Result<MMDiT> {
    let cfg = TransformerConfig::from_json_file(&src.config_path())?;
    let (name, tensors) = src.read(cfg.num_layers, dev)?;
    MMDiT::new(
        &cfg,
        WeightStore::new(name, tensors, dtype),
        trainable,
        dtype,
    )
}
