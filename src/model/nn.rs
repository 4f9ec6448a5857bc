//! Differentiable building blocks for the MMDiT.
//!
//! Candle's fused `softmax_last_dim`, `layer_norm` and `rms_norm` kernels have no backward pass: on a
//! tracked tensor they silently return no gradient. Every function here checks `track_op()` and takes the
//! fast kernel only when no gradient can be asked for, otherwise the plain, differentiable formula.
//! `frozen_matmul` is a matmul whose backward returns the input gradient only, so a LoRA step does not
//! pay for gradients of the frozen base weights.

use super::{coarse, fused};
use candle_core::backend::BackendStorage;
use candle_core::{
    CpuStorage, CudaStorage, CustomOp2, CustomOp3, DType, Layout, Result, Shape, Tensor, D,
};

/// Softmax over the last dimension; differentiable whenever `x` is part of a graph.
pub fn softmax_last_dim(x: &Tensor) -> Result<Tensor> {
    if !x.track_op() {
        return candle_nn::ops::softmax_last_dim(x);
    }
    if fused_ok(x) {
        return x.contiguous()?.apply_op1(fused::Softmax);
    }
    // Subtracting a constant does not change softmax or its gradient, so the max may be detached.
    let max = x.max_keepdim(D::Minus1)?.detach();
    let e = x.broadcast_sub(&max)?.exp()?;
    e.broadcast_div(&e.sum_keepdim(D::Minus1)?)
}

/// Layer norm over the last dimension without affine parameters (the MMDiT's `elementwise_affine=False`).
pub fn layer_norm_no_affine(x: &Tensor, eps: f64) -> Result<Tensor> {
    if !x.track_op() && x.is_contiguous() && x.dtype() != DType::F64 {
        let d = x.dim(D::Minus1)?;
        let ones = Tensor::ones(d, x.dtype(), x.device())?;
        let zeros = Tensor::zeros(d, x.dtype(), x.device())?;
        return candle_nn::ops::layer_norm(x, &ones, &zeros, eps as f32);
    }
    if fused_ok(x) {
        return x
            .contiguous()?
            .apply_op1(fused::LayerNorm { eps: eps as f32 });
    }
    let mean = x.mean_keepdim(D::Minus1)?;
    let xc = x.broadcast_sub(&mean)?;
    let var = xc.sqr()?.mean_keepdim(D::Minus1)?;
    xc.broadcast_mul(&(var + eps)?.sqrt()?.recip()?)
}

/// RMS norm over the last dimension with a learned scale, as diffusers' `RMSNorm`.
pub fn rms_norm(x: &Tensor, weight: &Tensor, eps: f32) -> Result<Tensor> {
    if !x.track_op() && !weight.track_op() && x.is_contiguous() && x.dtype() != DType::F64 {
        return candle_nn::ops::rms_norm(x, weight, eps);
    }
    if fused_ok(x) && weight.dtype() == DType::F32 {
        return x
            .contiguous()?
            .apply_op2(&weight.contiguous()?, fused::RmsNorm { eps });
    }
    let ms = x.sqr()?.mean_keepdim(D::Minus1)?;
    x.broadcast_mul(&(ms + eps as f64)?.sqrt()?.recip()?)?
        .broadcast_mul(weight)
}

/// GELU with the tanh approximation; the fused kernel (with its own backward) on CPU f32.
pub fn gelu(x: &Tensor) -> Result<Tensor> {
    if fused_ok(x) {
        return x.contiguous()?.apply_op1(fused::GeluTanh);
    }
    x.gelu()
}

/// Whether the fused CPU kernels of [`fused`] apply to `x`.
fn fused_ok(x: &Tensor) -> bool {
    x.device().is_cpu() && x.dtype() == DType::F32
}

/// `x * (1 + scale) + shift` with per-sample `scale`, `shift` of shape `[B, C]` broadcast over tokens.
pub fn modulate(x: &Tensor, shift: &Tensor, scale: &Tensor) -> Result<Tensor> {
    if coarse::applies(x) && shift.dtype() == x.dtype() && scale.dtype() == x.dtype() {
        return coarse::modulate(x, shift, scale);
    }
    x.broadcast_mul(&(scale.unsqueeze(1)? + 1.0)?)?
        .broadcast_add(&shift.unsqueeze(1)?)
}

/// The gated residual `res + a · gate`, with `gate` of shape `[B, C]` broadcast over tokens.
pub fn gated_residual(res: &Tensor, a: &Tensor, gate: &Tensor) -> Result<Tensor> {
    if coarse::applies(res) && a.dtype() == res.dtype() && gate.dtype() == res.dtype() {
        return coarse::gated_residual(res, a, gate);
    }
    res + a.broadcast_mul(&gate.unsqueeze(1)?)?
}

/// Multi-head attention on `[B, L, H·D]` token tensors (heads side by side); returns `[B, L, H·D]`.
/// On CPU f32/f64 the coarse op; elsewhere [`attention`] through the `[B, H, L, D]` layout.
pub fn multi_head_attention(q: &Tensor, k: &Tensor, v: &Tensor, heads: usize) -> Result<Tensor> {
    if coarse::attention_applies(q) && k.dtype() == q.dtype() && v.dtype() == q.dtype() {
        return coarse::attention(q, k, v, heads);
    }
    let (b, l, c) = q.dims3()?;
    let split = |x: &Tensor| {
        x.reshape((b, l, heads, c / heads))?
            .transpose(1, 2)?
            .contiguous()
    };
    attention(&split(q)?, &split(k)?, &split(v)?)?
        .transpose(1, 2)?
        .reshape((b, l, c))
}

/// Scaled dot-product attention on `[B, H, L, D]` tensors (no mask, no dropout).
///
/// With a graph it is [`recompute_attention`] (the `[B, H, L, L]` weights are not kept for the
/// backward pass), except in f32 on the CPU, where the graph keeps them (small models, the fused
/// softmax with its own backward).
pub fn attention(q: &Tensor, k: &Tensor, v: &Tensor) -> Result<Tensor> {
    let tracked = q.track_op() || k.track_op() || v.track_op();
    if tracked && !fused_ok(q) {
        return recompute_attention(q, k, v);
    }
    let scale = 1.0 / (q.dim(D::Minus1)? as f64).sqrt();
    let q = (q * scale)?;
    let scores = q.matmul(&k.t()?)?;
    softmax_last_dim(&scores)?.matmul(v)
}

/// Attention whose backward recomputes the attention weights `P = softmax(q kᵀ / √d)` from `q` and
/// `k` instead of keeping them: the graph holds `q`, `k`, `v` and the output, not the four
/// `[B, H, L, L]` tensors of the plain formula (scores, shifted scores, exponentials, weights) — for
/// SD3.5-Medium at 512 px, about 290 MB per image and layer in bf16. The price is one more
/// `q kᵀ` and softmax per layer in the backward pass.
///
/// Backward, with `G` the output gradient and `O = P v`:
/// `∂v = Pᵀ G`, `∂P = G vᵀ`, `∂S = P ⊙ (∂P − rowsum(G ⊙ O))`, `∂q = ∂S k / √d`, `∂k = ∂Sᵀ q / √d`.
pub fn recompute_attention(q: &Tensor, k: &Tensor, v: &Tensor) -> Result<Tensor> {
    let out = attention_weights(&q.detach(), &k.detach())?
        .matmul(&v.detach())?
        .contiguous()?;
    q.apply_op3(k, v, RecomputeAttention { out })
}

/// `softmax(q kᵀ / √d)` without a graph.
fn attention_weights(q: &Tensor, k: &Tensor) -> Result<Tensor> {
    let scale = 1.0 / (q.dim(D::Minus1)? as f64).sqrt();
    candle_nn::ops::softmax_last_dim(&(q * scale)?.matmul(&k.t()?)?)
}

/// The op of [`recompute_attention`]: its forward hands out the output computed without a graph.
struct RecomputeAttention {
    out: Tensor,
}

impl RecomputeAttention {
    fn storage(&self) -> Result<(candle_core::Storage, Shape)> {
        let (s, l) = self.out.storage_and_layout();
        let copy = match &*s {
            candle_core::Storage::Cpu(c) => candle_core::Storage::Cpu(c.try_clone(l)?),
            candle_core::Storage::Cuda(c) => candle_core::Storage::Cuda(c.try_clone(l)?),
            candle_core::Storage::Metal(_) => candle_core::bail!("recompute-attention: no Metal"),
        };
        Ok((copy, l.shape().clone()))
    }
}

impl CustomOp3 for RecomputeAttention {
    fn name(&self) -> &'static str {
        "recompute-attention"
    }

    fn cpu_fwd(
        &self,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        match self.storage()? {
            (candle_core::Storage::Cpu(c), shape) => Ok((c, shape)),
            _ => candle_core::bail!("recompute-attention: output and inputs on different devices"),
        }
    }

    fn cuda_fwd(
        &self,
        _: &CudaStorage,
        _: &Layout,
        _: &CudaStorage,
        _: &Layout,
        _: &CudaStorage,
        _: &Layout,
    ) -> Result<(CudaStorage, Shape)> {
        match self.storage()? {
            (candle_core::Storage::Cuda(c), shape) => Ok((c, shape)),
            _ => candle_core::bail!("recompute-attention: output and inputs on different devices"),
        }
    }

    fn bwd(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        out: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let (q, k, v, out, g) = (
            q.detach(),
            k.detach(),
            v.detach(),
            out.detach(),
            grad.detach(),
        );
        let scale = 1.0 / (q.dim(D::Minus1)? as f64).sqrt();
        let p = attention_weights(&q, &k)?;
        let dv = p.t()?.matmul(&g)?;
        let dp = g.matmul(&v.t()?)?;
        // rowsum(∂P ⊙ P) = rowsum(G ⊙ O), summed in f32 at least: a [B, H, L, 1] term, not another
        // [B, H, L, L] product
        let acc = if g.dtype() == DType::F64 {
            DType::F64
        } else {
            DType::F32
        };
        let delta = (g.to_dtype(acc)? * out.to_dtype(acc)?)?
            .sum_keepdim(D::Minus1)?
            .to_dtype(g.dtype())?;
        let ds = (dp.broadcast_sub(&delta)? * &p)?;
        drop(p);
        let dq = (ds.matmul(&k)? * scale)?;
        let dk = (ds.t()?.matmul(&q)? * scale)?;
        Ok((Some(dq), Some(dk), Some(dv)))
    }
}

/// `x @ wᵀ` for a 2-D `x` and a frozen `w` of shape `[out, in]`; backward yields `∂x` only.
pub fn frozen_matmul(x: &Tensor, w: &Tensor) -> Result<Tensor> {
    if !x.track_op() || w.track_op() {
        // Nothing to save: no gradient is needed, or `w` is trainable and needs its own.
        return x.matmul(&w.t()?);
    }
    x.contiguous()?.apply_op2(w, FrozenMatmul)
}

struct FrozenMatmul;

impl FrozenMatmul {
    fn fwd<S: BackendStorage>(x: &S, lx: &Layout, w: &S, lw: &Layout) -> Result<(S, Shape)> {
        let (m, k) = lx.shape().dims2()?;
        let (n, k2) = lw.shape().dims2()?;
        if k != k2 {
            candle_core::bail!("frozen_matmul: input has {k} features but the weight expects {k2}");
        }
        let wt = lw.transpose(0, 1)?;
        let out = x.matmul(w, (1, m, n, k), lx, &wt)?;
        Ok((out, Shape::from((m, n))))
    }
}

impl CustomOp2 for FrozenMatmul {
    fn name(&self) -> &'static str {
        "frozen-matmul"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        Self::fwd(s1, l1, s2, l2)
    }

    fn cuda_fwd(
        &self,
        s1: &CudaStorage,
        l1: &Layout,
        s2: &CudaStorage,
        l2: &Layout,
    ) -> Result<(CudaStorage, Shape)> {
        Self::fwd(s1, l1, s2, l2)
    }

    fn bwd(
        &self,
        _x: &Tensor,
        w: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        Ok((Some(grad.matmul(w)?), None))
    }
}

/// Largest absolute elementwise difference, computed in f64 (parity checks, tests).
pub fn max_abs_diff(a: &Tensor, b: &Tensor) -> Result<f64> {
    if a.dims() != b.dims() {
        candle_core::bail!(
            "max_abs_diff: shapes {:?} and {:?} differ",
            a.dims(),
            b.dims()
        );
    }
    (a.to_dtype(DType::F64)? - b.to_dtype(DType::F64)?)?
        .abs()?
        .flatten_all()?
        .max(0)?
        .to_scalar::<f64>()
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    fn close(a: &Tensor, b: &Tensor, tol: f64) {
        let d = max_abs_diff(a, b).unwrap();
        assert!(d <= tol, "max abs diff {d} > {tol}");
    }

    #[test]
    fn softmax_paths_agree_and_differentiable_path_has_gradient() {
        let dev = Device::Cpu;
        let x = Var::randn(0f32, 3.0, (2, 5, 7), &dev).unwrap();
        let fast = softmax_last_dim(&x.as_tensor().detach()).unwrap();
        let slow = softmax_last_dim(x.as_tensor()).unwrap();
        close(&fast, &slow, 1e-6);
        let w = Tensor::randn(0f32, 1.0, (2, 5, 7), &dev).unwrap();
        let loss = (slow * &w).unwrap().sum_all().unwrap();
        let g = loss.backward().unwrap();
        let gx = g.get(x.as_tensor()).expect("softmax must pass a gradient");
        // Analytic softmax gradient: p * (w - sum(p * w)).
        let p = fast;
        let pw = (&p * &w).unwrap().sum_keepdim(D::Minus1).unwrap();
        let expect = (&p * w.broadcast_sub(&pw).unwrap()).unwrap();
        close(gx, &expect, 1e-5);
    }

    #[test]
    fn layer_norm_paths_agree_and_pass_gradient() {
        let dev = Device::Cpu;
        let x = Var::randn(1f32, 2.0, (3, 4, 16), &dev).unwrap();
        let fast = layer_norm_no_affine(&x.as_tensor().detach(), 1e-6).unwrap();
        let slow = layer_norm_no_affine(x.as_tensor(), 1e-6).unwrap();
        close(&fast, &slow, 1e-5);
        let w = Tensor::randn(0f32, 1.0, (3, 4, 16), &dev).unwrap();
        let g = (slow * w).unwrap().sum_all().unwrap().backward().unwrap();
        assert!(g.get(x.as_tensor()).is_some());
    }

    #[test]
    fn rms_norm_paths_agree_and_pass_gradient() {
        let dev = Device::Cpu;
        let x = Var::randn(0f32, 1.0, (3, 4, 8), &dev).unwrap();
        let w = Tensor::randn(0f32, 1.0, 8, &dev).unwrap();
        let fast = rms_norm(&x.as_tensor().detach(), &w, 1e-6).unwrap();
        let slow = rms_norm(x.as_tensor(), &w, 1e-6).unwrap();
        close(&fast, &slow, 1e-5);
        let g = slow.sum_all().unwrap().backward().unwrap();
        assert!(g.get(x.as_tensor()).is_some());
    }

    #[test]
    fn frozen_matmul_matches_matmul_and_gives_input_gradient_only() {
        let dev = Device::Cpu;
        let x = Var::randn(0f32, 1.0, (6, 5), &dev).unwrap();
        let w = Tensor::randn(0f32, 1.0, (4, 5), &dev).unwrap();
        let y = frozen_matmul(x.as_tensor(), &w).unwrap();
        let wt = w.t().unwrap();
        let y_ref = x.as_tensor().matmul(&wt).unwrap();
        close(&y, &y_ref, 1e-5);
        let up = Tensor::randn(0f32, 1.0, (6, 4), &dev).unwrap();
        let g = (y * &up).unwrap().sum_all().unwrap().backward().unwrap();
        close(g.get(x.as_tensor()).unwrap(), &up.matmul(&w).unwrap(), 1e-5);
        assert!(
            g.get(&w).is_none(),
            "no gradient may be computed for the frozen weight"
        );
        // The plain matmul computes one: that is the cost the op avoids.
        let g2 = (y_ref * &up)
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        assert!(g2.get(&wt).is_some());
    }

    #[test]
    fn recompute_attention_matches_the_plain_formula_and_finite_differences() {
        let dev = Device::Cpu;
        let shape = (2, 3, 5, 4);
        let q = Var::randn(0f64, 1.0, shape, &dev).unwrap();
        let k = Var::randn(0f64, 1.0, shape, &dev).unwrap();
        let v = Var::randn(0f64, 1.0, shape, &dev).unwrap();
        let w = Tensor::randn(0f64, 1.0, shape, &dev).unwrap();
        let plain = |q: &Tensor, k: &Tensor, v: &Tensor| {
            let s = ((q * 0.5).unwrap().matmul(&k.t().unwrap())).unwrap();
            softmax_last_dim(&s).unwrap().matmul(v).unwrap()
        };
        let loss = |o: &Tensor| (o * &w).unwrap().sum_all().unwrap();
        let (qt, kt, vt) = (q.as_tensor(), k.as_tensor(), v.as_tensor());
        let rec = recompute_attention(qt, kt, vt).unwrap();
        let reference = plain(qt, kt, vt);
        close(&rec, &reference, 1e-12);
        // f64 on the CPU is one of the cases `attention` sends to the recomputing op
        close(&attention(qt, kt, vt).unwrap(), &reference, 1e-12);
        let g_rec = loss(&rec).backward().unwrap();
        let g_ref = loss(&reference).backward().unwrap();
        for var in [&q, &k, &v] {
            close(
                g_rec.get(var.as_tensor()).unwrap(),
                g_ref.get(var.as_tensor()).unwrap(),
                1e-10,
            );
        }
        // and against central finite differences, a few coordinates of each input
        let f =
            |q: &Tensor, k: &Tensor, v: &Tensor| loss(&plain(q, k, v)).to_scalar::<f64>().unwrap();
        let eps = 1e-6;
        for (which, var) in [&q, &k, &v].into_iter().enumerate() {
            let analytic = g_rec
                .get(var.as_tensor())
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1::<f64>()
                .unwrap();
            let base = var
                .as_tensor()
                .flatten_all()
                .unwrap()
                .to_vec1::<f64>()
                .unwrap();
            for i in [0, 17, 63, 119] {
                let at = |d: f64| {
                    let mut x = base.clone();
                    x[i] += d;
                    let x = Tensor::from_vec(x, shape, &dev).unwrap();
                    let (a, b, c) = match which {
                        0 => (&x, kt, vt),
                        1 => (qt, &x, vt),
                        _ => (qt, kt, &x),
                    };
                    f(&a.detach(), &b.detach(), &c.detach())
                };
                let numeric = (at(eps) - at(-eps)) / (2.0 * eps);
                assert!(
                    (numeric - analytic[i]).abs() < 1e-7,
                    "input {which}, coordinate {i}: finite difference {numeric}, backward {}",
                    analytic[i]
                );
            }
        }
    }
}
