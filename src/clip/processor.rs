//! `CLIPImageProcessor`'s preprocessing: shortest edge resized with PIL's bicubic filter in PIL's
//! 8-bit fixed-point arithmetic, centre crop, rescale, normalise — so the pixels match the reference
//! processors'.

use super::files::need_file;
use crate::image::Image;
use anyhow::{bail, ensure, Context, Result};
use candle_core::{Device, Tensor};
use serde::Deserialize;

/// An int or `{"shortest_edge": n}` / `{"height": h, "width": w}`.
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
enum Size {
    Int(usize),
    Map {
        shortest_edge: Option<usize>,
        height: Option<usize>,
        width: Option<usize>,
    },
}

#[derive(Debug, Clone, Deserialize)]
struct ProcessorFile {
    #[serde(default)]
    size: Option<Size>,
    #[serde(default)]
    crop_size: Option<Size>,
    #[serde(default = "yes")]
    do_resize: bool,
    #[serde(default = "yes")]
    do_center_crop: bool,
    #[serde(default = "yes")]
    do_rescale: bool,
    #[serde(default = "yes")]
    do_normalize: bool,
    #[serde(default = "default_rescale")]
    rescale_factor: f64,
    image_mean: [f32; 3],
    image_std: [f32; 3],
    #[serde(default = "bicubic")]
    resample: u32,
    #[serde(default)]
    do_convert_rgb: Option<bool>,
}

fn yes() -> bool {
    true
}
fn default_rescale() -> f64 {
    1.0 / 255.0
}
fn bicubic() -> u32 {
    3
}

/// `CLIPImageProcessor` as configured by a `preprocessor_config.json`.
#[derive(Debug, Clone)]
pub struct ClipProcessor {
    shortest_edge: Option<usize>,
    crop: Option<(usize, usize)>,
    rescale: Option<f64>,
    mean_std: Option<([f32; 3], [f32; 3])>,
}

impl ClipProcessor {
    pub fn load(model: &str) -> Result<Self> {
        let p = need_file(model, "preprocessor_config.json")?;
        let text =
            std::fs::read_to_string(&p).with_context(|| format!("reading {}", p.display()))?;
        Self::from_json(&text).with_context(|| format!("{}", p.display()))
    }

    pub fn from_json(text: &str) -> Result<Self> {
        let f: ProcessorFile =
            serde_json::from_str(text).context("not a CLIPImageProcessor config")?;
        ensure!(
            f.resample == 3,
            "resample = {}: only bicubic (3), which CLIP processors use, is implemented",
            f.resample
        );
        let _ = f.do_convert_rgb;
        let shortest_edge = match (f.do_resize, &f.size) {
            (false, _) => None,
            (true, Some(Size::Int(n))) => Some(*n),
            (
                true,
                Some(Size::Map {
                    shortest_edge: Some(n),
                    ..
                }),
            ) => Some(*n),
            (true, s) => bail!("size = {s:?}: expected an int or {{\"shortest_edge\": n}}"),
        };
        let crop = match (f.do_center_crop, &f.crop_size) {
            (false, _) => None,
            (true, Some(Size::Int(n))) => Some((*n, *n)),
            (
                true,
                Some(Size::Map {
                    height: Some(h),
                    width: Some(w),
                    ..
                }),
            ) => Some((*h, *w)),
            (true, s) => bail!("crop_size = {s:?}: expected an int or {{\"height\", \"width\"}}"),
        };
        Ok(Self {
            shortest_edge,
            crop,
            rescale: f.do_rescale.then_some(f.rescale_factor),
            mean_std: f.do_normalize.then_some((f.image_mean, f.image_std)),
        })
    }

    /// The resized and cropped 8-bit image, before rescaling.
    pub fn resize_crop(&self, im: &Image) -> Result<Image> {
        let mut im = im.clone();
        if let Some(s) = self.shortest_edge {
            let (w, h) = (im.width, im.height);
            let (short, long) = (w.min(h), w.max(h));
            let new_long = s * long / short;
            let (nw, nh) = if w <= h { (s, new_long) } else { (new_long, s) };
            im = resize_bicubic(&im, nw, nh);
        }
        if let Some((ch, cw)) = self.crop {
            ensure!(
                im.width >= cw && im.height >= ch,
                "a {}x{} image is smaller than the {cw}x{ch} crop",
                im.width,
                im.height
            );
            let top = (im.height - ch) / 2;
            let left = (im.width - cw) / 2;
            let mut data = Vec::with_capacity(cw * ch * 3);
            for y in top..top + ch {
                let row = (y * im.width + left) * 3;
                data.extend_from_slice(&im.data[row..row + cw * 3]);
            }
            im = Image {
                width: cw,
                height: ch,
                data,
            };
        }
        Ok(im)
    }

    /// `pixel_values` `[n, 3, H, W]` of a batch (all images must come out the same size).
    pub fn pixels(&self, images: &[Image], dev: &Device) -> Result<Tensor> {
        let mut out = vec![];
        let mut hw = None;
        for im in images {
            let im = self.resize_crop(im)?;
            ensure!(
                hw.is_none_or(|x| x == (im.height, im.width)),
                "images of different sizes after preprocessing"
            );
            hw = Some((im.height, im.width));
            let n = im.width * im.height;
            let mut chw = vec![0f32; 3 * n];
            for (i, px) in im.data.chunks(3).enumerate() {
                for c in 0..3 {
                    let mut v = px[c] as f64;
                    if let Some(r) = self.rescale {
                        v *= r;
                    }
                    let mut v = v as f32;
                    if let Some((m, s)) = &self.mean_std {
                        v = (v - m[c]) / s[c];
                    }
                    chw[c * n + i] = v;
                }
            }
            out.extend(chw);
        }
        let (h, w) = hw.context("no images")?;
        Ok(Tensor::from_vec(out, (images.len(), 3, h, w), dev)?)
    }
}

// PIL's resampling (Pillow `libImaging/Resample.c`): separable, bicubic a = -0.5 widened by the
// downscale factor, coefficients in 22-bit fixed point, each pass rounded and clipped to 8 bits.
const PRECISION_BITS: u32 = 32 - 8 - 2;

fn bicubic_filter(x: f64) -> f64 {
    let a = -0.5;
    let x = x.abs();
    if x < 1.0 {
        ((a + 2.0) * x - (a + 3.0)) * x * x + 1.0
    } else if x < 2.0 {
        (((x - 5.0) * x + 8.0) * x - 4.0) * a
    } else {
        0.0
    }
}

/// Per output pixel: first input index and fixed-point weights.
fn coeffs(in_size: usize, out_size: usize) -> Vec<(usize, Vec<i32>)> {
    let scale = in_size as f64 / out_size as f64;
    let filterscale = scale.max(1.0);
    let support = 2.0 * filterscale;
    (0..out_size)
        .map(|xx| {
            let center = (xx as f64 + 0.5) * scale;
            let ss = 1.0 / filterscale;
            let xmin = ((center - support + 0.5) as i64).max(0) as usize;
            let xmax = ((center + support + 0.5) as i64).min(in_size as i64) as usize;
            let mut k: Vec<f64> = (xmin..xmax)
                .map(|x| bicubic_filter((x as f64 - center + 0.5) * ss))
                .collect();
            let ww: f64 = k.iter().sum();
            if ww != 0.0 {
                for v in k.iter_mut() {
                    *v /= ww;
                }
            }
            let fixed = k
                .iter()
                .map(|&v| {
                    let s = v * (1u32 << PRECISION_BITS) as f64;
                    if v < 0.0 {
                        (-0.5 + s) as i32
                    } else {
                        (0.5 + s) as i32
                    }
                })
                .collect();
            (xmin, fixed)
        })
        .collect()
}

fn clip8(ss: i64) -> u8 {
    (ss >> PRECISION_BITS).clamp(0, 255) as u8
}

/// PIL's `Image.resize((w, h), Image.BICUBIC)` of an RGB image.
pub fn resize_bicubic(im: &Image, w: usize, h: usize) -> Image {
    let mut cur = im.clone();
    if w != cur.width {
        let cs = coeffs(cur.width, w);
        let mut data = vec![0u8; w * cur.height * 3];
        for y in 0..cur.height {
            for (x, (xmin, k)) in cs.iter().enumerate() {
                for c in 0..3 {
                    let mut ss: i64 = 1 << (PRECISION_BITS - 1);
                    for (j, &kk) in k.iter().enumerate() {
                        ss += cur.data[(y * cur.width + xmin + j) * 3 + c] as i64 * kk as i64;
                    }
                    data[(y * w + x) * 3 + c] = clip8(ss);
                }
            }
        }
        cur = Image {
            width: w,
            height: cur.height,
            data,
        };
    }
    if h != cur.height {
        let cs = coeffs(cur.height, h);
        let mut data = vec![0u8; cur.width * h * 3];
        for (y, (ymin, k)) in cs.iter().enumerate() {
            for x in 0..cur.width {
                for c in 0..3 {
                    let mut ss: i64 = 1 << (PRECISION_BITS - 1);
                    for (j, &kk) in k.iter().enumerate() {
                        ss += cur.data[((ymin + j) * cur.width + x) * 3 + c] as i64 * kk as i64;
                    }
                    data[(y * cur.width + x) * 3 + c] = clip8(ss);
                }
            }
        }
        cur = Image {
            width: cur.width,
            height: h,
            data,
        };
    }
    cur
}
