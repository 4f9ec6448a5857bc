//! Random scenes that satisfy a prompt strictly.

use crate::geneval::{Metadata, POSITION_THRESHOLD};
use crate::testbed::world::{color_rgb, Scene, Shape, CLASSES, COLORS, GRID, MAX_SHAPES};
use anyhow::{bail, Result};
use rand::Rng;
use serde::{Deserialize, Serialize};

/// Whole-scene placement attempts before [`scene_for`] gives up.
pub const MAX_ATTEMPTS: usize = 2000;

/// A relation asked for by a position clause must hold with this margin: the normalised revised
/// offset along the relation's axis (GenEval needs > 0.5) must exceed it. It keeps the relation true
/// for the detector's boxes when blur or noise moves a box edge by a pixel.
pub const RELATION_MARGIN: f64 = 0.7;

/// A random scene that satisfies `meta` strictly: exactly the objects its include clauses ask for
/// (no distractors), with the requested colours (random palette colours where none is asked), each in
/// its own cell of the grid ([`Shape::in_cell`]), and every position clause's relation holding with
/// [`RELATION_MARGIN`] between all objects of the clause and all objects of its target clause.
///
/// Errors for unknown classes or colours, more than [`MAX_SHAPES`] objects, two include clauses of
/// the same class (the detector could not tell their objects apart, so no image satisfies the
/// prompt strictly), an exclude clause that contradicts an include clause, or when
/// [`MAX_ATTEMPTS`] random placements all fail.
pub fn scene_for(meta: &Metadata, rng: &mut impl Rng) -> Result<Scene> {
    scene_in(meta, RelationLayout::Anywhere, rng)
}

/// Where a scene puts the objects of a position clause.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RelationLayout {
    /// Anywhere the relation holds.
    #[default]
    Anywhere,
    /// The clause's objects on the edge of the grid its relation names ("left of": the first
    /// column), its target's on the opposite edge, anywhere along them: the relation then holds
    /// wherever along the edges the two objects are.
    Edges,
}

/// The edge of the grid ("left of": the first column) that `layout` keeps clause `ci`'s objects on,
/// as (a column?, the last one?); `None` where the clause may go anywhere.
fn edge_of(meta: &Metadata, ci: usize, layout: RelationLayout) -> Option<(bool, bool)> {
    if layout == RelationLayout::Anywhere {
        return None;
    }
    let side = |rel: &str| match rel {
        "left of" => Some((true, false)),
        "right of" => Some((true, true)),
        "above" => Some((false, false)),
        "below" => Some((false, true)),
        _ => None,
    };
    if let Some((rel, _)) = &meta.include[ci].position {
        return side(rel);
    }
    meta.include.iter().find_map(|inc| match &inc.position {
        Some((rel, t)) if *t == ci => side(rel).map(|(cols, high)| (cols, !high)),
        _ => None,
    })
}

/// [`scene_for`] with the objects of position clauses placed as `layout` says.
pub fn scene_in(meta: &Metadata, layout: RelationLayout, rng: &mut impl Rng) -> Result<Scene> {
    let mut total = 0usize;
    for (i, inc) in meta.include.iter().enumerate() {
        if !CLASSES.contains(&inc.class.as_str()) {
            bail!(
                "{:?}: unknown class {:?} (the shapes world has {})",
                meta.prompt,
                inc.class,
                CLASSES.join(", ")
            );
        }
        if let Some(c) = &inc.color {
            if color_rgb(c).is_none() {
                let names: Vec<&str> = COLORS.iter().map(|(n, _)| *n).collect();
                bail!(
                    "{:?}: unknown colour {c:?} (the shapes world has {})",
                    meta.prompt,
                    names.join(", ")
                );
            }
        }
        if meta.include[..i].iter().any(|o| o.class == inc.class) {
            bail!(
                "{:?}: two include clauses of class {:?} cannot be satisfied strictly",
                meta.prompt,
                inc.class
            );
        }
        if let Some((_, t)) = &inc.position {
            if *t >= i {
                bail!(
                    "{:?}: position target {t} is not an earlier clause",
                    meta.prompt
                );
            }
        }
        total += inc.count as usize;
    }
    if total > MAX_SHAPES {
        bail!(
            "{:?}: {total} objects, the shapes world holds at most {MAX_SHAPES}",
            meta.prompt
        );
    }
    for exc in &meta.exclude {
        let asked: u32 = meta
            .include
            .iter()
            .filter(|i| i.class == exc.class)
            .map(|i| i.count)
            .sum();
        if asked >= exc.count {
            bail!(
                "{:?}: include asks for {asked} {} but exclude forbids {}",
                meta.prompt,
                exc.class,
                exc.count
            );
        }
    }

    'attempt: for _ in 0..MAX_ATTEMPTS {
        let mut shapes: Vec<Shape> = Vec::with_capacity(total);
        let mut clause_of: Vec<usize> = Vec::with_capacity(total);
        let mut cells: Vec<usize> = Vec::with_capacity(total);
        for (ci, inc) in meta.include.iter().enumerate() {
            for _ in 0..inc.count {
                let color = match &inc.color {
                    Some(c) => c.clone(),
                    None => COLORS[rng.random_range(0..COLORS.len())].0.to_string(),
                };
                // A free cell: `cells` holds the ones taken (at most MAX_SHAPES < GRID²).
                let edge = edge_of(meta, ci, layout);
                let on_edge = |c: usize| {
                    edge.is_none_or(|(cols, last)| {
                        let k = if cols { c % GRID } else { c / GRID };
                        k == if last { GRID - 1 } else { 0 }
                    })
                };
                let free: Vec<usize> = (0..GRID * GRID)
                    .filter(|&c| !cells.contains(&c) && on_edge(c))
                    .collect();
                if free.is_empty() {
                    continue 'attempt;
                }
                let cell = free[rng.random_range(0..free.len())];
                cells.push(cell);
                let s = Shape::in_cell(&inc.class, &color, cell % GRID, cell / GRID);
                shapes.push(s);
                clause_of.push(ci);
            }
        }
        for (ci, inc) in meta.include.iter().enumerate() {
            let Some((rel, target)) = &inc.position else {
                continue;
            };
            for (a, _) in shapes.iter().zip(&clause_of).filter(|(_, c)| **c == ci) {
                for (b, _) in shapes.iter().zip(&clause_of).filter(|(_, c)| *c == target) {
                    if relation_strength(&a.bbox(), &b.bbox(), rel) <= RELATION_MARGIN {
                        continue 'attempt;
                    }
                }
            }
        }
        return Ok(Scene { shapes });
    }
    bail!(
        "{:?}: no scene found in {MAX_ATTEMPTS} random placements",
        meta.prompt
    )
}

/// How strongly box `a` is `rel` of box `b`: GenEval's normalised revised offset along the
/// relation's axis, signed so that larger is stronger (GenEval: relation holds when > 0.5).
pub fn relation_strength(a: &[f32; 4], b: &[f32; 4], rel: &str) -> f64 {
    let c = |r: &[f32; 4], k: usize| (r[k] as f64 + r[k + 2] as f64) / 2.0;
    let d = |r: &[f32; 4], k: usize| (r[k + 2] as f64 - r[k] as f64).abs();
    let off = [c(a, 0) - c(b, 0), c(a, 1) - c(b, 1)];
    let norm = off[0].hypot(off[1]);
    if norm == 0.0 {
        return 0.0;
    }
    let revised = |k: usize| {
        (off[k].abs() - POSITION_THRESHOLD * (d(a, k) + d(b, k))).max(0.0) * off[k].signum()
    };
    match rel {
        "left of" => -revised(0) / norm,
        "right of" => revised(0) / norm,
        "above" => -revised(1) / norm,
        "below" => revised(1) / norm,
        _ => f64::NEG_INFINITY,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::geneval::relative_position;
    use crate::testbed::prompts;
    use rand::SeedableRng;

    #[test]
    fn strength_agrees_with_relative_position() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(9);
        for _ in 0..2000 {
            let mut bx = || {
                let x = rng.random_range(0.0..24.0f32);
                let y = rng.random_range(0.0..24.0f32);
                let s = rng.random_range(3.0..9.0f32);
                [x, y, x + s, y + s]
            };
            let (a, b) = (bx(), bx());
            let rels = relative_position(&a, &b);
            for r in crate::geneval::RELATIONS {
                assert_eq!(
                    relation_strength(&a, &b, r) > 0.5,
                    rels.contains(&r),
                    "{a:?} {b:?} {r}"
                );
            }
        }
    }

    #[test]
    fn scenes_put_one_shape_per_cell_and_satisfy_the_prompt() {
        use crate::testbed::world::{CELL, MARGIN, SHAPE_SIZE, SIZE};
        let mut rng = rand::rngs::StdRng::seed_from_u64(3);
        let mut used = std::collections::BTreeSet::new();
        for m in &crate::testbed::all_prompts() {
            let scene = scene_for(m, &mut rng).unwrap();
            let mut cells = std::collections::BTreeSet::new();
            for s in &scene.shapes {
                let b = s.bbox();
                assert_eq!(s.size, SHAPE_SIZE);
                let (x0, y0) = (b[0] as usize, b[1] as usize);
                assert_eq!((x0 % CELL, y0 % CELL), (MARGIN, MARGIN), "{b:?}");
                assert!(b[2] as usize <= SIZE && b[3] as usize <= SIZE, "{b:?}");
                assert!(
                    cells.insert((x0 / CELL, y0 / CELL)),
                    "two shapes in one cell: {scene:?}"
                );
            }
            used.extend(cells);
            assert!(
                crate::testbed::score_image(m, &scene.render()).strict,
                "{m:?}"
            );
        }
        assert_eq!(used.len(), GRID * GRID, "every cell is used by some scene");
    }

    #[test]
    fn edges_put_each_object_of_a_relation_on_its_edge() {
        use crate::testbed::world::CELL;
        let mut rng = rand::rngs::StdRng::seed_from_u64(5);
        let (first, last) = (CELL as f32, (GRID - 1) as f32 * CELL as f32);
        let mut n = 0;
        for m in crate::testbed::all_prompts()
            .iter()
            .filter(|m| m.tag == "position")
        {
            for _ in 0..4 {
                let scene = scene_in(m, RelationLayout::Edges, &mut rng).unwrap();
                assert!(crate::testbed::score_image(m, &scene.render()).strict);
                let (rel, target) = m.include[1].position.clone().unwrap();
                assert_eq!(target, 0);
                let (subj, other) = (&scene.shapes[1], &scene.shapes[0]);
                let (s, o) = match rel.as_str() {
                    "left of" => (subj.cx < first, other.cx > last),
                    "right of" => (subj.cx > last, other.cx < first),
                    "above" => (subj.cy < first, other.cy > last),
                    _ => (subj.cy > last, other.cy < first),
                };
                assert!(s && o, "{rel}: {scene:?}");
                n += 1;
            }
        }
        assert!(n > 0);
        // Prompts without a position clause are drawn exactly as by `scene_for`.
        let m = &crate::testbed::all_prompts()[0];
        let a = scene_in(
            m,
            RelationLayout::Edges,
            &mut rand::rngs::StdRng::seed_from_u64(1),
        );
        let b = scene_for(m, &mut rand::rngs::StdRng::seed_from_u64(1));
        assert_eq!(format!("{:?}", a.unwrap()), format!("{:?}", b.unwrap()));
    }

    #[test]
    fn impossible_prompts_are_errors() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(0);
        let mut m = prompts::single_object("circle");
        m.include[0].class = "hexagon".into();
        assert!(format!("{:#}", scene_for(&m, &mut rng).unwrap_err()).contains("unknown class"));
        let mut m = prompts::colors("circle", "red");
        m.include[0].color = Some("brown".into());
        assert!(format!("{:#}", scene_for(&m, &mut rng).unwrap_err()).contains("unknown colour"));
        let m = prompts::counting("square", 5);
        assert!(format!("{:#}", scene_for(&m, &mut rng).unwrap_err()).contains("at most 4"));
        let m = prompts::two_object("circle", "circle");
        assert!(
            format!("{:#}", scene_for(&m, &mut rng).unwrap_err()).contains("two include clauses")
        );
        let mut m = prompts::counting("square", 2);
        m.exclude[0].count = 2;
        assert!(format!("{:#}", scene_for(&m, &mut rng).unwrap_err()).contains("exclude forbids"));
    }
}
