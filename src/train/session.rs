//! Everything a training run reads and checks before its first epoch — prompt files, rewards, the
//! evaluation protocol, the pipeline and what it trains — so that a mistake in any of them is
//! reported before a file is written.

use crate::config::{Config, PromptSampling};
use crate::eval::EvalSettings;
use crate::model::Trainable;
use crate::pipeline::Pipeline;
use crate::prompt_file::{read_prompt_file, PromptItem};
use crate::reward::Rewards;
use anyhow::{bail, Context, Result};
use candle_core::{Device, Var};
use std::path::PathBuf;

pub struct Session {
    pub train_items: Vec<PromptItem>,
    pub test_items: Vec<PromptItem>,
    pub rewards: Rewards,
    pub eval: EvalSettings,
    /// The folder of the base model (`model.pretrained`, a hub id resolved).
    pub base: PathBuf,
    pub pipe: Box<dyn Pipeline>,
    /// The trainable variables, by name.
    pub vars: Vec<(String, Var)>,
}

impl Session {
    pub fn open(cfg: &Config, dev: &Device) -> Result<Self> {
        let train_path = cfg
            .prompts
            .train
            .as_ref()
            .context("prompts.train is not set")?;
        let test_path = cfg
            .prompts
            .test
            .as_ref()
            .context("prompts.test is not set")?;
        let train_items = read_prompt_file(train_path)?;
        let test_items = read_prompt_file(test_path)?;
        let rewards = Rewards::from_config_on(&cfg.reward, dev)?;
        rewards.check()?;
        let eval = EvalSettings::from_config(cfg)?;
        if cfg.prompts.sampling == PromptSampling::ByTag {
            if let Some(i) = train_items.iter().position(|p| p.meta.is_none()) {
                bail!(
                    "prompts.sampling = \"by_tag\" needs GenEval metadata (a .jsonl file), but prompt {} of \
                     {} ({:?}) has none: use sampling = \"uniform\"",
                    i + 1,
                    train_path.display(),
                    train_items[i].prompt
                );
            }
        }
        let trainable = if cfg.lora.enabled {
            Trainable::Lora {
                spec: cfg.lora.spec(),
                seed: cfg.run.seed,
            }
        } else {
            Trainable::Full
        };
        let base = crate::pipeline::sd3::resolve_pretrained(cfg)?;
        let mut texts: Vec<&str> = train_items
            .iter()
            .chain(&test_items)
            .map(|p| p.prompt.as_str())
            .collect();
        texts.push("");
        let pipe = crate::pipeline::load_for_training(cfg, &base, &trainable, &texts, dev)?;
        for (path, items) in [(train_path, &train_items), (test_path, &test_items)] {
            for (i, it) in items.iter().enumerate() {
                pipe.check_prompt(&it.prompt)
                    .with_context(|| format!("prompt {} of {}", i + 1, path.display()))?;
            }
        }
        if pipe.shapes_world() {
            if let Some(i) = test_items.iter().position(|p| p.meta.is_none()) {
                bail!(
                    "{}: test prompt {} ({:?}) has no GenEval metadata; shapes-world evaluations score \
                     .jsonl prompt files",
                    test_path.display(),
                    i + 1,
                    test_items[i].prompt
                );
            }
        }
        let res = pipe.image_size();
        if res != cfg.model.resolution {
            bail!(
                "model.resolution = {} but the model at {} works at {res}",
                cfg.model.resolution,
                base.display()
            );
        }
        let vars = pipe.transformer().trainable_vars();
        if vars.is_empty() {
            bail!("nothing to train: lora.targets match no layer and lora.enabled = true");
        }
        Ok(Self {
            train_items,
            test_items,
            rewards,
            eval,
            base,
            pipe,
            vars,
        })
    }
}
