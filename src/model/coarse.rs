//! Coarse CPU ops with hand-written backward passes for the MMDiT's training path: a linear layer
//! (frozen weight, bias and optional LoRA adapter as one op), adaLN's modulate, and the gated
//! residual. Each is one forward kernel and one backward kernel over contiguous rows, in f32 or f64.
//!
//! Composed from Candle ops, a LoRA linear is seven tensors forward and about twenty in the backward
//! (gradients of every intermediate, `zeros_like` + `add` for each first gradient, the broadcast of
//! the bias summed back); here it is three GEMMs forward and four backward, and no gradient is ever
//! formed for the frozen weight. `nn.rs` and `linear.rs` route CPU f32/f64 tensors through these ops
//! and everything else through the plain formulas, which the tests below compare them with.

use candle_core::backend::BackendStorage;
use candle_core::{
    CpuStorage, CustomOp1, CustomOp3, DType, Device, Layout, Result, Shape, Storage, Tensor,
    WithDType,
};
use gemm::Parallelism;
use std::sync::atomic::{AtomicBool, Ordering};

/// The element types the kernels run in.
pub trait Elem: WithDType + num_traits::Float + std::ops::AddAssign {}
impl Elem for f32 {}
impl Elem for f64 {}

static ENABLED: AtomicBool = AtomicBool::new(true);

/// Switches the coarse ops on or off for the whole process (on by default); off, every layer takes
/// the plain formulas. For comparisons in tests and benches only: switching while another thread runs
/// a model mixes the two paths within one pass.
pub fn set_enabled(on: bool) {
    ENABLED.store(on, Ordering::SeqCst);
}

/// Whether the coarse ops apply to `x`: switched on, on the CPU, in f32 or f64.
pub fn applies(x: &Tensor) -> bool {
    ENABLED.load(Ordering::Relaxed)
        && x.device().is_cpu()
        && matches!(x.dtype(), DType::F32 | DType::F64)
}

/// `dst (+)= beta · L · R` for row-major `dst` `[m, n]`, `L` `[m, k]` and `R` `[k, n]`; `lt` / `rt`
/// say that `L` / `R` are stored transposed (`[k, m]` / `[n, k]`). `acc` adds to `dst`.
#[allow(clippy::too_many_arguments)]
fn mm<T: Elem>(
    dst: &mut [T],
    acc: bool,
    beta: T,
    m: usize,
    n: usize,
    k: usize,
    l: &[T],
    lt: bool,
    r: &[T],
    rt: bool,
) {
    assert!(
        dst.len() == m * n && l.len() == m * k && r.len() == k * n,
        "coarse gemm: sizes"
    );
    if m == 0 || n == 0 {
        return;
    }
    if k == 0 {
        if !acc {
            dst.fill(T::zero());
        }
        return;
    }
    let (l_rs, l_cs) = if lt { (1, m as isize) } else { (k as isize, 1) };
    let (r_rs, r_cs) = if rt { (1, k as isize) } else { (n as isize, 1) };
    // SAFETY: the asserted lengths cover every index the strides reach.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst.as_mut_ptr(),
            1,
            n as isize,
            acc,
            l.as_ptr(),
            l_cs,
            l_rs,
            r.as_ptr(),
            r_cs,
            r_rs,
            T::one(),
            beta,
            false,
            false,
            false,
            Parallelism::None,
        )
    }
}

/// The contiguous data of a CPU tensor, read-locked for the closure.
fn with_data<T: Elem, R>(t: &Tensor, f: impl FnOnce(&[T]) -> Result<R>) -> Result<R> {
    let (s, l) = t.storage_and_layout();
    let Storage::Cpu(c) = &*s else {
        candle_core::bail!("coarse op: a tensor is not on the CPU");
    };
    f(slice(c, l)?)
}

fn slice<'a, T: Elem>(s: &'a CpuStorage, l: &Layout) -> Result<&'a [T]> {
    match l.contiguous_offsets() {
        Some((a, b)) => Ok(&T::cpu_storage_as_slice(s)?[a..b]),
        None => candle_core::bail!("coarse op: expects a contiguous tensor"),
    }
}

/// A `[B, C]` per-sample row vector that may be a column slice of a wider matrix (an adaLN chunk):
/// its data from the first element on, and the distance between rows.
fn rows_of<'a, T: Elem>(s: &'a CpuStorage, l: &Layout) -> Result<(&'a [T], usize)> {
    let stride = l.stride();
    if l.dims().len() != 2 || (stride[1] != 1 && l.dims()[1] > 1) {
        candle_core::bail!(
            "coarse op: expects [B, C] rows with unit column stride, got {:?}",
            l
        );
    }
    Ok((&T::cpu_storage_as_slice(s)?[l.start_offset()..], stride[0]))
}

fn tensor<T: Elem>(v: Vec<T>, shape: impl Into<Shape>) -> Result<Tensor> {
    Tensor::from_vec(v, shape, &Device::Cpu)
}

// ------------------------------------------------------------------------------------ linear ---

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
        macro_rules! run {
            ($t:ty) => {{
                let ab = match ab {
                    Some((a, la, b, lb)) => {
                        Some((slice::<$t>(a, la)?, slice::<$t>(b, lb)?, la.dims()[0]))
                    }
                    None => None,
                };
                self.fwd::<$t>(slice(x, lx)?, n, ab)
            }};
        }
        match x.dtype() {
            DType::F32 => run!(f32),
            DType::F64 => run!(f64),
            d => candle_core::bail!("linear: coarse op runs in f32 or f64, not {d:?}"),
        }
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
        match x.dtype() {
            DType::F32 => self.bwd_t::<f32>(x, g, ab),
            DType::F64 => self.bwd_t::<f64>(x, g, ab),
            d => candle_core::bail!("linear: coarse op runs in f32 or f64, not {d:?}"),
        }
    }
}

impl CustomOp1 for LinearOp {
    fn name(&self) -> &'static str {
        "coarse-linear"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        self.fwd_storage(s, l, None)
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

// ----------------------------------------------------------------- modulate and gated residual ---

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
        macro_rules! run {
            ($t:ty) => {
                T3::<$t>::out(
                    Self::fwd::<$t>(slice(s1, l1)?, d, rows_of(s2, l2)?, rows_of(s3, l3)?),
                    l1,
                )
            };
        }
        match s1.dtype() {
            DType::F32 => run!(f32),
            DType::F64 => run!(f64),
            d => candle_core::bail!("modulate: coarse op runs in f32 or f64, not {d:?}"),
        }
    }

    fn bwd(
        &self,
        x: &Tensor,
        shift: &Tensor,
        scale: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let (dx, dsh, dsc) = match x.dtype() {
            DType::F32 => Self::bwd_t::<f32>(x, shift, scale, grad)?,
            _ => Self::bwd_t::<f64>(x, shift, scale, grad)?,
        };
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
        macro_rules! run {
            ($t:ty) => {
                T3::<$t>::out(
                    Self::fwd::<$t>(slice(s1, l1)?, slice(s2, l2)?, d, rows_of(s3, l3)?),
                    l1,
                )
            };
        }
        match s1.dtype() {
            DType::F32 => run!(f32),
            DType::F64 => run!(f64),
            d => candle_core::bail!("gated residual: coarse op runs in f32 or f64, not {d:?}"),
        }
    }

    fn bwd(
        &self,
        _res_in: &Tensor,
        a: &Tensor,
        gate: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let (da, dgate) = match a.dtype() {
            DType::F32 => Self::bwd_t::<f32>(a, gate, grad)?,
            _ => Self::bwd_t::<f64>(a, gate, grad)?,
        };
        Ok((Some(grad.clone()), Some(da), Some(dgate)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::nn::max_abs_diff;
    use candle_core::Var;

    /// Checks `f`'s backward against central finite differences in f64, on a few coordinates of
    /// every input, and returns nothing: it panics with the coordinate that disagrees.
    fn check_fd(f: impl Fn(&[Tensor]) -> Tensor, inputs: &[Tensor]) {
        let vars: Vec<Var> = inputs
            .iter()
            .map(|t| Var::from_tensor(t).unwrap())
            .collect();
        let ts: Vec<Tensor> = vars.iter().map(|v| v.as_tensor().clone()).collect();
        let out = f(&ts);
        let up = Tensor::randn(0f64, 1.0, out.dims(), &Device::Cpu).unwrap();
        let l = |o: &Tensor| (o * &up).unwrap().sum_all().unwrap();
        let g = l(&out).backward().unwrap();
        for (j, v) in vars.iter().enumerate() {
            let analytic: Vec<f64> = g
                .get(v.as_tensor())
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1()
                .unwrap();
            let base: Vec<f64> = v.as_tensor().flatten_all().unwrap().to_vec1().unwrap();
            let n = base.len();
            for i in [0, n / 3, n / 2, n - 1] {
                let at = |d: f64| {
                    let mut x = base.clone();
                    x[i] += d;
                    let mut args: Vec<Tensor> = inputs.to_vec();
                    args[j] = Tensor::from_vec(x, v.as_tensor().dims(), &Device::Cpu).unwrap();
                    l(&f(&args)).to_scalar::<f64>().unwrap()
                };
                let eps = 1e-6;
                let numeric = (at(eps) - at(-eps)) / (2.0 * eps);
                assert!(
                    (numeric - analytic[i]).abs() < 1e-6 * (1.0 + numeric.abs()),
                    "input {j}, coordinate {i}: finite difference {numeric}, backward {}",
                    analytic[i]
                );
            }
        }
    }

    fn randn(shape: &[usize], dtype: DType) -> Tensor {
        Tensor::randn(0f64, 1.0, shape, &Device::Cpu)
            .unwrap()
            .to_dtype(dtype)
            .unwrap()
    }

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
                let up = randn(ours.dims(), dtype);
                let g1 = (&ours * &up)
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
                let mut leaves = vec![&xv];
                if lora.is_some() {
                    leaves.extend([&av, &bv]);
                }
                for v in leaves {
                    let d = max_abs_diff(
                        g1.get(v.as_tensor()).unwrap(),
                        g2.get(v.as_tensor()).unwrap(),
                    )
                    .unwrap();
                    assert!(d < tol, "{dtype:?}: gradient differs by {d}");
                }
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
            let up = randn(ours.dims(), dtype);
            let g1 = (&ours * &up)
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
            for v in [&x, &a, &m] {
                let d = max_abs_diff(
                    g1.get(v.as_tensor()).unwrap(),
                    g2.get(v.as_tensor()).unwrap(),
                )
                .unwrap();
                assert!(d < tol, "{dtype:?}: gradient differs by {d}");
            }
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
