//! `jpeg_compressibility` and `jpeg_incompressibility`: the size of an image as a JPEG file.

use crate::geneval::Metadata;
use crate::image::Image;
use crate::reward::module::{Reward, RewardOutput};
use anyhow::Result;

/// Size in kB (1000 bytes) of an image encoded as baseline JPEG at quality 95, 4:2:0, standard Huffman
/// tables — what PIL's `image.save(buffer, format="JPEG", quality=95)` does in the reference rewards.
pub fn jpeg_size_kb(im: &Image) -> Result<f64> {
    Ok(jpeg_bytes(im, 95)?.len() as f64 / 1000.0)
}

/// Baseline JPEG at `quality`, 4:2:0, standard tables (PIL's defaults apart from the quality, which
/// PIL defaults to 75).
pub fn jpeg_bytes(im: &Image, quality: u8) -> Result<Vec<u8>> {
    let (w, h) = (u16::try_from(im.width)?, u16::try_from(im.height)?);
    let mut buf = Vec::new();
    let mut enc = jpeg_encoder::Encoder::new(&mut buf, quality);
    enc.set_sampling_factor(jpeg_encoder::SamplingFactor::F_2_2);
    enc.encode(&im.data, w, h, jpeg_encoder::ColorType::Rgb)
        .map_err(|e| anyhow::anyhow!("JPEG encoding of a {w}x{h} image: {e}"))?;
    Ok(buf)
}

/// `jpeg_incompressibility`: the JPEG size in kB (quality 95); `jpeg_compressibility`: its negative
/// (docs/rewards.md; Flow-GRPO's variant divides by 500, i.e. `weight = 0.002`). Sub-metric `size_kb`.
pub struct JpegSize {
    pub compressible: bool,
}

impl Reward for JpegSize {
    fn name(&self) -> &str {
        if self.compressible {
            "jpeg_compressibility"
        } else {
            "jpeg_incompressibility"
        }
    }

    fn score(
        &self,
        images: &[Image],
        _prompts: &[String],
        _metadata: &[Option<Metadata>],
    ) -> Result<RewardOutput> {
        let sizes = images
            .iter()
            .map(jpeg_size_kb)
            .collect::<Result<Vec<_>>>()?;
        let sign = if self.compressible { -1.0 } else { 1.0 };
        let mut out = RewardOutput {
            scores: sizes.iter().map(|s| (sign * s) as f32).collect(),
            ..Default::default()
        };
        out.sub
            .insert("size_kb".into(), sizes.iter().map(|s| *s as f32).collect());
        Ok(out)
    }
}
