//! The pieces of an MMDiT block: joint / self attention with optional qk RMS-norm, the GELU MLP, and
//! the block that joins the image and context streams; plus the [`Builder`] that takes their weights
//! from a [`WeightStore`] by diffusers name and decides what is trainable.

use super::config::TransformerConfig;
use super::linear::{Linear, Param, Trainable, Weights};
use super::lora::LoraAdapter;
use super::nn::{
    gated_residual, gelu, layer_norm_no_affine, modulate, multi_head_attention, rms_norm,
};
use super::weights::WeightStore;
use anyhow::Result;
use candle_core::{DType, Device, Tensor};

pub(super) const NORM_EPS: f64 = 1e-6;

/// Builds layers from a [`WeightStore`] and decides what is trainable.
pub(super) struct Builder<'a> {
    pub(super) w: &'a mut WeightStore,
    pub(super) trainable: &'a Trainable,
    pub(super) rng: rand::rngs::StdRng,
    pub(super) dev: Device,
    pub(super) dtype: DType,
}

impl Builder<'_> {
    pub(super) fn param(&mut self, name: &str, shape: &[usize]) -> Result<Param> {
        let t = self.w.take(name, shape)?;
        Ok(Param::new(t, matches!(self.trainable, Trainable::Full))?)
    }

    pub(super) fn linear(&mut self, name: &str, in_f: usize, out_f: usize) -> Result<Linear> {
        let weight = self.param(&format!("{name}.weight"), &[out_f, in_f])?;
        let bias = Some(self.param(&format!("{name}.bias"), &[out_f])?);
        let lora = match self.trainable {
            Trainable::Lora { spec, .. } if spec.targets_module(name) => Some(LoraAdapter::init(
                spec,
                in_f,
                out_f,
                &mut self.rng,
                &self.dev,
                super::linear::trainable_dtype(self.dtype),
            )?),
            _ => None,
        };
        Ok(Linear {
            name: name.to_string(),
            weight,
            bias,
            lora,
        })
    }
}

/// Joint attention (`attn`) or plain self-attention (`attn2`) with optional qk RMS-norm.
#[derive(Debug, Clone)]
pub(super) struct Attention {
    heads: usize,
    to_q: Linear,
    to_k: Linear,
    to_v: Linear,
    to_out: Linear,
    norm_q: Option<Param>,
    norm_k: Option<Param>,
    /// Context-stream projections, present for joint attention.
    added: Option<AddedProj>,
}

#[derive(Debug, Clone)]
struct AddedProj {
    q: Linear,
    k: Linear,
    v: Linear,
    /// `None` in the last block, whose context output is discarded.
    out: Option<Linear>,
    norm_q: Option<Param>,
    norm_k: Option<Param>,
}

impl Attention {
    fn new(
        b: &mut Builder,
        p: &str,
        cfg: &TransformerConfig,
        joint: bool,
        pre_only: bool,
    ) -> Result<Self> {
        let d = cfg.inner_dim();
        let hd = cfg.attention_head_dim;
        let norm = |b: &mut Builder, n: &str| -> Result<Option<Param>> {
            if cfg.use_qk_norm() {
                Ok(Some(b.param(&format!("{p}.{n}.weight"), &[hd])?))
            } else {
                Ok(None)
            }
        };
        let norm_q = norm(b, "norm_q")?;
        let norm_k = norm(b, "norm_k")?;
        let added = if joint {
            Some(AddedProj {
                q: b.linear(&format!("{p}.add_q_proj"), d, d)?,
                k: b.linear(&format!("{p}.add_k_proj"), d, d)?,
                v: b.linear(&format!("{p}.add_v_proj"), d, d)?,
                out: if pre_only {
                    None
                } else {
                    Some(b.linear(&format!("{p}.to_add_out"), d, d)?)
                },
                norm_q: norm(b, "norm_added_q")?,
                norm_k: norm(b, "norm_added_k")?,
            })
        } else {
            None
        };
        Ok(Self {
            heads: cfg.num_attention_heads,
            to_q: b.linear(&format!("{p}.to_q"), d, d)?,
            to_k: b.linear(&format!("{p}.to_k"), d, d)?,
            to_v: b.linear(&format!("{p}.to_v"), d, d)?,
            to_out: b.linear(&format!("{p}.to_out.0"), d, d)?,
            norm_q,
            norm_k,
            added,
        })
    }

    /// `[B, L, H·D]` with the optional RMS norm over each head's `D` features.
    fn normed(&self, x: Tensor, norm: &Option<Param>, w: Weights) -> Result<Tensor> {
        let Some(n) = norm else { return Ok(x) };
        let (b, l, c) = x.dims3()?;
        let heads = x.reshape((b, l, self.heads, c / self.heads))?;
        Ok(rms_norm(&heads, &n.get(w, x.dtype())?, NORM_EPS as f32)?.reshape((b, l, c))?)
    }

    /// Returns the image-token output and, for joint attention, the context-token output
    /// (projected unless this is the last block).
    fn forward(
        &self,
        x: &Tensor,
        ctx: Option<&Tensor>,
        w: Weights,
    ) -> Result<(Tensor, Option<Tensor>)> {
        let n_img = x.dim(1)?;
        let mut q = self.normed(self.to_q.forward(x, w)?, &self.norm_q, w)?;
        let mut k = self.normed(self.to_k.forward(x, w)?, &self.norm_k, w)?;
        let mut v = self.to_v.forward(x, w)?;
        if let (Some(a), Some(c)) = (&self.added, ctx) {
            let cq = self.normed(a.q.forward(c, w)?, &a.norm_q, w)?;
            let ck = self.normed(a.k.forward(c, w)?, &a.norm_k, w)?;
            let cv = a.v.forward(c, w)?;
            // Image tokens first, then context tokens, as diffusers' JointAttnProcessor2_0.
            q = Tensor::cat(&[&q, &cq], 1)?;
            k = Tensor::cat(&[&k, &ck], 1)?;
            v = Tensor::cat(&[&v, &cv], 1)?;
        }
        let o = multi_head_attention(&q, &k, &v, self.heads)?; // [B, L, H·D]
        let total = o.dim(1)?;
        let img = self.to_out.forward(&o.narrow(1, 0, n_img)?, w)?;
        let ctx_out = match (&self.added, ctx) {
            (Some(a), Some(_)) => {
                let c = o.narrow(1, n_img, total - n_img)?;
                Some(match &a.out {
                    Some(lin) => lin.forward(&c, w)?,
                    None => c,
                })
            }
            _ => None,
        };
        Ok((img, ctx_out))
    }

    fn linears(&self) -> Vec<&Linear> {
        let mut v = vec![&self.to_q, &self.to_k, &self.to_v, &self.to_out];
        if let Some(a) = &self.added {
            v.extend([&a.q, &a.k, &a.v]);
            v.extend(a.out.as_ref());
        }
        v
    }

    pub(super) fn norm_params(&self, p: &str) -> Vec<(String, &Param)> {
        let added = self.added.as_ref();
        [
            ("norm_q", self.norm_q.as_ref()),
            ("norm_k", self.norm_k.as_ref()),
            ("norm_added_q", added.and_then(|a| a.norm_q.as_ref())),
            ("norm_added_k", added.and_then(|a| a.norm_k.as_ref())),
        ]
        .into_iter()
        .filter_map(|(n, x)| x.map(|x| (format!("{p}.{n}.weight"), x)))
        .collect()
    }
}

/// `GELU(tanh)` MLP with 4× expansion (`ff.net.0.proj`, `ff.net.2`).
#[derive(Debug, Clone)]
struct FeedForward {
    up: Linear,
    down: Linear,
}

impl FeedForward {
    fn new(b: &mut Builder, p: &str, d: usize) -> Result<Self> {
        Ok(Self {
            up: b.linear(&format!("{p}.net.0.proj"), d, 4 * d)?,
            down: b.linear(&format!("{p}.net.2"), 4 * d, d)?,
        })
    }

    fn forward(&self, x: &Tensor, w: Weights) -> Result<Tensor> {
        Ok(self.down.forward(&gelu(&self.up.forward(x, w)?)?, w)?)
    }
}

/// One MMDiT block: an image stream and a context stream that meet in joint attention.
#[derive(Debug, Clone)]
pub(super) struct JointBlock {
    /// adaLN-Zero of the image stream: 6 chunks, or 9 with dual attention.
    pub(super) norm1: Linear,
    /// adaLN of the context stream: 6 chunks, or 2 (scale, shift) in the last block.
    pub(super) norm1_context: Linear,
    pub(super) attn: Attention,
    pub(super) attn2: Option<Attention>,
    ff: FeedForward,
    ff_context: Option<FeedForward>,
}

impl JointBlock {
    pub(super) fn new(b: &mut Builder, i: usize, cfg: &TransformerConfig) -> Result<Self> {
        let d = cfg.inner_dim();
        let p = format!("transformer_blocks.{i}");
        let last = i + 1 == cfg.num_layers;
        let dual = cfg.is_dual_attention(i);
        Ok(Self {
            norm1: b.linear(
                &format!("{p}.norm1.linear"),
                d,
                if dual { 9 } else { 6 } * d,
            )?,
            norm1_context: b.linear(
                &format!("{p}.norm1_context.linear"),
                d,
                if last { 2 } else { 6 } * d,
            )?,
            attn: Attention::new(b, &format!("{p}.attn"), cfg, true, last)?,
            attn2: if dual {
                Some(Attention::new(b, &format!("{p}.attn2"), cfg, false, false)?)
            } else {
                None
            },
            ff: FeedForward::new(b, &format!("{p}.ff"), d)?,
            ff_context: if last {
                None
            } else {
                Some(FeedForward::new(b, &format!("{p}.ff_context"), d)?)
            },
        })
    }

    /// `temb_act` is `silu(temb)`, shared by every adaLN.
    pub(super) fn forward(
        &self,
        x: &Tensor,
        ctx: &Tensor,
        temb_act: &Tensor,
        w: Weights,
    ) -> Result<(Tensor, Option<Tensor>)> {
        let m = self
            .norm1
            .forward(temb_act, w)?
            .chunk(if self.attn2.is_some() { 9 } else { 6 }, 1)?;
        let (shift_msa, scale_msa, gate_msa) = (&m[0], &m[1], &m[2]);
        let (shift_mlp, scale_mlp, gate_mlp) = (&m[3], &m[4], &m[5]);
        let x_norm = layer_norm_no_affine(x, NORM_EPS)?;
        let x_in = modulate(&x_norm, shift_msa, scale_msa)?;

        let cm = self.norm1_context.forward(temb_act, w)?;
        let c_norm = layer_norm_no_affine(ctx, NORM_EPS)?;
        let (c_in, c_mods) = if self.ff_context.is_none() {
            // AdaLayerNormContinuous: (scale, shift) order.
            let s = cm.chunk(2, 1)?;
            (modulate(&c_norm, &s[1], &s[0])?, None)
        } else {
            let s = cm.chunk(6, 1)?;
            (modulate(&c_norm, &s[0], &s[1])?, Some(s))
        };

        let (attn_out, ctx_attn) = self.attn.forward(&x_in, Some(&c_in), w)?;
        let mut x = gated_residual(x, &attn_out, gate_msa)?;
        if let Some(attn2) = &self.attn2 {
            let x2_in = modulate(&x_norm, &m[6], &m[7])?;
            let (o2, _) = attn2.forward(&x2_in, None, w)?;
            x = gated_residual(&x, &o2, &m[8])?;
        }
        let h = modulate(&layer_norm_no_affine(&x, NORM_EPS)?, shift_mlp, scale_mlp)?;
        let x = gated_residual(&x, &self.ff.forward(&h, w)?, gate_mlp)?;

        let ctx = match (c_mods, &self.ff_context, ctx_attn) {
            (Some(s), Some(ff), Some(ca)) => {
                let c = gated_residual(ctx, &ca, &s[2])?;
                let h = modulate(&layer_norm_no_affine(&c, NORM_EPS)?, &s[3], &s[4])?;
                Some(gated_residual(&c, &ff.forward(&h, w)?, &s[5])?)
            }
            _ => None,
        };
        Ok((x, ctx))
    }

    pub(super) fn linears(&self) -> Vec<&Linear> {
        let mut v = vec![&self.norm1, &self.norm1_context];
        v.extend(self.attn.linears());
        if let Some(a) = &self.attn2 {
            v.extend(a.linears());
        }
        v.extend([&self.ff.up, &self.ff.down]);
        if let Some(f) = &self.ff_context {
            v.extend([&f.up, &f.down]);
        }
        v
    }
}
