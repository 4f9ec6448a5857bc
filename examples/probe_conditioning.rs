//! What a shapes pipeline's denoiser takes from its caption, measured on position prompts:
//!   cargo run --release --example probe_conditioning -- configs/shapes/base
//! 1. how far the text encoder's per-token output moves when one word changes;
//! 2. the flow-matching loss on ground-truth position scenes at fixed σ with the correct caption, the
//!    relation swapped (left ↔ right, above ↔ below), the empty caption, and the caption's context
//!    tokens or pooled vector alone (the other from the empty caption);
//! 3. how much the velocity depends on where a token is: a left-right flip of x_t against the flip of
//!    the velocity (0 = the model ignores absolute position);
//! 4. how much the relation could lower the loss at σ → 1: E[x0 | left of] against the mixture.

use anyhow::{Context, Result};
use candle_core::{Device, Tensor};
use dgpo::model::{Trainable, Weights};
use dgpo::pipeline::shapes::{encode_images, ShapesPipeline};
use dgpo::testbed::prompts::position;
use dgpo::testbed::scene::scene_for;
use rand::SeedableRng;

const RELATIONS: [&str; 4] = ["left of", "right of", "above", "below"];
const CLASSES: [&str; 4] = ["circle", "square", "diamond", "triangle"];

/// True position scenes, their latents and the noise they are probed with.
struct Scenes {
    metas: Vec<dgpo::geneval::Metadata>,
    x0: Tensor,
    noise: Tensor,
}

fn swapped(rel: &str) -> &'static str {
    match rel {
        "left of" => "right of",
        "right of" => "left of",
        "above" => "below",
        _ => "above",
    }
}

fn mean_sq(t: &Tensor) -> Result<f32> {
    Ok(t.sqr()?.mean_all()?.to_scalar::<f32>()?)
}

fn main() -> Result<()> {
    let dir = std::env::args()
        .nth(1)
        .context("usage: probe_conditioning PIPELINE_DIR")?;
    let dev = Device::Cpu;
    let pipe = ShapesPipeline::load(std::path::Path::new(&dir), &Trainable::None, &dev)?;
    let mut rng = rand::rngs::StdRng::seed_from_u64(7);
    text_separation(&pipe)?;
    // 256 position prompts over every (subject, target, relation), each with one true scene.
    let metas: Vec<_> = (0..256)
        .map(|i| {
            let s = i % 4;
            let t = (s + 1 + (i / 4) % 3) % 4;
            position(CLASSES[s], RELATIONS[(i / 12) % 4], CLASSES[t])
        })
        .collect();
    let images: Vec<_> = metas
        .iter()
        .map(|m| Ok(scene_for(m, &mut rng)?.render()))
        .collect::<Result<_>>()?;
    let x0 = encode_images(pipe.codec.as_ref(), &images, &dev)?;
    let noise = dgpo::sampling::seeded_randn(&mut rng, x0.dims4()?, &dev)?;
    let sc = Scenes { metas, x0, noise };
    caption_losses(&pipe, &sc, &dev)?;
    flip_equivariance(&pipe, &sc, &dev)?;
    relation_gain(&pipe, &mut rng, &dev)
}

/// 1: per-token distance of the context between two prompts that differ in one respect.
fn text_separation(pipe: &ShapesPipeline) -> Result<()> {
    let pairs = [
        (
            "a photo of a circle left of a square",
            "a photo of a circle right of a square",
        ),
        (
            "a photo of a circle left of a square",
            "a photo of a square left of a circle",
        ),
        ("a photo of a red circle", "a photo of a blue circle"),
    ];
    println!("text encoder: |context(a) - context(b)| per token (norm of a's context)");
    for (a, b) in pairs {
        let (ctx, _) = pipe.text_forward(&[a, b], false)?;
        let diff = (ctx.get(0)? - ctx.get(1)?)?;
        let per_tok: Vec<f32> = diff.sqr()?.sum(1)?.sqrt()?.to_vec1()?;
        let norm = ctx.get(0)?.sqr()?.sum_all()?.sqrt()?.to_scalar::<f32>()?;
        let shown: Vec<String> = per_tok.iter().map(|x| format!("{x:.2}")).collect();
        println!("  {a:?} vs {b:?} (norm {norm:.1}): [{}]", shown.join(", "));
    }
    Ok(())
}

/// 2: the loss with each caption variant at fixed σ.
fn caption_losses(pipe: &ShapesPipeline, sc: &Scenes, dev: &Device) -> Result<()> {
    let (metas, x0, noise) = (&sc.metas, &sc.x0, &sc.noise);
    let n = metas.len();
    let encode = |caps: &[String]| -> Result<(Tensor, Tensor)> {
        let p: Vec<&str> = caps.iter().map(|s| s.as_str()).collect();
        pipe.text_forward(&p, false)
    };
    let correct: Vec<String> = metas.iter().map(|m| m.prompt.clone()).collect();
    let swap: Vec<String> = metas
        .iter()
        .map(|m| {
            let rel = &m.include[1].position.as_ref().expect("position prompt").0;
            m.prompt.replace(rel.as_str(), swapped(rel))
        })
        .collect();
    let (c, e, s) = (
        encode(&correct)?,
        encode(&vec![String::new(); n])?,
        encode(&swap)?,
    );
    let variants = [
        ("correct", c.clone()),
        ("swapped", s),
        ("empty", e.clone()),
        ("context only", (c.0.clone(), e.1.clone())),
        ("pooled only", (e.0, c.1)),
    ];
    println!("flow-matching loss on true position scenes, per caption variant");
    for sigma in [0.98f64, 0.95, 0.9, 0.8, 0.7, 0.6, 0.5, 0.3] {
        let xt = ((x0 * (1.0 - sigma))? + (noise * sigma)?)?;
        let target = (noise - x0)?;
        let t = Tensor::full(sigma as f32 * 1000.0, n, dev)?;
        let mut row = format!("  σ {sigma:.2}");
        for (name, (ctx, pooled)) in &variants {
            let v = pipe
                .transformer
                .forward(&xt, &t, ctx, pooled, Weights::Policy)?;
            row += &format!("  {name} {:.4}", mean_sq(&(v - &target)?)?);
        }
        println!("{row}");
    }
    Ok(())
}

/// 3: v(flip(x_t)) against flip(v(x_t)), relative to |v|².
fn flip_equivariance(pipe: &ShapesPipeline, sc: &Scenes, dev: &Device) -> Result<()> {
    let (metas, x0, noise) = (&sc.metas, &sc.x0, &sc.noise);
    let caps: Vec<&str> = metas.iter().map(|m| m.prompt.as_str()).collect();
    let (ctx, pooled) = pipe.text_forward(&caps, false)?;
    let w = x0.dims4()?.3 as u32;
    let idx = Tensor::new((0..w).rev().collect::<Vec<u32>>(), dev)?;
    let flip = |x: &Tensor| x.index_select(&idx, 3);
    println!("position dependence: mean (flip v(x_t) - v(flip x_t))² / mean v²");
    for sigma in [0.98f64, 0.9, 0.7] {
        let xt = ((x0 * (1.0 - sigma))? + (noise * sigma)?)?;
        let t = Tensor::full(sigma as f32 * 1000.0, metas.len(), dev)?;
        let v = pipe
            .transformer
            .forward(&xt, &t, &ctx, &pooled, Weights::Policy)?;
        let vf = pipe
            .transformer
            .forward(&flip(&xt)?, &t, &ctx, &pooled, Weights::Policy)?;
        let d = mean_sq(&(flip(&v)? - vf)?)?;
        println!("  σ {sigma:.2}: {:.2e}", d / mean_sq(&v)?);
    }
    Ok(())
}

/// 4: the loss a perfect use of the relation saves at σ → 1, per latent element.
fn relation_gain(pipe: &ShapesPipeline, rng: &mut rand::rngs::StdRng, dev: &Device) -> Result<()> {
    let mut scenes = |rel: &str| -> Result<Tensor> {
        let m = position("circle", rel, "square");
        let ims: Vec<_> = (0..1024)
            .map(|_| Ok(scene_for(&m, rng)?.render()))
            .collect::<Result<_>>()?;
        encode_images(pipe.codec.as_ref(), &ims, dev)
    };
    let (l, r) = (scenes("left of")?, scenes("right of")?);
    let (ml, mr) = (l.mean(0)?, r.mean(0)?);
    let mix = ((&ml + &mr)? * 0.5)?;
    println!(
        "\"a circle left of a square\": |E[x0|left] - E[x0|left or right]|² {:.5} per element, \
         E[x0²] {:.4}",
        mean_sq(&(&ml - &mix)?)?,
        mean_sq(&l)?
    );
    Ok(())
}
