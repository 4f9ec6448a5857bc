//! adaLN's modulate `x · (1 + scale) + shift` and the gated residual `res + a · gate`, each one pass
//! forward and one backward, reading the adaLN chunks in place. On the CPU in f32/f64 its own
//! kernels; on CUDA and in half precision the same op composed from Candle's kernels, no graph.

use super::kernel::{by_dtype, kernel_applies, rows_of, slice, tensor, with_data, Elem};
use candle_core::backend::BackendStorage;
use candle_core::op::{Add, Mul};
use candle_core::{CpuStorage, CudaStorage, CustomOp3, DType, Layout, Result, Shape, Tensor};

/// `[B, L, C]` dims of a token tensor.
fn dims3(l: &Layout) -> Result<(usize, usize, usize)> {
    l.shape().dims3()
}

/// adaLN's `x · (1 + scale) + shift`, `x` `[B, L, C]`, `shift` and `scale` `[B, C]` (adaLN chunks:
/// column slices are read in place).
pub fn modulate(x: &Tensor, shift: &Tensor, scale: &Tensor) -> Result<Tensor> {
    let composed = !kernel_applies(x);
    x.contiguous()?
        .apply_op3(shift, scale, Modulate { composed })
}

/// `composed`: Candle's kernels (any backend and dtype) instead of the CPU kernels.
struct Modulate {
    composed: bool,
}

/// The layout that repeats a contiguous `[B, C]` over the `L` tokens of a `[B, L, C]` tensor.
fn per_sample_rows(l: &Layout) -> Result<Layout> {
    let (b, n, c) = l.shape().dims3()?;
    Layout::contiguous((b, 1, c)).broadcast_as((b, n, c))
}

/// `Σ_L` of a `[B, L, C]` product, accumulated in f32 at least, in `like`'s dtype.
fn token_sum(t: &Tensor, like: DType) -> Result<Tensor> {
    let acc = if like == DType::F64 {
        DType::F64
    } else {
        DType::F32
    };
    t.to_dtype(acc)?.sum(1)?.to_dtype(like)
}

impl Modulate {
    /// The forward from Candle's kernels on any backend: `x · (scale + 1) + shift`.
    fn fwd_composed<S: BackendStorage>(
        (x, lx): (&S, &Layout),
        (sh, lsh): (&S, &Layout),
        (sc, lsc): (&S, &Layout),
    ) -> Result<(S, Shape)> {
        let (b, _, c) = lx.shape().dims3()?;
        if lsh.dims() != [b, c] || lsc.dims() != [b, c] {
            candle_core::bail!(
                "modulate: x {lx:?}, shift {lsh:?}, scale {lsc:?}: expected [B, C] rows"
            );
        }
        let rows = per_sample_rows(lx)?;
        let t = x.binary_impl::<Mul>(&sc.affine(lsc, 1.0, 1.0)?, lx, &rows)?;
        let sh = sh.affine(lsh, 1.0, 0.0)?;
        let y = t.binary_impl::<Add>(&sh, &Layout::contiguous(lx.shape()), &rows)?;
        Ok((y, lx.shape().clone()))
    }

    /// The backward from Candle's tensor ops on detached tensors, any backend and dtype.
    fn bwd_composed(x: &Tensor, scale: &Tensor, g: &Tensor) -> Result<(Tensor, Tensor, Tensor)> {
        let (x, g) = (x.detach(), g.detach());
        let dx = g.broadcast_mul(&(scale.detach().unsqueeze(1)? + 1.0)?)?;
        let (dsh, dsc) = (
            token_sum(&g, g.dtype())?,
            token_sum(&(&g * &x)?, g.dtype())?,
        );
        Ok((dx, dsh, dsc))
    }

    fn fwd<T: Elem>(
        x: &[T],
        (b, l, c): (usize, usize, usize),
        sh: (&[T], usize),
        sc: (&[T], usize),
    ) -> Vec<T> {
        let mut y = vec![T::zero(); x.len()];
        for bi in 0..b {
            let (sh, sc) = (&sh.0[bi * sh.1..][..c], &sc.0[bi * sc.1..][..c]);
            let rows = bi * l * c..(bi + 1) * l * c;
            for (yr, xr) in y[rows.clone()]
                .chunks_exact_mut(c)
                .zip(x[rows].chunks_exact(c))
            {
                for i in 0..c {
                    yr[i] = xr[i] * (sc[i] + T::one()) + sh[i];
                }
            }
        }
        y
    }

    /// `(∂x, ∂shift, ∂scale)`.
    fn bwd_t<T: Elem>(
        x: &Tensor,
        shift: &Tensor,
        scale: &Tensor,
        g: &Tensor,
    ) -> Result<(Tensor, Tensor, Tensor)> {
        let (b, l, c) = x.dims3()?;
        let g = g.contiguous()?;
        let scale = scale.contiguous()?;
        let _ = shift;
        with_data::<T, _>(x, |x| {
            with_data::<T, _>(&g, |g| {
                with_data::<T, _>(&scale, |sc| {
                    let mut dx = vec![T::zero(); x.len()];
                    let (mut dsh, mut dsc) = (vec![T::zero(); b * c], vec![T::zero(); b * c]);
                    for bi in 0..b {
                        let s = &sc[bi * c..][..c];
                        let (dsh, dsc) = (&mut dsh[bi * c..][..c], &mut dsc[bi * c..][..c]);
                        let rows = bi * l * c..(bi + 1) * l * c;
                        let it = dx[rows.clone()]
                            .chunks_exact_mut(c)
                            .zip(g[rows.clone()].chunks_exact(c))
                            .zip(x[rows].chunks_exact(c));
                        for ((dxr, gr), xr) in it {
                            for i in 0..c {
                                dxr[i] = gr[i] * (s[i] + T::one());
                                dsh[i] += gr[i];
                                dsc[i] += gr[i] * xr[i];
                            }
                        }
                    }
                    Ok((
                        tensor(dx, (b, l, c))?,
                        tensor(dsh, (b, c))?,
                        tensor(dsc, (b, c))?,
                    ))
                })
            })
        })
    }
}

impl CustomOp3 for Modulate {
    fn name(&self) -> &'static str {
        "coarse-modulate"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        if self.composed {
            return Self::fwd_composed((s1, l1), (s2, l2), (s3, l3));
        }
        let d = dims3(l1)?;
        by_dtype!(s1.dtype(), "modulate", T => {
        T3::<T>::out(
                            Self::fwd::<T>(slice(s1, l1)?, d, rows_of(s2, l2)?, rows_of(s3, l3)?),
                            l1,
                        )
        })
    }

    fn bwd(
        &self,
        x: &Tensor,
        shift: &Tensor,
        scale: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let (dx, dsh, dsc) = if self.composed {
            Self::bwd_composed(x, scale, grad)?
        } else {
            by_dtype!(x.dtype(), "backward", T => Self::bwd_t::<T>(x, shift, scale, grad)?)
        };
        Ok((Some(dx), Some(dsh), Some(dsc)))
    }

    fn cuda_fwd(
        &self,
        s1: &CudaStorage,
        l1: &Layout,
        s2: &CudaStorage,
        l2: &Layout,
        s3: &CudaStorage,
        l3: &Layout,
    ) -> Result<(CudaStorage, Shape)> {
        Self::fwd_composed((s1, l1), (s2, l2), (s3, l3))
    }
}

/// The gated residual `res + a · gate`, `res` and `a` `[B, L, C]`, `gate` `[B, C]`.
pub fn gated_residual(res: &Tensor, a: &Tensor, gate: &Tensor) -> Result<Tensor> {
    let composed = !kernel_applies(res);
    res.contiguous()?
        .apply_op3(&a.contiguous()?, gate, GatedResidual { composed })
}

/// `composed`: Candle's kernels (any backend and dtype) instead of the CPU kernels.
struct GatedResidual {
    composed: bool,
}

/// Wraps a kernel's output as the storage of a tensor shaped like `l`.
struct T3<T>(std::marker::PhantomData<T>);
impl<T: Elem> T3<T> {
    fn out(v: Vec<T>, l: &Layout) -> Result<(CpuStorage, Shape)> {
        Ok((T::to_cpu_storage_owned(v), l.shape().clone()))
    }
}

impl GatedResidual {
    /// The forward from Candle's kernels on any backend: `res + a · gate`.
    fn fwd_composed<S: BackendStorage>(
        (res, lr): (&S, &Layout),
        (a, la): (&S, &Layout),
        (gate, lg): (&S, &Layout),
    ) -> Result<(S, Shape)> {
        if la.shape() != lr.shape() {
            candle_core::bail!(
                "gated residual: shapes {:?} and {:?} differ",
                lr.shape(),
                la.shape()
            );
        }
        let (b, _, c) = la.shape().dims3()?;
        if lg.dims() != [b, c] {
            candle_core::bail!("gated residual: a {la:?}, gate {lg:?}: expected [B, C] rows");
        }
        let t = a.binary_impl::<Mul>(&gate.affine(lg, 1.0, 0.0)?, la, &per_sample_rows(la)?)?;
        let y = res.binary_impl::<Add>(&t, lr, &Layout::contiguous(la.shape()))?;
        Ok((y, lr.shape().clone()))
    }

    /// `(∂a, ∂gate)` from Candle's tensor ops on detached tensors, any backend and dtype.
    fn bwd_composed(a: &Tensor, gate: &Tensor, g: &Tensor) -> Result<(Tensor, Tensor)> {
        let (a, g) = (a.detach(), g.detach());
        let da = g.broadcast_mul(&gate.detach().unsqueeze(1)?)?;
        Ok((da, token_sum(&(&g * &a)?, g.dtype())?))
    }

    fn fwd<T: Elem>(
        res: &[T],
        a: &[T],
        (b, l, c): (usize, usize, usize),
        gate: (&[T], usize),
    ) -> Vec<T> {
        let mut y = vec![T::zero(); res.len()];
        for bi in 0..b {
            let gt = &gate.0[bi * gate.1..][..c];
            let rows = bi * l * c..(bi + 1) * l * c;
            let it = y[rows.clone()]
                .chunks_exact_mut(c)
                .zip(res[rows.clone()].chunks_exact(c))
                .zip(a[rows].chunks_exact(c));
            for ((yr, rr), ar) in it {
                for i in 0..c {
                    yr[i] = rr[i] + ar[i] * gt[i];
                }
            }
        }
        y
    }

    /// `(∂a, ∂gate)`; `∂res` is the incoming gradient itself.
    fn bwd_t<T: Elem>(a: &Tensor, gate: &Tensor, g: &Tensor) -> Result<(Tensor, Tensor)> {
        let (b, l, c) = a.dims3()?;
        let g = g.contiguous()?;
        let gate = gate.contiguous()?;
        with_data::<T, _>(a, |a| {
            with_data::<T, _>(&g, |g| {
                with_data::<T, _>(&gate, |gt| {
                    let mut da = vec![T::zero(); a.len()];
                    let mut dgate = vec![T::zero(); b * c];
                    for bi in 0..b {
                        let s = &gt[bi * c..][..c];
                        let dgt = &mut dgate[bi * c..][..c];
                        let rows = bi * l * c..(bi + 1) * l * c;
                        let it = da[rows.clone()]
                            .chunks_exact_mut(c)
                            .zip(g[rows.clone()].chunks_exact(c))
                            .zip(a[rows].chunks_exact(c));
                        for ((dar, gr), ar) in it {
                            for i in 0..c {
                                dar[i] = gr[i] * s[i];
                                dgt[i] += gr[i] * ar[i];
                            }
                        }
                    }
                    Ok((tensor(da, (b, l, c))?, tensor(dgate, (b, c))?))
                })
            })
        })
    }
}

impl CustomOp3 for GatedResidual {
    fn name(&self) -> &'static str {
        "coarse-gated-residual"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        if self.composed {
            return Self::fwd_composed((s1, l1), (s2, l2), (s3, l3));
        }
        let d = dims3(l1)?;
        if l2.shape() != l1.shape() {
            candle_core::bail!(
                "gated residual: shapes {:?} and {:?} differ",
                l1.shape(),
                l2.shape()
            );
        }
        by_dtype!(s1.dtype(), "gated residual", T => {
        T3::<T>::out(
                            Self::fwd::<T>(slice(s1, l1)?, slice(s2, l2)?, d, rows_of(s3, l3)?),
                            l1,
                        )
        })
    }

    fn bwd(
        &self,
        _res_in: &Tensor,
        a: &Tensor,
        gate: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let (da, dgate) = if self.composed {
            Self::bwd_composed(a, gate, grad)?
        } else {
            by_dtype!(a.dtype(), "backward", T => Self::bwd_t::<T>(a, gate, grad)?)
        };
        Ok((Some(grad.clone()), Some(da), Some(dgate)))
    }

    fn cuda_fwd(
        &self,
        s1: &CudaStorage,
        l1: &Layout,
        s2: &CudaStorage,
        l2: &Layout,
        s3: &CudaStorage,
        l3: &Layout,
    ) -> Result<(CudaStorage, Shape)> {
        Self::fwd_composed((s1, l1), (s2, l2), (s3, l3))
    }
}

#[cfg(test)]
mod tests {
    use super::super::kernel::testing::*;
    use super::*;
    use crate::model::nn::max_abs_diff;
    use candle_core::DType;
    use candle_core::Var;

    /// adaLN chunks as the block takes them: column slices of one `[B, k·C]` matrix.
    fn chunks(b: usize, c: usize, dtype: DType) -> Vec<Tensor> {
        randn(&[b, 3 * c], dtype).chunk(3, 1).unwrap()
    }

    #[test]
    fn modulate_and_gated_residual_match_the_plain_formulas() {
        for dtype in [DType::F32, DType::F64] {
            let tol = if dtype == DType::F32 { 1e-5 } else { 1e-12 };
            let x = Var::from_tensor(&randn(&[2, 4, 5], dtype)).unwrap();
            let a = Var::from_tensor(&randn(&[2, 4, 5], dtype)).unwrap();
            let m = Var::from_tensor(&randn(&[2, 15], dtype)).unwrap();
            let ch = m.as_tensor().chunk(3, 1).unwrap();
            let (x_, a_) = (x.as_tensor(), a.as_tensor());
            let ours = (modulate(x_, &ch[0], &ch[1]).unwrap()
                + gated_residual(x_, a_, &ch[2]).unwrap())
            .unwrap();
            let plain_mod = x_
                .broadcast_mul(&(ch[1].unsqueeze(1).unwrap() + 1.0).unwrap())
                .unwrap()
                .broadcast_add(&ch[0].unsqueeze(1).unwrap())
                .unwrap();
            let plain_res = (x_ + a_.broadcast_mul(&ch[2].unsqueeze(1).unwrap()).unwrap()).unwrap();
            let plain = (plain_mod + plain_res).unwrap();
            assert!(max_abs_diff(&ours, &plain).unwrap() < tol);
            assert_same_grads(&ours, &plain, &[&x, &a, &m], tol);
        }
    }

    /// The composed ops (Candle's kernels, as on CUDA), forced on CPU f64 tensors.
    fn modulate_composed(x: &Tensor, sh: &Tensor, sc: &Tensor) -> Tensor {
        x.apply_op3(sh, sc, Modulate { composed: true }).unwrap()
    }
    fn residual_composed(r: &Tensor, a: &Tensor, g: &Tensor) -> Tensor {
        r.apply_op3(a, g, GatedResidual { composed: true }).unwrap()
    }

    #[test]
    fn composed_ops_equal_the_kernels_and_finite_differences() {
        let x = Var::from_tensor(&randn(&[2, 4, 5], DType::F64)).unwrap();
        let a = Var::from_tensor(&randn(&[2, 4, 5], DType::F64)).unwrap();
        let m = Var::from_tensor(&randn(&[2, 15], DType::F64)).unwrap();
        let ch = m.as_tensor().chunk(3, 1).unwrap();
        let (x_, a_) = (x.as_tensor(), a.as_tensor());
        let ours =
            (modulate_composed(x_, &ch[0], &ch[1]) + residual_composed(x_, a_, &ch[2])).unwrap();
        let kernels = (modulate(x_, &ch[0], &ch[1]).unwrap()
            + gated_residual(x_, a_, &ch[2]).unwrap())
        .unwrap();
        assert!(max_abs_diff(&ours, &kernels).unwrap() < 1e-12);
        assert_same_grads(&ours, &kernels, &[&x, &a, &m], 1e-12);
        let ch = chunks(2, 5, DType::F64);
        check_fd(
            |t| modulate_composed(&t[0], &t[1], &t[2]),
            &[randn(&[2, 3, 5], DType::F64), ch[0].clone(), ch[1].clone()],
        );
        check_fd(
            |t| residual_composed(&t[0], &t[1], &t[2]),
            &[
                randn(&[2, 3, 5], DType::F64),
                randn(&[2, 3, 5], DType::F64),
                ch[2].clone(),
            ],
        );
    }

    #[test]
    fn half_precision_takes_the_composed_ops() {
        // bf16 on the CPU goes through Candle's kernels: the same values as f32 within bf16's precision
        let (x, a, m) = (
            randn(&[2, 4, 8], DType::F32),
            randn(&[2, 4, 8], DType::F32),
            randn(&[2, 16], DType::F32),
        );
        let f = |dt: DType| {
            let [x, a, m] =
                [&x, &a, &m].map(|t| Var::from_tensor(&t.to_dtype(dt).unwrap()).unwrap());
            let ch = m.as_tensor().chunk(2, 1).unwrap();
            let y = gated_residual(
                x.as_tensor(),
                &modulate(a.as_tensor(), &ch[0], &ch[1]).unwrap(),
                &ch[1],
            )
            .unwrap();
            let g = y.sum_all().unwrap().backward().unwrap();
            let dm = g.get(m.as_tensor()).unwrap().to_dtype(DType::F32).unwrap();
            (y.to_dtype(DType::F32).unwrap(), dm)
        };
        let ((y16, dm16), (y32, dm32)) = (f(DType::BF16), f(DType::F32));
        assert!(max_abs_diff(&y16, &y32).unwrap() < 0.1);
        assert!(max_abs_diff(&dm16, &dm32).unwrap() < 0.2);
    }

    #[test]
    fn modulate_and_gated_residual_backward_match_finite_differences() {
        let ch = chunks(2, 5, DType::F64);
        check_fd(
            |t| modulate(&t[0], &t[1], &t[2]).unwrap(),
            &[randn(&[2, 3, 5], DType::F64), ch[0].clone(), ch[1].clone()],
        );
        check_fd(
            |t| gated_residual(&t[0], &t[1], &t[2]).unwrap(),
            &[
                randn(&[2, 3, 5], DType::F64),
                randn(&[2, 3, 5], DType::F64),
                ch[2].clone(),
            ],
        );
    }
}
