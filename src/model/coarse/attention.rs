//! Attention `softmax(q kᵀ / √d) v` on `[B, L, H·D]` token tensors (heads side by side, as the
//! projections write them) as one op: no transposes to `[B, H, L, D]`, and no `[B, H, L, L]` tensor
//! kept for the backward, which recomputes one head's weights at a time from `q` and `k`.
//!
//! Backward, per head, with `G` the output gradient and `O = P v`:
//! `∂v = Pᵀ G`, `∂S = P ⊙ (G vᵀ − rowsum(G ⊙ O))`, `∂q = ∂S k / √d`, `∂k = ∂Sᵀ q / √d`.

use super::kernel::{by_dtype, slice, tensor, with_data, Elem};
use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp3, Layout, Result, Shape, Tensor};
use gemm::Parallelism;

/// `q`, `k`, `v`: `[B, L, H·D]`; returns `[B, L, H·D]`.
pub fn attention(q: &Tensor, k: &Tensor, v: &Tensor, heads: usize) -> Result<Tensor> {
    let (b, l, c) = q.dims3()?;
    if k.dims() != [b, l, c] || v.dims() != [b, l, c] || heads == 0 || c % heads != 0 {
        candle_core::bail!(
            "attention: q {:?}, k {:?}, v {:?} with {heads} heads",
            q.dims(),
            k.dims(),
            v.dims()
        );
    }
    q.contiguous()?
        .apply_op3(&k.contiguous()?, &v.contiguous()?, Attention { heads })
}

struct Attention {
    heads: usize,
}

/// A strided matrix view: data, row stride, column stride.
type View<'a, T> = (&'a [T], usize, usize);

/// `dst (+)= beta · L · R` on strided views, `L` `[m, k]`, `R` `[k, n]`, `dst` `[m, n]` (row and
/// column strides given); `acc` adds to `dst`.
#[allow(clippy::too_many_arguments)]
fn gemm_view<T: Elem>(
    dst: &mut [T],
    (drs, dcs): (usize, usize),
    acc: bool,
    beta: T,
    (m, n, k): (usize, usize, usize),
    (l, lrs, lcs): View<T>,
    (r, rrs, rcs): View<T>,
) {
    let last = |rs: usize, cs: usize, rows: usize, cols: usize| (rows - 1) * rs + (cols - 1) * cs;
    assert!(m > 0 && n > 0 && k > 0, "attention gemm: empty");
    assert!(
        last(drs, dcs, m, n) < dst.len(),
        "attention gemm: dst bounds"
    );
    assert!(last(lrs, lcs, m, k) < l.len(), "attention gemm: lhs bounds");
    assert!(last(rrs, rcs, k, n) < r.len(), "attention gemm: rhs bounds");
    // SAFETY: the assertions above bound every index the strides reach.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst.as_mut_ptr(),
            dcs as isize,
            drs as isize,
            acc,
            l.as_ptr(),
            lcs as isize,
            lrs as isize,
            r.as_ptr(),
            rcs as isize,
            rrs as isize,
            T::one(),
            beta,
            false,
            false,
            false,
            Parallelism::None,
        )
    }
}

/// One head's attention weights `P = softmax(q kᵀ · scale)` into `p` (`[L, L]`); `o` is the offset
/// of the head's first element in `q` and `k`.
fn weights<T: Elem>(p: &mut [T], q: &[T], k: &[T], o: usize, (l, c, d): (usize, usize, usize)) {
    let scale = T::from(1.0 / (d as f64).sqrt()).unwrap();
    gemm_view(
        p,
        (l, 1),
        false,
        scale,
        (l, l, d),
        (&q[o..], c, 1),
        (&k[o..], 1, c),
    );
    for row in p.chunks_exact_mut(l) {
        let max = row
            .iter()
            .fold(T::neg_infinity(), |m, &x| num_traits::Float::max(m, x));
        let mut sum = T::zero();
        for x in row.iter_mut() {
            *x = (*x - max).exp();
            sum += *x;
        }
        let inv = T::one() / sum;
        row.iter_mut().for_each(|x| *x *= inv);
    }
}

impl Attention {
    fn fwd<T: Elem>(&self, q: &[T], k: &[T], v: &[T], (b, l, c): (usize, usize, usize)) -> Vec<T> {
        let d = c / self.heads;
        let mut out = vec![T::zero(); q.len()];
        let mut p = vec![T::zero(); l * l];
        for bi in 0..b {
            for h in 0..self.heads {
                let o = bi * l * c + h * d;
                weights(&mut p, q, k, o, (l, c, d));
                gemm_view(
                    &mut out[o..],
                    (c, 1),
                    false,
                    T::one(),
                    (l, d, l),
                    (&p, l, 1),
                    (&v[o..], c, 1),
                );
            }
        }
        out
    }

    /// `(∂q, ∂k, ∂v)` from the inputs, the output `out` and its gradient `g`.
    fn bwd_t<T: Elem>(&self, [q, k, v, out, g]: [&Tensor; 5]) -> Result<(Tensor, Tensor, Tensor)> {
        let (b, l, c) = q.dims3()?;
        let d = c / self.heads;
        let scale = T::from(1.0 / (d as f64).sqrt()).unwrap();
        let g = g.contiguous()?;
        let (mut dq, mut dk, mut dv) = (
            vec![T::zero(); b * l * c],
            vec![T::zero(); b * l * c],
            vec![T::zero(); b * l * c],
        );
        let (mut p, mut ds) = (vec![T::zero(); l * l], vec![T::zero(); l * l]);
        let mut delta = vec![T::zero(); l];
        with_data::<T, _>(q, |q| {
            with_data::<T, _>(k, |k| {
                with_data::<T, _>(v, |v| {
                    with_data::<T, _>(out, |out| {
                        with_data::<T, _>(&g, |g| {
                            for bi in 0..b {
                                for h in 0..self.heads {
                                    let o = bi * l * c + h * d;
                                    weights(&mut p, q, k, o, (l, c, d));
                                    // ∂v = Pᵀ G
                                    let gv = (&g[o..], c, 1);
                                    gemm_view(
                                        &mut dv[o..],
                                        (c, 1),
                                        false,
                                        T::one(),
                                        (l, d, l),
                                        (&p, 1, l),
                                        gv,
                                    );
                                    // ∂P = G vᵀ, then ∂S = P ⊙ (∂P − rowsum(G ⊙ O))
                                    gemm_view(
                                        &mut ds,
                                        (l, 1),
                                        false,
                                        T::one(),
                                        (l, l, d),
                                        gv,
                                        (&v[o..], 1, c),
                                    );
                                    for (i, dl) in delta.iter_mut().enumerate() {
                                        let r = o + i * c;
                                        *dl = (0..d)
                                            .fold(T::zero(), |s, j| s + g[r + j] * out[r + j]);
                                    }
                                    for ((dsr, pr), dl) in
                                        ds.chunks_exact_mut(l).zip(p.chunks_exact(l)).zip(&delta)
                                    {
                                        dsr.iter_mut()
                                            .zip(pr)
                                            .for_each(|(x, &pi)| *x = pi * (*x - *dl));
                                    }
                                    // ∂q = ∂S k · scale, ∂k = ∂Sᵀ q · scale
                                    gemm_view(
                                        &mut dq[o..],
                                        (c, 1),
                                        false,
                                        scale,
                                        (l, d, l),
                                        (&ds, l, 1),
                                        (&k[o..], c, 1),
                                    );
                                    gemm_view(
                                        &mut dk[o..],
                                        (c, 1),
                                        false,
                                        scale,
                                        (l, d, l),
                                        (&ds, 1, l),
                                        (&q[o..], c, 1),
                                    );
                                }
                            }
                            Ok(())
                        })
                    })
                })
            })
        })?;
        Ok((
            tensor(dq, (b, l, c))?,
            tensor(dk, (b, l, c))?,
            tensor(dv, (b, l, c))?,
        ))
    }
}

impl CustomOp3 for Attention {
    fn name(&self) -> &'static str {
        "coarse-attention"
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
        let dims = l1.shape().dims3()?;
        by_dtype!(s1.dtype(), "attention", T => {
            let y = self.fwd::<T>(slice(s1, l1)?, slice(s2, l2)?, slice(s3, l3)?, dims);
            Ok((<T as candle_core::WithDType>::to_cpu_storage_owned(y), l1.shape().clone()))
        })
    }

    fn bwd(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let args = [q, k, v, res, grad];
        let (dq, dk, dv) = by_dtype!(q.dtype(), "attention", T => self.bwd_t::<T>(args)?);
        Ok((Some(dq), Some(dk), Some(dv)))
    }
}

#[cfg(test)]
mod tests {
    use super::super::kernel::testing::*;
    use super::*;
    use crate::model::nn::{attention as plain_attention, max_abs_diff};
    use candle_core::DType;
    use candle_core::Var;

    /// The plain formula on `[B, L, H·D]` tensors, through `[B, H, L, D]`.
    fn plain(q: &Tensor, k: &Tensor, v: &Tensor, heads: usize) -> Tensor {
        let (b, l, c) = q.dims3().unwrap();
        let split = |x: &Tensor| {
            x.reshape((b, l, heads, c / heads))
                .unwrap()
                .transpose(1, 2)
                .unwrap()
                .contiguous()
                .unwrap()
        };
        plain_attention(&split(q), &split(k), &split(v))
            .unwrap()
            .transpose(1, 2)
            .unwrap()
            .reshape((b, l, c))
            .unwrap()
    }

    #[test]
    fn attention_matches_the_plain_formula() {
        for dtype in [DType::F32, DType::F64] {
            let tol = if dtype == DType::F32 { 1e-5 } else { 1e-12 };
            let vars: Vec<Var> = (0..3)
                .map(|_| Var::from_tensor(&randn(&[2, 5, 12], dtype)).unwrap())
                .collect();
            let [q, k, v] = [0, 1, 2].map(|i| vars[i].as_tensor());
            let ours = attention(q, k, v, 3).unwrap();
            let theirs = plain(q, k, v, 3);
            assert!(max_abs_diff(&ours, &theirs).unwrap() < tol);
            assert_same_grads(&ours, &theirs, &vars.iter().collect::<Vec<_>>(), tol);
        }
    }

    #[test]
    fn attention_backward_matches_finite_differences() {
        let inputs = [0, 1, 2].map(|_| randn(&[2, 4, 6], DType::F64));
        check_fd(|t| attention(&t[0], &t[1], &t[2], 2).unwrap(), &inputs);
    }
}
