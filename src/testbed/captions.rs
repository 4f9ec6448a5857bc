//! Loose captions for pretraining: the scene drawn for a caption may differ from what the caption
//! says, as web images differ from their alt text — unmentioned objects, a relation or a count that
//! does not hold, colours on the wrong objects. [`loosen`] turns a caption's metadata into the
//! metadata of the scene actually drawn; the caption stays the prompt.

use crate::geneval::{Include, Metadata};
use crate::testbed::world::{CLASSES, COLORS, MAX_SHAPES};
use anyhow::{bail, Result};
use rand::Rng;
use serde::{Deserialize, Serialize};

/// Probabilities with which a pretraining scene departs from its caption. All zero (the default):
/// every scene is exactly what its caption says.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize, Default)]
#[serde(default, deny_unknown_fields)]
pub struct CaptionNoise {
    /// A position caption's relation is ignored: the two objects are placed anywhere.
    pub position: f64,
    /// A counting caption's number is off by one in the scene (one fewer when one more would not
    /// fit, one more when one fewer would be none).
    pub count: f64,
    /// A colour-attribution caption's two colours are swapped between its two objects.
    pub binding: f64,
    /// A colour named by a caption is another palette colour in the scene (each named colour on
    /// its own).
    pub color: f64,
    /// For each place left free (up to [`MAX_SHAPES`] objects), the chance of one more object the
    /// caption does not mention, of a class the caption does not name and any colour.
    pub extras: f64,
}

impl CaptionNoise {
    /// The fields by name, for validation and documentation.
    pub fn fields(&self) -> [(&'static str, f64); 5] {
        [
            ("position", self.position),
            ("count", self.count),
            ("binding", self.binding),
            ("color", self.color),
            ("extras", self.extras),
        ]
    }

    /// Whether every scene is exactly its caption.
    pub fn is_exact(&self) -> bool {
        self.fields().iter().all(|(_, p)| *p == 0.0)
    }
}

/// The metadata of the scene drawn for the caption `meta` under `noise` (a strict GenEval check of
/// the scene against it holds). Exclude clauses are dropped: what the scene shows is all there is.
/// Draws nothing from `rng` when `noise` is exact.
pub fn loosen(meta: &Metadata, noise: &CaptionNoise, rng: &mut impl Rng) -> Result<Metadata> {
    for (k, p) in noise.fields() {
        if !(0.0..=1.0).contains(&p) {
            bail!("caption noise {k} = {p} is not a probability");
        }
    }
    if noise.is_exact() {
        return Ok(meta.clone());
    }
    let mut include: Vec<Include> = meta.include.clone();
    for inc in &mut include {
        if inc.position.is_some() && hit(rng, noise.position) {
            inc.position = None;
        }
    }
    if meta.tag == "counting" && hit(rng, noise.count) {
        let inc = &mut include[0];
        inc.count = if inc.count as usize >= MAX_SHAPES || (inc.count > 1 && hit(rng, 0.5)) {
            inc.count - 1
        } else {
            inc.count + 1
        };
    }
    if include.len() == 2 && include.iter().all(|i| i.color.is_some()) && hit(rng, noise.binding) {
        let c = include[0].color.take();
        include[0].color = include[1].color.replace(c.expect("checked above"));
    }
    for inc in &mut include {
        if inc.color.is_some() && hit(rng, noise.color) {
            let others: Vec<&str> = COLORS
                .iter()
                .map(|(n, _)| *n)
                .filter(|n| Some(*n) != inc.color.as_deref())
                .collect();
            inc.color = Some(others[rng.random_range(0..others.len())].to_string());
        }
    }
    let mut total: usize = include.iter().map(|i| i.count as usize).sum();
    while total < MAX_SHAPES && hit(rng, noise.extras) {
        let free: Vec<&str> = CLASSES
            .iter()
            .copied()
            .filter(|c| include.iter().all(|i| i.class != *c))
            .collect();
        if free.is_empty() {
            break;
        }
        let class = free[rng.random_range(0..free.len())];
        let color = COLORS[rng.random_range(0..COLORS.len())].0;
        include.push(Include {
            class: class.to_string(),
            count: 1,
            color: Some(color.to_string()),
            position: None,
        });
        total += 1;
    }
    Ok(Metadata {
        tag: meta.tag.clone(),
        include,
        exclude: Vec::new(),
        prompt: meta.prompt.clone(),
    })
}

/// A draw that comes out true with probability `p` (none is drawn when `p` is 0).
fn hit(rng: &mut impl Rng, p: f64) -> bool {
    p > 0.0 && rng.random::<f64>() < p
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testbed::{prompts, random_metadata, scene_for, score_image};
    use rand::SeedableRng;

    #[test]
    fn exact_noise_is_the_caption_and_draws_nothing() {
        let mut a = rand::rngs::StdRng::seed_from_u64(1);
        let b = a.clone();
        let m = prompts::position("circle", "left of", "square");
        assert_eq!(loosen(&m, &CaptionNoise::default(), &mut a).unwrap(), m);
        assert_eq!(a, b);
    }

    #[test]
    fn each_kind_of_noise_changes_what_it_names_and_the_scene_follows() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(2);
        let all = |f: fn(&mut CaptionNoise)| {
            let mut n = CaptionNoise::default();
            f(&mut n);
            n
        };
        let m = prompts::counting("square", 4);
        let l = loosen(&m, &all(|n| n.count = 1.0), &mut rng).unwrap();
        assert_eq!(l.include[0].count, 3);
        assert!(l.exclude.is_empty());
        let m = prompts::counting("square", 2);
        for _ in 0..20 {
            let c = loosen(&m, &all(|n| n.count = 1.0), &mut rng)
                .unwrap()
                .include[0]
                .count;
            assert!(c == 1 || c == 3, "{c}");
        }
        let m = prompts::color_attr("circle", "red", "square", "blue");
        let l = loosen(&m, &all(|n| n.binding = 1.0), &mut rng).unwrap();
        assert_eq!(l.include[0].color.as_deref(), Some("blue"));
        assert_eq!(l.include[1].color.as_deref(), Some("red"));
        let l = loosen(&m, &all(|n| n.color = 1.0), &mut rng).unwrap();
        assert_ne!(l.include[0].color.as_deref(), Some("red"));
        assert_ne!(l.include[1].color.as_deref(), Some("blue"));
        let m = prompts::position("circle", "left of", "square");
        let l = loosen(&m, &all(|n| n.position = 1.0), &mut rng).unwrap();
        assert!(l.include.iter().all(|i| i.position.is_none()));
        let m = prompts::single_object("circle");
        let l = loosen(&m, &all(|n| n.extras = 1.0), &mut rng).unwrap();
        assert_eq!(l.include.len(), MAX_SHAPES);
        let mut classes: Vec<&str> = l.include.iter().map(|i| i.class.as_str()).collect();
        classes.sort();
        classes.dedup();
        assert_eq!(
            classes.len(),
            MAX_SHAPES,
            "extras are of classes not named: {l:?}"
        );
        // Every loosened prompt still has a scene, which satisfies the loosened metadata.
        let noisy = CaptionNoise {
            position: 0.5,
            count: 0.5,
            binding: 0.5,
            color: 0.5,
            extras: 0.5,
        };
        for _ in 0..500 {
            let m = random_metadata(&mut rng);
            let l = loosen(&m, &noisy, &mut rng).unwrap();
            let scene = scene_for(&l, &mut rng).unwrap();
            assert!(score_image(&l, &scene.render()).strict, "{l:?}");
        }
        let bad = CaptionNoise {
            extras: 1.5,
            ..Default::default()
        };
        let e = loosen(&m, &bad, &mut rng).unwrap_err();
        assert!(format!("{e}").contains("extras = 1.5"), "{e}");
    }
}
