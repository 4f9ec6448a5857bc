//! The rollout solvers against diffusers (`scripts/make_scheduler_fixtures.py`): timesteps and sigmas of
//! `FlowMatchEulerDiscreteScheduler` and of the authors' `DPMSolverMultistepScheduler` (Sana config,
//! flow sigmas), and every latent of a rollout driven by a fake velocity field.

use candle_core::{DType, Device, Tensor};
use dgpo::config::Sampler;
use dgpo::sampling::{integrate, schedule, Schedule};
use std::collections::HashMap;
use std::path::PathBuf;

/// Relative tolerance on sigmas and timesteps.
const REL: f64 = 1e-6;
/// Absolute tolerance on each latent of a trajectory.
const ABS: f32 = 1e-5;

const CASES: [(usize, f64); 6] = [
    (10, 3.0),
    (14, 3.0),
    (4, 1.0),
    (1, 3.0),
    (2, 3.0),
    (15, 3.0),
];

fn fixtures() -> HashMap<String, Tensor> {
    let p = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/schedulers/schedulers.safetensors");
    candle_core::safetensors::load(p, &Device::Cpu).unwrap()
}

fn key(sampler: Sampler, n: usize, shift: f64) -> String {
    let name = match sampler {
        Sampler::Euler => "euler",
        Sampler::DpmSolver2m => "dpm",
    };
    format!("{name}/n{n}_s{shift}")
}

fn vec_f32(t: &Tensor) -> Vec<f32> {
    t.to_dtype(DType::F32).unwrap().to_vec1().unwrap()
}

/// Largest `|a − b| / max(|b|, 1e-3)`; lengths must agree.
fn max_rel(a: &[f32], b: &[f32]) -> f64 {
    assert_eq!(a.len(), b.len(), "{a:?} vs {b:?}");
    a.iter()
        .zip(b)
        .map(|(&x, &y)| (x as f64 - y as f64).abs() / (y as f64).abs().max(1e-3))
        .fold(0.0, f64::max)
}

fn max_abs(a: &Tensor, b: &Tensor) -> f32 {
    (a - b)
        .unwrap()
        .abs()
        .unwrap()
        .flatten_all()
        .unwrap()
        .max(0)
        .unwrap()
        .to_scalar()
        .unwrap()
}

/// The script's `0.5·x·(t/1000) − 0.3·sin(2x + t/100)`, same f32 operation order.
fn fake_velocity(x: &Tensor, t: f32) -> anyhow::Result<Tensor> {
    let a = ((x * 0.5)? * (t / 1000.0) as f64)?;
    let b = ((x * 2.0)? + (t / 100.0) as f64)?.sin()?;
    Ok((a - (b * 0.3)?)?)
}

#[test]
fn timesteps_and_sigmas_match_diffusers() {
    let f = fixtures();
    for sampler in [Sampler::Euler, Sampler::DpmSolver2m] {
        for (n, shift) in CASES {
            let k = key(sampler, n, shift);
            let s = schedule(sampler, n, shift);
            let (e_t, e_s) = (
                max_rel(&s.timesteps, &vec_f32(&f[&format!("{k}/timesteps")])),
                max_rel(&s.sigmas, &vec_f32(&f[&format!("{k}/sigmas")])),
            );
            let train: Vec<f32> = (0..n).map(|j| s.train_sigma(j)).collect();
            let e_train = max_rel(&train, &vec_f32(&f[&format!("{k}/train_sigmas")]));
            println!("{k}: max rel error timesteps {e_t:.1e}, sigmas {e_s:.1e}, train sigmas {e_train:.1e}");
            assert!(e_t <= REL, "{k} timesteps: {e_t}");
            assert!(e_s <= REL, "{k} sigmas: {e_s}");
            assert!(e_train <= REL, "{k} train sigmas: {e_train}");
            if sampler == Sampler::DpmSolver2m {
                assert!(s.timesteps.iter().all(|t| t.fract() == 0.0));
            }
        }
    }
}

fn check_trajectory(sampler: Sampler, f: &HashMap<String, Tensor>) {
    let x_t = &f["x_T"];
    for (n, shift) in CASES {
        let k = key(sampler, n, shift);
        let want = &f[&format!("{k}/traj")];
        assert_eq!(want.dim(0).unwrap(), n + 1);
        let s: Schedule = schedule(sampler, n, shift);
        let mut seen = vec![];
        let out = integrate(sampler, &s, x_t, |x, i, t| {
            assert_eq!(i, seen.len());
            assert_eq!(t, s.timesteps[i]);
            seen.push(x.clone());
            fake_velocity(x, t)
        })
        .unwrap();
        seen.push(out);
        let mut worst = 0f32;
        for (i, x) in seen.iter().enumerate() {
            let e = max_abs(x, &want.get(i).unwrap());
            assert!(e <= ABS, "{k}: latent {i} off by {e}");
            worst = worst.max(e);
        }
        println!("{k}: max abs error over {} latents {worst:.1e}", n + 1);
    }
}

#[test]
fn euler_trajectories_match_diffusers() {
    check_trajectory(Sampler::Euler, &fixtures());
}

#[test]
fn dpm_solver_trajectories_match_diffusers() {
    check_trajectory(Sampler::DpmSolver2m, &fixtures());
}

#[test]
fn the_fake_model_tells_the_solvers_and_timesteps_apart() {
    // The fixtures would prove little if a wrong solver or float timesteps still passed.
    let f = fixtures();
    let x_t = &f["x_T"];
    let want = &f["dpm/n10_s3/traj"].get(10).unwrap();
    let s = schedule(Sampler::DpmSolver2m, 10, 3.0);
    let float_t = Schedule {
        timesteps: s.sigmas[..10].iter().map(|v| v * 1000.0).collect(),
        ..s.clone()
    };
    let run = |sampler, sch: &Schedule| {
        integrate(sampler, sch, x_t, |x, _, t| fake_velocity(x, t)).unwrap()
    };
    assert!(max_abs(&run(Sampler::DpmSolver2m, &float_t), want) > 1e-3);
    assert!(max_abs(&run(Sampler::Euler, &s), want) > 1e-3);
}
