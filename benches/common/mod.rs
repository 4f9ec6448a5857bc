//! Shared by the benchmarks.

use std::time::Instant;

/// Median wall time of `reps` runs of `f`, after one warm-up run.
pub fn median<F: FnMut()>(mut f: F, reps: usize) -> f64 {
    f(); // warm-up
    let mut v: Vec<f64> = (0..reps)
        .map(|_| {
            let s = Instant::now();
            f();
            s.elapsed().as_secs_f64()
        })
        .collect();
    v.sort_by(|a, b| a.total_cmp(b));
    v[reps / 2]
}
