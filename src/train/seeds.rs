//! The random streams of a run: each epoch draws its prompts, its rollout noise and its update's
//! draws (step indices, then group noise) from a stream of its own, seeded by `(run.seed, epoch,
//! purpose)`, so a resumed run repeats an uninterrupted one.

use rand::SeedableRng;

/// The stream that picks an epoch's prompts.
pub const PROMPTS: u64 = 1;
/// The stream of an epoch's rollout noise.
pub const ROLLOUT_NOISE: u64 = 2;
/// The stream of an epoch's update: step indices, then group noise.
pub const UPDATE: u64 = 3;

/// The random stream `purpose` of an epoch.
pub fn epoch_rng(seed: u64, epoch: usize, purpose: u64) -> rand::rngs::StdRng {
    rand::rngs::StdRng::seed_from_u64(
        seed.wrapping_mul(0x9E37_79B9_7F4A_7C15)
            ^ ((epoch as u64) << 16).wrapping_add(purpose.wrapping_mul(0xD1B5_4A32_D192_ED03)),
    )
}
