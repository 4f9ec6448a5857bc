//! The reward interface: a batch of images with their prompts and (GenEval-style) metadata → one score
//! per image plus named sub-metrics. Several modules combine as a weighted sum (`[[reward]]` tables).

pub mod clip;
pub mod remote;
pub mod serve;

use crate::config::RewardConfig;
use crate::geneval::Metadata;
use crate::image::Image;
use crate::testbed::score_image;
use anyhow::{bail, Context, Result};
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

/// Size in kB (1000 bytes) of an image encoded as baseline JPEG at quality 95, 4:2:0, standard Huffman
/// tables — what PIL's `image.save(buffer, format="JPEG", quality=95)` does in the reference rewards.
pub fn jpeg_size_kb(im: &Image) -> Result<f64> {
    Ok(jpeg_bytes(im, 95)?.len() as f64 / 1000.0)
}

/// Baseline JPEG at `quality`, 4:2:0, standard tables (PIL's defaults apart from the quality, which
/// PIL defaults to 75).
pub fn jpeg_bytes(im: &Image, quality: u8) -> Result<Vec<u8>> {
    let (w, h) = (u16::try_from(im.width)?, u16::try_from(im.height)?);
    let mut buf = Vec::new();
    let mut enc = jpeg_encoder::Encoder::new(&mut buf, quality);
    enc.set_sampling_factor(jpeg_encoder::SamplingFactor::F_2_2);
    enc.encode(&im.data, w, h, jpeg_encoder::ColorType::Rgb)
        .map_err(|e| anyhow::anyhow!("JPEG encoding of a {w}x{h} image: {e}"))?;
    Ok(buf)
}

/// `jpeg_incompressibility`: the JPEG size in kB (quality 95); `jpeg_compressibility`: its negative
/// (docs/rewards.md; Flow-GRPO's variant divides by 500, i.e. `weight = 0.002`). Sub-metric `size_kb`.
pub struct JpegSize {
    pub compressible: bool,
}

impl Reward for JpegSize {
    fn name(&self) -> &str {
        if self.compressible {
            "jpeg_compressibility"
        } else {
            "jpeg_incompressibility"
        }
    }

    fn score(
        &self,
        images: &[Image],
        _prompts: &[String],
        _metadata: &[Option<Metadata>],
    ) -> Result<RewardOutput> {
        let sizes = images
            .iter()
            .map(jpeg_size_kb)
            .collect::<Result<Vec<_>>>()?;
        let sign = if self.compressible { -1.0 } else { 1.0 };
        let mut out = RewardOutput {
            scores: sizes.iter().map(|s| (sign * s) as f32).collect(),
            ..Default::default()
        };
        out.sub
            .insert("size_kb".into(), sizes.iter().map(|s| *s as f32).collect());
        Ok(out)
    }
}

/// Names accepted in `[[reward]] kind = …` today.
pub const KNOWN: [&str; 7] = [
    "shapes_geneval",
    "jpeg_compressibility",
    "jpeg_incompressibility",
    "clip_score",
    "pickscore",
    "aesthetic",
    "remote",
];

/// Per-image values of every module and sub-metric, by name.
pub type NamedScores = BTreeMap<String, Vec<f32>>;

/// Each module's weight and raw per-image scores, in config order.
pub type ModuleScores = Vec<(f64, Vec<f32>)>;

/// What [`Rewards::score_parts`] returns.
pub type Scored = (Vec<f32>, NamedScores, ModuleScores);

/// The scores of consecutive batches as one; a named score is kept when every batch has it.
pub fn concat_scored(parts: Vec<Scored>) -> Result<Scored> {
    let mut it = parts.into_iter();
    let Some((mut total, mut named, mut modules)) = it.next() else {
        return Ok(Default::default());
    };
    for (t, n, m) in it {
        if m.len() != modules.len() {
            bail!(
                "reward batches with {} and {} modules",
                modules.len(),
                m.len()
            );
        }
        total.extend(t);
        named.retain(|k, _| n.contains_key(k));
        for (k, v) in named.iter_mut() {
            v.extend(&n[k]);
        }
        for ((_, a), (_, b)) in modules.iter_mut().zip(m) {
            a.extend(b);
        }
    }
    Ok((total, named, modules))
}

/// A weighted sum of reward modules.
pub struct Rewards {
    parts: Vec<(f64, Box<dyn Reward>)>,
}

impl Rewards {
    /// Checks `[[reward]]` tables without loading models or contacting servers (for `--dry-run`).
    pub fn validate(cfg: &[RewardConfig]) -> Result<()> {
        if cfg.is_empty() {
            bail!("no [[reward]] in the config: add e.g. [[reward]] kind = \"shapes_geneval\"");
        }
        for (i, r) in cfg.iter().enumerate() {
            let kind = r.kind.as_str();
            if !KNOWN.contains(&kind) {
                bail!(
                    "reward[{i}].kind = {kind:?} is not available (known: {})",
                    KNOWN.join(", ")
                );
            }
            if kind == "remote" {
                crate::reward::remote::RemoteReward::from_config(r)
                    .with_context(|| format!("reward[{i}]"))?;
            }
            if kind == "aesthetic" && r.head.is_none() {
                bail!("reward[{i}] (aesthetic) needs head = \"path/to/sac+logos+ava1-l14-linearMSE.pth\"");
            }
        }
        Ok(())
    }

    /// The modules of `[[reward]]` tables, models on the CPU.
    pub fn from_config(cfg: &[RewardConfig]) -> Result<Self> {
        Self::from_config_on(cfg, &candle_core::Device::Cpu)
    }

    /// As [`Rewards::from_config`], reward models (CLIP) on `dev`.
    pub fn from_config_on(cfg: &[RewardConfig], dev: &candle_core::Device) -> Result<Self> {
        if cfg.is_empty() {
            bail!("no [[reward]] in the config: add e.g. [[reward]] kind = \"shapes_geneval\"");
        }
        let mut parts: Vec<(f64, Box<dyn Reward>)> = vec![];
        for (i, r) in cfg.iter().enumerate() {
            let m: Box<dyn Reward> = match r.kind.as_str() {
                "shapes_geneval" => Box::new(ShapesGeneval),
                "jpeg_compressibility" => Box::new(JpegSize { compressible: true }),
                "jpeg_incompressibility" => Box::new(JpegSize {
                    compressible: false,
                }),
                k if crate::reward::clip::ClipKind::parse(k).is_some() => Box::new(
                    crate::reward::clip::ClipReward::from_config(
                        crate::reward::clip::ClipKind::parse(k).expect("checked"),
                        r,
                        dev,
                    )
                    .with_context(|| format!("reward[{i}] ({k})"))?,
                ),
                "remote" => Box::new(
                    crate::reward::remote::RemoteReward::from_config(r)
                        .with_context(|| format!("reward[{i}]"))?,
                ),
                other => bail!(
                    "reward[{i}].kind = {other:?} is not available (known: {})",
                    KNOWN.join(", ")
                ),
            };
            parts.push((r.weight, m));
        }
        Ok(Self { parts })
    }

    /// Every module's [`Reward::check`] (servers answer their health check), before any long work.
    pub fn check(&self) -> Result<()> {
        for (i, (_, m)) in self.parts.iter().enumerate() {
            m.check()
                .with_context(|| format!("reward[{i}] ({}) failed its check", m.name()))?;
        }
        Ok(())
    }

    /// Weighted total per image (`avg` in the reference code) and every module's scores and
    /// sub-metrics under `<module>` and `<module>/<sub>`. Non-finite or missing scores are errors.
    pub fn score(
        &self,
        images: &[Image],
        prompts: &[String],
        metadata: &[Option<Metadata>],
    ) -> Result<(Vec<f32>, NamedScores)> {
        let (total, named, _) = self.score_parts(images, prompts, metadata)?;
        Ok((total, named))
    }

    /// As [`Rewards::score`], also returning each module's weight and raw scores in config order (for
    /// decoupled advantages). Two modules of the same kind are named `<kind>` and `<kind>#1`, ….
    pub fn score_parts(
        &self,
        images: &[Image],
        prompts: &[String],
        metadata: &[Option<Metadata>],
    ) -> Result<Scored> {
        let n = images.len();
        let mut total = vec![0f32; n];
        let mut named = BTreeMap::new();
        let mut parts = Vec::with_capacity(self.parts.len());
        let mut seen: BTreeMap<String, usize> = BTreeMap::new();
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
            let count = seen.entry(m.name().to_string()).or_insert(0);
            let name = match *count {
                0 => m.name().to_string(),
                k => format!("{}#{k}", m.name()),
            };
            *count += 1;
            parts.push((*w, o.scores.clone()));
            named.insert(name.clone(), o.scores);
            for (k, v) in o.sub {
                named.insert(format!("{name}/{k}"), v);
            }
        }
        Ok((total, named, parts))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testbed::{prompts::colors, scene_for};
    use rand::SeedableRng;

    #[test]
    fn jpeg_rewards_prefer_flat_images_and_are_exact_negatives() {
        let flat = crate::image::Image::new(32, 32, [40, 40, 40]);
        let mut busy = flat.clone();
        let mut rng = rand::rngs::StdRng::seed_from_u64(3);
        busy.add_noise(60.0, &mut rng);
        let (a, b) = (jpeg_size_kb(&flat).unwrap(), jpeg_size_kb(&busy).unwrap());
        assert!(a > 0.1 && b > 2.0 * a, "flat {a} kB, noisy {b} kB");
        // a JPEG starts with SOI and ends with EOI: the size is the whole file
        let cfg = |k: &str| RewardConfig {
            kind: k.into(),
            weight: 1.0,
            ..Default::default()
        };
        let imgs = [flat, busy];
        let p = vec![String::new(); 2];
        let m = vec![None, None];
        let (c, named) = Rewards::from_config(&[cfg("jpeg_compressibility")])
            .unwrap()
            .score(&imgs, &p, &m)
            .unwrap();
        let (i, _) = Rewards::from_config(&[cfg("jpeg_incompressibility")])
            .unwrap()
            .score(&imgs, &p, &m)
            .unwrap();
        assert!(c[0] > c[1], "the flat image compresses better");
        assert_eq!(c.iter().map(|x| -x).collect::<Vec<_>>(), i);
        assert!((named["jpeg_compressibility/size_kb"][1] as f64 - b).abs() < 1e-6);
    }

    #[test]
    fn weighted_sum_and_unknown_kinds() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(1);
        let m = colors("circle", "red");
        let good = scene_for(&m, &mut rng).unwrap().render();
        let blank = crate::image::Image::new(32, 32, crate::testbed::BACKGROUND);
        let cfg = vec![RewardConfig {
            kind: "shapes_geneval".into(),
            weight: 2.0,
            ..Default::default()
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
            ..Default::default()
        }];
        let e = Rewards::from_config(&bad).err().unwrap().to_string();
        assert!(
            e.contains("reward[0].kind") && e.contains("shapes_geneval"),
            "{e}"
        );
    }
}
