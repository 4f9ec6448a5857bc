//! `shapes_geneval`: GenEval scoring of the shapes testbed with its exact detector.

use crate::geneval::Metadata;
use crate::image::Image;
use crate::reward::{Reward, RewardOutput};
use crate::testbed::score_image;
use anyhow::{bail, Result};

/// GenEval scoring of the shapes world with its exact detector: the training reward is the reference's
/// partial-credit score; `strict_accuracy` and `accuracy` (GenEval's `correct`) come along.
pub struct ShapesGeneval;

impl Reward for ShapesGeneval {
    fn name(&self) -> &str {
        "shapes_geneval"
    }

    fn score(
        &self,
        images: &[Image],
        _prompts: &[String],
        metadata: &[Option<Metadata>],
    ) -> Result<RewardOutput> {
        let mut out = RewardOutput::default();
        let mut strict = vec![];
        let mut correct = vec![];
        for (i, (im, m)) in images.iter().zip(metadata).enumerate() {
            let Some(m) = m else {
                bail!("shapes_geneval needs GenEval metadata for every prompt; image {i} has none (use a .jsonl prompt file)");
            };
            let o = score_image(m, im);
            out.scores.push(o.reward as f32);
            strict.push(o.strict as u8 as f32);
            correct.push(o.correct as u8 as f32);
        }
        out.sub.insert("strict_accuracy".into(), strict);
        out.sub.insert("accuracy".into(), correct);
        Ok(out)
    }
}
