//! The reward interface: a batch of images with their prompts and (GenEval-style) metadata → one score
//! per image plus named sub-metrics. Several modules combine as a weighted sum (`[[reward]]` tables);
//! [`KINDS`] is the one table of the kinds, each in a file of its own.

pub mod clip;
pub mod jpeg;
pub mod module;
pub mod remote;
pub mod serve;
pub mod shapes_geneval;

pub use jpeg::{jpeg_bytes, jpeg_size_kb, JpegSize};
pub use module::{Reward, RewardOutput};
pub use shapes_geneval::ShapesGeneval;

use crate::config::RewardConfig;
use crate::geneval::Metadata;
use crate::image::Image;
use anyhow::{bail, Context, Result};
use candle_core::Device;
use std::collections::BTreeMap;

/// One `[[reward]] kind`: its name, a check of its table that loads nothing (for validation and
/// `--dry-run`), and how the module is built.
struct Kind {
    name: &'static str,
    check: fn(&RewardConfig) -> Result<()>,
    build: fn(&RewardConfig, &Device) -> Result<Box<dyn Reward>>,
}

fn no_check(_: &RewardConfig) -> Result<()> {
    Ok(())
}

fn build_clip(r: &RewardConfig, dev: &Device) -> Result<Box<dyn Reward>> {
    let kind = clip::ClipKind::parse(&r.kind).context("not a CLIP reward kind")?;
    Ok(Box::new(clip::ClipReward::from_config(kind, r, dev)?))
}

/// Every reward kind: the one place that lists them.
const KINDS: [Kind; 7] = [
    Kind {
        name: "shapes_geneval",
        check: no_check,
        build: |_, _| Ok(Box::new(ShapesGeneval)),
    },
    Kind {
        name: "jpeg_compressibility",
        check: no_check,
        build: |_, _| Ok(Box::new(JpegSize { compressible: true })),
    },
    Kind {
        name: "jpeg_incompressibility",
        check: no_check,
        build: |_, _| {
            Ok(Box::new(JpegSize {
                compressible: false,
            }))
        },
    },
    Kind {
        name: "clip_score",
        check: no_check,
        build: build_clip,
    },
    Kind {
        name: "pickscore",
        check: no_check,
        build: build_clip,
    },
    Kind {
        name: "aesthetic",
        check: |r| {
            if r.head.is_none() {
                bail!("aesthetic needs head = \"path/to/sac+logos+ava1-l14-linearMSE.pth\"");
            }
            Ok(())
        },
        build: build_clip,
    },
    Kind {
        name: "remote",
        check: |r| remote::RemoteReward::from_config(r).map(|_| ()),
        build: |r, _| Ok(Box::new(remote::RemoteReward::from_config(r)?)),
    },
];

/// The names accepted in `[[reward]] kind = …`.
pub fn kinds() -> Vec<&'static str> {
    KINDS.iter().map(|k| k.name).collect()
}

/// The kind of table `i`, or an error naming the known kinds.
fn kind_of(i: usize, r: &RewardConfig) -> Result<&'static Kind> {
    KINDS.iter().find(|k| k.name == r.kind).with_context(|| {
        format!(
            "reward[{i}].kind = {:?} is not available (known: {})",
            r.kind,
            kinds().join(", ")
        )
    })
}

/// Per-image values of every module and sub-metric, by name.
pub type NamedScores = BTreeMap<String, Vec<f32>>;

/// Each module's weight and raw per-image scores, in config order.
pub type ModuleScores = Vec<(f64, Vec<f32>)>;

/// What [`Rewards::score_parts`] returns.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Scored {
    /// The weighted total per image: the training reward.
    pub total: Vec<f32>,
    /// Every module's scores and sub-metrics under `<module>` and `<module>/<sub>`.
    pub named: NamedScores,
    /// Each module's weight and raw scores (for decoupled advantages).
    pub modules: ModuleScores,
}

/// The scores of consecutive batches as one; a named score is kept when every batch has it.
pub fn concat_scored(parts: Vec<Scored>) -> Result<Scored> {
    let mut it = parts.into_iter();
    let Some(mut all) = it.next() else {
        return Ok(Default::default());
    };
    for next in it {
        if next.modules.len() != all.modules.len() {
            bail!(
                "reward batches with {} and {} modules",
                all.modules.len(),
                next.modules.len()
            );
        }
        all.total.extend(next.total);
        all.named.retain(|k, _| next.named.contains_key(k));
        for (k, v) in all.named.iter_mut() {
            v.extend(&next.named[k]);
        }
        for ((_, a), (_, b)) in all.modules.iter_mut().zip(next.modules) {
            a.extend(b);
        }
    }
    Ok(all)
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
            (kind_of(i, r)?.check)(r).with_context(|| format!("reward[{i}] ({})", r.kind))?;
        }
        Ok(())
    }

    /// The modules of `[[reward]]` tables, models on the CPU.
    pub fn from_config(cfg: &[RewardConfig]) -> Result<Self> {
        Self::from_config_on(cfg, &Device::Cpu)
    }

    /// As [`Rewards::from_config`], reward models (CLIP) on `dev`.
    pub fn from_config_on(cfg: &[RewardConfig], dev: &Device) -> Result<Self> {
        Self::validate(cfg)?;
        let mut parts: Vec<(f64, Box<dyn Reward>)> = vec![];
        for (i, r) in cfg.iter().enumerate() {
            let m = (kind_of(i, r)?.build)(r, dev)
                .with_context(|| format!("reward[{i}] ({})", r.kind))?;
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
        let s = self.score_parts(images, prompts, metadata)?;
        Ok((s.total, s.named))
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
        Ok(Scored {
            total,
            named,
            modules: parts,
        })
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
