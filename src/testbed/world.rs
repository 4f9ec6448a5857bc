//! The shapes world itself: image size, the grid of cells, classes, palette, background, and the
//! [`Scene`] of flat shapes an image shows.
//!
//! * a [`GRID`]×[`GRID`] grid of [`CELL`]-pixel cells, one per patch of the shapes model, so that one
//!   image token draws one object; a shape fills its cell but for [`MARGIN`] pixels on the top and
//!   left and [`GAP`]` − MARGIN` on the bottom and right, so that two shapes in neighbouring cells are
//!   [`GAP`] background pixels apart (a 3×3 blur never joins them, nor mixes their blurred edges);
//! * classes: [`CLASSES`] (circle, square, triangle pointing up, diamond), all [`SHAPE_SIZE`] pixels
//!   (odd, so every shape has a centre column and its apex pixel);
//! * colours: [`COLORS`], GenEval colour names, on [`BACKGROUND`];
//! * at most [`MAX_SHAPES`] shapes per scene.

use crate::image::Image;
use serde::{Deserialize, Serialize};

/// Cells per image side.
pub const GRID: usize = 4;

/// Cell side in pixels (the shapes model's patch size).
pub const CELL: usize = 12;

/// Image side in pixels.
pub const SIZE: usize = GRID * CELL;

/// Object classes (GenEval's `class` field).
pub const CLASSES: [&str; 4] = ["circle", "square", "triangle", "diamond"];

/// Plural forms for counting prompts, in the order of [`CLASSES`].
pub const PLURALS: [&str; 4] = ["circles", "squares", "triangles", "diamonds"];

/// The palette: GenEval colour names and their RGB values. Chosen far apart from each other and from
/// [`BACKGROUND`] along the lines the detector uses (background → colour); no brown (it lies on the
/// background→orange line) and no black (the background).
pub const COLORS: [(&str, [u8; 3]); 7] = [
    ("red", [220, 40, 40]),
    ("orange", [250, 140, 20]),
    ("yellow", [240, 220, 40]),
    ("green", [40, 180, 60]),
    ("blue", [40, 90, 230]),
    ("purple", [150, 60, 210]),
    ("white", [235, 235, 235]),
];

/// Plain background colour (dark grey).
pub const BACKGROUND: [u8; 3] = [32, 32, 32];

/// Shape size (bounding-box side in pixels) used by [`scene_for`]. Odd, so that every shape is
/// symmetric about a pixel column; not 7: a 7-pixel disc is an octagon halfway to a diamond, and a
/// 3×3 blur erases too much of a 7-pixel triangle's tip (see `detect`'s tests).
pub const SHAPE_SIZE: u32 = 9;

/// Most shapes in one scene (counting prompts go up to four).
pub const MAX_SHAPES: usize = 4;

/// Background pixels between the bounding boxes of two shapes in neighbouring cells.
pub const GAP: usize = CELL - SHAPE_SIZE as usize;

/// Offset in pixels of a shape's bounding box from its cell's top-left corner (and so the least
/// distance from the image border).
pub const MARGIN: usize = 1;

/// RGB of a palette colour name.
pub fn color_rgb(name: &str) -> Option<[u8; 3]> {
    COLORS.iter().find(|(n, _)| *n == name).map(|(_, c)| *c)
}

/// Plural of a class name.
pub fn plural(class: &str) -> Option<&'static str> {
    CLASSES.iter().position(|c| *c == class).map(|i| PLURALS[i])
}

/// One flat shape. Its bounding box is the square of side `size` centred at (`cx`, `cy`); a pixel is
/// painted when its centre lies strictly inside the shape. [`scene_for`] places shapes in cells
/// ([`Shape::in_cell`]) on the pixel grid (`cx − size/2` and `cy − size/2` whole numbers), which makes
/// the painted pixels fill that bounding box exactly.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Shape {
    pub class: String,
    pub color: String,
    pub cx: f32,
    pub cy: f32,
    pub size: u32,
}

impl Shape {
    /// A [`SHAPE_SIZE`] shape in the cell at `col`, `row` (counted from the top-left corner).
    pub fn in_cell(class: &str, color: &str, col: usize, row: usize) -> Shape {
        let h = SHAPE_SIZE as f32 / 2.0;
        Shape {
            class: class.to_string(),
            color: color.to_string(),
            cx: (col * CELL + MARGIN) as f32 + h,
            cy: (row * CELL + MARGIN) as f32 + h,
            size: SHAPE_SIZE,
        }
    }

    /// `[x0, y0, x1, y1]` of the shape's square (pixels, x1/y1 exclusive).
    pub fn bbox(&self) -> [f32; 4] {
        let h = self.size as f32 / 2.0;
        [self.cx - h, self.cy - h, self.cx + h, self.cy + h]
    }

    /// Whether the point (`x`, `y`) (pixel units) lies inside the shape.
    pub fn contains(&self, x: f32, y: f32) -> bool {
        let h = self.size as f32 / 2.0;
        let (u, v) = ((x - self.cx) / h, (y - self.cy) / h);
        match self.class.as_str() {
            "square" => u.abs() < 1.0 && v.abs() < 1.0,
            "circle" => u * u + v * v < 1.0,
            // Apex at the top, base at the bottom, as wide as tall.
            "triangle" => v.abs() < 1.0 && u.abs() < (v + 1.0) / 2.0,
            "diamond" => u.abs() + v.abs() < 1.0,
            _ => false,
        }
    }

    /// Paint the shape (unknown classes or colours paint nothing).
    pub fn draw(&self, img: &mut Image) {
        let Some(rgb) = color_rgb(&self.color) else {
            return;
        };
        let [x0, y0, x1, y1] = self.bbox();
        let clip = |v: f32, max: usize| (v.floor().max(0.0) as usize).min(max);
        for y in clip(y0, img.height)..clip(y1 + 1.0, img.height) {
            for x in clip(x0, img.width)..clip(x1 + 1.0, img.width) {
                if self.contains(x as f32 + 0.5, y as f32 + 0.5) {
                    img.set_pixel(x, y, rgb);
                }
            }
        }
    }
}

/// A set of shapes on the background.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Scene {
    pub shapes: Vec<Shape>,
}

impl Scene {
    /// The [`SIZE`]×[`SIZE`] image of the scene.
    pub fn render(&self) -> Image {
        let mut img = Image::new(SIZE, SIZE, BACKGROUND);
        for s in &self.shapes {
            s.draw(&mut img);
        }
        img
    }
}
