//! adaLN's modulate `x · (1 + scale) + shift` and the gated residual `res + a · gate`, each one pass
//! forward and one backward, reading the adaLN chunks in place.

use super::kernel::{by_dtype, rows_of, slice, tensor, with_data, Elem};
use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp3, Layout, Result, Shape, Tensor};

/// `[B, L, C]` dims of a token tensor.
fn dims3(l: &Layout) -> Result<(usize, usize, usize)> {
    l.shape().dims3()
}

/// adaLN's `x · (1 + scale) + shift`, `x` `[B, L, C]`, `shift` and `scale` `[B, C]` (adaLN chunks:
/// column slices are read in place).
pub fn modulate(x: &Tensor, shift: &Tensor, scale: &Tensor) -> Result<Tensor> {
    x.contiguous()?.apply_op3(shift, scale, Modulate)
}

struct Modulate;

impl Modulate {
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
        let (dx, dsh, dsc) =
            by_dtype!(x.dtype(), "backward", T => Self::bwd_t::<T>(x, shift, scale, grad)?);
        Ok((Some(dx), Some(dsh), Some(dsc)))
    }
}

/// The gated residual `res + a · gate`, `res` and `a` `[B, L, C]`, `gate` `[B, C]`.
pub fn gated_residual(res: &Tensor, a: &Tensor, gate: &Tensor) -> Result<Tensor> {
    res.contiguous()?
        .apply_op3(&a.contiguous()?, gate, GatedResidual)
}

struct GatedResidual;

/// Wraps a kernel's output as the storage of a tensor shaped like `l`.
struct T3<T>(std::marker::PhantomData<T>);
impl<T: Elem> T3<T> {
    fn out(v: Vec<T>, l: &Layout) -> Result<(CpuStorage, Shape)> {
        Ok((T::to_cpu_storage_owned(v), l.shape().clone()))
    }
}

impl GatedResidual {
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
        let (da, dgate) = by_dtype!(a.dtype(), "backward", T => Self::bwd_t::<T>(a, gate, grad)?);
        Ok((Some(grad.clone()), Some(da), Some(dgate)))
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
