//! Evaluation: every test prompt sampled `images_per_prompt` times from fixed noise with the
//! deterministic ODE sampler, each image scored (the testbed's exact detector, or the `[[reward]]`
//! modules for SD3 / SD3.5), summarised per tag. Serves `dgpo eval`, `dgpo pretrain` and `dgpo train`.

use crate::config::{Config, Sampler};
use crate::geneval::{summarize, Metadata, Outcome, Summary};
use crate::image::Image;
use crate::model::Weights;
use crate::pipeline::Pipeline;
use crate::prompt_file::PromptItem;
use crate::reward::Rewards;
use crate::reward::ShapesGeneval;
use crate::sampling::{sample, schedule, seeded_randn};
use anyhow::{bail, Context, Result};
use candle_core::{Device, Tensor};
use rand::SeedableRng;

/// How an evaluation samples.
#[derive(Debug, Clone, PartialEq)]
pub struct EvalSettings {
    pub sampler: Sampler,
    pub num_steps: usize,
    pub guidance: f64,
    pub shift: f64,
    pub images_per_prompt: usize,
    pub batch_size: usize,
    /// Seed of the fixed evaluation noise.
    pub seed: u64,
}

impl EvalSettings {
    /// The evaluation protocol of a config: its sampler with `eval_num_steps`, CFG, shift, images per
    /// prompt, and `run.seed` for the fixed noise.
    pub fn from_config(cfg: &Config) -> Result<Self> {
        Ok(Self {
            sampler: cfg.sample.eval_sampler.unwrap_or(cfg.sample.sampler),
            num_steps: cfg.sample.eval_num_steps,
            guidance: cfg.sample.guidance_scale,
            shift: cfg.sample.flow_shift,
            images_per_prompt: cfg.sample.eval_images_per_prompt,
            batch_size: cfg.sample.eval_batch_size,
            seed: cfg.run.seed,
        })
    }
}

/// Initial noise of image `image` of prompt `prompt`: depends only on these and the seed, never on
/// the batch layout, so two checkpoints are always compared on the same noise.
pub fn eval_noise(
    seed: u64,
    prompt: usize,
    image: usize,
    shape: (usize, usize, usize),
    dev: &Device,
) -> Result<Tensor> {
    let key = seed
        .wrapping_mul(0x9E37_79B9_7F4A_7C15)
        .wrapping_add((prompt as u64) << 20)
        .wrapping_add(image as u64);
    let mut rng = rand::rngs::StdRng::seed_from_u64(key);
    seeded_randn(&mut rng, (1, shape.0, shape.1, shape.2), dev)
}

pub struct EvalResult {
    pub summary: Summary,
    /// Prompt-major: images of prompt 0, then prompt 1, …
    pub images: Vec<Image>,
    pub outcomes: Vec<Outcome>,
    /// Whether `strict` / `correct` of the outcomes are GenEval verdicts (the shapes detector, or a
    /// reward module with `strict_accuracy` / `accuracy` sub-metrics); otherwise only the rewards mean
    /// something.
    pub geneval: bool,
    pub wall_s: f64,
}

/// Sample and score every prompt of `metas` with the shapes world's detector. `w` selects the
/// weights (policy, reference).
pub fn evaluate(
    pipe: &dyn Pipeline,
    metas: &[Metadata],
    s: &EvalSettings,
    w: Weights,
    progress: bool,
) -> Result<EvalResult> {
    let items: Vec<PromptItem> = metas
        .iter()
        .map(|m| PromptItem {
            prompt: m.prompt.clone(),
            meta: Some(m.clone()),
        })
        .collect();
    evaluate_prompts(pipe, &items, s, w, progress, None)
}

/// Sample every prompt `images_per_prompt` times from the fixed evaluation noise and score the images:
/// with the exact detector in the shapes world (every prompt needs GenEval metadata), otherwise with
/// `rewards` (the `[[reward]]` modules), whose `strict_accuracy` and `accuracy` sub-metrics, when a
/// module has them (the GenEval server), give the per-tag GenEval scores.
pub fn evaluate_prompts(
    pipe: &dyn Pipeline,
    items: &[PromptItem],
    s: &EvalSettings,
    w: Weights,
    progress: bool,
    rewards: Option<&Rewards>,
) -> Result<EvalResult> {
    let start = std::time::Instant::now();
    if items.is_empty() {
        bail!("no evaluation prompts");
    }
    let dev = pipe.device();
    let shape = pipe.latent_shape();
    let jobs: Vec<(usize, usize)> = (0..items.len())
        .flat_map(|p| (0..s.images_per_prompt).map(move |i| (p, i)))
        .collect();
    let sched = schedule(s.sampler, s.num_steps, s.shift);
    let empty = pipe.encode(&[""])?;
    let bar = if progress {
        indicatif::ProgressBar::new(jobs.len() as u64)
    } else {
        indicatif::ProgressBar::hidden()
    };
    bar.set_style(
        indicatif::ProgressStyle::with_template(
            "eval {bar:30} {pos}/{len} images [{elapsed_precise}<{eta_precise}]",
        )
        .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
    );
    let mut images = Vec::with_capacity(jobs.len());
    for chunk in jobs.chunks(s.batch_size.max(1)) {
        let prompts: Vec<&str> = chunk
            .iter()
            .map(|(p, _)| items[*p].prompt.as_str())
            .collect();
        let cond = pipe.encode(&prompts)?;
        let uncond = empty.repeat(chunk.len())?;
        let noise = chunk
            .iter()
            .map(|(p, i)| eval_noise(s.seed, *p, *i, shape, &dev))
            .collect::<Result<Vec<_>>>()?;
        let noise = Tensor::cat(&noise, 0)?;
        let x0 = sample(
            pipe.transformer(),
            s.sampler,
            &sched,
            &noise,
            &cond,
            Some(&uncond),
            s.guidance,
            w,
        )?;
        images.extend(pipe.decode(&x0)?);
        bar.inc(chunk.len() as u64);
    }
    bar.finish_and_clear();
    // Prompts without metadata are summarised under one tag.
    let metas: Vec<Metadata> = items
        .iter()
        .map(|it| {
            it.meta.clone().unwrap_or_else(|| Metadata {
                tag: UNTAGGED.into(),
                include: vec![],
                exclude: vec![],
                prompt: it.prompt.clone(),
            })
        })
        .collect();
    let job_metas: Vec<Option<Metadata>> =
        jobs.iter().map(|(p, _)| items[*p].meta.clone()).collect();
    let (outcomes, geneval) = if pipe.shapes_world() {
        (ShapesGeneval::outcomes(&images, &job_metas)?, true)
    } else {
        let Some(rewards) = rewards else {
            bail!("evaluating outside the shapes world needs the [[reward]] modules")
        };
        let prompts: Vec<String> = jobs.iter().map(|(p, _)| items[*p].prompt.clone()).collect();
        let (total, named) = rewards
            .score(&images, &prompts, &job_metas)
            .context("scoring the evaluation images")?;
        let sub = |suffix: &str| {
            named
                .iter()
                .find(|(k, _)| k.ends_with(suffix))
                .map(|(_, v)| v.clone())
        };
        let (strict, correct) = (sub("/strict_accuracy"), sub("/accuracy"));
        let geneval = strict.is_some() || correct.is_some();
        let verdict = |v: &Option<Vec<f32>>, i: usize| v.as_ref().is_some_and(|v| v[i] > 0.5);
        let outcomes = total
            .iter()
            .enumerate()
            .map(|(i, r)| Outcome {
                reward: f64::from(*r),
                strict: verdict(&strict, i),
                // Without an `accuracy` list the strict verdict stands for both.
                correct: match &correct {
                    Some(_) => verdict(&correct, i),
                    None => verdict(&strict, i),
                },
                reason: String::new(),
            })
            .collect();
        (outcomes, geneval)
    };
    let summary = summarize(
        jobs.iter()
            .zip(&outcomes)
            .map(|((p, _), o)| (&metas[*p], o)),
    );
    Ok(EvalResult {
        summary,
        images,
        outcomes,
        geneval,
        wall_s: start.elapsed().as_secs_f64(),
    })
}

/// The tag under which prompts without GenEval metadata are summarised.
pub const UNTAGGED: &str = "prompts";
