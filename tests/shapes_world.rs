//! The shapes world end to end: versioned prompt files, ground-truth scenes scored by the detector
//! (clean and degraded), hand-computed rewards of broken scenes, GenEval's real metadata file.
//!
//! Regenerate the versioned prompt files after changing the prompt space or the split:
//! `DGPO_REGENERATE_PROMPTS=1 cargo test --test shapes_world versioned_prompt_files`.

use dgpo::geneval::{metadata_json_line, read_metadata, Metadata, TAGS};
use dgpo::image::Image;
use dgpo::testbed::{
    prompt_split, prompts, scene_for, score_image, write_prompt_files, Scene, SIZE,
};
use rand::rngs::StdRng;
use rand::SeedableRng;
use std::collections::{BTreeMap, HashSet};
use std::path::{Path, PathBuf};

fn prompt_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("configs/shapes")
}

fn tag_counts(metas: &[Metadata]) -> BTreeMap<String, usize> {
    let mut m = BTreeMap::new();
    for x in metas {
        *m.entry(x.tag.clone()).or_insert(0) += 1;
    }
    m
}

#[test]
fn versioned_prompt_files_match_split() {
    let dir = prompt_dir();
    if std::env::var("DGPO_REGENERATE_PROMPTS").is_ok_and(|v| v == "1") {
        write_prompt_files(&dir).unwrap();
        eprintln!("rewrote {}", dir.display());
    }
    let (train, test) = prompt_split();
    for (name, want) in [
        ("train_metadata.jsonl", &train),
        ("test_metadata.jsonl", &test),
    ] {
        let path = dir.join(name);
        let text = std::fs::read_to_string(&path).unwrap_or_default();
        let expected: String = want.iter().map(|m| metadata_json_line(m) + "\n").collect();
        assert!(
            text == expected,
            "{} differs from shapes::prompt_split(); regenerate with \
             `DGPO_REGENERATE_PROMPTS=1 cargo test --test shapes_world versioned_prompt_files`",
            path.display()
        );
        assert_eq!(&read_metadata(&path).unwrap(), want);
    }
}

#[test]
fn train_and_test_prompts_disjoint() {
    let (train, test) = prompt_split();
    let train_prompts: HashSet<&str> = train.iter().map(|m| m.prompt.as_str()).collect();
    assert!(test
        .iter()
        .all(|m| !train_prompts.contains(m.prompt.as_str())));
    let (tr, te) = (tag_counts(&train), tag_counts(&test));
    println!("train {} prompts {tr:?}", train.len());
    println!("test  {} prompts {te:?}", test.len());
    for tag in TAGS {
        assert!(te.get(tag).copied().unwrap_or(0) > 0, "no {tag} in test");
    }
    assert!((60..=150).contains(&test.len()));
}

/// Fraction of prompts whose every sampled scene (after `degrade`) scores strict, correct, reward 1;
/// and the fraction of images that do.
fn ground_truth_pass_rate(
    metas: &[Metadata],
    seeds: u64,
    degrade: impl Fn(Image, &mut StdRng) -> Image,
) -> (f64, f64, Vec<String>) {
    let (mut prompts_ok, mut images_ok, mut images) = (0usize, 0usize, 0usize);
    let mut failures = Vec::new();
    for (i, meta) in metas.iter().enumerate() {
        let mut all = true;
        for seed in 0..seeds {
            let mut rng = StdRng::seed_from_u64(1000 * i as u64 + seed);
            let scene = scene_for(meta, &mut rng).unwrap();
            let img = degrade(scene.render(), &mut rng);
            let o = score_image(meta, &img);
            images += 1;
            if o.strict && o.correct && o.reward == 1.0 {
                images_ok += 1;
            } else {
                all = false;
                failures.push(format!("{} (seed {seed}): {}", meta.prompt, o.reason));
            }
        }
        prompts_ok += all as usize;
    }
    (
        prompts_ok as f64 / metas.len() as f64,
        images_ok as f64 / images as f64,
        failures,
    )
}

#[test]
fn ground_truth_scenes_score_perfectly() {
    let (train, test) = prompt_split();
    for (name, metas, seeds) in [("test", &test, 8), ("train", &train, 2)] {
        let (p, i, fails) = ground_truth_pass_rate(metas, seeds, |img, _| img);
        println!(
            "clean {name}: {:.2}% of {} prompts ({seeds} scenes each), {:.2}% of images perfect",
            100.0 * p,
            metas.len(),
            100.0 * i
        );
        assert!(p >= 0.99 && i >= 0.99, "{fails:#?}");
    }
}

type Degrade = fn(Image, &mut StdRng) -> Image;

#[test]
fn degraded_scenes_still_score() {
    let (_, test) = prompt_split();
    let variants: [(&str, Degrade); 3] = [
        ("3x3 blur", |img, _| img.box_blur3()),
        ("noise 8/255", |mut img, rng| {
            img.add_noise(8.0, rng);
            img
        }),
        ("blur + noise", |img, rng| {
            let mut b = img.box_blur3();
            b.add_noise(8.0, rng);
            b
        }),
    ];
    for (name, degrade) in variants {
        let (p, i, fails) = ground_truth_pass_rate(&test, 8, degrade);
        println!(
            "{name}: {:.2}% of {} test prompts (8 scenes each), {:.2}% of images perfect",
            100.0 * p,
            test.len(),
            100.0 * i
        );
        for f in fails.iter().take(5) {
            println!("  failed: {f}");
        }
        assert!(p >= 0.95 && i >= 0.98, "{name}: {fails:#?}");
    }
}

fn scene(meta: &Metadata, seed: u64) -> Scene {
    scene_for(meta, &mut StdRng::seed_from_u64(seed)).unwrap()
}

fn assert_outcome(meta: &Metadata, s: &Scene, strict: bool, correct: bool, reward: f64) {
    let o = score_image(meta, &s.render());
    assert_eq!(
        (o.strict, o.correct),
        (strict, correct),
        "{}: {o:?}",
        meta.prompt
    );
    assert!(
        (o.reward - reward).abs() < 1e-12,
        "{}: reward {} != {reward}: {}",
        meta.prompt,
        o.reward,
        o.reason
    );
}

#[test]
fn broken_scenes_score_by_the_formula() {
    for seed in 0..5 {
        // color_attr "a red circle and a blue square": clauses [circle red, square blue].
        let m = prompts::color_attr("circle", "red", "square", "blue");
        let s = scene(&m, seed);
        assert_outcome(&m, &s, true, true, 1.0);
        // Square removed: [1, 1 (circle count, colour), 0, 0 (count wrong on a colour clause)] = 1/2.
        let mut gone = s.clone();
        gone.shapes.retain(|x| x.class != "square");
        assert_outcome(&m, &gone, false, false, 0.5);
        // Square recoloured green: [1, 1, 1, 0] = 3/4.
        let mut green = s.clone();
        green
            .shapes
            .iter_mut()
            .filter(|x| x.class == "square")
            .for_each(|x| x.color = "green".into());
        assert_outcome(&m, &green, false, false, 0.75);

        // position "a circle left of a square": clauses [square, circle left of 0].
        let m = prompts::position("circle", "left of", "square");
        let s = scene(&m, seed);
        assert_outcome(&m, &s, true, true, 1.0);
        // Mirrored: the circle is now right of the square. The reference appends 0 and then 1 for
        // the failed relation: [1, 1, 0, 1] = 3/4.
        let mut mirrored = s.clone();
        for x in &mut mirrored.shapes {
            x.cx = SIZE as f32 - x.cx;
        }
        assert_outcome(&m, &mirrored, false, false, 0.75);
        // Target (square) removed: [0, 1, 0 (no target)] = 1/3.
        let mut no_target = s.clone();
        no_target.shapes.retain(|x| x.class != "square");
        assert_outcome(&m, &no_target, false, false, 1.0 / 3.0);
        // Circle removed: [1, 0, 0 (count wrong on a position clause)] = 1/3.
        let mut no_circle = s.clone();
        no_circle.shapes.retain(|x| x.class != "circle");
        assert_outcome(&m, &no_circle, false, false, 1.0 / 3.0);

        // counting "three triangles" with one removed: [1 − 1/3] = 2/3.
        let m = prompts::counting("triangle", 3);
        let mut s = scene(&m, seed);
        s.shapes.pop();
        assert_outcome(&m, &s, false, false, 2.0 / 3.0);
        // Four triangles for "three": [1 − 1/3] = 2/3, and the exclude clause (>= 4) fails the
        // official verdict.
        let four = scene(&prompts::counting("triangle", 4), seed);
        assert_outcome(&m, &four, false, false, 2.0 / 3.0);

        // colors "a purple diamond" recoloured: [1, 0] = 1/2.
        let m = prompts::colors("diamond", "purple");
        let mut s = scene(&m, seed);
        s.shapes[0].color = "yellow".into();
        assert_outcome(&m, &s, false, false, 0.5);

        // two_object "a circle and a diamond" without the diamond: [1, 0] = 1/2.
        let m = prompts::two_object("circle", "diamond");
        let mut s = scene(&m, seed);
        s.shapes.retain(|x| x.class != "diamond");
        assert_outcome(&m, &s, false, false, 0.5);

        // single_object "a square" with two squares: strict [1 − 1/1] = 0, but GenEval's official
        // verdict only asks for at least one.
        let m = prompts::single_object("square");
        let two = scene(&prompts::counting("square", 2), seed);
        assert_outcome(&m, &two, false, true, 0.0);
    }
}

#[test]
fn scenes_are_deterministic() {
    let m = prompts::color_attr("triangle", "orange", "diamond", "white");
    let a = scene(&m, 7);
    assert_eq!(a, scene(&m, 7));
    assert_eq!(a.render(), scene(&m, 7).render());
    assert_ne!(a, scene(&m, 8));
    let r1: Vec<_> = (0..20)
        .map(|_| 0)
        .scan(StdRng::seed_from_u64(3), |rng, _| {
            Some(dgpo::testbed::random_metadata(rng))
        })
        .collect();
    let r2: Vec<_> = (0..20)
        .map(|_| 0)
        .scan(StdRng::seed_from_u64(3), |rng, _| {
            Some(dgpo::testbed::random_metadata(rng))
        })
        .collect();
    assert_eq!(r1, r2);
}

fn real_geneval_file() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../shared/data/geneval/test_metadata.jsonl")
}

#[test]
fn real_geneval_metadata_parses() {
    let path = real_geneval_file();
    if !path.exists() {
        eprintln!("skipped: {} not found", path.display());
        return;
    }
    let metas = read_metadata(&path).unwrap();
    // The file holds GenEval's 553 prompts four times over (2212 lines).
    assert_eq!(metas.len(), 4 * 553);
    let distinct: HashSet<&str> = metas.iter().map(|m| m.prompt.as_str()).collect();
    assert_eq!(distinct.len(), 553);
    assert!(metas.chunks(553).all(|c| c == &metas[..553]));
    let counts = tag_counts(&metas[..553]);
    println!(
        "GenEval: {} entries, 553 distinct prompts: {counts:?}",
        metas.len()
    );
    let want = [
        ("single_object", 80),
        ("two_object", 99),
        ("counting", 80),
        ("colors", 94),
        ("position", 100),
        ("color_attr", 100),
    ];
    assert_eq!(
        counts,
        want.iter().map(|(t, n)| (t.to_string(), *n)).collect()
    );
    // Our JSON lines are byte-identical to GenEval's.
    let text = std::fs::read_to_string(&path).unwrap();
    for (line, meta) in text.lines().zip(&metas) {
        assert_eq!(metadata_json_line(meta), line);
    }
}

#[test]
fn broken_metadata_line_is_located() {
    let dir = std::env::temp_dir().join(format!("dgpo-meta-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("broken.jsonl");
    let good = metadata_json_line(&prompts::single_object("circle"));
    let bad =
        r#"{"tag": "counting", "include": [{"class": "circle", "count": "two"}], "prompt": "x"}"#;
    std::fs::write(&path, format!("{good}\n{good}\n\n{bad}\n")).unwrap();
    let err = format!("{:#}", read_metadata(&path).unwrap_err());
    std::fs::remove_dir_all(&dir).unwrap();
    assert!(err.contains(&format!("{}:4:", path.display())), "{err}");
    assert!(err.contains("expected"), "{err}");
}
