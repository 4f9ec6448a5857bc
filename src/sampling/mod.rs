//! Deterministic flow-matching sampling: the schedulers' step grids ([`schedule`]), the ODE solvers
//! ([`solver`]), classifier-free guidance ([`guidance`]), and the seeded noise every rollout,
//! evaluation and pretraining step starts from.

pub mod guidance;
pub mod schedule;
pub mod solver;

pub use guidance::{guided_velocity_at, velocity_sharded, Conditioning};
pub use schedule::{euler_sigmas, schedule, shift_sigma, Schedule};
pub use solver::{integrate, sample, sample_euler};

use anyhow::Result;
use candle_core::Tensor;

/// Gaussian noise of `shape` drawn from `rng` in row-major order (Candle's own CPU `randn` cannot be
/// seeded); every seeded noise of rollouts, evaluations and pretraining comes from here.
pub fn seeded_randn(
    rng: &mut impl rand::Rng,
    shape: (usize, usize, usize, usize),
    dev: &candle_core::Device,
) -> Result<Tensor> {
    use rand_distr::Distribution;
    let n = shape.0 * shape.1 * shape.2 * shape.3;
    let v: Vec<f32> = (0..n)
        .map(|_| rand_distr::StandardNormal.sample(&mut *rng))
        .collect();
    Ok(Tensor::from_vec(v, shape, dev)?)
}

#[cfg(test)]
mod tests {
    use super::schedule::*;
    use super::solver::*;
    use super::*;
    use crate::config::Sampler;
    use crate::model::init::init_weights;
    use crate::model::{MMDiT, Weights};
    use crate::model::{Trainable, TransformerConfig, WeightStore};
    use candle_core::DType;
    use candle_core::Device;

    const BOTH: [Sampler; 2] = [Sampler::Euler, Sampler::DpmSolver2m];

    fn max_abs(a: &Tensor, b: &Tensor) -> f32 {
        (a - b)
            .unwrap()
            .abs()
            .unwrap()
            .flatten_all()
            .unwrap()
            .max(0)
            .unwrap()
            .to_scalar::<f32>()
            .unwrap()
    }

    #[test]
    fn sigmas_follow_the_shifted_diffusers_grid() {
        let s = euler_sigmas(10, 3.0);
        assert_eq!(s.len(), 11);
        assert_eq!(s[0], 1.0);
        assert_eq!(s[10], 0.0);
        assert!(s.windows(2).all(|w| w[0] > w[1]));
        // Last non-zero sigma: the doubly shifted 1/1000 (diffusers' own quirk).
        let last = shift_sigma(shift_sigma(0.001, 3.0), 3.0) as f32;
        assert!((s[9] - last).abs() < 1e-7, "{} vs {last}", s[9]);
        // No shift: a plain linspace from 1 to 1/1000.
        let u = euler_sigmas(4, 1.0);
        assert!((u[1] - (1.0 - 0.999 / 3.0) as f32).abs() < 1e-7);
    }

    #[test]
    fn euler_timesteps_are_the_sigmas_times_1000() {
        let s = schedule(Sampler::Euler, 10, 3.0);
        assert_eq!(s.num_steps(), 10);
        for (t, sig) in s.timesteps.iter().zip(&s.sigmas) {
            assert_eq!(*t, sig * 1000.0);
        }
        assert_eq!(s.timesteps[0], 1000.0);
    }

    #[test]
    fn dpm_grid_starts_below_one_and_calls_the_model_at_integer_timesteps() {
        let s = schedule(Sampler::DpmSolver2m, 10, 3.0);
        assert_eq!(s.sigmas.len(), 11);
        assert_eq!(s.sigmas[10], 0.0);
        // σ_i = shift(0.999·(1 − i/N)): the first is shift(0.999), not 1; the last non-zero one is large.
        assert_eq!(s.sigmas[0], shift_sigma(0.999, 3.0) as f32);
        assert!((s.sigmas[9] - shift_sigma(0.0999, 3.0) as f32).abs() < 1e-7);
        assert_eq!(s.timesteps[0], 999.0);
        for (t, sig) in s.timesteps.iter().zip(&s.sigmas) {
            assert_eq!(t.fract(), 0.0);
            assert_eq!(*t, (*sig as f64 * 1000.0).floor() as f32, "{t} vs {sig}");
        }
        // DGPO trains at t/1000, the truncated timestep.
        assert_eq!(s.train_sigma(0), 0.999);
        assert!(s.train_sigma(0) < s.sigmas[0]);
    }

    #[test]
    fn no_shift_grids_are_plain_linspaces() {
        let e = schedule(Sampler::Euler, 4, 1.0);
        let want = [1.0, 0.667, 0.334, 0.001, 0.0];
        for (a, b) in e.sigmas.iter().zip(want) {
            assert!((a - b).abs() < 1e-7, "{:?}", e.sigmas);
        }
        let d = schedule(Sampler::DpmSolver2m, 4, 1.0);
        let want = [0.999, 0.74925, 0.4995, 0.24975, 0.0];
        for (a, b) in d.sigmas.iter().zip(want) {
            assert!((a - b).abs() < 1e-7, "{:?}", d.sigmas);
        }
        assert_eq!(d.timesteps, vec![999.0, 749.0, 499.0, 249.0]);
    }

    #[test]
    fn one_and_zero_steps() {
        let e = schedule(Sampler::Euler, 1, 3.0);
        assert_eq!(e.sigmas, vec![1.0, 0.0]);
        assert_eq!(e.timesteps, vec![1000.0]);
        let d = schedule(Sampler::DpmSolver2m, 1, 3.0);
        assert_eq!(d.sigmas, vec![shift_sigma(0.999, 3.0) as f32, 0.0]);
        assert_eq!(d.timesteps, vec![999.0]);

        let dev = Device::Cpu;
        let x = Tensor::randn(0f32, 1.0, (2, 3, 4, 4), &dev).unwrap();
        let v = Tensor::randn(0f32, 1.0, (2, 3, 4, 4), &dev).unwrap();
        let mut calls = vec![];
        // One Euler step: x − v; one DPM step returns the data prediction x − σ_0·v.
        let out = integrate(Sampler::Euler, &e, &x, |_, i, t| {
            calls.push((i, t));
            Ok(v.clone())
        })
        .unwrap();
        assert_eq!(calls, vec![(0, 1000.0)]);
        assert!(max_abs(&out, &(&x - &v).unwrap()) < 1e-7);
        let out = integrate(Sampler::DpmSolver2m, &d, &x, |_, _, _| Ok(v.clone())).unwrap();
        let want = (&x - (&v * d.sigmas[0] as f64).unwrap()).unwrap();
        assert!(max_abs(&out, &want) < 1e-7);

        for sampler in BOTH {
            let z = schedule(sampler, 0, 3.0);
            assert_eq!(z.sigmas, vec![0.0]);
            assert!(z.timesteps.is_empty());
            let out = integrate(sampler, &z, &x, |_, _, _| unreachable!()).unwrap();
            assert_eq!(max_abs(&out, &x), 0.0);
        }
    }

    #[test]
    fn both_solvers_are_exact_on_straight_paths() {
        // A single data point x0: the exact velocity is (x − x0)/σ, the flow is a straight line and both
        // Euler and DPM-Solver++ (constant data prediction) land on x0.
        let dev = Device::Cpu;
        let x0 = Tensor::randn(0f32, 1.0, (2, 3, 4, 4), &dev).unwrap();
        let noise = Tensor::randn(0f32, 1.0, (2, 3, 4, 4), &dev).unwrap();
        for sampler in BOTH {
            for (n, shift) in [(1, 3.0), (2, 3.0), (10, 3.0), (14, 3.0), (7, 1.0)] {
                let s = schedule(sampler, n, shift);
                let s0 = s.sigmas[0] as f64;
                let start = ((&x0 * (1.0 - s0)).unwrap() + (&noise * s0).unwrap()).unwrap();
                let sig = s.sigmas.clone();
                let out = integrate(sampler, &s, &start, |x, i, _| {
                    Ok(((x - &x0)? / sig[i] as f64)?)
                })
                .unwrap();
                let e = max_abs(&out, &x0);
                assert!(e < 1e-5, "{sampler:?} n={n} shift={shift}: {e}");
            }
        }
    }

    #[test]
    fn bad_schedules_and_velocities_are_errors() {
        let dev = Device::Cpu;
        let x = Tensor::zeros((1, 2, 2, 2), DType::F32, &dev).unwrap();
        let bad = Schedule {
            sigmas: vec![1.0, 0.0],
            timesteps: vec![],
        };
        assert!(integrate(Sampler::Euler, &bad, &x, |x, _, _| Ok(x.clone())).is_err());
        let s = schedule(Sampler::DpmSolver2m, 3, 3.0);
        let e = integrate(Sampler::DpmSolver2m, &s, &x, |_, _, _| {
            Ok(Tensor::zeros((1, 2, 2, 3), DType::F32, &dev)?)
        })
        .unwrap_err();
        assert!(e.to_string().contains("shape"), "{e}");
    }

    fn tiny_model() -> MMDiT {
        let cfg = TransformerConfig {
            sample_size: 4,
            num_layers: 1,
            attention_head_dim: 8,
            num_attention_heads: 2,
            joint_attention_dim: 12,
            caption_projection_dim: 16,
            pooled_projection_dim: 10,
            in_channels: 4,
            out_channels: 4,
            pos_embed_max_size: 4,
            dual_attention_layers: vec![],
            ..TransformerConfig::sd3_medium()
        };
        let dev = Device::Cpu;
        // Fresh weights start at zero velocity: give the zero-initialised tensors random values.
        let w = init_weights(&cfg, 7, &dev)
            .unwrap()
            .into_iter()
            .map(|(k, v)| {
                let zero = v
                    .abs()
                    .unwrap()
                    .sum_all()
                    .unwrap()
                    .to_scalar::<f32>()
                    .unwrap()
                    == 0.0;
                let v = if zero {
                    v.randn_like(0.0, 0.2).unwrap()
                } else {
                    v
                };
                (k, v)
            })
            .collect();
        MMDiT::new(
            &cfg,
            WeightStore::new("test", w, DType::F32),
            &Trainable::None,
            DType::F32,
        )
        .unwrap()
    }

    #[test]
    fn sample_guides_each_step_at_the_schedule_timesteps() {
        let m = tiny_model();
        let dev = Device::Cpu;
        let noise = Tensor::randn(0f32, 1.0, (2, 4, 4, 4), &dev).unwrap();
        let cond = Conditioning {
            context: Tensor::randn(0f32, 1.0, (2, 5, 12), &dev).unwrap(),
            pooled: Tensor::randn(0f32, 1.0, (2, 10), &dev).unwrap(),
        };
        let uncond = Conditioning {
            context: Tensor::randn(0f32, 1.0, (1, 5, 12), &dev).unwrap(),
            pooled: Tensor::randn(0f32, 1.0, (1, 10), &dev).unwrap(),
        }
        .repeat(2)
        .unwrap();
        let fwd = |x: &Tensor, t: f32, c: &Conditioning| {
            let tt = Tensor::full(t, 2, &dev).unwrap();
            m.forward(x, &tt, &c.context, &c.pooled, Weights::Policy)
        };
        for sampler in BOTH {
            let s = schedule(sampler, 5, 3.0);
            let got = sample(
                &m,
                sampler,
                &s,
                &noise,
                &cond,
                Some(&uncond),
                4.5,
                Weights::Policy,
            )
            .unwrap();
            let want = integrate(sampler, &s, &noise, |x, _, t| {
                let vu = fwd(x, t, &uncond)?;
                let vc = fwd(x, t, &cond)?;
                Ok((&vu + ((vc - &vu)? * 4.5)?)?)
            })
            .unwrap();
            let e = max_abs(&got, &want);
            assert!(e < 1e-4, "{sampler:?}: {e}");
            // Guidance 1 (or no unconditional branch) is the conditional model alone.
            let plain = integrate(sampler, &s, &noise, |x, _, t| fwd(x, t, &cond)).unwrap();
            let g1 = sample(
                &m,
                sampler,
                &s,
                &noise,
                &cond,
                Some(&uncond),
                1.0,
                Weights::Policy,
            )
            .unwrap();
            let none = sample(&m, sampler, &s, &noise, &cond, None, 4.5, Weights::Policy).unwrap();
            // `sample` shards the batch over worker threads, and a matmul over fewer rows may round
            // differently, so equality is up to float rounding.
            assert!(max_abs(&g1, &plain) < 1e-5);
            assert!(max_abs(&none, &plain) < 1e-5);
            assert!(max_abs(&got, &plain) > 1e-2, "guidance must matter");
        }
        // The old Euler entry point is the Euler sampler.
        let s = schedule(Sampler::Euler, 5, 3.0);
        let old = sample_euler(
            &m,
            &noise,
            &cond,
            Some(&uncond),
            4.5,
            &euler_sigmas(5, 3.0),
            Weights::Policy,
        )
        .unwrap();
        let new = sample(
            &m,
            Sampler::Euler,
            &s,
            &noise,
            &cond,
            Some(&uncond),
            4.5,
            Weights::Policy,
        )
        .unwrap();
        assert_eq!(max_abs(&old, &new), 0.0);
    }
}
