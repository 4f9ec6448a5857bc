//! Parameters and linear layers that know whether they are trained.
//!
//! A [`Param`] is either frozen (a plain tensor; no gradient is ever computed for it) or trainable (a
//! `Var` plus a frozen copy of its starting value, the full-fine-tune reference). A [`Linear`] may carry
//! a LoRA adapter; switching the adapter off *is* the reference model, so LoRA runs keep one copy of the
//! base weights.

use super::lora::{LoraAdapter, LoraSpec};
use super::nn::frozen_matmul;
use candle_core::{DType, Result, Tensor, Var};

/// What becomes trainable when the model is built.
#[derive(Debug, Clone)]
pub enum Trainable {
    /// Nothing (inference).
    None,
    /// LoRA adapters on the matching linear layers, base frozen; adapter off = reference.
    Lora { spec: LoraSpec, seed: u64 },
    /// Every tensor is trained; a frozen copy of each is kept as the reference.
    Full,
}

/// Which weights a forward pass uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Weights {
    /// The weights being trained: adapters on, trainable values; records the graph for backward.
    Policy,
    /// The same weights without a graph (rollouts, evaluation): cheaper, and the fast fused kernels
    /// apply because nothing is tracked.
    PolicyNoGrad,
    /// The reference: adapters off, starting values of fully fine-tuned tensors.
    Reference,
}

/// One named tensor of the model.
#[derive(Debug, Clone)]
pub enum Param {
    Frozen(Tensor),
    Trainable { var: Var, reference: Tensor },
}

impl Param {
    /// Trainable tensors are kept in f32 (f64 only when the whole model is f64, for gradient checks).
    pub fn new(t: Tensor, trainable: bool) -> Result<Self> {
        Ok(if trainable {
            let var = Var::from_tensor(&t.to_dtype(trainable_dtype(t.dtype()))?)?;
            Param::Trainable { var, reference: t }
        } else {
            Param::Frozen(t)
        })
    }

    /// The tensor to compute with under `w`, in `dtype`.
    pub fn get(&self, w: Weights, dtype: DType) -> Result<Tensor> {
        match (self, w) {
            (Param::Frozen(t), _) | (Param::Trainable { reference: t, .. }, Weights::Reference) => {
                t.to_dtype(dtype)
            }
            (Param::Trainable { var, .. }, Weights::Policy) => var.as_tensor().to_dtype(dtype),
            (Param::Trainable { var, .. }, Weights::PolicyNoGrad) => {
                var.as_tensor().detach().to_dtype(dtype)
            }
        }
    }

    pub fn var(&self) -> Option<&Var> {
        match self {
            Param::Frozen(_) => None,
            Param::Trainable { var, .. } => Some(var),
        }
    }

    /// The current value (the trained one for trainable tensors).
    pub fn value(&self) -> &Tensor {
        match self {
            Param::Frozen(t) => t,
            Param::Trainable { var, .. } => var.as_tensor(),
        }
    }

    pub fn elem_count(&self) -> usize {
        self.value().elem_count()
    }
}

/// The dtype of trained tensors for a model stored in `dtype`: f32, or f64 for an f64 model.
pub fn trainable_dtype(dtype: DType) -> DType {
    if dtype == DType::F64 {
        DType::F64
    } else {
        DType::F32
    }
}

/// `y = x Wᵀ + b (+ scale · B A x)`, over the last dimension of `x`.
#[derive(Debug, Clone)]
pub struct Linear {
    /// The module's diffusers name, e.g. `transformer_blocks.3.attn.to_q`.
    pub name: String,
    pub weight: Param,
    pub bias: Option<Param>,
    pub lora: Option<LoraAdapter>,
}

impl Linear {
    pub fn out_features(&self) -> usize {
        self.weight.value().dim(0).unwrap_or(0)
    }

    pub fn in_features(&self) -> usize {
        self.weight.value().dim(1).unwrap_or(0)
    }

    pub fn forward(&self, x: &Tensor, w: Weights) -> Result<Tensor> {
        let dtype = x.dtype();
        let mut out_shape = x.dims().to_vec();
        let last = out_shape.len() - 1;
        out_shape[last] = self.out_features();
        let x2 = x.reshape(((), self.in_features()))?;
        if let Some(y) = self.coarse_forward(&x2, w)? {
            return y.reshape(out_shape);
        }
        let weight = self.weight.get(w, dtype)?;
        let mut y = frozen_matmul(&x2, &weight)?;
        if let Some(b) = &self.bias {
            y = y.broadcast_add(&b.get(w, dtype)?)?;
        }
        match (&self.lora, w) {
            (Some(lora), Weights::Policy) => y = (y + lora.forward(&x2, true)?.to_dtype(dtype)?)?,
            (Some(lora), Weights::PolicyNoGrad) => {
                y = (y + lora.forward(&x2, false)?.to_dtype(dtype)?)?
            }
            _ => {}
        }
        y.reshape(out_shape)
    }

    /// The whole layer as one coarse op ([`super::coarse::linear`]) when its weight and bias are
    /// frozen under `w`; `None` sends it through the plain formula.
    fn coarse_forward(&self, x2: &Tensor, w: Weights) -> Result<Option<Tensor>> {
        let dtype = x2.dtype();
        if !super::coarse::applies(x2) {
            return Ok(None);
        }
        let frozen = |p: &Param| match (p, w) {
            (Param::Trainable { .. }, Weights::Policy) => None,
            _ => Some(p.get(w, dtype)),
        };
        let Some(weight) = frozen(&self.weight).transpose()? else {
            return Ok(None);
        };
        let bias = match &self.bias {
            Some(b) => match frozen(b).transpose()? {
                Some(b) => Some(b),
                None => return Ok(None),
            },
            None => None,
        };
        let adapter = match (&self.lora, w) {
            (Some(l), Weights::Policy | Weights::PolicyNoGrad) => {
                let track = w == Weights::Policy;
                let get = |v: &candle_core::Var| {
                    if track {
                        v.as_tensor().clone()
                    } else {
                        v.as_tensor().detach()
                    }
                };
                Some((get(&l.a), get(&l.b), l.scale))
            }
            _ => None,
        };
        let lora = adapter.as_ref().map(|(a, b, s)| (a, b, *s));
        super::coarse::linear(x2, &weight, bias.as_ref(), lora).map(Some)
    }

    /// Every parameter of this layer as (name, param), weights first.
    pub fn params(&self) -> Vec<(String, &Param)> {
        let mut v = vec![(format!("{}.weight", self.name), &self.weight)];
        if let Some(b) = &self.bias {
            v.push((format!("{}.bias", self.name), b));
        }
        v
    }
}
