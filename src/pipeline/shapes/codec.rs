//! The cell codec: the shapes pipeline's fixed linear "VAE". Each cell of the shapes world's grid
//! becomes one latent pixel of `3 × k` channels — per RGB channel, the cell's offset from the
//! background projected on an orthonormal basis of the world's `k` shape masks — so the MMDiT draws
//! one object per image token, as SD3 draws in a VAE's latent space. Encoding a scene of the world
//! and decoding it again gives the scene back exactly; any latent decodes to a blend of masks.

use crate::image::Image;
use crate::testbed::{Shape, BACKGROUND, CELL, CLASSES};
use anyhow::{bail, Context, Result};
use candle_core::{DType, Device, Tensor};
use serde::{Deserialize, Serialize};
use std::path::Path;

pub const CODEC_CLASS: &str = "DgpoCellCodec";

/// `codec/config.json` of a shapes pipeline folder.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CodecConfig {
    #[serde(rename = "_class_name")]
    pub class_name: String,
    /// Cell side in pixels: one latent pixel per cell.
    pub cell: usize,
    /// Latent = scaling_factor × projection (as a VAE's `scaling_factor`: latents of about unit size).
    pub scaling_factor: f32,
}

/// The codec: the configuration and the orthonormal mask basis (`k` vectors of `cell²` pixels).
#[derive(Debug, Clone)]
pub struct CellCodec {
    pub cfg: CodecConfig,
    basis: Vec<Vec<f32>>,
}

impl CellCodec {
    /// The codec of `cfg`; its cell must be the world's (the masks are the world's shapes).
    pub fn new(cfg: CodecConfig) -> Result<Self> {
        if cfg.class_name != CODEC_CLASS {
            bail!(
                "codec _class_name {:?}: expected {CODEC_CLASS:?}",
                cfg.class_name
            );
        }
        if cfg.cell != CELL {
            bail!(
                "codec cell = {} but the shapes world's cells are {CELL} pixels",
                cfg.cell
            );
        }
        if !(cfg.scaling_factor.is_finite() && cfg.scaling_factor > 0.0) {
            bail!(
                "codec scaling_factor = {} must be a positive number",
                cfg.scaling_factor
            );
        }
        // Gram-Schmidt over the masks, square first (it holds the others' pixels).
        let mut basis: Vec<Vec<f32>> = Vec::new();
        for class in ["square", "circle", "diamond", "triangle"] {
            debug_assert!(CLASSES.contains(&class));
            let s = Shape::in_cell(class, "white", 0, 0);
            let mut v: Vec<f64> = (0..CELL * CELL)
                .map(|i| {
                    let (x, y) = ((i % CELL) as f32 + 0.5, (i / CELL) as f32 + 0.5);
                    s.contains(x, y) as u8 as f64
                })
                .collect();
            for b in &basis {
                let d: f64 = v.iter().zip(b).map(|(a, b)| a * *b as f64).sum();
                v.iter_mut().zip(b).for_each(|(a, b)| *a -= d * *b as f64);
            }
            let n = v.iter().map(|a| a * a).sum::<f64>().sqrt();
            basis.push(v.iter().map(|a| (a / n) as f32).collect());
        }
        Ok(Self { cfg, basis })
    }

    /// Read `dir/config.json`.
    pub fn load(dir: &Path) -> Result<Self> {
        Self::from_file(&dir.join("config.json"))
    }

    /// Read a codec `config.json`.
    pub fn from_file(p: &Path) -> Result<Self> {
        let text =
            std::fs::read_to_string(p).with_context(|| format!("reading {}", p.display()))?;
        let cfg: CodecConfig =
            serde_json::from_str(&text).with_context(|| format!("parsing {}", p.display()))?;
        Self::new(cfg).with_context(|| p.display().to_string())
    }

    /// Latent channels: `k` masks × RGB.
    pub fn channels(&self) -> usize {
        3 * self.basis.len()
    }

    fn background(ch: usize) -> f32 {
        BACKGROUND[ch] as f32 / 127.5 - 1.0
    }

    /// Images (sides multiples of the cell) → latents `[B, 3k, H/cell, W/cell]`.
    pub fn encode(&self, images: &[Image], dev: &Device) -> Result<Tensor> {
        let Some(first) = images.first() else {
            bail!("no images")
        };
        let (w, h, c) = (first.width, first.height, self.cfg.cell);
        if w % c != 0 || h % c != 0 {
            bail!("a {w}×{h} image is not whole {c}-pixel cells");
        }
        let (gw, gh, k) = (w / c, h / c, self.basis.len());
        let mut out = vec![0f32; images.len() * 3 * k * gw * gh];
        for (n, im) in images.iter().enumerate() {
            if im.width != w || im.height != h {
                bail!("images of different sizes in one batch");
            }
            for (gy, gx, ch) in cells(gh, gw) {
                for (j, b) in self.basis.iter().enumerate() {
                    let mut d = 0f32;
                    for (i, bv) in b.iter().enumerate() {
                        let (x, y) = (gx * c + i % c, gy * c + i / c);
                        let v = im.data[(y * w + x) * 3 + ch] as f32 / 127.5 - 1.0;
                        d += bv * (v - Self::background(ch));
                    }
                    out[(((n * 3 + ch) * k + j) * gh + gy) * gw + gx] = d * self.cfg.scaling_factor;
                }
            }
        }
        Ok(Tensor::from_vec(out, (images.len(), 3 * k, gh, gw), dev)?)
    }

    /// Latents `[B, 3k, GH, GW]` → RGB images (clamped, rounded).
    pub fn decode(&self, z: &Tensor) -> Result<Vec<Image>> {
        let (bn, zc, gh, gw) = z.dims4()?;
        let (c, k) = (self.cfg.cell, self.basis.len());
        if zc != 3 * k {
            bail!("latents of {zc} channels: the cell codec's have {}", 3 * k);
        }
        let v: Vec<f32> = z
            .to_dtype(DType::F32)?
            .to_device(&Device::Cpu)?
            .flatten_all()?
            .to_vec1()?;
        let (w, h) = (gw * c, gh * c);
        let mut out = Vec::with_capacity(bn);
        for n in 0..bn {
            let mut data = vec![0u8; w * h * 3];
            for (gy, gx, ch) in cells(gh, gw) {
                let coef: Vec<f32> = (0..k)
                    .map(|j| {
                        v[(((n * 3 + ch) * k + j) * gh + gy) * gw + gx] / self.cfg.scaling_factor
                    })
                    .collect();
                for i in 0..c * c {
                    let s: f32 = self.basis.iter().zip(&coef).map(|(b, a)| b[i] * a).sum();
                    let val = Self::background(ch) + s;
                    let (x, y) = (gx * c + i % c, gy * c + i / c);
                    data[(y * w + x) * 3 + ch] =
                        ((val + 1.0) * 127.5).round().clamp(0.0, 255.0) as u8;
                }
            }
            out.push(Image {
                width: w,
                height: h,
                data,
            });
        }
        Ok(out)
    }
}

/// Every (cell row, cell column, RGB channel).
fn cells(gh: usize, gw: usize) -> impl Iterator<Item = (usize, usize, usize)> {
    (0..gh).flat_map(move |y| (0..gw).flat_map(move |x| (0..3).map(move |ch| (y, x, ch))))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testbed::{all_prompts, scene_for};
    use rand::SeedableRng;

    pub fn codec() -> CellCodec {
        CellCodec::new(CodecConfig {
            class_name: CODEC_CLASS.into(),
            cell: CELL,
            scaling_factor: 0.2,
        })
        .unwrap()
    }

    #[test]
    fn every_scene_of_the_world_decodes_to_itself() {
        let c = codec();
        assert_eq!(c.channels(), 12);
        let mut rng = rand::rngs::StdRng::seed_from_u64(4);
        let images: Vec<Image> = all_prompts()
            .iter()
            .map(|m| scene_for(m, &mut rng).unwrap().render())
            .collect();
        let z = c.encode(&images, &Device::Cpu).unwrap();
        assert_eq!(z.dims(), &[images.len(), 12, 4, 4]);
        let back = c.decode(&z).unwrap();
        for (a, b) in images.iter().zip(&back) {
            let worst = a
                .data
                .iter()
                .zip(&b.data)
                .map(|(x, y)| x.abs_diff(*y))
                .max();
            assert!(worst <= Some(1), "{worst:?}");
        }
        // The basis is orthonormal: zero latents are the background.
        let zero = c.decode(&z.zeros_like().unwrap()).unwrap();
        assert!(zero[0].data.chunks(3).all(|p| p == BACKGROUND));
    }

    #[test]
    fn bad_codec_configs_are_refused() {
        let mut cfg = codec().cfg;
        cfg.cell = 8;
        assert!(format!("{:#}", CellCodec::new(cfg).unwrap_err()).contains("cell = 8"));
        let mut cfg = codec().cfg;
        cfg.scaling_factor = f32::NAN;
        assert!(format!("{:#}", CellCodec::new(cfg).unwrap_err()).contains("scaling_factor"));
    }
}
