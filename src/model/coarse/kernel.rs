//! What the coarse kernels share: the element types, GEMM on row-major slices, and access to the
//! contiguous data of CPU tensors.

use candle_core::backend::BackendStorage;
use candle_core::{
    CpuStorage, CudaStorage, Device, Layout, Result, Shape, Storage, Tensor, WithDType,
};
use gemm::Parallelism;

/// The element types the kernels run in.
pub trait Elem: WithDType + num_traits::Float + std::ops::AddAssign + std::ops::MulAssign {}
impl Elem for f32 {}
impl Elem for f64 {}

/// `dst (+)= beta · L · R` for row-major `dst` `[m, n]`, `L` `[m, k]` and `R` `[k, n]`; `lt` / `rt`
/// say that `L` / `R` are stored transposed (`[k, m]` / `[n, k]`). `acc` adds to `dst`.
#[allow(clippy::too_many_arguments)]
pub fn mm<T: Elem>(
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

/// Whether the coarse ops' own kernels apply to `x`: on the CPU, in f32 or f64 (elsewhere they are
/// composed from Candle's kernels).
pub fn kernel_applies(x: &Tensor) -> bool {
    x.device().is_cpu() && matches!(x.dtype(), candle_core::DType::F32 | candle_core::DType::F64)
}

/// The contiguous data of a CPU tensor, read-locked for the closure.
pub fn with_data<T: Elem, R>(t: &Tensor, f: impl FnOnce(&[T]) -> Result<R>) -> Result<R> {
    let (s, l) = t.storage_and_layout();
    let Storage::Cpu(c) = &*s else {
        candle_core::bail!("coarse op: a tensor is not on the CPU");
    };
    f(slice(c, l)?)
}

pub fn slice<'a, T: Elem>(s: &'a CpuStorage, l: &Layout) -> Result<&'a [T]> {
    match l.contiguous_offsets() {
        Some((a, b)) => Ok(&T::cpu_storage_as_slice(s)?[a..b]),
        None => candle_core::bail!("coarse op: expects a contiguous tensor"),
    }
}

/// A `[B, C]` per-sample row vector that may be a column slice of a wider matrix (an adaLN chunk):
/// its data from the first element on, and the distance between rows.
pub fn rows_of<'a, T: Elem>(s: &'a CpuStorage, l: &Layout) -> Result<(&'a [T], usize)> {
    let stride = l.stride();
    if l.dims().len() != 2 || (stride[1] != 1 && l.dims()[1] > 1) {
        candle_core::bail!(
            "coarse op: expects [B, C] rows with unit column stride, got {:?}",
            l
        );
    }
    Ok((&T::cpu_storage_as_slice(s)?[l.start_offset()..], stride[0]))
}

pub fn tensor<T: Elem>(v: Vec<T>, shape: impl Into<Shape>) -> Result<Tensor> {
    Tensor::from_vec(v, shape, &Device::Cpu)
}

/// Evaluates `$body` with the type `$t` bound to `$dtype`'s element type, f32 or f64; any other dtype
/// is an error that names the op.
macro_rules! by_dtype {
    ($dtype:expr, $op:expr, $t:ident => $body:expr) => {
        match $dtype {
            candle_core::DType::F32 => {
                type $t = f32;
                $body
            }
            candle_core::DType::F64 => {
                type $t = f64;
                $body
            }
            d => candle_core::bail!("{}: coarse op runs in f32 or f64, not {d:?}", $op),
        }
    };
}
pub(crate) use by_dtype;

/// A backend's storage type, and how to find it in a [`Storage`]: the ops' composed paths are
/// written once for every backend and read the tensors they capture (frozen weights) through this.
pub trait Backend: BackendStorage {
    fn of(s: &Storage) -> Result<&Self>;
}

impl Backend for CpuStorage {
    fn of(s: &Storage) -> Result<&Self> {
        match s {
            Storage::Cpu(c) => Ok(c),
            _ => candle_core::bail!("coarse op: a captured tensor is not on the CPU"),
        }
    }
}

impl Backend for CudaStorage {
    fn of(s: &Storage) -> Result<&Self> {
        match s {
            Storage::Cuda(c) => Ok(c),
            _ => candle_core::bail!("coarse op: a captured tensor is not on the GPU"),
        }
    }
}

/// The storage and layout of `t` on backend `S`, read-locked for the closure.
pub fn with_storage<S: Backend, R>(
    t: &Tensor,
    f: impl FnOnce(&S, &Layout) -> Result<R>,
) -> Result<R> {
    let (s, l) = t.storage_and_layout();
    f(S::of(&s)?, l)
}

#[cfg(test)]
pub mod testing {
    use super::*;
    use candle_core::DType;
    use candle_core::Var;

    /// Checks `f`'s backward against central finite differences in f64, on a few coordinates of
    /// every input, and returns nothing: it panics with the coordinate that disagrees.
    pub fn check_fd(f: impl Fn(&[Tensor]) -> Tensor, inputs: &[Tensor]) {
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

    pub fn randn(shape: &[usize], dtype: DType) -> Tensor {
        Tensor::randn(0f64, 1.0, shape, &Device::Cpu)
            .unwrap()
            .to_dtype(dtype)
            .unwrap()
    }

    /// Asserts that `ours` and `plain` (the same function of `vars`, two ways) have gradients within
    /// `tol` of each other, through one random upstream gradient.
    pub fn assert_same_grads(ours: &Tensor, plain: &Tensor, vars: &[&Var], tol: f64) {
        let up = randn(ours.dims(), ours.dtype());
        let grads = |y: &Tensor| (y * &up).unwrap().sum_all().unwrap().backward().unwrap();
        let (g1, g2) = (grads(ours), grads(plain));
        for v in vars {
            let (a, b) = (
                g1.get(v.as_tensor()).unwrap(),
                g2.get(v.as_tensor()).unwrap(),
            );
            let d = crate::model::nn::max_abs_diff(a, b).unwrap();
            assert!(d < tol, "{:?}: gradient differs by {d}", ours.dtype());
        }
    }
}
