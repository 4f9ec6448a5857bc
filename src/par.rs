//! Batch-level parallelism on the CPU.
//!
//! The shapes model's matrices are tiny (hidden 64–128), so Candle's own parallel kernels (rayon in
//! the matmul, a spinning barrier pool in element-wise ops) cost more in synchronisation than they
//! save: on 2 cores a pretraining step was *faster* with one thread. dgpo instead runs Candle
//! single-threaded and splits each batch into one shard per worker thread, which runs its forward
//! (and backward) on its own; results are put back together in shard order, so a run is reproducible
//! for a given thread count.
//!
//! The thread count is process-wide: `dgpo --threads N` (default: the machine's available
//! parallelism). On CUDA there is one shard.

use anyhow::Result;
use std::ops::Range;
use std::sync::atomic::{AtomicUsize, Ordering};

static THREADS: AtomicUsize = AtomicUsize::new(0);

/// Sets the number of worker threads (at least 1).
pub fn set_threads(n: usize) {
    THREADS.store(n.max(1), Ordering::Relaxed);
}

/// The number of worker threads: as set, else the machine's available parallelism.
pub fn threads() -> usize {
    match THREADS.load(Ordering::Relaxed) {
        0 => std::thread::available_parallelism().map_or(1, |n| n.get()),
        n => n,
    }
}

/// Batch shards for tensors on `dev`: [`threads`] on the CPU, 1 elsewhere.
pub fn workers_for(dev: &candle_core::Device) -> usize {
    if dev.is_cpu() {
        threads()
    } else {
        1
    }
}

/// Splits `0..len` into at most `parts` contiguous, non-empty ranges whose starts are multiples of
/// `align` (so shards hold whole groups); `len` must be a multiple of `align`.
pub fn shards(len: usize, parts: usize, align: usize) -> Vec<Range<usize>> {
    let align = align.max(1);
    let units = len / align;
    let parts = parts.clamp(1, units.max(1));
    let mut out = Vec::with_capacity(parts);
    let mut start = 0;
    for p in 0..parts {
        let n = units / parts + usize::from(p < units % parts);
        let end = if p + 1 == parts {
            len
        } else {
            start + n * align
        };
        if end > start {
            out.push(start..end);
        }
        start = end;
    }
    out
}

/// Runs `f` on each range in its own scoped thread (the first on the calling thread) and returns the
/// results in range order; the first error wins.
pub fn map_shards<T: Send>(
    ranges: &[Range<usize>],
    f: impl Fn(Range<usize>) -> Result<T> + Sync,
) -> Result<Vec<T>> {
    if ranges.len() <= 1 {
        return ranges.iter().map(|r| f(r.clone())).collect();
    }
    std::thread::scope(|s| {
        let handles: Vec<_> = ranges[1..]
            .iter()
            .map(|r| {
                let f = &f;
                let r = r.clone();
                s.spawn(move || f(r))
            })
            .collect();
        let first = f(ranges[0].clone());
        let mut out = vec![first];
        for h in handles {
            out.push(match h.join() {
                Ok(r) => r,
                Err(p) => std::panic::resume_unwind(p),
            });
        }
        out.into_iter().collect()
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shards_cover_the_range_in_aligned_pieces() {
        assert_eq!(shards(32, 2, 1), vec![0..16, 16..32]);
        assert_eq!(shards(7, 2, 1), vec![0..4, 4..7]);
        assert_eq!(shards(24, 2, 8), vec![0..16, 16..24]);
        assert_eq!(shards(8, 4, 8), vec![0..8]);
        assert_eq!(shards(3, 8, 1), vec![0..1, 1..2, 2..3]);
        assert_eq!(shards(5, 1, 1), vec![0..5]);
        assert!(shards(0, 2, 1).is_empty());
    }

    #[test]
    fn map_shards_keeps_order_and_reports_errors() {
        let r = shards(10, 3, 1);
        let v = map_shards(&r, |x| Ok(x.start)).unwrap();
        assert_eq!(v, vec![0, 4, 7]);
        let e = map_shards(&r, |x| {
            if x.start == 4 {
                anyhow::bail!("shard at 4 failed")
            }
            Ok(())
        });
        assert!(e.unwrap_err().to_string().contains("shard at 4"));
    }
}
