//! Fused CPU kernels, with real backward passes, for the element- and row-wise ops of the MMDiT.
//!
//! Candle composes GELU's backward from `powf`, `tanh` and five more tensor ops, and its fused softmax
//! and norm kernels have no backward at all, so the training path used to spell them out op by op.
//! On the shapes model that made GELU alone (glibc's scalar `tanhf`, which goes through `expm1f`) about
//! a third of a pretraining step. Each op here is one pass over contiguous f32 rows forward and one
//! backward; the backward kernels take the saved input and the incoming gradient.
//!
//! They run on the CPU for f32 only; `nn.rs` dispatches every other device and dtype to the plain
//! differentiable formulas. Unit tests compare values with those formulas and gradients with finite
//! differences.

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp1, CustomOp2, Layout, Result, Shape, Tensor};

const SQRT_2_OVER_PI: f32 = 0.797_884_6;
const GELU_C: f32 = 0.044_715;

/// `tanh` as a rational function of `x²` (the approximation Eigen and XLA use for f32), accurate to a
/// few ulp on the clamped range and branch-free, so loops over it vectorise.
#[inline(always)]
pub fn fast_tanh(x: f32) -> f32 {
    const CLAMP: f32 = 7.905_311;
    const A1: f32 = 4.893_524_6e-3;
    const A3: f32 = 6.372_619_3e-4;
    const A5: f32 = 1.485_722_4e-5;
    const A7: f32 = 5.122_297e-8;
    const A9: f32 = -8.604_672e-11;
    const A11: f32 = 2.000_188e-13;
    const A13: f32 = -2.760_768_5e-16;
    const B0: f32 = 4.893_525e-3;
    const B2: f32 = 2.268_434_6e-3;
    const B4: f32 = 1.185_347_1e-4;
    const B6: f32 = 1.198_258_4e-6;
    let xc = x.clamp(-CLAMP, CLAMP);
    let x2 = xc * xc;
    let p = ((((((A13 * x2 + A11) * x2 + A9) * x2 + A7) * x2 + A5) * x2 + A3) * x2 + A1) * xc;
    let q = ((B6 * x2 + B4) * x2 + B2) * x2 + B0;
    // For tiny |x| the ratio is x to within rounding anyway; keep it exact there.
    if x.abs() < 4e-4 {
        x
    } else {
        p / q
    }
}

fn rows<'a>(s: &'a CpuStorage, l: &Layout, op: &str) -> Result<&'a [f32]> {
    let data = match s {
        CpuStorage::F32(v) => v.as_slice(),
        _ => candle_core::bail!("{op}: fused kernel expects f32, got {:?}", s.dtype()),
    };
    match l.contiguous_offsets() {
        Some((a, b)) => Ok(&data[a..b]),
        None => candle_core::bail!("{op}: fused kernel expects a contiguous tensor"),
    }
}

/// The two same-shape contiguous f32 inputs of a backward kernel.
fn rows2<'a>(
    s1: &'a CpuStorage,
    l1: &Layout,
    s2: &'a CpuStorage,
    l2: &Layout,
    op: &str,
) -> Result<(&'a [f32], &'a [f32])> {
    if l1.shape() != l2.shape() {
        candle_core::bail!("{op}: shapes {:?} and {:?} differ", l1.shape(), l2.shape());
    }
    Ok((rows(s1, l1, op)?, rows(s2, l2, op)?))
}

fn last_dim(l: &Layout) -> Result<usize> {
    match l.shape().dims().last() {
        Some(&d) if d > 0 => Ok(d),
        _ => candle_core::bail!("fused row op on a tensor without a last dimension"),
    }
}

// ---------------------------------------------------------------------------------------- GELU ---

/// GELU with the tanh approximation (`gelu-approximate` in diffusers' SD3 feed-forward).
pub struct GeluTanh;

impl CustomOp1 for GeluTanh {
    fn name(&self) -> &'static str {
        "fused-gelu-tanh"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let x = rows(s, l, self.name())?;
        let y: Vec<f32> = x
            .iter()
            .map(|&v| {
                let u = SQRT_2_OVER_PI * (v + GELU_C * v * v * v);
                0.5 * v * (1.0 + fast_tanh(u))
            })
            .collect();
        Ok((CpuStorage::F32(y), l.shape().clone()))
    }

    fn bwd(&self, arg: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        Ok(Some(
            arg.apply_op2_no_bwd(&grad.contiguous()?, &GeluTanhGrad)?,
        ))
    }
}

struct GeluTanhGrad;

impl CustomOp2 for GeluTanhGrad {
    fn name(&self) -> &'static str {
        "fused-gelu-tanh-grad"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (x, g) = rows2(s1, l1, s2, l2, self.name())?;
        let dx: Vec<f32> = x
            .iter()
            .zip(g)
            .map(|(&v, &gi)| {
                let u = SQRT_2_OVER_PI * (v + GELU_C * v * v * v);
                let t = fast_tanh(u);
                let du = SQRT_2_OVER_PI * (1.0 + 3.0 * GELU_C * v * v);
                gi * (0.5 * (1.0 + t) + 0.5 * v * (1.0 - t * t) * du)
            })
            .collect();
        Ok((CpuStorage::F32(dx), l1.shape().clone()))
    }
}

// ------------------------------------------------------------------------------------- softmax ---

/// Softmax over the last dimension.
pub struct Softmax;

impl CustomOp1 for Softmax {
    fn name(&self) -> &'static str {
        "fused-softmax"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let x = rows(s, l, self.name())?;
        let d = last_dim(l)?;
        let mut y = vec![0f32; x.len()];
        for (xr, yr) in x.chunks_exact(d).zip(y.chunks_exact_mut(d)) {
            let max = xr.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            let mut sum = 0f32;
            for (yi, &xi) in yr.iter_mut().zip(xr) {
                *yi = (xi - max).exp();
                sum += *yi;
            }
            let inv = 1.0 / sum;
            yr.iter_mut().for_each(|v| *v *= inv);
        }
        Ok((CpuStorage::F32(y), l.shape().clone()))
    }

    fn bwd(&self, _arg: &Tensor, res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        Ok(Some(
            res.apply_op2_no_bwd(&grad.contiguous()?, &SoftmaxGrad)?,
        ))
    }
}

/// `y ⊙ (g − Σ g⊙y)` per row, from the softmax output `y` and the gradient `g`.
struct SoftmaxGrad;

impl CustomOp2 for SoftmaxGrad {
    fn name(&self) -> &'static str {
        "fused-softmax-grad"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (y, g) = rows2(s1, l1, s2, l2, self.name())?;
        let d = last_dim(l1)?;
        let mut dx = vec![0f32; y.len()];
        for ((yr, gr), dr) in y
            .chunks_exact(d)
            .zip(g.chunks_exact(d))
            .zip(dx.chunks_exact_mut(d))
        {
            let dot: f32 = yr.iter().zip(gr).map(|(a, b)| a * b).sum();
            for ((o, &yi), &gi) in dr.iter_mut().zip(yr).zip(gr) {
                *o = yi * (gi - dot);
            }
        }
        Ok((CpuStorage::F32(dx), l1.shape().clone()))
    }
}

// ---------------------------------------------------------------------------------- layer norm ---

/// Layer norm over the last dimension without affine parameters.
pub struct LayerNorm {
    pub eps: f32,
}

fn mean_rstd(xr: &[f32], eps: f32) -> (f32, f32) {
    let n = xr.len() as f32;
    let mean = xr.iter().sum::<f32>() / n;
    let var = xr.iter().map(|v| (v - mean) * (v - mean)).sum::<f32>() / n;
    (mean, 1.0 / (var + eps).sqrt())
}

impl CustomOp1 for LayerNorm {
    fn name(&self) -> &'static str {
        "fused-layer-norm"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let x = rows(s, l, self.name())?;
        let d = last_dim(l)?;
        let mut y = vec![0f32; x.len()];
        for (xr, yr) in x.chunks_exact(d).zip(y.chunks_exact_mut(d)) {
            let (mean, rstd) = mean_rstd(xr, self.eps);
            for (o, &v) in yr.iter_mut().zip(xr) {
                *o = (v - mean) * rstd;
            }
        }
        Ok((CpuStorage::F32(y), l.shape().clone()))
    }

    fn bwd(&self, arg: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        Ok(Some(arg.apply_op2_no_bwd(
            &grad.contiguous()?,
            &LayerNormGrad { eps: self.eps },
        )?))
    }
}

/// `rstd · (g − mean(g) − ŷ·mean(g⊙ŷ))` per row, from the input `x` and the gradient `g`.
struct LayerNormGrad {
    eps: f32,
}

impl CustomOp2 for LayerNormGrad {
    fn name(&self) -> &'static str {
        "fused-layer-norm-grad"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (x, g) = rows2(s1, l1, s2, l2, self.name())?;
        let d = last_dim(l1)?;
        let n = d as f32;
        let mut dx = vec![0f32; x.len()];
        for ((xr, gr), dr) in x
            .chunks_exact(d)
            .zip(g.chunks_exact(d))
            .zip(dx.chunks_exact_mut(d))
        {
            let (mean, rstd) = mean_rstd(xr, self.eps);
            let mut g_mean = 0f32;
            let mut gy_mean = 0f32;
            for (&v, &gi) in xr.iter().zip(gr) {
                g_mean += gi;
                gy_mean += gi * (v - mean) * rstd;
            }
            g_mean /= n;
            gy_mean /= n;
            for ((o, &v), &gi) in dr.iter_mut().zip(xr).zip(gr) {
                *o = rstd * (gi - g_mean - (v - mean) * rstd * gy_mean);
            }
        }
        Ok((CpuStorage::F32(dx), l1.shape().clone()))
    }
}

// ------------------------------------------------------------------------------------ RMS norm ---

/// `x / rms(x) ⊙ w` over the last dimension, with a learned scale `w` (diffusers' `RMSNorm`).
pub struct RmsNorm {
    pub eps: f32,
}

fn rrms(xr: &[f32], eps: f32) -> f32 {
    let ms = xr.iter().map(|v| v * v).sum::<f32>() / xr.len() as f32;
    1.0 / (ms + eps).sqrt()
}

impl CustomOp2 for RmsNorm {
    fn name(&self) -> &'static str {
        "fused-rms-norm"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let x = rows(s1, l1, self.name())?;
        let w = rows(s2, l2, self.name())?;
        let d = last_dim(l1)?;
        if w.len() != d {
            candle_core::bail!("{}: weight has {} entries, rows {d}", self.name(), w.len());
        }
        let mut y = vec![0f32; x.len()];
        for (xr, yr) in x.chunks_exact(d).zip(y.chunks_exact_mut(d)) {
            let r = rrms(xr, self.eps);
            for ((o, &v), &wi) in yr.iter_mut().zip(xr).zip(w) {
                *o = v * r * wi;
            }
        }
        Ok((CpuStorage::F32(y), l1.shape().clone()))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let grad = grad.contiguous()?;
        let dx = x.apply_op2_no_bwd(
            &grad,
            &RmsNormGrad {
                eps: self.eps,
                w: w.detach(),
            },
        )?;
        // ∂w = Σ_rows g ⊙ x̂, with x̂ = x / rms(x) (the op with a unit weight); skipped for a frozen
        // weight (the qk norms of a LoRA model), whose gradient nobody reads.
        if !w.track_op() {
            return Ok((Some(dx), None));
        }
        let d = w.dim(0)?;
        let ones = Tensor::ones(d, w.dtype(), w.device())?;
        let xhat = x.apply_op2_no_bwd(&ones, &RmsNorm { eps: self.eps })?;
        let dw = (grad * xhat)?.reshape(((), d))?.sum(0)?;
        Ok((Some(dx), Some(dw)))
    }
}

/// `rrms · (g⊙w − x̂·mean(g⊙w⊙x̂))` per row, from the input `x` and the gradient `g`.
struct RmsNormGrad {
    eps: f32,
    w: Tensor,
}

impl CustomOp2 for RmsNormGrad {
    fn name(&self) -> &'static str {
        "fused-rms-norm-grad"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (x, g) = rows2(s1, l1, s2, l2, self.name())?;
        let d = last_dim(l1)?;
        let w: Vec<f32> = self.w.flatten_all()?.to_vec1()?;
        if w.len() != d {
            candle_core::bail!("{}: weight has {} entries, rows {d}", self.name(), w.len());
        }
        let n = d as f32;
        let mut dx = vec![0f32; x.len()];
        for ((xr, gr), dr) in x
            .chunks_exact(d)
            .zip(g.chunks_exact(d))
            .zip(dx.chunks_exact_mut(d))
        {
            let r = rrms(xr, self.eps);
            let mut dot = 0f32;
            for ((&v, &gi), &wi) in xr.iter().zip(gr).zip(&w) {
                dot += gi * wi * v * r;
            }
            dot /= n;
            for (((o, &v), &gi), &wi) in dr.iter_mut().zip(xr).zip(gr).zip(&w) {
                *o = r * (gi * wi - v * r * dot);
            }
        }
        Ok((CpuStorage::F32(dx), l1.shape().clone()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{DType, Device, Var, D};

    fn max_diff(a: &Tensor, b: &Tensor) -> f64 {
        crate::model::nn::max_abs_diff(a, b).unwrap()
    }

    #[test]
    fn fast_tanh_is_accurate_everywhere() {
        let mut worst = 0f64;
        let mut x = -12.0f64;
        while x <= 12.0 {
            let e = (fast_tanh(x as f32) as f64 - x.tanh()).abs();
            worst = worst.max(e);
            x += 1.0 / 4096.0;
        }
        for x in [0.0f32, 1e-8, -1e-8, 3.9e-4, 4.1e-4, 1e30, -1e30] {
            let e = (fast_tanh(x) as f64 - (x as f64).tanh()).abs();
            worst = worst.max(e);
        }
        assert!(worst < 5e-7, "fast tanh max abs error {worst}");
        assert!(fast_tanh(f32::NAN).is_nan());
    }

    /// Central finite differences of `sum(f(x) ⊙ w)` in f64 against the op's analytic gradient.
    fn check_grad(f: impl Fn(&Tensor) -> Tensor, x: &Tensor, tol: f64) {
        let w = Tensor::randn(0f64, 1.0, x.shape(), &Device::Cpu).unwrap();
        let xs: Vec<f64> = x
            .to_dtype(DType::F64)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        let h = 1e-3;
        let eval = |v: &[f64]| -> f64 {
            let t = Tensor::from_slice(v, x.shape(), &Device::Cpu)
                .unwrap()
                .to_dtype(DType::F32)
                .unwrap();
            (f(&t).to_dtype(DType::F64).unwrap() * &w)
                .unwrap()
                .sum_all()
                .unwrap()
                .to_scalar::<f64>()
                .unwrap()
        };
        let xv = Var::from_tensor(x).unwrap();
        let loss = (f(xv.as_tensor()).to_dtype(DType::F64).unwrap() * &w)
            .unwrap()
            .sum_all()
            .unwrap();
        let g = loss.backward().unwrap();
        let gx: Vec<f32> = g
            .get(xv.as_tensor())
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        for i in 0..xs.len() {
            let mut p = xs.clone();
            p[i] += h;
            let mut m = xs.clone();
            m[i] -= h;
            let fd = (eval(&p) - eval(&m)) / (2.0 * h);
            let e = (fd - gx[i] as f64).abs() / (1.0 + fd.abs());
            assert!(
                e < tol,
                "element {i}: finite difference {fd}, analytic {}",
                gx[i]
            );
        }
    }

    fn x(shape: (usize, usize, usize)) -> Tensor {
        Tensor::randn(0f32, 1.5, shape, &Device::Cpu).unwrap()
    }

    #[test]
    fn gelu_matches_candle_and_finite_differences() {
        let t = x((2, 3, 40));
        let ours = t.apply_op1(GeluTanh).unwrap();
        assert!(max_diff(&ours, &t.gelu().unwrap()) < 1e-6);
        check_grad(|v| v.apply_op1(GeluTanh).unwrap(), &t, 2e-3);
    }

    #[test]
    fn softmax_matches_candle_and_finite_differences() {
        let t = x((2, 3, 9));
        let ours = t.apply_op1(Softmax).unwrap();
        let theirs = candle_nn::ops::softmax_last_dim(&t).unwrap();
        assert!(max_diff(&ours, &theirs) < 1e-6);
        check_grad(|v| v.apply_op1(Softmax).unwrap(), &t, 2e-3);
    }

    #[test]
    fn layer_norm_matches_formula_and_finite_differences() {
        let t = (x((2, 3, 16)) + 0.7).unwrap();
        let ours = t.apply_op1(LayerNorm { eps: 1e-6 }).unwrap();
        let mean = t.mean_keepdim(D::Minus1).unwrap();
        let xc = t.broadcast_sub(&mean).unwrap();
        let var = xc.sqr().unwrap().mean_keepdim(D::Minus1).unwrap();
        let expect = xc
            .broadcast_div(&(var + 1e-6).unwrap().sqrt().unwrap())
            .unwrap();
        assert!(max_diff(&ours, &expect) < 1e-5);
        check_grad(|v| v.apply_op1(LayerNorm { eps: 1e-6 }).unwrap(), &t, 3e-3);
    }

    #[test]
    fn rms_norm_matches_formula_and_both_gradients() {
        let t = x((2, 3, 8));
        let w = Tensor::randn(1f32, 0.3, 8, &Device::Cpu).unwrap();
        let op = RmsNorm { eps: 1e-6 };
        let ours = t.apply_op2(&w, op).unwrap();
        let ms = t.sqr().unwrap().mean_keepdim(D::Minus1).unwrap();
        let expect = t
            .broadcast_div(&(ms + 1e-6).unwrap().sqrt().unwrap())
            .unwrap()
            .broadcast_mul(&w)
            .unwrap();
        assert!(max_diff(&ours, &expect) < 1e-5);
        check_grad(
            |v| v.apply_op2(&w, RmsNorm { eps: 1e-6 }).unwrap(),
            &t,
            3e-3,
        );
        // ∂w against the plain formula's autograd.
        let wv = Var::from_tensor(&w).unwrap();
        let up = x((2, 3, 8));
        let g1 = (t.apply_op2(wv.as_tensor(), RmsNorm { eps: 1e-6 }).unwrap() * &up)
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        let plain = t
            .broadcast_div(
                &(t.sqr().unwrap().mean_keepdim(D::Minus1).unwrap() + 1e-6)
                    .unwrap()
                    .sqrt()
                    .unwrap(),
            )
            .unwrap()
            .broadcast_mul(wv.as_tensor())
            .unwrap();
        let g2 = (plain * &up)
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        let a = g1.get(wv.as_tensor()).unwrap();
        let b = g2.get(wv.as_tensor()).unwrap();
        assert!(max_diff(a, b) < 1e-4);
    }
}
