//! `dgpo sample`: images, grids and scores for a set of prompts from one or several models, all on
//! the same initial noise.
//!
//! Output folder:
//! * `images/<k>/p<prompt>_i<image>.png` — model `k` (0-based, in `--checkpoint` order);
//! * `grid.png` — one row per prompt; per model a block of `images_per_prompt` columns;
//! * `index.html` — the same, with each prompt written under its images and the models named;
//! * `scores.jsonl` — one line per image: model, prompt, image index, seed, every reward and
//!   sub-metric (when the configured rewards can score the prompts);
//! * `summary.json` — per model: mean reward and, when the prompts carry GenEval metadata, strict
//!   accuracy, GenEval accuracy per tag and `geneval_overall`; also printed as a table;
//! * `noise.safetensors` — the initial noise used (`noise`, `[n_images, C, H, W]`, prompt-major), so
//!   another implementation or a later run can start from exactly the same noise (`--noise`).

use crate::cli::source::{load_pipeline, Loaded};
use crate::config::{Config, Sampler};
use crate::eval::eval_noise;
use crate::geneval::{summarize, Metadata};
use crate::image::Image;
use crate::io::{append_jsonl, save_safetensors, write_atomic};
use crate::model::Weights;
use crate::pipeline::Pipeline;
use crate::prompt_file::{read_prompt_file, PromptItem};
use crate::reward::Rewards;
use crate::sampling::{sample, schedule};
use crate::testbed::score_image;
use crate::train::run_dir::WeightsChoice;
use anyhow::{bail, Context, Result};
use candle_core::{Device, Tensor};
use std::collections::HashMap;
use std::path::{Path, PathBuf};

/// Everything `dgpo sample` was asked for (defaults already resolved from the config).
#[derive(Debug, Clone)]
pub struct SampleArgs {
    /// Models, in order; an empty list means the config's base model.
    pub checkpoints: Vec<PathBuf>,
    pub weights: WeightsChoice,
    /// Prompts given on the command line.
    pub prompts: Vec<String>,
    /// A prompt file: GenEval-style `.jsonl` (metadata enables GenEval scoring) or plain text, one
    /// prompt per line.
    pub prompt_file: Option<PathBuf>,
    pub images_per_prompt: usize,
    pub seed: u64,
    pub steps: usize,
    pub guidance: f64,
    pub sampler: Sampler,
    pub shift: f64,
    pub batch_size: usize,
    /// Initial noise to use instead of the seeded noise.
    pub noise: Option<PathBuf>,
    pub out: PathBuf,
}

impl SampleArgs {
    /// Defaults from the config's `[sample]` and `[run]` sections: eval steps, CFG, shift, sampler,
    /// images per prompt, batch size, seed; prompts from `prompts.test` when none are given.
    pub fn from_config(cfg: &Config, out: PathBuf) -> Self {
        Self {
            checkpoints: vec![],
            weights: WeightsChoice::Ema,
            prompts: vec![],
            prompt_file: None,
            images_per_prompt: cfg.sample.eval_images_per_prompt,
            seed: cfg.run.seed,
            steps: cfg.sample.eval_num_steps,
            guidance: cfg.sample.guidance_scale,
            sampler: cfg.sample.eval_sampler.unwrap_or(cfg.sample.sampler),
            shift: cfg.sample.flow_shift,
            batch_size: cfg.sample.eval_batch_size,
            noise: None,
            out,
        }
    }
}

/// Read `--noise`: a safetensors file with one tensor (or one named `noise`) of shape
/// `[n_prompts·images_per_prompt, C, H, W]` (prompt-major) or `[images_per_prompt, C, H, W]` (the same
/// noise for every prompt). Returns the per-image noise, prompt-major.
pub fn read_noise(
    path: &Path,
    n_prompts: usize,
    images_per_prompt: usize,
    shape: (usize, usize, usize),
    dev: &Device,
) -> Result<Tensor> {
    let all = candle_core::safetensors::load(path, dev)
        .with_context(|| format!("reading --noise {}", path.display()))?;
    let t = match all.get("noise") {
        Some(t) => t.clone(),
        None if all.len() == 1 => all.into_values().next().expect("one tensor"),
        None => bail!(
            "--noise {}: expected one tensor, or one named \"noise\"; found {} tensors",
            path.display(),
            all.len()
        ),
    };
    let t = t.to_dtype(candle_core::DType::F32)?;
    let want_all = [n_prompts * images_per_prompt, shape.0, shape.1, shape.2];
    let want_one = [images_per_prompt, shape.0, shape.1, shape.2];
    if t.dims() == want_all {
        Ok(t)
    } else if t.dims() == want_one {
        let reps: Vec<Tensor> = (0..n_prompts).map(|_| t.clone()).collect();
        Ok(Tensor::cat(&reps, 0)?)
    } else {
        bail!(
            "--noise {}: shape {:?}; expected {:?} (one per image, prompt-major) or {:?} (shared by \
             every prompt) for {n_prompts} prompts × {images_per_prompt} images at this model's size",
            path.display(),
            t.dims(),
            want_all,
            want_one
        )
    }
}

fn label<P>(m: &Loaded<P>) -> String {
    match &m.kind {
        crate::cli::source::SourceKind::Base => format!("base ({})", m.path.display()),
        crate::cli::source::SourceKind::Run { epoch, weights } => {
            format!("{} (epoch {epoch}, {})", m.path.display(), weights.name())
        }
        _ => m.path.display().to_string(),
    }
}

fn html_escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

/// A model to sample from: a shapes pipeline or an SD3 / SD3.5 diffusers pipeline, with whatever
/// checkpoint was applied.
type Model = Loaded<Box<dyn Pipeline>>;

impl Model {
    fn label(&self) -> String {
        label(self)
    }

    fn generator(&self) -> &dyn Pipeline {
        self.pipe.as_ref()
    }

    /// Sample `prompts` × `images_per_prompt` from `noise` (prompt-major).
    fn sample_all(
        &self,
        prompts: &[PromptItem],
        noise: &Tensor,
        a: &SampleArgs,
        bar: &indicatif::ProgressBar,
    ) -> Result<Vec<Image>> {
        let g = self.generator();
        let sched = schedule(a.sampler, a.steps, a.shift);
        let empty = g.encode(&[""])?;
        in_batches(prompts, noise, a, bar, |texts, noise| {
            let cond = g.encode(texts)?;
            // CFG against the empty prompt; none at guidance 1, as diffusers.
            let uncond = if a.guidance > 1.0 {
                Some(empty.repeat(texts.len())?)
            } else {
                None
            };
            let x0 = sample(
                g.transformer(),
                a.sampler,
                &sched,
                noise,
                &cond,
                uncond.as_ref(),
                a.guidance,
                Weights::PolicyNoGrad,
            )?;
            g.decode(&x0)
        })
    }
}

/// Every image (`images_per_prompt` per prompt, prompt-major) in batches of `a.batch_size`: `gen`
/// makes one batch's images from its prompts and noise.
fn in_batches(
    prompts: &[PromptItem],
    noise: &Tensor,
    a: &SampleArgs,
    bar: &indicatif::ProgressBar,
    mut gen: impl FnMut(&[&str], &Tensor) -> Result<Vec<Image>>,
) -> Result<Vec<Image>> {
    let n = prompts.len() * a.images_per_prompt;
    let mut images = Vec::with_capacity(n);
    let mut start = 0;
    while start < n {
        let len = a.batch_size.max(1).min(n - start);
        let texts: Vec<&str> = (start..start + len)
            .map(|k| prompts[k / a.images_per_prompt].prompt.as_str())
            .collect();
        images.extend(gen(&texts, &noise.narrow(0, start, len)?)?);
        bar.inc(len as u64);
        start += len;
    }
    Ok(images)
}

/// A grid: one row per prompt; per model a block of `ipp` images, blocks separated by a wider gap.
fn side_by_side(per_model: &[Vec<Image>], ipp: usize, n_prompts: usize) -> Image {
    let (w, h) = per_model
        .first()
        .and_then(|v| v.first())
        .map(|i| (i.width, i.height))
        .unwrap_or((1, 1));
    let (pad, gap) = (2, 8);
    let block = ipp * (w + pad);
    let width = pad + per_model.len() * block + per_model.len().saturating_sub(1) * gap;
    let height = pad + n_prompts * (h + pad);
    let mut out = Image::new(width, height, [0, 0, 0]);
    for (k, imgs) in per_model.iter().enumerate() {
        for (j, img) in imgs.iter().enumerate() {
            let (p, i) = (j / ipp, j % ipp);
            let ox = pad + k * (block + gap) + i * (w + pad);
            let oy = pad + p * (h + pad);
            for y in 0..img.height.min(h) {
                for x in 0..img.width.min(w) {
                    out.set_pixel(ox + x, oy + y, img.pixel(x, y));
                }
            }
        }
    }
    out
}

/// What `dgpo sample` produced for one model.
#[derive(Debug, Clone, serde::Serialize)]
pub struct ModelSummary {
    pub model: String,
    pub images: usize,
    /// Weighted total of the configured rewards, averaged (absent when they could not score).
    pub reward_mean: Option<f64>,
    /// GenEval-style summary when every prompt carries metadata.
    pub geneval: Option<crate::geneval::Summary>,
}

/// Run `dgpo sample`.
pub fn run(cfg: &Config, a: &SampleArgs, dev: &Device) -> Result<Vec<ModelSummary>> {
    if a.images_per_prompt == 0 || a.steps == 0 {
        bail!("--images-per-prompt and --steps must be at least 1");
    }
    if a.guidance.is_nan() || a.guidance < 1.0 {
        bail!(
            "--cfg {} must be ≥ 1 (1 disables classifier-free guidance), as sample.guidance_scale",
            a.guidance
        );
    }
    // ---- prompts ----
    let mut prompts: Vec<PromptItem> = a
        .prompts
        .iter()
        .map(|p| PromptItem {
            prompt: p.clone(),
            meta: None,
        })
        .collect();
    let source: String;
    if let Some(f) = &a.prompt_file {
        prompts.extend(read_prompt_file(f)?);
        source = f.display().to_string();
    } else if prompts.is_empty() {
        let test = cfg.prompts.test.as_ref().context(
            "no prompts: give --prompt, --prompts FILE, or set prompts.test in the config",
        )?;
        prompts = read_prompt_file(test)?;
        source = test.display().to_string();
    } else {
        source = "--prompt".into();
    }
    // Images are written even when the config's rewards cannot be built or reached (a CLIP model
    // that is not downloaded, a reward server that is not running); the scores are then left out,
    // with the reason.
    let rewards = match Rewards::from_config_on(&cfg.reward, dev).and_then(|r| r.check().map(|_| r))
    {
        Ok(r) => Some(r),
        Err(e) => {
            tracing::warn!("no reward scores (the images are still written): {e:#}");
            None
        }
    };
    let all_meta = prompts.iter().all(|p| p.meta.is_some());
    // ---- models (all loaded and checked before any sampling) ----
    let sources: Vec<Option<&Path>> = if a.checkpoints.is_empty() {
        vec![None]
    } else {
        a.checkpoints.iter().map(|p| Some(p.as_path())).collect()
    };
    let mut models = Vec::with_capacity(sources.len());
    for s in &sources {
        let mut texts: Vec<&str> = prompts.iter().map(|p| p.prompt.as_str()).collect();
        texts.push("");
        let mut m = load_pipeline(cfg, *s, a.weights, dev)?;
        m.pipe.prepare_prompts(&texts, a.batch_size)?;
        for (i, p) in prompts.iter().enumerate() {
            m.generator()
                .check_prompt(&p.prompt)
                .with_context(|| format!("prompt {} ({:?}) of {source}", i + 1, p.prompt))?;
        }
        models.push(m);
    }
    let shape = models[0].generator().latent_shape();
    if let Some(m) = models
        .iter()
        .find(|m| m.generator().latent_shape() != shape)
    {
        bail!(
            "{} samples images of shape {:?} but {} of {:?}: models compared side by side must share \
             their image size",
            m.label(),
            m.generator().latent_shape(),
            models[0].label(),
            shape
        );
    }
    // ---- noise ----
    let n = prompts.len() * a.images_per_prompt;
    let noise = match &a.noise {
        Some(f) => read_noise(f, prompts.len(), a.images_per_prompt, shape, dev)?,
        None => {
            let parts = (0..n)
                .map(|k| {
                    eval_noise(
                        a.seed,
                        k / a.images_per_prompt,
                        k % a.images_per_prompt,
                        shape,
                        dev,
                    )
                })
                .collect::<Result<Vec<_>>>()?;
            Tensor::cat(&parts, 0)?
        }
    };
    std::fs::create_dir_all(&a.out).with_context(|| format!("creating {}", a.out.display()))?;
    save_safetensors(
        &a.out.join("noise.safetensors"),
        &HashMap::from([("noise".to_string(), noise.clone())]),
        None,
    )?;
    // ---- sample ----
    let bar = indicatif::ProgressBar::new((n * models.len()) as u64);
    bar.set_style(
        indicatif::ProgressStyle::with_template(
            "sample {bar:30} {pos}/{len} images [{elapsed_precise}<{eta_precise}]",
        )
        .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
    );
    let scores_path = a.out.join("scores.jsonl");
    let tmp_scores = a.out.join("scores.jsonl.tmp");
    let _ = std::fs::remove_file(&tmp_scores);
    let mut per_model = Vec::with_capacity(models.len());
    let mut summaries = Vec::with_capacity(models.len());
    let mut warned = false;
    for (k, m) in models.iter().enumerate() {
        let start = std::time::Instant::now();
        let images = m.sample_all(&prompts, &noise, a, &bar)?;
        for (j, img) in images.iter().enumerate() {
            img.to_png(&a.out.join(format!(
                "images/{k}/p{:04}_i{:02}.png",
                j / a.images_per_prompt,
                j % a.images_per_prompt
            )))?;
        }
        let texts: Vec<String> = (0..n)
            .map(|j| prompts[j / a.images_per_prompt].prompt.clone())
            .collect();
        let metas: Vec<Option<Metadata>> = (0..n)
            .map(|j| prompts[j / a.images_per_prompt].meta.clone())
            .collect();
        let scored = match &rewards {
            Some(r) if all_meta || !cfg.reward.iter().any(|c| c.kind == "shapes_geneval") => {
                Some(r.score(&images, &texts, &metas)?)
            }
            // Rewards that could not be built were reported once, above.
            None => None,
            Some(_) => {
                if !warned {
                    tracing::warn!(
                        "no reward scores: the configured rewards need GenEval metadata for every \
                         prompt (give a .jsonl prompt file)"
                    );
                    warned = true;
                }
                None
            }
        };
        let geneval = all_meta.then(|| {
            let outcomes: Vec<_> = images
                .iter()
                .zip(&metas)
                .map(|(im, m)| score_image(m.as_ref().expect("all prompts have metadata"), im))
                .collect();
            summarize(
                metas
                    .iter()
                    .map(|m| m.as_ref().expect("metadata"))
                    .zip(outcomes.iter()),
            )
        });
        for j in 0..n {
            let mut line = serde_json::json!({
                "model": k,
                "checkpoint": m.path.display().to_string(),
                "prompt_index": j / a.images_per_prompt,
                "image_index": j % a.images_per_prompt,
                "prompt": texts[j],
                "seed": a.seed,
                "noise": a.noise.as_ref().map(|p| p.display().to_string()),
                "image": format!("images/{k}/p{:04}_i{:02}.png", j / a.images_per_prompt, j % a.images_per_prompt),
            });
            if let Some(meta) = &metas[j] {
                line["tag"] = meta.tag.clone().into();
            }
            if let Some((total, named)) = &scored {
                line["reward"] = f64::from(total[j]).into();
                for (name, v) in named {
                    line[name.as_str()] = f64::from(v[j]).into();
                }
            }
            append_jsonl(&tmp_scores, &line)?;
        }
        let reward_mean = scored
            .as_ref()
            .map(|(t, _)| t.iter().map(|x| f64::from(*x)).sum::<f64>() / n as f64);
        tracing::info!(
            seconds = start.elapsed().as_secs_f64(),
            "sampled {n} images with {}",
            m.label()
        );
        summaries.push(ModelSummary {
            model: m.label(),
            images: n,
            reward_mean,
            geneval,
        });
        per_model.push(images);
    }
    bar.finish_and_clear();
    std::fs::rename(&tmp_scores, &scores_path)
        .with_context(|| format!("writing {}", scores_path.display()))?;
    // ---- grid, index, summary ----
    side_by_side(&per_model, a.images_per_prompt, prompts.len()).to_png(&a.out.join("grid.png"))?;
    let mut html = String::from(
        "<!doctype html><meta charset=\"utf-8\"><title>dgpo sample</title>\n<style>body{font-family:sans-serif}\
         img{width:96px;image-rendering:pixelated;margin:1px}td{vertical-align:top;padding:4px 10px}</style>\n<table>\n<tr><th>prompt</th>",
    );
    for s in &summaries {
        html.push_str(&format!("<th>{}</th>", html_escape(&s.model)));
    }
    html.push_str("</tr>\n");
    for (p, item) in prompts.iter().enumerate() {
        html.push_str(&format!("<tr><td>{}</td>", html_escape(&item.prompt)));
        for k in 0..models.len() {
            html.push_str("<td>");
            for i in 0..a.images_per_prompt {
                html.push_str(&format!("<img src=\"images/{k}/p{p:04}_i{i:02}.png\">"));
            }
            html.push_str("</td>");
        }
        html.push_str("</tr>\n");
    }
    html.push_str("</table>\n");
    write_atomic(&a.out.join("index.html"), html.as_bytes())?;
    let summary = serde_json::json!({
        "prompts": source,
        "n_prompts": prompts.len(),
        "images_per_prompt": a.images_per_prompt,
        "seed": a.seed,
        "noise": a.noise.as_ref().map(|p| p.display().to_string()),
        "sampler": a.sampler,
        "steps": a.steps,
        "guidance_scale": a.guidance,
        "flow_shift": a.shift,
        "models": summaries,
    });
    write_atomic(
        &a.out.join("summary.json"),
        serde_json::to_string_pretty(&summary)?.as_bytes(),
    )?;
    for s in &summaries {
        println!("== {}", s.model);
        if let Some(g) = &s.geneval {
            print!("{}", g.table());
        } else if let Some(r) = s.reward_mean {
            println!("mean reward {r:.4} over {} images", s.images);
        } else {
            println!("{} images (not scored)", s.images);
        }
    }
    println!(
        "wrote {} images, grid.png, index.html, scores.jsonl and summary.json to {}",
        n * models.len(),
        a.out.display()
    );
    Ok(summaries)
}
