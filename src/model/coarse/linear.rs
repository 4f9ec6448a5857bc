//! The linear layer as one op: frozen weight, bias and an optional LoRA adapter; three GEMMs
//! forward, four backward, no gradient for the frozen weight. On the CPU in f32/f64 its own kernels;
//! on CUDA (and other dtypes) the same op composed from Candle's kernels, without an autograd graph:
//! the graph keeps `x` in its storage dtype, not an f32 copy per adapter.

use super::kernel::{by_dtype, mm, slice, tensor, with_data, with_storage, Backend, Elem};
use candle_core::backend::BackendStorage;
use candle_core::op::Add;
use candle_core::{
    CpuStorage, CudaStorage, CustomOp1, CustomOp3, DType, Layout, Result, Shape, Tensor,
};

/// `y = x Wᵀ + b + scale · (x Aᵀ) Bᵀ` for a 2-D `x` `[N, in]`, with `W` `[out, in]` and `b` frozen
/// and, when given, the adapter `A` `[r, in]`, `B` `[out, r]`. With a graph, the backward yields
/// `∂x` and the adapter's `∂A`, `∂B`, never `∂W`.
pub fn linear(
    x: &Tensor,
    w: &Tensor,
    bias: Option<&Tensor>,
    lora: Option<(&Tensor, &Tensor, f64)>,
) -> Result<Tensor> {
    let op = LinearOp {
        w: w.contiguous()?,
        bias: bias.map(|b| b.contiguous()).transpose()?,
        scale: lora.map_or(0.0, |l| l.2),
    };
    let x = x.contiguous()?;
    match lora {
        Some((a, b, _)) => x.apply_op3(a, b, op),
        None => x.apply_op1(op),
    }
}

struct LinearOp {
    w: Tensor,
    bias: Option<Tensor>,
    scale: f64,
}

impl LinearOp {
    /// The forward kernel; `ab` is the adapter's data and rank.
    fn fwd<T: Elem>(
        &self,
        x: &[T],
        n: usize,
        ab: Option<(&[T], &[T], usize)>,
    ) -> Result<(CpuStorage, Shape)> {
        let (out, inp) = self.w.dims2()?;
        if x.len() != n * inp {
            candle_core::bail!(
                "linear: input has {} features, the weight expects {inp}",
                x.len() / n.max(1)
            );
        }
        let mut y = vec![T::zero(); n * out];
        with_data::<T, _>(&self.w, |w| {
            mm(&mut y, false, T::one(), n, out, inp, x, false, w, true);
            Ok(())
        })?;
        if let Some(b) = &self.bias {
            with_data::<T, _>(b, |b| {
                for row in y.chunks_exact_mut(out) {
                    row.iter_mut().zip(b).for_each(|(y, b)| *y += *b);
                }
                Ok(())
            })?;
        }
        if let Some((a, bm, r)) = ab {
            let mut t = vec![T::zero(); n * r];
            mm(&mut t, false, T::one(), n, r, inp, x, false, a, true);
            mm(
                &mut y,
                true,
                T::from(self.scale).unwrap(),
                n,
                out,
                r,
                &t,
                false,
                bm,
                true,
            );
        }
        Ok((T::to_cpu_storage_owned(y), Shape::from((n, out))))
    }

    fn fwd_storage(
        &self,
        x: &CpuStorage,
        lx: &Layout,
        ab: Option<(&CpuStorage, &Layout, &CpuStorage, &Layout)>,
    ) -> Result<(CpuStorage, Shape)> {
        let n = lx.dims()[0];
        let kernel = matches!(x.dtype(), DType::F32 | DType::F64)
            && self.w.dtype() == x.dtype()
            && ab.is_none_or(|(a, _, _, _)| a.dtype() == x.dtype());
        if !kernel {
            return self.fwd_composed(x, lx, ab);
        }
        by_dtype!(x.dtype(), "linear", T => {
            let ab = match ab {
                Some((a, la, b, lb)) => Some((slice::<T>(a, la)?, slice::<T>(b, lb)?, la.dims()[0])),
                None => None,
            };
            self.fwd::<T>(slice(x, lx)?, n, ab)
        })
    }

    /// The forward composed from Candle's kernels (matmul, broadcast add, casts) on any backend,
    /// in the order of the plain formula: `x Wᵀ`, `+ b`, `+ (scale · (x Aᵀ) Bᵀ)` with the adapter
    /// in its own dtype and the sum cast back.
    fn fwd_composed<S: Backend>(
        &self,
        x: &S,
        lx: &Layout,
        ab: Option<(&S, &Layout, &S, &Layout)>,
    ) -> Result<(S, Shape)> {
        let (n, inp) = lx.shape().dims2()?;
        let (out, _) = self.w.dims2()?;
        let ly = Layout::contiguous((n, out));
        let mut y = with_storage::<S, _>(&self.w, |w, lw| {
            x.matmul(w, (1, n, out, inp), lx, &lw.transpose(0, 1)?)
        })?;
        if let Some(b) = &self.bias {
            y = with_storage::<S, _>(b, |b, lb| {
                y.binary_impl::<Add>(b, &ly, &lb.broadcast_as((n, out))?)
            })?;
        }
        if let Some((a, la, bm, lb)) = ab {
            let r = la.dims()[0];
            let (cast, lc) = (x.to_dtype(lx, a.dtype())?, Layout::contiguous((n, inp)));
            let (xa, lxa) = if x.dtype() == a.dtype() {
                (x, lx)
            } else {
                (&cast, &lc)
            };
            let t = xa.matmul(a, (1, n, r, inp), lxa, &la.transpose(0, 1)?)?;
            let lt = Layout::contiguous((n, r));
            let u = t
                .matmul(bm, (1, n, out, r), &lt, &lb.transpose(0, 1)?)?
                .affine(&ly, self.scale, 0.0)?;
            let u = if u.dtype() == y.dtype() {
                u
            } else {
                u.to_dtype(&ly, y.dtype())?
            };
            y = y.binary_impl::<Add>(&u, &ly, &ly)?;
        }
        Ok((y, Shape::from((n, out))))
    }

    /// The backward from Candle tensor ops on detached tensors (no graph), any backend and dtype:
    /// the adapter's gradients in its own dtype, `∂x` in `x`'s.
    fn bwd_composed(
        &self,
        x: &Tensor,
        g: &Tensor,
        ab: Option<(&Tensor, &Tensor)>,
    ) -> Result<(Tensor, Option<(Tensor, Tensor)>)> {
        let (x, g) = (x.detach(), g.detach());
        let dx = g.matmul(&self.w.to_dtype(g.dtype())?)?;
        let Some((a, b)) = ab else {
            return Ok((dx, None));
        };
        let (a, b) = (a.detach(), b.detach());
        let (xa, ga) = (x.to_dtype(a.dtype())?, g.to_dtype(a.dtype())?);
        let gb = ga.matmul(&b)?;
        let dx = (dx + (gb.matmul(&a)? * self.scale)?.to_dtype(x.dtype())?)?;
        let da = (gb.t()?.matmul(&xa)? * self.scale)?;
        let db = (ga.t()?.matmul(&xa.matmul(&a.t()?)?)? * self.scale)?;
        Ok((dx, Some((da, db))))
    }

    /// `(∂x, ∂A, ∂B)` from the incoming gradient `g` `[N, out]`.
    fn bwd_t<T: Elem>(
        &self,
        x: &Tensor,
        g: &Tensor,
        ab: Option<(&Tensor, &Tensor)>,
    ) -> Result<(Tensor, Option<(Tensor, Tensor)>)> {
        let (out, inp) = self.w.dims2()?;
        let n = x.dim(0)?;
        let g = g.contiguous()?;
        with_data::<T, _>(x, |x| {
            with_data::<T, _>(&g, |g| {
                let mut dx = vec![T::zero(); n * inp];
                with_data::<T, _>(&self.w, |w| {
                    mm(&mut dx, false, T::one(), n, inp, out, g, false, w, false);
                    Ok(())
                })?;
                let Some((a, b)) = ab else {
                    return Ok((tensor(dx, (n, inp))?, None));
                };
                let r = a.dim(0)?;
                let s = T::from(self.scale).unwrap();
                with_data::<T, _>(a, |a| {
                    with_data::<T, _>(b, |b| {
                        // gB = g B [N, r]; t = x Aᵀ [N, r]
                        let mut gb = vec![T::zero(); n * r];
                        mm(&mut gb, false, T::one(), n, r, out, g, false, b, false);
                        let mut t = vec![T::zero(); n * r];
                        mm(&mut t, false, T::one(), n, r, inp, x, false, a, true);
                        mm(&mut dx, true, s, n, inp, r, &gb, false, a, false);
                        let mut da = vec![T::zero(); r * inp];
                        mm(&mut da, false, s, r, inp, n, &gb, true, x, false);
                        let mut db = vec![T::zero(); out * r];
                        mm(&mut db, false, s, out, r, n, g, true, &t, false);
                        Ok((
                            tensor(dx, (n, inp))?,
                            Some((tensor(da, (r, inp))?, tensor(db, (out, r))?)),
                        ))
                    })
                })
            })
        })
    }

    fn bwd(
        &self,
        x: &Tensor,
        g: &Tensor,
        ab: Option<(&Tensor, &Tensor)>,
    ) -> Result<(Tensor, Option<(Tensor, Tensor)>)> {
        let kernel = x.device().is_cpu()
            && matches!(x.dtype(), DType::F32 | DType::F64)
            && self.w.dtype() == x.dtype()
            && ab.is_none_or(|(a, _)| a.dtype() == x.dtype());
        if !kernel {
            return self.bwd_composed(x, g, ab);
        }
        by_dtype!(x.dtype(), "linear", T => self.bwd_t::<T>(x, g, ab))
    }
}

impl CustomOp1 for LinearOp {
    fn name(&self) -> &'static str {
        "coarse-linear"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        self.fwd_storage(s, l, None)
    }

    fn cuda_fwd(&self, s: &CudaStorage, l: &Layout) -> Result<(CudaStorage, Shape)> {
        self.fwd_composed(s, l, None)
    }

    fn bwd(&self, x: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        Ok(Some(LinearOp::bwd(self, x, grad, None)?.0))
    }
}

impl CustomOp3 for LinearOp {
    fn name(&self) -> &'static str {
        "coarse-lora-linear"
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
        self.fwd_storage(s1, l1, Some((s2, l2, s3, l3)))
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
        self.fwd_composed(s1, l1, Some((s2, l2, s3, l3)))
    }

    fn bwd(
        &self,
        x: &Tensor,
        a: &Tensor,
        b: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let (dx, dab) = LinearOp::bwd(self, x, grad, Some((a, b)))?;
        let (da, db) = dab.map_or((None, None), |(a, b)| (Some(a), Some(b)));
        Ok((Some(dx), da, db))
    }
}

#[cfg(test)]
mod tests {
    use super::super::kernel::testing::*;
    use super::*;
    use crate::model::nn::max_abs_diff;
    use candle_core::Var;

    /// The plain formula the op replaces.
    fn linear_plain(
        x: &Tensor,
        w: &Tensor,
        b: &Tensor,
        lora: Option<(&Tensor, &Tensor, f64)>,
    ) -> Tensor {
        let y = x.matmul(&w.t().unwrap()).unwrap().broadcast_add(b).unwrap();
        match lora {
            Some((a, bm, s)) => (y
                + (x.matmul(&a.t().unwrap())
                    .unwrap()
                    .matmul(&bm.t().unwrap())
                    .unwrap()
                    * s)
                    .unwrap())
            .unwrap(),
            None => y,
        }
    }

    #[test]
    fn linear_matches_the_plain_formula_with_and_without_lora() {
        for dtype in [DType::F32, DType::F64] {
            let tol = if dtype == DType::F32 { 1e-4 } else { 1e-12 };
            let (x, w, b) = (
                randn(&[7, 5], dtype),
                randn(&[6, 5], dtype),
                randn(&[6], dtype),
            );
            let (a, bm) = (randn(&[3, 5], dtype), randn(&[6, 3], dtype));
            for lora in [None, Some((&a, &bm, 1.5))] {
                let xv = Var::from_tensor(&x).unwrap();
                let (av, bv) = (
                    Var::from_tensor(&a).unwrap(),
                    Var::from_tensor(&bm).unwrap(),
                );
                let lv = lora.map(|(_, _, s)| (av.as_tensor(), bv.as_tensor(), s));
                let ours = linear(xv.as_tensor(), &w, Some(&b), lv).unwrap();
                let plain = linear_plain(xv.as_tensor(), &w, &b, lv);
                assert!(max_abs_diff(&ours, &plain).unwrap() < tol);
                let mut leaves = vec![&xv];
                if lora.is_some() {
                    leaves.extend([&av, &bv]);
                }
                assert_same_grads(&ours, &plain, &leaves, tol);
                let g1 = ours.sum_all().unwrap().backward().unwrap();
                assert!(
                    g1.get(&w).is_none() && g1.get(&b).is_none(),
                    "no gradient for frozen tensors"
                );
            }
        }
    }

    #[test]
    fn linear_backward_matches_finite_differences() {
        let (w, b) = (randn(&[6, 5], DType::F64), randn(&[6], DType::F64));
        check_fd(
            |t| linear(&t[0], &w, Some(&b), Some((&t[1], &t[2], 0.7))).unwrap(),
            &[
                randn(&[4, 5], DType::F64),
                randn(&[3, 5], DType::F64),
                randn(&[6, 3], DType::F64),
            ],
        );
        check_fd(
            |t| linear(&t[0], &w, None, None).unwrap(),
            &[randn(&[4, 5], DType::F64)],
        );
    }

    /// The composed path (what CUDA runs), on the CPU in f16 with an f32 adapter, against the plain
    /// formula in f32: values and gradients within f16 rounding.
    #[test]
    fn composed_path_in_half_precision_with_an_f32_adapter() {
        let h = DType::F16;
        let (x, w, b) = (randn(&[7, 5], h), randn(&[6, 5], h), randn(&[6], h));
        let (a, bm) = (randn(&[3, 5], DType::F32), randn(&[6, 3], DType::F32));
        let (xv, av, bv) = (
            Var::from_tensor(&x).unwrap(),
            Var::from_tensor(&a).unwrap(),
            Var::from_tensor(&bm).unwrap(),
        );
        let ours = linear(
            xv.as_tensor(),
            &w,
            Some(&b),
            Some((av.as_tensor(), bv.as_tensor(), 1.5)),
        )
        .unwrap();
        assert_eq!(ours.dtype(), h);
        let f = |t: &Tensor| t.to_dtype(DType::F32).unwrap();
        let xf = Var::from_tensor(&f(&x)).unwrap();
        let (af, bf) = (
            Var::from_tensor(&a).unwrap(),
            Var::from_tensor(&bm).unwrap(),
        );
        let plain = linear_plain(
            xf.as_tensor(),
            &f(&w),
            &f(&b),
            Some((af.as_tensor(), bf.as_tensor(), 1.5)),
        );
        let scale = plain
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap() as f64;
        assert!(max_abs_diff(&ours, &plain).unwrap() < 2e-3 * scale);
        let up = randn(ours.dims(), DType::F32);
        let g1 = (f(&ours) * &up)
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        let g2 = (&plain * &up)
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        for (ours, theirs) in [(&xv, &xf), (&av, &af), (&bv, &bf)] {
            let (g, want) = (
                g1.get(ours.as_tensor()).unwrap(),
                g2.get(theirs.as_tensor()).unwrap(),
            );
            assert_eq!(g.dtype(), ours.dtype());
            let s = want
                .abs()
                .unwrap()
                .max_all()
                .unwrap()
                .to_scalar::<f32>()
                .unwrap() as f64;
            let d = max_abs_diff(g, want).unwrap();
            assert!(d < 5e-3 * s, "gradient differs by {d} (scale {s})");
        }
    }
}
