//! The exact detector of the shapes world.
//!
//! 1. **Pixel labels.** A pixel `p` is compared with every palette colour `c` along the line from
//!    the background `b` to `c`: `t = (p − b)·(c − b) / |c − b|²` is how far along the line it is
//!    (`t = 1` is the pure colour; the 50 % mix of a blurred edge is `t = 0.5`) and the residual
//!    `|p − b − t (c − b)|` how far off the line. The pixel takes the colour with the smallest
//!    residual if `t ≥` [`MIN_ALPHA`] and the residual is at most [`MAX_RESIDUAL`]; otherwise it is
//!    background (off-palette pixels included). Compared with a plain nearest-colour rule this keeps
//!    the soft edges of blurred or generated shapes from being read as a third colour (the mix of
//!    yellow and the background is not "orange"), and puts the object boundary at the 50 % level.
//! 2. **Components.** 8-connected components of equal labels (shapes are kept [`GAP`](crate::testbed::GAP)
//!    background pixels apart, so they never touch, even blurred); components under
//!    [`MIN_PIXELS`] pixels (specks of noise) are dropped. The box of a detection is the box of the
//!    component's labelled pixels.
//! 3. **Class** from two moments of the component's *soft mass* (each pixel weighted by its
//!    position along the line, over the labelled pixels and a [`RING`] of unlabelled pixels
//!    around them, so that the mass a blur moves out of the labelled set still counts; see
//!    [`Component::mass`]): the
//!    four-fold moment `(μ40 + μ04 − 6 μ22) / (μ20 + μ02)²` (square ≈ −0.6, disc 0, diamond
//!    ≈ +0.6) and the vertical skewness `μ03 / μ02^1.5` (triangle, apex up, ≈ −0.6; the others 0).
//!    A symmetric blur leaves the third moments and the four-fold numerator unchanged and only
//!    adds its variance to the denominators, so both features keep their sign and most of their
//!    size. The nearest prototype wins; the decision boundaries lie near four-fold ±0.25 and
//!    skewness −0.25, and at the world's [`SHAPE_SIZE`](crate::testbed::SHAPE_SIZE) and larger, clean or 3×3-blurred, every class
//!    stays ≥ 0.1 away from them (Gaussian noise of σ = 8 after the blur spreads the four-fold
//!    moment by about ±0.1). Components that
//!    are not roughly round or square in outline (box aspect or moment elongation beyond
//!    [`MAX_ASPECT`]) or too sparse (soft mass under [`MIN_FILL`] of the box) are no object of this
//!    world and are dropped, like a detector that finds nothing there.
//! 4. **Confidence** in (0, 1]: `1 / (1 + d²)` for the scaled distance `d` to the class prototype,
//!    times a size factor (blobs under 36 pixels are less certain), so that GenEval's "most
//!    confident first" ordering prefers clean, full-sized shapes. **Colour**: the label.

use crate::geneval::{score, Detection, Metadata, Outcome};
use crate::image::Image;
use crate::testbed::world::{BACKGROUND, COLORS};

/// Minimum position along the background→colour line for a pixel to belong to a shape.
pub const MIN_ALPHA: f32 = 0.5;

/// Largest distance (RGB units) of a pixel from its colour's line.
pub const MAX_RESIDUAL: f32 = 60.0;

/// Components smaller than this are noise. The smallest shapes (size-9 triangle and diamond) have
/// 41 pixels, 37 after a 3×3 blur.
pub const MIN_PIXELS: usize = 16;

/// Largest ratio of the longer to the shorter side of a component's box.
pub const MAX_ASPECT: f32 = 1.6;

/// Smallest fill ratio of a component's box.
pub const MIN_FILL: f32 = 0.3;

/// Pixels at which a component is fully confident about its size (a size-9 diamond has 41).
const FULL_CONFIDENCE_PIXELS: f32 = 36.0;

/// Ideal (four-fold moment, skewness) per class, and the feature scales of the class distance.
const PROTOTYPES: [(&str, f32, f32); 4] = [
    ("circle", 0.03, 0.0),
    ("square", -0.52, 0.0),
    ("triangle", 0.07, -0.5),
    ("diamond", 0.48, 0.0),
];
const HARMONIC_SCALE: f32 = 0.25;
const SKEW_SCALE: f32 = 0.25;

/// Per-pixel palette label (index into [`COLORS`]), `None` for background.
pub fn label_pixels(img: &Image) -> Vec<Option<usize>> {
    let bg = BACKGROUND.map(|v| v as f32);
    let dirs: Vec<([f32; 3], f32)> = COLORS
        .iter()
        .map(|(_, c)| {
            let d = [0, 1, 2].map(|k| c[k] as f32 - bg[k]);
            (d, d.iter().map(|v| v * v).sum::<f32>())
        })
        .collect();
    img.data
        .chunks_exact(3)
        .map(|p| {
            let q = [0, 1, 2].map(|k| p[k] as f32 - bg[k]);
            let mut best: Option<(usize, f32, f32)> = None;
            for (i, (d, n2)) in dirs.iter().enumerate() {
                let t = ((q[0] * d[0] + q[1] * d[1] + q[2] * d[2]) / n2).max(0.0);
                let r2: f32 = (0..3).map(|k| (q[k] - t * d[k]).powi(2)).sum();
                if best.is_none_or(|(_, _, b)| r2 < b) {
                    best = Some((i, t, r2));
                }
            }
            let (i, t, r2) = best?;
            (t >= MIN_ALPHA && r2 <= MAX_RESIDUAL * MAX_RESIDUAL).then_some(i)
        })
        .collect()
}

/// Position of pixel `p` along the background→`color` line and its squared distance from it.
fn along(p: &[u8], color: usize) -> (f32, f32) {
    let c = COLORS[color].1;
    let d = [0, 1, 2].map(|k| c[k] as f32 - BACKGROUND[k] as f32);
    let q = [0, 1, 2].map(|k| p[k] as f32 - BACKGROUND[k] as f32);
    let n2: f32 = d.iter().map(|v| v * v).sum();
    let t = (q[0] * d[0] + q[1] * d[1] + q[2] * d[2]) / n2;
    let r2 = (0..3).map(|k| (q[k] - t * d[k]).powi(2)).sum();
    (t, r2)
}

/// Shape features of one connected component.
#[derive(Debug, Clone, PartialEq)]
pub struct Component {
    /// Index into [`COLORS`].
    pub color: usize,
    /// Pixels carrying the label.
    pub pixels: usize,
    /// `[x0, y0, x1, y1]` of the labelled pixels, x1/y1 exclusive.
    pub bbox: [usize; 4],
    /// Soft mass: the sum over the labelled pixels and the [`RING`] of pixels around them of each
    /// pixel's weight, its position `t` along the background→colour line ramped from 0 at
    /// [`WEIGHT_FLOOR`] to 1 at the pure colour. A blur moves mass into the ring but (up to the
    /// floor) does not change the sum, nor (for a symmetric kernel) the moments below except for
    /// adding the kernel's own variance.
    pub mass: f32,
    /// Soft mass / box area.
    pub fill: f32,
    /// Four-fold moment `(μ40 + μ04 − 6 μ22) / (μ20 + μ02)²`: 0 for a disc, −0.6 for an
    /// axis-aligned square, +0.6 for a diamond (continuous shapes, central moments of the soft mass).
    pub harmonic4: f32,
    /// Vertical skewness `μ03 / μ02^1.5`: −0.57 for a triangle with its apex up, 0 for the others.
    pub skew: f32,
    /// `sqrt(λmax / λmin)` of the second-moment matrix: 1 for all classes but the triangle (1.15).
    pub elongation: f32,
}

impl Component {
    pub fn width(&self) -> usize {
        self.bbox[2] - self.bbox[0]
    }
    pub fn height(&self) -> usize {
        self.bbox[3] - self.bbox[1]
    }
}

/// Width in pixels of the ring of unlabelled pixels around a component whose soft mass counts for it
/// (a 3×3 blur moves mass up to 2 pixels from the labelled set: 1 beyond the true edge, whose
/// thin tips may have dropped below [`MIN_ALPHA`]). Ring pixels go to the nearest component.
pub const RING: usize = 2;

/// Position along the background→colour line below which a pixel has no weight in the soft mass
/// (see [`Component::mass`]).
pub const WEIGHT_FLOOR: f32 = 0.1;

/// 8-connected components of equal palette labels, at least [`MIN_PIXELS`] pixels, in scan order
/// of their first pixel.
pub fn components(img: &Image) -> Vec<Component> {
    let (w, h) = (img.width, img.height);
    let labels = label_pixels(img);
    let neighbours = |i: usize| {
        let (x, y) = (i % w, i / w);
        (y.saturating_sub(1)..(y + 2).min(h))
            .flat_map(move |ny| (x.saturating_sub(1)..(x + 2).min(w)).map(move |nx| ny * w + nx))
    };
    // Connected components of the labels.
    let mut seen = vec![false; w * h];
    let mut comps: Vec<(usize, Vec<usize>)> = Vec::new();
    let mut stack = Vec::new();
    for start in 0..w * h {
        let Some(color) = labels[start] else {
            continue;
        };
        if seen[start] {
            continue;
        }
        seen[start] = true;
        stack.push(start);
        let mut members = Vec::new();
        while let Some(i) = stack.pop() {
            members.push(i);
            for j in neighbours(i) {
                if !seen[j] && labels[j] == Some(color) {
                    seen[j] = true;
                    stack.push(j);
                }
            }
        }
        if members.len() >= MIN_PIXELS {
            comps.push((color, members));
        }
    }
    // Rings: unlabelled pixels within RING of a component, owned by the nearest one (breadth-first
    // from all components at once).
    let mut owner: Vec<Option<usize>> = vec![None; w * h];
    let mut frontier: Vec<usize> = Vec::new();
    for (k, (_, members)) in comps.iter().enumerate() {
        for &i in members {
            owner[i] = Some(k);
            frontier.push(i);
        }
    }
    let mut rings: Vec<Vec<usize>> = vec![Vec::new(); comps.len()];
    for _ in 0..RING {
        let mut next = Vec::new();
        for &i in &frontier {
            let k = owner[i];
            for j in neighbours(i) {
                if labels[j].is_none() && owner[j].is_none() {
                    owner[j] = k;
                    if let Some(k) = k {
                        rings[k].push(j);
                    }
                    next.push(j);
                }
            }
        }
        frontier = next;
    }
    comps
        .iter()
        .zip(&rings)
        .map(|((color, members), ring)| features(img, *color, members, ring))
        .collect()
}

/// Features of one component from its labelled pixels and its ring.
fn features(img: &Image, color: usize, members: &[usize], ring: &[usize]) -> Component {
    let w = img.width;
    let (mut x0, mut y0, mut x1, mut y1) = (usize::MAX, usize::MAX, 0, 0);
    for &i in members {
        let (x, y) = (i % w, i / w);
        x0 = x0.min(x);
        y0 = y0.min(y);
        x1 = x1.max(x + 1);
        y1 = y1.max(y + 1);
    }
    // Soft weights: the position along the background→colour line, ramped from 0 at WEIGHT_FLOOR
    // to 1 at the pure colour. The floor keeps the background's noise (which the far-reaching
    // fourth moments amplify) out; the ramp, unlike a hard cut, changes the weights only a little
    // when noise moves a faint blurred pixel across it. Pixels far off the line (other colours,
    // junk) weigh nothing.
    let weight = |i: usize| {
        let (t, r2) = along(&img.data[3 * i..3 * i + 3], color);
        if r2 > MAX_RESIDUAL * MAX_RESIDUAL {
            0.0
        } else {
            ((t - WEIGHT_FLOOR) / (1.0 - WEIGHT_FLOOR)).clamp(0.0, 1.0)
        }
    };
    let pts: Vec<(f32, f32, f32)> = members
        .iter()
        .chain(ring)
        .map(|&i| ((i % w) as f32, (i / w) as f32, weight(i)))
        .collect();
    let mass: f32 = pts.iter().map(|p| p.2).sum::<f32>().max(1e-3);
    let mx = pts.iter().map(|p| p.0 * p.2).sum::<f32>() / mass;
    let my = pts.iter().map(|p| p.1 * p.2).sum::<f32>() / mass;
    let moment = |a: i32, b: i32| {
        pts.iter()
            .map(|&(x, y, wt)| wt * (x - mx).powi(a) * (y - my).powi(b))
            .sum::<f32>()
            / mass
    };
    let (m20, m02, m11) = (moment(2, 0), moment(0, 2), moment(1, 1));
    let (m40, m04, m22, m03) = (moment(4, 0), moment(0, 4), moment(2, 2), moment(0, 3));
    let half_trace = (m20 + m02) / 2.0;
    let disc = (((m20 - m02) / 2.0).powi(2) + m11 * m11).sqrt();
    let (lmax, lmin) = (half_trace + disc, (half_trace - disc).max(1e-6));
    Component {
        color,
        pixels: members.len(),
        bbox: [x0, y0, x1, y1],
        mass,
        fill: mass / ((x1 - x0) * (y1 - y0)) as f32,
        harmonic4: (m40 + m04 - 6.0 * m22) / (m20 + m02).max(1e-6).powi(2),
        skew: m03 / m02.max(1e-6).powf(1.5),
        elongation: (lmax / lmin).sqrt(),
    }
}

/// Class and confidence of a component, `None` when it is no object of this world.
pub fn classify(c: &Component) -> Option<(&'static str, f32)> {
    let (w, h) = (c.width() as f32, c.height() as f32);
    if w.max(h) > MAX_ASPECT * w.min(h) || c.elongation > MAX_ASPECT || c.fill < MIN_FILL {
        return None;
    }
    let (class, dist) = PROTOTYPES
        .iter()
        .map(|(name, h4, skew)| {
            let d = ((c.harmonic4 - h4) / HARMONIC_SCALE).powi(2)
                + ((c.skew - skew) / SKEW_SCALE).powi(2);
            (*name, d.sqrt())
        })
        .min_by(|a, b| a.1.total_cmp(&b.1))?;
    let fit = 1.0 / (1.0 + dist * dist);
    let size = (c.pixels as f32 / FULL_CONFIDENCE_PIXELS).min(1.0);
    Some((class, (fit * size).max(1e-3)))
}

/// Detect the shapes of an image.
pub fn detect(img: &Image) -> Vec<Detection> {
    components(img)
        .iter()
        .filter_map(|c| {
            let (class, confidence) = classify(c)?;
            Some(Detection {
                class: class.to_string(),
                bbox: c.bbox.map(|v| v as f32),
                color: Some(COLORS[c.color].0.to_string()),
                confidence,
            })
        })
        .collect()
}

/// GenEval's verdict on an image of the shapes world: `score(meta, &detect(img))`.
pub fn score_image(meta: &Metadata, img: &Image) -> Outcome {
    score(meta, &detect(img))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testbed::{Scene, Shape, CLASSES, SHAPE_SIZE, SIZE};

    /// The world's shape size and two larger ones: the detector is not tied to one size.
    const SHAPE_SIZES: [u32; 3] = [SHAPE_SIZE, 11, 13];
    use rand::SeedableRng;

    fn shape(class: &str, color: &str, x0: u32, y0: u32, size: u32) -> Shape {
        Shape {
            class: class.into(),
            color: color.into(),
            cx: x0 as f32 + size as f32 / 2.0,
            cy: y0 as f32 + size as f32 / 2.0,
            size,
        }
    }

    /// Every class, size and colour, clean, blurred and blurred + noisy, at two places.
    #[test]
    fn every_shape_detected() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(5);
        for class in CLASSES {
            for size in SHAPE_SIZES {
                for (color, _) in COLORS {
                    for (x0, y0) in [(1, 2), (SIZE as u32 - size - 1, 12)] {
                        let s = shape(class, color, x0, y0, size);
                        let clean = Scene {
                            shapes: vec![s.clone()],
                        }
                        .render();
                        let blurred = clean.box_blur3();
                        let mut noisy = blurred.clone();
                        noisy.add_noise(8.0, &mut rng);
                        for (kind, img) in [("clean", clean), ("blur", blurred), ("noisy", noisy)] {
                            let d = detect(&img);
                            assert_eq!(d.len(), 1, "{kind} {s:?}: {d:?}");
                            assert_eq!(d[0].class, class, "{kind} {s:?}: {:?}", components(&img));
                            assert_eq!(d[0].color.as_deref(), Some(color), "{kind} {s:?}");
                            // Blur loses the 1-pixel tips (a triangle's two top rows are 1
                            // pixel wide: noise may cost the second one too).
                            let tol = match kind {
                                "clean" => 0.0,
                                "blur" => 1.0,
                                _ => 2.0,
                            };
                            let off = d[0].bbox.iter().zip(s.bbox()).map(|(a, b)| (a - b).abs());
                            assert!(off.fold(0.0, f32::max) <= tol, "{kind} {s:?}: {d:?}");
                            assert!(d[0].confidence > 0.5, "{kind} {s:?}: {d:?}");
                        }
                    }
                }
            }
        }
    }

    /// The features stay ≥ 0.1 from the decision boundaries (four-fold ±0.25, skew −0.25) with no
    /// noise; values printed with --nocapture.
    #[test]
    fn feature_margins() {
        for class in CLASSES {
            for size in SHAPE_SIZES {
                let img = Scene {
                    shapes: vec![shape(class, "blue", 8, 8, size)],
                }
                .render();
                for (kind, im) in [("clean", img.clone()), ("blur", img.box_blur3())] {
                    let c = &components(&im)[0];
                    println!(
                        "{class:9} {size:2} {kind:5} four-fold {:+.3} skew {:+.3} elongation {:.3}",
                        c.harmonic4, c.skew, c.elongation
                    );
                    let (h, k) = (c.harmonic4, c.skew);
                    match class {
                        "circle" => assert!(h.abs() < 0.15 && k.abs() < 0.05),
                        "square" => assert!(h < -0.4 && k.abs() < 0.05),
                        "diamond" => assert!(h > 0.4 && k.abs() < 0.05),
                        _ => assert!(k < -0.45 && h.abs() < 0.15),
                    }
                }
            }
        }
    }

    #[test]
    fn noise_and_junk_are_not_objects() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(2);
        // Strong noise on an empty image.
        let mut img = Image::new(SIZE, SIZE, BACKGROUND);
        img.add_noise(20.0, &mut rng);
        assert!(detect(&img).is_empty());
        // Specks of palette colours.
        let mut img = Image::new(SIZE, SIZE, BACKGROUND);
        for k in 0..30 {
            let (x, y) = ((k * 7) % SIZE, (k * 11) % SIZE);
            img.set_pixel(x, y, COLORS[k % COLORS.len()].1);
        }
        assert!(detect(&img).is_empty());
        // A line 2 pixels thick, 20 long.
        let mut img = Image::new(SIZE, SIZE, BACKGROUND);
        for x in 4..24 {
            img.set_pixel(x, 10, COLORS[0].1);
            img.set_pixel(x, 11, COLORS[0].1);
        }
        assert!(detect(&img).is_empty(), "{:?}", components(&img));
        // An off-palette (brown, dark grey) square: background.
        let mut img = Image::new(SIZE, SIZE, BACKGROUND);
        for y in 5..15 {
            for x in 5..15 {
                img.set_pixel(x, y, if x < 10 { [120, 70, 30] } else { [70, 70, 70] });
            }
        }
        assert!(detect(&img).is_empty(), "{:?}", detect(&img));
    }

    #[test]
    fn touching_shapes_of_different_colours_stay_apart() {
        let img = Scene {
            shapes: vec![
                shape("square", "red", 4, 4, 11),
                shape("square", "blue", 15, 4, 11),
            ],
        }
        .render();
        let d = detect(&img);
        assert_eq!(d.len(), 2);
        assert_eq!(d[0].bbox, [4.0, 4.0, 15.0, 15.0]);
        assert_eq!(d[1].bbox, [15.0, 4.0, 26.0, 15.0]);
    }

    #[test]
    fn confidence_prefers_clean_full_shapes() {
        // A small, ragged blob (a 5×5 square) is less confident than a clean 11-pixel square.
        let mut img = Scene {
            shapes: vec![shape("square", "green", 2, 2, 11)],
        }
        .render();
        for y in 20..25 {
            for x in 20..25 {
                img.set_pixel(x, y, COLORS[3].1);
            }
        }
        let d = detect(&img);
        assert_eq!(d.len(), 2);
        assert!(d[0].confidence > d[1].confidence, "{d:?}");
    }
}
