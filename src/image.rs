//! RGB images (8 bits per channel, row-major), PNG output, grids and the degradations the
//! robustness tests apply (blur, noise).

use anyhow::{ensure, Context, Result};
use rand::Rng;
use std::path::Path;

/// An RGB image, 3 bytes per pixel, rows top to bottom.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Image {
    pub width: usize,
    pub height: usize,
    pub data: Vec<u8>,
}

impl Image {
    /// A `width × height` image filled with `rgb`.
    pub fn new(width: usize, height: usize, rgb: [u8; 3]) -> Self {
        Image {
            width,
            height,
            data: rgb.repeat(width * height),
        }
    }

    /// The pixel at column `x`, row `y`.
    pub fn pixel(&self, x: usize, y: usize) -> [u8; 3] {
        let i = 3 * (y * self.width + x);
        [self.data[i], self.data[i + 1], self.data[i + 2]]
    }

    pub fn set_pixel(&mut self, x: usize, y: usize, rgb: [u8; 3]) {
        let i = 3 * (y * self.width + x);
        self.data[i..i + 3].copy_from_slice(&rgb);
    }

    /// The image encoded as an 8-bit RGB PNG.
    pub fn png_bytes(&self) -> Result<Vec<u8>> {
        ensure!(
            self.data.len() == 3 * self.width * self.height && self.width > 0 && self.height > 0,
            "image {}x{} with {} bytes cannot be written as PNG",
            self.width,
            self.height,
            self.data.len()
        );
        let mut out = Vec::new();
        {
            let mut enc = png::Encoder::new(&mut out, self.width as u32, self.height as u32);
            enc.set_color(png::ColorType::Rgb);
            enc.set_depth(png::BitDepth::Eight);
            let mut writer = enc.write_header()?;
            writer.write_image_data(&self.data)?;
            writer.finish()?;
        }
        Ok(out)
    }

    /// Decode an 8-bit RGB or RGBA PNG (alpha dropped); anything else is an error naming its format.
    pub fn from_png_bytes(bytes: &[u8]) -> Result<Self> {
        let dec = png::Decoder::new(std::io::Cursor::new(bytes));
        let mut reader = dec.read_info()?;
        let mut buf = vec![0u8; reader.output_buffer_size()];
        let info = reader.next_frame(&mut buf)?;
        ensure!(
            info.bit_depth == png::BitDepth::Eight
                && matches!(info.color_type, png::ColorType::Rgb | png::ColorType::Rgba),
            "PNG is {:?} {:?}: expected 8-bit RGB or RGBA",
            info.color_type,
            info.bit_depth
        );
        let (w, h) = (info.width as usize, info.height as usize);
        let ch = if info.color_type == png::ColorType::Rgba {
            4
        } else {
            3
        };
        let data = buf[..w * h * ch]
            .chunks(ch)
            .flat_map(|p| [p[0], p[1], p[2]])
            .collect();
        Ok(Self {
            width: w,
            height: h,
            data,
        })
    }

    /// Write as PNG, atomically: a temporary file next to `path`, then a rename. Creates the parent
    /// folder if needed.
    pub fn to_png(&self, path: &Path) -> Result<()> {
        let bytes = self.png_bytes()?;
        crate::io::write_atomic(path, &bytes)
            .with_context(|| format!("writing PNG {}", path.display()))
    }

    /// Shrunk by the whole factor `k` (the mean of each `k × k` block; a partial last block is dropped).
    pub fn downscale(&self, k: usize) -> Image {
        let k = k.max(1);
        let (w, h) = ((self.width / k).max(1), (self.height / k).max(1));
        let mut out = Image::new(w, h, [0, 0, 0]);
        for y in 0..h {
            for x in 0..w {
                let mut sum = [0u32; 3];
                let mut n = 0u32;
                for yy in y * k..((y + 1) * k).min(self.height) {
                    for xx in x * k..((x + 1) * k).min(self.width) {
                        let p = self.pixel(xx, yy);
                        (0..3).for_each(|c| sum[c] += p[c] as u32);
                        n += 1;
                    }
                }
                out.set_pixel(x, y, sum.map(|v| (v / n.max(1)) as u8));
            }
        }
        out
    }

    /// 3×3 box blur; at the border the mean is over the neighbours inside the image.
    pub fn box_blur3(&self) -> Image {
        let mut out = self.clone();
        for y in 0..self.height {
            for x in 0..self.width {
                let mut sum = [0u32; 3];
                let mut n = 0;
                for yy in y.saturating_sub(1)..(y + 2).min(self.height) {
                    for xx in x.saturating_sub(1)..(x + 2).min(self.width) {
                        let p = self.pixel(xx, yy);
                        for c in 0..3 {
                            sum[c] += p[c] as u32;
                        }
                        n += 1;
                    }
                }
                out.set_pixel(x, y, sum.map(|s| ((s + n / 2) / n) as u8));
            }
        }
        out
    }

    /// Add independent Gaussian noise of standard deviation `sigma` (in 0–255 units) to every
    /// channel, rounding and clamping to 0–255.
    pub fn add_noise(&mut self, sigma: f32, rng: &mut impl Rng) {
        for v in &mut self.data {
            let z = gaussian(rng);
            *v = (*v as f32 + sigma * z).round().clamp(0.0, 255.0) as u8;
        }
    }
}

/// A standard normal sample (Box–Muller).
fn gaussian(rng: &mut impl Rng) -> f32 {
    let u1: f32 = rng.random::<f32>().max(f32::MIN_POSITIVE);
    let u2: f32 = rng.random();
    (-2.0 * u1.ln()).sqrt() * (std::f32::consts::TAU * u2).cos()
}

/// Tile `images` row by row, `cols` per row (at least 1), with `pad` black pixels between and around
/// A PNG for viewing: as is when at most `max_width` wide (or not decodable), else shrunk by the
/// smallest whole factor that fits.
pub fn png_at_most(png: Vec<u8>, max_width: usize) -> Vec<u8> {
    let Ok(im) = Image::from_png_bytes(&png) else {
        return png;
    };
    if im.width <= max_width {
        return png;
    }
    im.downscale(im.width.div_ceil(max_width.max(1)))
        .png_bytes()
        .unwrap_or(png)
}

/// the tiles. Cells take the largest width and height among the images.
pub fn grid(images: &[Image], cols: usize, pad: usize) -> Image {
    let cols = cols.max(1).min(images.len().max(1));
    let rows = images.len().div_ceil(cols);
    let cw = images.iter().map(|i| i.width).max().unwrap_or(0);
    let ch = images.iter().map(|i| i.height).max().unwrap_or(0);
    let width = cols * cw + (cols + 1) * pad;
    let height = rows * ch + (rows + 1) * pad;
    let mut out = Image::new(width.max(1), height.max(1), [0, 0, 0]);
    for (k, img) in images.iter().enumerate() {
        let (ox, oy) = (pad + (k % cols) * (cw + pad), pad + (k / cols) * (ch + pad));
        for y in 0..img.height {
            let src = &img.data[3 * y * img.width..3 * (y + 1) * img.width];
            let start = 3 * ((oy + y) * out.width + ox);
            out.data[start..start + src.len()].copy_from_slice(src);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;

    #[test]
    fn grid_layout() {
        let a = Image::new(2, 2, [10, 20, 30]);
        let b = Image::new(2, 2, [40, 50, 60]);
        let g = grid(&[a.clone(), b.clone(), a.clone()], 2, 1);
        assert_eq!((g.width, g.height), (2 * 2 + 3, 2 * 2 + 3));
        assert_eq!(g.pixel(0, 0), [0, 0, 0]);
        assert_eq!(g.pixel(1, 1), [10, 20, 30]);
        assert_eq!(g.pixel(4, 2), [40, 50, 60]);
        assert_eq!(g.pixel(2, 5), [10, 20, 30]);
        assert_eq!(g.pixel(5, 5), [0, 0, 0]);
        assert_eq!(grid(std::slice::from_ref(&b), 8, 0), b);
    }

    #[test]
    fn blur_and_noise() {
        let mut img = Image::new(4, 4, [0, 0, 0]);
        img.set_pixel(0, 0, [90, 90, 90]);
        let b = img.box_blur3();
        assert_eq!(b.pixel(0, 0), [23, 23, 23]); // 90/4 at the corner, rounded
        assert_eq!(b.pixel(1, 1), [10, 10, 10]); // 90/9
        assert_eq!(b.pixel(2, 2), [0, 0, 0]);
        let mut rng = rand::rngs::StdRng::seed_from_u64(1);
        let mut n = Image::new(64, 64, [128, 128, 128]);
        n.add_noise(8.0, &mut rng);
        let mean = n.data.iter().map(|&v| v as f64).sum::<f64>() / n.data.len() as f64;
        let var = n
            .data
            .iter()
            .map(|&v| (v as f64 - mean).powi(2))
            .sum::<f64>()
            / n.data.len() as f64;
        assert!(
            (mean - 128.0).abs() < 0.5 && (var.sqrt() - 8.0).abs() < 0.5,
            "{mean} {var}"
        );
    }

    #[test]
    fn png_written_atomically() {
        let dir = std::env::temp_dir().join(format!("dgpo-png-{}", std::process::id()));
        let path = dir.join("sub/x.png");
        let img = Image::new(3, 2, [1, 2, 3]);
        img.to_png(&path).unwrap();
        let bytes = std::fs::read(&path).unwrap();
        assert_eq!(&bytes[1..4], b"PNG");
        let leftovers: Vec<_> = std::fs::read_dir(dir.join("sub")).unwrap().collect();
        assert_eq!(leftovers.len(), 1);
        let decoder = png::Decoder::new(std::fs::File::open(&path).unwrap());
        let mut reader = decoder.read_info().unwrap();
        let mut buf = vec![0; reader.output_buffer_size()];
        let info = reader.next_frame(&mut buf).unwrap();
        assert_eq!(&buf[..info.buffer_size()], &img.data[..]);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn wide_pngs_are_shrunk_for_viewing() {
        let mut im = Image::new(4100, 2, [10, 20, 30]);
        im.set_pixel(0, 0, [250, 250, 250]);
        let out = Image::from_png_bytes(&png_at_most(im.png_bytes().unwrap(), 2048)).unwrap();
        assert_eq!((out.width, out.height), (1366, 1));
        // The first block is 3 × 2 pixels, one of them bright: (250 + 5 × 10) / 6 = 50, …
        assert_eq!(out.pixel(0, 0), [50, 58, 66]);
        let small = Image::new(64, 8, [1, 2, 3]).png_bytes().unwrap();
        assert_eq!(png_at_most(small.clone(), 2048), small);
    }
}
