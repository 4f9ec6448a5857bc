//! The copies of the weights a run uses, reached one way: the current policy θ, the frozen reference
//! (the base model: adapters off, or the stored copy of fully fine-tuned weights), the EMA-reference
//! (DGPO's "old" policy) and the slow EMA (what is evaluated and exported). The two EMAs are swapped
//! into the trainable variables for as long as they are used, then the live values come back.

use crate::model::Weights;
use crate::train::optim::{Shadow, TrainState};
use anyhow::Result;
use candle_core::Var;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Policy {
    Current,
    Reference,
    EmaReference,
    SlowEma,
}

/// The trainable variables with the two EMA copies that can take their place.
pub struct Policies<'a> {
    pub vars: &'a [(String, Var)],
    pub ema_ref: &'a Shadow,
    pub ema: &'a Shadow,
}

impl<'a> Policies<'a> {
    pub fn of(state: &'a TrainState) -> Self {
        Self {
            vars: state.opt.vars(),
            ema_ref: &state.ema_ref,
            ema: &state.ema,
        }
    }

    /// Run `f` with the weights of `policy` in place and no gradient; `f` gets the [`Weights`] to
    /// pass to the model.
    pub fn no_grad<T>(&self, policy: Policy, f: impl FnOnce(Weights) -> Result<T>) -> Result<T> {
        match policy {
            Policy::Current => f(Weights::PolicyNoGrad),
            Policy::Reference => f(Weights::Reference),
            Policy::EmaReference => self.ema_ref.with(self.vars, || f(Weights::PolicyNoGrad)),
            Policy::SlowEma => self.ema.with(self.vars, || f(Weights::PolicyNoGrad)),
        }
    }
}
