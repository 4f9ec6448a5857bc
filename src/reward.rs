//! The reward interface: a batch of images with their prompts and (GenEval-style) metadata → one score
//! per image plus named sub-metrics. Several modules combine as a weighted sum (`[[reward]]` tables).

use crate::config::RewardConfig;
use crate::geneval::Metadata;
use crate::shapes::{score_image, Image};
use anyhow::{bail, Result};
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
    fn score(
        &self,
        images: &[Image],
        prompts: &[String],
        metadata: &[Option<Metadata>],
    ) -> Result<RewardOutput>;
}

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

/// Names accepted in `[[reward]] kind = …` today.
pub const KNOWN: [&str; 1] = ["shapes_geneval"];

/// Per-image values of every module and sub-metric, by name.
pub type NamedScores = BTreeMap<String, Vec<f32>>;

/// A weighted sum of reward modules.
pub struct Rewards {
    parts: Vec<(f64, Box<dyn Reward>)>,
}

impl Rewards {
    pub fn from_config(cfg: &[RewardConfig]) -> Result<Self> {
        if cfg.is_empty() {
            bail!("no [[reward]] in the config: add e.g. [[reward]] kind = \"shapes_geneval\"");
        }
        let mut parts: Vec<(f64, Box<dyn Reward>)> = vec![];
        for (i, r) in cfg.iter().enumerate() {
            let m: Box<dyn Reward> = match r.kind.as_str() {
                "shapes_geneval" => Box::new(ShapesGeneval),
                other => bail!(
                    "reward[{i}].kind = {other:?} is not available (known: {}; remote and CLIP-family \
                     rewards arrive with issue 6)",
                    KNOWN.join(", ")
                ),
            };
            parts.push((r.weight, m));
        }
        Ok(Self { parts })
    }

    /// Weighted total per image (`avg` in the reference code) and every module's scores and
    /// sub-metrics under `<module>` and `<module>/<sub>`. Non-finite or missing scores are errors.
    pub fn score(
        &self,
        images: &[Image],
        prompts: &[String],
        metadata: &[Option<Metadata>],
    ) -> Result<(Vec<f32>, NamedScores)> {
        let n = images.len();
        let mut total = vec![0f32; n];
        let mut named = BTreeMap::new();
        for (w, m) in &self.parts {
            let o = m.score(images, prompts, metadata)?;
            if o.scores.len() != n {
                bail!(
                    "reward {} returned {} scores for {n} images",
                    m.name(),
                    o.scores.len()
                );
            }
            if let Some(i) = o.scores.iter().position(|s| !s.is_finite()) {
                bail!(
                    "reward {} returned {} for image {i} (prompt {:?})",
                    m.name(),
                    o.scores[i],
                    prompts.get(i)
                );
            }
            for (t, s) in total.iter_mut().zip(&o.scores) {
                *t += (*w as f32) * s;
            }
            named.insert(m.name().to_string(), o.scores);
            for (k, v) in o.sub {
                named.insert(format!("{}/{k}", m.name()), v);
            }
        }
        Ok((total, named))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::shapes::{prompts::colors, scene_for};
    use rand::SeedableRng;

    #[test]
    fn weighted_sum_and_unknown_kinds() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(1);
        let m = colors("circle", "red");
        let good = scene_for(&m, &mut rng).unwrap().render();
        let blank = crate::shapes::Image::new(32, 32, crate::shapes::BACKGROUND);
        let cfg = vec![RewardConfig {
            kind: "shapes_geneval".into(),
            weight: 2.0,
            url: None,
        }];
        let r = Rewards::from_config(&cfg).unwrap();
        let (total, named) = r
            .score(
                &[good, blank],
                &[m.prompt.clone(), m.prompt.clone()],
                &[Some(m.clone()), Some(m.clone())],
            )
            .unwrap();
        assert_eq!(total, vec![2.0, 0.0]);
        assert_eq!(named["shapes_geneval/strict_accuracy"], vec![1.0, 0.0]);
        let bad = vec![RewardConfig {
            kind: "geneval_server".into(),
            weight: 1.0,
            url: None,
        }];
        let e = Rewards::from_config(&bad).err().unwrap().to_string();
        assert!(
            e.contains("reward[0].kind") && e.contains("shapes_geneval"),
            "{e}"
        );
    }
}
