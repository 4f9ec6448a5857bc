//! `dgpo eval`: a model's scores on the config's test prompts — the shapes world's exact detector,
//! or the `[[reward]]` modules for SD3 / SD3.5 — as a table, optionally as JSON and a grid.

use crate::config::Config;
use crate::eval::{evaluate_prompts, EvalSettings};
use crate::model::Weights;
use crate::reward::Rewards;
use crate::train::run_dir::WeightsChoice;
use anyhow::{Context, Result};
use candle_core::Device;

/// `dgpo eval`: load the model, evaluate on `prompts.test`, print the table, optionally write JSON and a
/// grid.
pub fn run_cli(
    cfg: &Config,
    checkpoint: Option<&std::path::Path>,
    json: Option<&std::path::Path>,
    grid: Option<&std::path::Path>,
    dev: &Device,
) -> Result<()> {
    let settings = EvalSettings::from_config(cfg)?;
    let test = cfg
        .prompts
        .test
        .as_ref()
        .context("prompts.test is not set: `dgpo eval` scores the config's test prompts")?;
    let items = crate::prompt_file::read_prompt_file(test)?;
    let mut m = crate::cli::source::load_pipeline(cfg, checkpoint, WeightsChoice::Ema, dev)
        .context("loading the model to evaluate")?;
    // SD3 / SD3.5: the images are scored by the [[reward]] modules (GenEval through its server).
    let rewards = if m.pipe.shapes_world() {
        None
    } else {
        let rewards = Rewards::from_config_on(&cfg.reward, dev)?;
        rewards.check()?;
        let mut texts: Vec<&str> = items.iter().map(|p| p.prompt.as_str()).collect();
        texts.push("");
        m.pipe.prepare_prompts(&texts, settings.batch_size)?;
        Some(rewards)
    };
    let (pipe, dir) = (m.pipe.as_ref(), &m.path);
    for (i, it) in items.iter().enumerate() {
        pipe.check_prompt(&it.prompt)
            .with_context(|| format!("test prompt {} of {}", i + 1, test.display()))?;
    }
    tracing::info!(
        prompts = items.len(),
        images_per_prompt = settings.images_per_prompt,
        steps = settings.num_steps,
        cfg = settings.guidance,
        "evaluating {}",
        dir.display()
    );
    let r = evaluate_prompts(
        pipe,
        &items,
        &settings,
        Weights::PolicyNoGrad,
        true,
        rewards.as_ref(),
    )?;
    if !r.geneval {
        println!(
            "(no GenEval verdicts: no reward module reports strict_accuracy; only rewards count)"
        );
    }
    println!("{}", r.summary.table());
    println!(
        "{} images of {} prompts in {:.1} s",
        r.images.len(),
        items.len(),
        r.wall_s
    );
    if let Some(j) = json {
        let mut v = serde_json::to_value(&r.summary)?;
        v["checkpoint"] = dir.display().to_string().into();
        v["test_prompts"] = test.display().to_string().into();
        v["images_per_prompt"] = settings.images_per_prompt.into();
        v["num_steps"] = settings.num_steps.into();
        v["guidance_scale"] = settings.guidance.into();
        v["seed"] = settings.seed.into();
        crate::io::write_atomic(j, serde_json::to_string_pretty(&v)?.as_bytes())?;
    }
    if let Some(g) = grid {
        let img = crate::image::grid(&r.images, settings.images_per_prompt, 2);
        img.to_png(g)?;
        println!(
            "grid ({} per row, one row per prompt) in {}",
            settings.images_per_prompt,
            g.display()
        );
    }
    Ok(())
}
