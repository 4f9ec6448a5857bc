//! Coarse ops with hand-written backward passes for the MMDiT's training path: a linear layer
//! (frozen weight, bias and optional LoRA adapter as one op), adaLN's modulate, the gated residual,
//! and multi-head attention. On the CPU in f32/f64 each is one forward kernel and one backward
//! kernel; on CUDA (and in half precision) the linear, modulate and residual ops are composed from
//! Candle's kernels without an autograd graph.
//!
//! Composed from Candle ops, a LoRA linear is seven tensors forward and about twenty in the backward
//! (gradients of every intermediate, `zeros_like` + `add` for each first gradient, the broadcast of
//! the bias summed back); here it is three GEMMs forward and four backward, and no gradient is ever
//! formed for the frozen weight. `nn.rs` and `linear.rs` route tensors through these ops when
//! [`applies`] says so and everything else through the plain formulas, which the tests compare them
//! with (here, and through the whole model in `tests/coarse_ops.rs`).

use candle_core::Tensor;

mod attention;
mod kernel;
mod linear;
mod residual;

pub use attention::attention;
pub use linear::linear;
pub use residual::{gated_residual, modulate};

use std::sync::atomic::{AtomicBool, Ordering};

static ENABLED: AtomicBool = AtomicBool::new(true);

/// Switches the coarse ops on or off for the whole process (on by default); off, every layer takes
/// the plain formulas. For comparisons in tests and benches only: switching while another thread runs
/// a model mixes the two paths within one pass.
pub fn set_enabled(on: bool) {
    ENABLED.store(on, Ordering::SeqCst);
}

/// Whether the coarse linear, modulate and gated-residual ops apply to `x`: switched on, and on the
/// CPU (their kernels in f32/f64, Candle's otherwise) or on CUDA (Candle's kernels, composed
/// without a graph).
pub fn applies(x: &Tensor) -> bool {
    ENABLED.load(Ordering::Relaxed) && (x.device().is_cpu() || x.device().is_cuda())
}

/// Whether the coarse attention op applies to `x`: switched on, on the CPU, in f32 or f64. Elsewhere
/// attention recomputes its weights in the backward ([`crate::model::nn::recompute_attention`]).
pub fn attention_applies(x: &Tensor) -> bool {
    ENABLED.load(Ordering::Relaxed) && kernel::kernel_applies(x)
}
