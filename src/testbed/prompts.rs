//! Prompts of the shapes world, in GenEval's templates and metadata schema:
//!
//! | tag | prompt | include (exclude) |
//! |---|---|---|
//! | single_object | a photo of a circle | circle×1 |
//! | two_object | a photo of a circle and a square | circle×1, square×1 |
//! | counting | a photo of three circles | circle×3 (exclude circle×4) |
//! | colors | a photo of an orange circle | circle×1 orange |
//! | position | a photo of a circle left of a square | square×1, circle×1 `["left of", 0]` |
//! | color_attr | a photo of a red circle and a blue square | circle×1 red, square×1 blue |
//!
//! As in GenEval, the two objects of two_object, position and color_attr prompts are of different
//! classes and the two colours of a color_attr prompt differ; counting uses two, three and four.
//! With 4 classes and 7 colours the space holds 4 + 12 + 12 + 28 + 48 + 504 = 608 prompts.

use crate::geneval::{write_metadata, Exclude, Include, Metadata, RELATIONS, TAGS};
use crate::testbed::world::{plural, CLASSES, COLORS};
use anyhow::Result;
use rand::Rng;
use std::path::Path;

/// Counting numbers and their words.
pub const NUMBERS: [(u32, &str); 3] = [(2, "two"), (3, "three"), (4, "four")];

/// "a" or "an" before `word`.
pub fn article(word: &str) -> &'static str {
    match word.chars().next() {
        Some('a' | 'e' | 'i' | 'o' | 'u') => "an",
        _ => "a",
    }
}

fn inc(class: &str, count: u32) -> Include {
    Include {
        class: class.into(),
        count,
        color: None,
        position: None,
    }
}

fn a(word: &str) -> String {
    format!("{} {word}", article(word))
}

pub fn single_object(class: &str) -> Metadata {
    Metadata {
        tag: "single_object".into(),
        include: vec![inc(class, 1)],
        exclude: vec![],
        prompt: format!("a photo of {}", a(class)),
    }
}

pub fn two_object(first: &str, second: &str) -> Metadata {
    Metadata {
        tag: "two_object".into(),
        include: vec![inc(first, 1), inc(second, 1)],
        exclude: vec![],
        prompt: format!("a photo of {} and {}", a(first), a(second)),
    }
}

/// `number` must be one of [`NUMBERS`] for the prompt to have a number word (it falls back to
/// digits otherwise).
pub fn counting(class: &str, number: u32) -> Metadata {
    let word = NUMBERS
        .iter()
        .find(|(n, _)| *n == number)
        .map_or_else(|| number.to_string(), |(_, w)| w.to_string());
    let plural = plural(class).map_or_else(|| format!("{class}s"), str::to_string);
    Metadata {
        tag: "counting".into(),
        include: vec![inc(class, number)],
        exclude: vec![Exclude {
            class: class.into(),
            count: number + 1,
        }],
        prompt: format!("a photo of {word} {plural}"),
    }
}

pub fn colors(class: &str, color: &str) -> Metadata {
    Metadata {
        tag: "colors".into(),
        include: vec![Include {
            color: Some(color.into()),
            ..inc(class, 1)
        }],
        exclude: vec![],
        prompt: format!("a photo of {} {class}", a(color)),
    }
}

/// "a photo of a `subject` `relation` a `target`"; the target is the first include clause, as in
/// GenEval's file.
pub fn position(subject: &str, relation: &str, target: &str) -> Metadata {
    Metadata {
        tag: "position".into(),
        include: vec![
            inc(target, 1),
            Include {
                position: Some((relation.into(), 0)),
                ..inc(subject, 1)
            },
        ],
        exclude: vec![],
        prompt: format!("a photo of {} {relation} {}", a(subject), a(target)),
    }
}

pub fn color_attr(first: &str, first_color: &str, second: &str, second_color: &str) -> Metadata {
    Metadata {
        tag: "color_attr".into(),
        include: vec![
            Include {
                color: Some(first_color.into()),
                ..inc(first, 1)
            },
            Include {
                color: Some(second_color.into()),
                ..inc(second, 1)
            },
        ],
        exclude: vec![],
        prompt: format!(
            "a photo of {} {first} and {} {second}",
            a(first_color),
            a(second_color)
        ),
    }
}

/// Ordered pairs of distinct indices below `n`.
fn pairs(n: usize) -> impl Iterator<Item = (usize, usize)> {
    (0..n).flat_map(move |i| (0..n).filter(move |&j| j != i).map(move |j| (i, j)))
}

/// Every prompt of one tag, in a fixed order (empty for an unknown tag).
pub fn prompts_of(tag: &str) -> Vec<Metadata> {
    let nc = CLASSES.len();
    match tag {
        "single_object" => CLASSES.iter().map(|c| single_object(c)).collect(),
        "two_object" => pairs(nc)
            .map(|(i, j)| two_object(CLASSES[i], CLASSES[j]))
            .collect(),
        "counting" => CLASSES
            .iter()
            .flat_map(|c| NUMBERS.iter().map(move |(n, _)| counting(c, *n)))
            .collect(),
        "colors" => CLASSES
            .iter()
            .flat_map(|c| COLORS.iter().map(move |(k, _)| colors(c, k)))
            .collect(),
        "position" => pairs(nc)
            .flat_map(|(s, t)| {
                RELATIONS
                    .iter()
                    .map(move |r| position(CLASSES[s], r, CLASSES[t]))
            })
            .collect(),
        "color_attr" => pairs(nc)
            .flat_map(|(i, j)| {
                pairs(COLORS.len()).map(move |(ci, cj)| {
                    color_attr(CLASSES[i], COLORS[ci].0, CLASSES[j], COLORS[cj].0)
                })
            })
            .collect(),
        _ => Vec::new(),
    }
}

/// The whole prompt space, tag by tag in the order of [`TAGS`].
pub fn all_prompts() -> Vec<Metadata> {
    TAGS.iter().flat_map(|t| prompts_of(t)).collect()
}

/// A prompt from the full template distribution: tag uniform over the six, then uniform within the
/// tag (pretraining captions).
pub fn random_metadata(rng: &mut impl Rng) -> Metadata {
    let tag = TAGS[rng.random_range(0..TAGS.len())];
    random_metadata_of(tag, rng).expect("TAGS are all known")
}

/// A random prompt of `tag`, one of [`TAGS`].
pub fn random_metadata_of(tag: &str, rng: &mut impl Rng) -> anyhow::Result<Metadata> {
    fn distinct<R: Rng + ?Sized>(rng: &mut R, n: usize) -> (usize, usize) {
        let i = rng.random_range(0..n);
        (i, (i + 1 + rng.random_range(0..n - 1)) % n)
    }
    let class = |rng: &mut _| CLASSES[Rng::random_range(rng, 0..CLASSES.len())];
    Ok(match tag {
        "single_object" => single_object(class(rng)),
        "two_object" => {
            let (i, j) = distinct(rng, CLASSES.len());
            two_object(CLASSES[i], CLASSES[j])
        }
        "counting" => {
            let c = class(rng);
            counting(c, NUMBERS[rng.random_range(0..NUMBERS.len())].0)
        }
        "colors" => {
            let c = class(rng);
            colors(c, COLORS[rng.random_range(0..COLORS.len())].0)
        }
        "position" => {
            let (s, t) = distinct(rng, CLASSES.len());
            let r = RELATIONS[rng.random_range(0..RELATIONS.len())];
            position(CLASSES[s], r, CLASSES[t])
        }
        "color_attr" => {
            let (i, j) = distinct(rng, CLASSES.len());
            let (ci, cj) = distinct(rng, COLORS.len());
            color_attr(CLASSES[i], COLORS[ci].0, CLASSES[j], COLORS[cj].0)
        }
        other => anyhow::bail!(
            "unknown GenEval tag {other:?}; the tags are {}",
            TAGS.join(", ")
        ),
    })
}

/// Stable 64-bit hash of a string (FNV-1a followed by the splitmix64 finaliser); independent of
/// library versions, so the split never changes by itself.
fn stable_hash(s: &str) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in s.bytes() {
        h ^= b as u64;
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h ^= h >> 30;
    h = h.wrapping_mul(0xbf58_476d_1ce4_e5b9);
    h ^= h >> 27;
    h = h.wrapping_mul(0x94d0_49bb_1331_11eb);
    h ^ (h >> 31)
}

/// Number of color_attr prompts in the test split.
pub const TEST_COLOR_ATTR: usize = 32;

/// The deterministic train/test split of the whole prompt space: `(train, test)`, disjoint, each in
/// the order of [`all_prompts`]. Versioned as `configs/shapes/{train,test}_metadata.jsonl`
/// ([`write_prompt_files`]).
///
/// Test set (78 prompts), chosen by fixed rules so that every class, colour, number and relation
/// shows up on both sides wherever the tag's space allows it:
///
/// * single_object: all 4 prompts are test-only (one prompt per class; the RL training prompts
///   never ask for a lone object, train relies on the other tags to cover the classes);
/// * two_object (12): the 6 pairs whose first class comes first in [`CLASSES`] (train has the
///   other order of each pair: "a square and a circle" vs "a circle and a square");
/// * counting (12): class `i`, number index `k` with `i + k` even → 6 (each class and number on
///   both sides);
/// * colors (28): class `i`, colour `k` with `i + k` even → 14;
/// * position (48): subject `s`, target `t`, relation `r` with `s + t + r ≡ 0 (mod 3)` → 16;
/// * color_attr (504): the [`TEST_COLOR_ATTR`] = 32 prompts with the smallest stable hash of the
///   prompt string.
///
/// Train: the other 530 (6 two_object, 6 counting, 14 colors, 32 position, 472 color_attr); a
/// sampler that wants balanced tags should stratify by tag.
pub fn prompt_split() -> (Vec<Metadata>, Vec<Metadata>) {
    let idx = |name: &str, list: &[&str]| list.iter().position(|x| *x == name).unwrap_or(0);
    let class_idx = |name: &str| idx(name, &CLASSES);
    let mut attr_hashes: Vec<u64> = prompts_of("color_attr")
        .iter()
        .map(|m| stable_hash(&m.prompt))
        .collect();
    attr_hashes.sort_unstable();
    let attr_cut = attr_hashes[TEST_COLOR_ATTR - 1];
    let is_test = |m: &Metadata| -> bool {
        let c = |k: usize| class_idx(&m.include[k].class);
        match m.tag.as_str() {
            "single_object" => true,
            "two_object" => c(0) < c(1),
            "counting" => {
                let k = NUMBERS
                    .iter()
                    .position(|(n, _)| *n == m.include[0].count)
                    .unwrap_or(0);
                (c(0) + k) % 2 == 0
            }
            "colors" => {
                let colors: Vec<&str> = COLORS.iter().map(|(n, _)| *n).collect();
                (c(0) + idx(m.include[0].color.as_deref().unwrap_or(""), &colors)) % 2 == 0
            }
            "position" => {
                let r = idx(
                    m.include[1].position.as_ref().map_or("", |p| p.0.as_str()),
                    &RELATIONS,
                );
                (c(1) + c(0) + r) % 3 == 0
            }
            _ => stable_hash(&m.prompt) <= attr_cut,
        }
    };
    all_prompts().into_iter().partition(|m| !is_test(m))
}

/// Write `train_metadata.jsonl` and `test_metadata.jsonl` of [`prompt_split`] into `dir`.
pub fn write_prompt_files(dir: &Path) -> Result<()> {
    std::fs::create_dir_all(dir)?;
    let (train, test) = prompt_split();
    write_metadata(&dir.join("train_metadata.jsonl"), &train)?;
    write_metadata(&dir.join("test_metadata.jsonl"), &test)
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;
    use std::collections::{BTreeMap, HashSet};

    #[test]
    fn prompts_valid_and_unique() {
        let all = all_prompts();
        assert_eq!(all.len(), 608);
        let mut seen = HashSet::new();
        for m in &all {
            m.validate().unwrap();
            assert!(seen.insert(m.prompt.clone()), "duplicate {}", m.prompt);
        }
        let texts: Vec<&str> = all.iter().map(|m| m.prompt.as_str()).collect();
        for want in [
            "a photo of a circle",
            "a photo of a circle and a square",
            "a photo of three triangles",
            "a photo of an orange diamond",
            "a photo of a circle left of a square",
            "a photo of a red circle and an orange square",
        ] {
            assert!(texts.contains(&want), "{want}");
        }
    }

    #[test]
    fn split_sizes() {
        let (train, test) = prompt_split();
        let count = |v: &[Metadata]| {
            let mut m = BTreeMap::new();
            for x in v {
                *m.entry(x.tag.clone()).or_insert(0) += 1;
            }
            m
        };
        let (tr, te) = (count(&train), count(&test));
        assert_eq!(te["single_object"], 4);
        assert_eq!(te["two_object"], 6);
        assert_eq!(te["counting"], 6);
        assert_eq!(te["colors"], 14);
        assert_eq!(te["position"], 16);
        assert_eq!(te["color_attr"], TEST_COLOR_ATTR);
        assert_eq!(test.len(), 78);
        assert!(!tr.contains_key("single_object"));
        assert_eq!(train.len() + test.len(), 608);
    }

    #[test]
    fn random_metadata_covers_the_space() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(3);
        let all: HashSet<String> = all_prompts().into_iter().map(|m| m.prompt).collect();
        let mut tags = BTreeMap::new();
        for _ in 0..3000 {
            let m = random_metadata(&mut rng);
            assert!(all.contains(&m.prompt), "{}", m.prompt);
            *tags.entry(m.tag).or_insert(0usize) += 1;
        }
        assert_eq!(tags.len(), 6);
        assert!(tags.values().all(|&n| (400..600).contains(&n)), "{tags:?}");
    }
}
