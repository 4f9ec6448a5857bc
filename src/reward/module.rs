//! The interface one reward module implements: a batch of images with their prompts and metadata
//! in, one score per image and named per-image sub-metrics out.

use crate::geneval::Metadata;
use crate::image::Image;
use anyhow::Result;
use std::collections::BTreeMap;

/// Scores of one batch.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct RewardOutput {
    pub scores: Vec<f32>,
    /// Named per-image sub-metrics (e.g. `strict_accuracy`).
    pub sub: BTreeMap<String, Vec<f32>>,
}

pub trait Reward: Send + Sync {
    fn name(&self) -> &str;
    /// Called once before any long work (e.g. a server's health check): an error stops the run
    /// before its first rollout.
    fn check(&self) -> Result<()> {
        Ok(())
    }
    fn score(
        &self,
        images: &[Image],
        prompts: &[String],
        metadata: &[Option<Metadata>],
    ) -> Result<RewardOutput>;
}
