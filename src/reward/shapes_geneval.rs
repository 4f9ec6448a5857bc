//! `shapes_geneval`: GenEval scoring of the shapes testbed with its exact detector.

use crate::geneval::{Metadata, Outcome};
use crate::image::Image;
use crate::reward::module::{Reward, RewardOutput};
use crate::testbed::score_image;
use anyhow::{bail, Result};

/// GenEval scoring of the shapes world with its exact detector: the training reward is the reference's
/// partial-credit score; `strict_accuracy` and `accuracy` (GenEval's `correct`) come along.
pub struct ShapesGeneval;

impl ShapesGeneval {
    /// GenEval's verdict on each image (every image needs its prompt's metadata).
    pub fn outcomes(images: &[Image], metadata: &[Option<Metadata>]) -> Result<Vec<Outcome>> {
        images
            .iter()
            .zip(metadata)
            .enumerate()
            .map(|(i, (im, m))| match m {
                Some(m) => Ok(score_image(m, im)),
                None => bail!(
                    "shapes_geneval needs GenEval metadata for every prompt; image {i} has none \
                     (use a .jsonl prompt file)"
                ),
            })
            .collect()
    }
}

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
        let outcomes = Self::outcomes(images, metadata)?;
        let verdicts =
            |f: fn(&Outcome) -> bool| outcomes.iter().map(|o| f(o) as u8 as f32).collect();
        let mut out = RewardOutput {
            scores: outcomes.iter().map(|o| o.reward as f32).collect(),
            ..Default::default()
        };
        out.sub
            .insert("strict_accuracy".into(), verdicts(|o| o.strict));
        out.sub.insert("accuracy".into(), verdicts(|o| o.correct));
        Ok(out)
    }
}
