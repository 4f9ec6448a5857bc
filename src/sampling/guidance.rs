//! Classifier-free guidance: a batch's text conditioning, the guided velocity `v_u + w·(v_c − v_u)`,
//! and its evaluation split over the CPU's worker threads.

use crate::model::{MMDiT, Weights};
use anyhow::{bail, Result};
use candle_core::{DType, Tensor};

/// Text conditioning of a batch: per-token context `[B, L, D]` and pooled `[B, P]`.
#[derive(Debug, Clone)]
pub struct Conditioning {
    pub context: Tensor,
    pub pooled: Tensor,
}

impl Conditioning {
    pub fn batch(&self) -> Result<usize> {
        Ok(self.context.dim(0)?)
    }

    /// Rows `r` of the batch.
    pub fn narrow(&self, r: std::ops::Range<usize>) -> Result<Self> {
        Ok(Self {
            context: self.context.narrow(0, r.start, r.len())?,
            pooled: self.pooled.narrow(0, r.start, r.len())?,
        })
    }

    /// Repeat a single conditioning (e.g. the empty prompt) `n` times.
    pub fn repeat(&self, n: usize) -> Result<Self> {
        if self.batch()? != 1 {
            bail!("only a single conditioning can be repeated");
        }
        Ok(Self {
            context: self.context.repeat((n, 1, 1))?,
            pooled: self.pooled.repeat((n, 1))?,
        })
    }

    pub fn cat(parts: &[&Conditioning]) -> Result<Self> {
        let c: Vec<&Tensor> = parts.iter().map(|p| &p.context).collect();
        let p: Vec<&Tensor> = parts.iter().map(|p| &p.pooled).collect();
        Ok(Self {
            context: Tensor::cat(&c, 0)?,
            pooled: Tensor::cat(&p, 0)?,
        })
    }
}

/// Guided velocity `v_u + w·(v_c − v_u)` at model timestep `timestep` (0..1000); `uncond` must have the
/// batch of `cond`. With `w == 1` or no `uncond` only the conditional branch runs. Both branches go
/// through the model as one batch (unconditional first, as diffusers concatenates them); the guidance
/// is combined in f32 and returned in the model's output dtype.
pub fn guided_velocity_at(
    model: &MMDiT,
    x: &Tensor,
    timestep: f32,
    cond: &Conditioning,
    uncond: Option<&Conditioning>,
    guidance: f64,
    w: Weights,
) -> Result<Tensor> {
    let b = x.dim(0)?;
    let dev = x.device();
    match uncond {
        Some(u) if guidance != 1.0 => {
            let both = Conditioning::cat(&[u, cond])?;
            let xx = Tensor::cat(&[x, x], 0)?;
            let t = Tensor::full(timestep, 2 * b, dev)?;
            let v = model.forward(&xx, &t, &both.context, &both.pooled, w)?;
            let dtype = v.dtype();
            let v = v.to_dtype(DType::F32)?;
            let vu = v.narrow(0, 0, b)?;
            let vc = v.narrow(0, b, b)?;
            Ok((&vu + ((vc - &vu)? * guidance)?)?.to_dtype(dtype)?)
        }
        _ => {
            let t = Tensor::full(timestep, b, dev)?;
            model.forward(x, &t, &cond.context, &cond.pooled, w)
        }
    }
}

/// Applies `f(x, cond, uncond)` to the batch: on the CPU to one slice per worker thread
/// ([`crate::par`]), the results concatenated in order; elsewhere to the whole batch.
pub(super) fn per_shard(
    x: &Tensor,
    cond: &Conditioning,
    uncond: Option<&Conditioning>,
    f: impl Fn(&Tensor, &Conditioning, Option<&Conditioning>) -> Result<Tensor> + Sync,
) -> Result<Tensor> {
    let ranges = crate::par::shards(x.dim(0)?, crate::par::workers_for(x.device()), 1);
    if ranges.len() <= 1 {
        return f(x, cond, uncond);
    }
    let outs = crate::par::map_shards(&ranges, |r| {
        let u = uncond.map(|u| u.narrow(r.clone())).transpose()?;
        f(
            &x.narrow(0, r.start, r.len())?,
            &cond.narrow(r)?,
            u.as_ref(),
        )
    })?;
    Ok(Tensor::cat(&outs, 0)?)
}

/// [`guided_velocity_at`] without gradients, the batch split over the worker threads on the CPU.
pub fn velocity_sharded(
    model: &MMDiT,
    x: &Tensor,
    timestep: f32,
    cond: &Conditioning,
    uncond: Option<&Conditioning>,
    guidance: f64,
    w: Weights,
) -> Result<Tensor> {
    per_shard(x, cond, uncond, |x, c, u| {
        guided_velocity_at(model, x, timestep, c, u, guidance, w)
    })
}
