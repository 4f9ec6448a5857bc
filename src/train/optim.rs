//! AdamW as PyTorch's `torch.optim.AdamW` (decoupled weight decay, bias-corrected moments), global
//! gradient-norm clipping as `clip_grad_norm_`, gradient accumulation over micro-batches, and a state that
//! can be saved and restored exactly (Candle's own `AdamW` keeps its moments private and defaults to a
//! weight decay of 0.01); the EMA copies of the weights ([`Shadow`]); and [`TrainState`], the three
//! together as a run carries them from one epoch to the next.

use crate::config::TrainConfig;
use anyhow::{bail, Result};
use candle_core::backprop::GradStore;
use candle_core::{DType, Tensor, Var};
use std::collections::HashMap;

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AdamWParams {
    pub lr: f64,
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub weight_decay: f64,
}

/// Sums of gradients over the micro-batches of one optimizer step.
pub struct GradAccum {
    grads: Vec<Option<Tensor>>,
}

/// AdamW over a fixed, named list of variables (f32 moments whatever the device).
pub struct AdamW {
    vars: Vec<(String, Var)>,
    m: Vec<Tensor>,
    v: Vec<Tensor>,
    pub step: u64,
    pub params: AdamWParams,
}

impl AdamW {
    pub fn new(vars: Vec<(String, Var)>, params: AdamWParams) -> Result<Self> {
        let mut m = vec![];
        for (_, v) in &vars {
            m.push(v.as_tensor().zeros_like()?.to_dtype(DType::F32)?);
        }
        Ok(Self {
            v: m.clone(),
            m,
            vars,
            step: 0,
            params,
        })
    }

    pub fn vars(&self) -> &[(String, Var)] {
        &self.vars
    }

    pub fn accum(&self) -> GradAccum {
        GradAccum {
            grads: vec![None; self.vars.len()],
        }
    }

    /// Add the gradients of one backward pass.
    pub fn add(&self, acc: &mut GradAccum, grads: &GradStore) -> Result<()> {
        self.add_with(acc, |v| grads.get(v.as_tensor()))
    }

    /// [`Self::add`] for gradients held by var id ([`crate::model::VarGrads`]).
    pub fn add_var_grads(&self, acc: &mut GradAccum, grads: &crate::model::VarGrads) -> Result<()> {
        self.add_with(acc, |v| grads.get(&v.id()))
    }

    fn add_with<'a>(
        &self,
        acc: &mut GradAccum,
        get: impl Fn(&Var) -> Option<&'a Tensor>,
    ) -> Result<()> {
        for (slot, (_, var)) in acc.grads.iter_mut().zip(&self.vars) {
            if let Some(g) = get(var) {
                let g = g.detach().to_dtype(DType::F32)?;
                *slot = Some(match slot.take() {
                    Some(s) => (s + g)?,
                    None => g,
                });
            }
        }
        Ok(())
    }

    /// Global L2 norm of the accumulated gradients.
    pub fn grad_norm(acc: &GradAccum) -> Result<f64> {
        let mut total = 0f64;
        for g in acc.grads.iter().flatten() {
            total += g.sqr()?.sum_all()?.to_scalar::<f32>()? as f64;
        }
        Ok(total.sqrt())
    }

    /// Clip the gradients to `max_norm` (as `clip_grad_norm_`: scale by `max/(norm + 1e-6)` when above)
    /// and take one AdamW step at learning rate `lr`. Returns the norm before clipping. A non-finite norm
    /// is an error, and the weights are left untouched.
    pub fn step(&mut self, acc: GradAccum, lr: f64, max_norm: Option<f64>) -> Result<f64> {
        let norm = Self::grad_norm(&acc)?;
        if !norm.is_finite() {
            bail!("gradient norm is {norm}: the loss diverged; weights left unchanged");
        }
        let clip = match max_norm {
            Some(m) if norm > m => m / (norm + 1e-6),
            _ => 1.0,
        };
        self.step += 1;
        let p = self.params;
        let t = self.step as i32;
        let bc1 = 1.0 - p.beta1.powi(t);
        let bc2 = 1.0 - p.beta2.powi(t);
        for (i, (_, var)) in self.vars.iter().enumerate() {
            let Some(g) = &acc.grads[i] else { continue };
            // Gradients carry the op graph of the forward pass; moments must not keep it alive.
            let g = (g.detach() * clip)?;
            let m = ((&self.m[i] * p.beta1)? + (&g * (1.0 - p.beta1))?)?;
            let v = ((&self.v[i] * p.beta2)? + (g.sqr()? * (1.0 - p.beta2))?)?;
            let w = var.as_tensor().detach().to_dtype(DType::F32)?;
            let w = (&w * (1.0 - lr * p.weight_decay))?;
            let update = ((&m / bc1)? / ((&v / bc2)?.sqrt()? + p.eps)?)?;
            let w = (w - (update * lr)?)?;
            var.set(&w.to_dtype(var.dtype())?)?;
            self.m[i] = m.detach();
            self.v[i] = v.detach();
        }
        Ok(norm)
    }

    /// Moments as named tensors (`m.<name>`, `v.<name>`) for a checkpoint.
    pub fn state(&self) -> HashMap<String, Tensor> {
        let mut out = HashMap::new();
        for (i, (name, _)) in self.vars.iter().enumerate() {
            out.insert(format!("m.{name}"), self.m[i].clone());
            out.insert(format!("v.{name}"), self.v[i].clone());
        }
        out
    }

    /// Restore moments saved by [`AdamW::state`]; every variable must be present with its shape.
    pub fn load_state(&mut self, mut state: HashMap<String, Tensor>, step: u64) -> Result<()> {
        for (i, (name, var)) in self.vars.iter().enumerate() {
            for (kind, slot) in [("m", &mut self.m[i]), ("v", &mut self.v[i])] {
                let key = format!("{kind}.{name}");
                let t = state.remove(&key).ok_or_else(|| {
                    anyhow::anyhow!("optimizer state has no {key}: it belongs to another model")
                })?;
                if t.dims() != var.dims() {
                    bail!(
                        "optimizer state {key} has shape {:?}, the variable {:?}",
                        t.dims(),
                        var.dims()
                    );
                }
                *slot = t.to_dtype(DType::F32)?.to_device(var.device())?;
            }
        }
        if let Some(k) = state.keys().next() {
            bail!("optimizer state has {k}, which this model does not train");
        }
        self.step = step;
        Ok(())
    }
}

/// A copy of a set of variables that can be averaged (EMA) and swapped into the model.
pub struct Shadow {
    pub values: Vec<Tensor>,
}

impl Shadow {
    /// A detached copy of the variables' current values.
    pub fn of(vars: &[(String, Var)]) -> Result<Self> {
        Ok(Self {
            values: vars
                .iter()
                .map(|(_, v)| v.as_tensor().detach().copy())
                .collect::<candle_core::Result<_>>()?,
        })
    }

    /// `shadow ← decay·shadow + (1 − decay)·value` (kept detached: no graph survives a step).
    pub fn update(&mut self, vars: &[(String, Var)], decay: f64) -> Result<()> {
        for (s, (_, v)) in self.values.iter_mut().zip(vars) {
            *s = ((&*s * decay)? + (v.as_tensor().detach() * (1.0 - decay))?)?.detach();
        }
        Ok(())
    }

    /// Run `f` with the shadow values in the variables, then restore the live values (also on error).
    pub fn with<T>(&self, vars: &[(String, Var)], f: impl FnOnce() -> Result<T>) -> Result<T> {
        let mut live = Vec::with_capacity(vars.len());
        for (s, (_, v)) in self.values.iter().zip(vars) {
            live.push(v.as_tensor().detach().copy()?);
            v.set(s)?;
        }
        let r = f();
        for (l, (_, v)) in live.into_iter().zip(vars) {
            v.set(&l)?;
        }
        r
    }

    /// The values under the variables' names with a prefix (for checkpoints).
    pub fn named(&self, vars: &[(String, Var)], prefix: &str) -> HashMap<String, Tensor> {
        vars.iter()
            .zip(&self.values)
            .map(|((n, _), t)| (format!("{prefix}{n}"), t.clone()))
            .collect()
    }
}

/// What a run carries from one epoch to the next: AdamW over the trainable variables, the
/// EMA-reference (the "old" policy of DGPO's clipped ratio, and its rollout policy after
/// `train.switch_ema_ref` steps) and the slow EMA that is evaluated and exported.
pub struct TrainState {
    pub opt: AdamW,
    pub ema_ref: Shadow,
    pub ema: Shadow,
}

impl TrainState {
    /// A fresh state: zero moments, both EMAs equal to the current weights.
    pub fn new(vars: Vec<(String, Var)>, t: &TrainConfig) -> Result<Self> {
        let params = AdamWParams {
            lr: t.learning_rate,
            beta1: t.adam_beta1,
            beta2: t.adam_beta2,
            eps: t.adam_epsilon,
            weight_decay: t.adam_weight_decay,
        };
        let opt = AdamW::new(vars.clone(), params)?;
        Ok(Self {
            ema_ref: Shadow::of(&vars)?,
            ema: Shadow::of(&vars)?,
            opt,
        })
    }

    /// One AdamW step on the epoch's accumulated gradients (clipped to `train.max_grad_norm`), then
    /// the EMA-reference with decay `min(0.3, 0.001·step)` and, every `train.ema_every` steps, the
    /// slow EMA with decay `min(ema_decay, (1 + step) / (10 + step))`. Returns the gradient norm
    /// before clipping.
    pub fn step(&mut self, acc: GradAccum, t: &TrainConfig) -> Result<f64> {
        let grad_norm = self.opt.step(acc, t.learning_rate, Some(t.max_grad_norm))?;
        let step = self.opt.step;
        let vars = self.opt.vars();
        let updated = vars
            .iter()
            .map(|(n, v)| (n.clone(), v.as_tensor().clone()))
            .collect();
        if let Some(name) = first_non_finite(&updated)? {
            bail!(
                "optimizer step {step} (gradient norm {grad_norm}) made {name} non-finite; the last \
                 good checkpoint is kept — lower train.learning_rate"
            );
        }
        self.ema_ref.update(vars, (0.001 * step as f64).min(0.3))?;
        if step.is_multiple_of(t.ema_every as u64) {
            let d = t.ema_decay.min((1.0 + step as f64) / (10.0 + step as f64));
            self.ema.update(vars, d)?;
        }
        Ok(grad_norm)
    }
}

/// The first tensor (by name) holding an infinity or a NaN (`0·x` is 0 exactly when `x` is finite).
pub fn first_non_finite(tensors: &HashMap<String, Tensor>) -> Result<Option<String>> {
    let mut names: Vec<&String> = tensors.keys().collect();
    names.sort();
    for n in names {
        let t = &tensors[n];
        let d = (t * 0.0)?.to_dtype(candle_core::DType::F32)?.sum_all()?;
        if !d.to_scalar::<f32>()?.is_finite() {
            return Ok(Some(n.clone()));
        }
    }
    Ok(None)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    /// Two steps checked against the AdamW formulas written out by hand (PyTorch's algorithm).
    #[test]
    fn matches_hand_computed_adamw_with_clipping() {
        let dev = Device::Cpu;
        let w = Var::new(&[1.0f32, -2.0], &dev).unwrap();
        let p = AdamWParams {
            lr: 0.1,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 0.01,
        };
        let mut opt = AdamW::new(vec![("w".into(), w.clone())], p).unwrap();
        // loss = 3·w0 + 4·w1 → grad (3, 4), norm 5; clipped to 1 → (0.6, 0.8).
        let loss = (w.as_tensor() * &Tensor::new(&[3f32, 4.], &dev).unwrap())
            .unwrap()
            .sum_all()
            .unwrap();
        let mut acc = opt.accum();
        opt.add(&mut acc, &loss.backward().unwrap()).unwrap();
        let norm = opt.step(acc, 0.1, Some(1.0)).unwrap();
        assert!((norm - 5.0).abs() < 1e-6);
        // Step 1: m̂ = g, v̂ = g², update = g/(|g|+eps) = sign(g) → w·(1−lr·wd) − lr.
        let got: Vec<f32> = w.as_tensor().to_vec1().unwrap();
        let exp = [1.0 * (1.0 - 0.001) - 0.1, -2.0 * (1.0 - 0.001) - 0.1];
        for (g, e) in got.iter().zip(exp) {
            assert!((*g as f64 - e).abs() < 1e-6, "{got:?} vs {exp:?}");
        }
        // Step 2 with an accumulated gradient of two passes (g = 2·(3,4) = (6,8), norm 10, no clip).
        let mut acc = opt.accum();
        for _ in 0..2 {
            let loss = (w.as_tensor() * &Tensor::new(&[3f32, 4.], &dev).unwrap())
                .unwrap()
                .sum_all()
                .unwrap();
            opt.add(&mut acc, &loss.backward().unwrap()).unwrap();
        }
        opt.step(acc, 0.1, None).unwrap();
        let mut exp2 = vec![];
        for (i, (g1, g2)) in [(0.6f64, 6.0f64), (0.8, 8.0)].iter().enumerate() {
            let m = 0.9 * (0.1 * g1) + 0.1 * g2;
            let v = 0.999 * (0.001 * g1 * g1) + 0.001 * g2 * g2;
            let (mh, vh) = (m / (1.0 - 0.81), v / (1.0 - 0.999f64.powi(2)));
            exp2.push(exp[i] * (1.0 - 0.001) - 0.1 * mh / (vh.sqrt() + 1e-8));
        }
        let got: Vec<f32> = w.as_tensor().to_vec1().unwrap();
        for (g, e) in got.iter().zip(&exp2) {
            assert!((*g as f64 - e).abs() < 1e-5, "{got:?} vs {exp2:?}");
        }
        // State round trip.
        let st = opt.state();
        let mut o2 = AdamW::new(vec![("w".into(), w.clone())], p).unwrap();
        o2.load_state(st, opt.step).unwrap();
        assert_eq!(o2.step, 2);
        let mut bad = opt.state();
        bad.insert(
            "m.other".into(),
            Tensor::zeros(1, DType::F32, &dev).unwrap(),
        );
        assert!(o2.load_state(bad, 2).is_err());
    }
}
