//! The run configuration: TOML with the paper's names, `--set key.path=value` overrides, and a
//! validation pass that explains each rejected value. One file per section, each with its defaults
//! and its own checks beside its fields; the checks across sections are here.

mod model;
mod pretrain;
mod problems;
mod prompts;
mod reward;
mod run;
mod sample;
mod train;

pub use model::{LoraConfig, ModelConfig, WeightDType};
pub use pretrain::{PretrainConfig, TimestepSampling};
pub use prompts::{PromptSampling, PromptsConfig};
pub use reward::RewardConfig;
pub use run::RunConfig;
pub use sample::{SampleConfig, Sampler};
pub use train::{AdvantageMode, Algorithm, TrainConfig};

use problems::Problems;

use anyhow::{anyhow, bail, Context, Result};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::Path;

/// The whole configuration of a run.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    pub run: RunConfig,
    pub model: ModelConfig,
    pub lora: LoraConfig,
    pub sample: SampleConfig,
    pub train: TrainConfig,
    pub prompts: PromptsConfig,
    pub reward: Vec<RewardConfig>,
    pub pretrain: PretrainConfig,
}

impl Config {
    /// Read `path`, apply `overrides` (`key.path=value`), validate for training.
    pub fn load(path: &Path, overrides: &[String]) -> Result<Self> {
        Self::load_for(path, overrides, Purpose::Train)
    }

    /// Read `path`, apply `overrides`, validate what `purpose` uses.
    pub fn load_for(path: &Path, overrides: &[String], purpose: Purpose) -> Result<Self> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("reading config file {}", path.display()))?;
        Self::from_toml_for(&text, &path.display().to_string(), overrides, purpose)
    }

    /// Parse TOML text (`origin` names it in errors), apply overrides, validate for training.
    pub fn from_toml(text: &str, origin: &str, overrides: &[String]) -> Result<Self> {
        Self::from_toml_for(text, origin, overrides, Purpose::Train)
    }

    /// Parse TOML text, apply overrides, validate what `purpose` uses.
    pub fn from_toml_for(
        text: &str,
        origin: &str,
        overrides: &[String],
        purpose: Purpose,
    ) -> Result<Self> {
        // Parsing the text itself first gives errors with the line and the offending key.
        let cfg: Config =
            toml::from_str(text).map_err(|e| anyhow!("in config file {origin}: {e}"))?;
        let cfg = if overrides.is_empty() {
            cfg
        } else {
            let mut table: toml::Table = toml::from_str(text)?;
            for o in overrides {
                apply_override(&mut table, o)?;
            }
            toml::Value::Table(table)
                .try_into()
                .map_err(|e: toml::de::Error| {
                    anyhow!(
                        "after applying --set {}: {}",
                        overrides.join(" --set "),
                        e.message()
                    )
                })?
        };
        let problems = cfg.problems_for(purpose);
        if !problems.is_empty() {
            bail!(
                "{origin}: {} invalid setting{}:\n  - {}",
                problems.len(),
                if problems.len() == 1 { "" } else { "s" },
                problems.join("\n  - ")
            );
        }
        Ok(cfg)
    }

    /// Every rejected value of a training run, explained in the config's own terms.
    pub fn problems(&self) -> Vec<String> {
        self.problems_for(Purpose::Train)
    }

    /// Every rejected value among the settings `purpose` uses.
    pub fn problems_for(&self, purpose: Purpose) -> Vec<String> {
        let mut p = Problems::default();
        self.sample.check_eval(&mut p);
        self.lora.check(&mut p);
        self.model.check(&mut p);
        for (i, rw) in self.reward.iter().enumerate() {
            rw.check(i, &mut p);
        }
        if purpose == Purpose::Train {
            self.training_problems(&mut p);
        }
        // Every float must be finite: `inf` and `nan` parse as TOML floats but no setting means them.
        for (key, v) in self.leaves().unwrap_or_default() {
            if purpose == Purpose::Sample && TRAINING_ONLY.iter().any(|s| key.starts_with(s)) {
                continue;
            }
            let floats = match &v {
                toml::Value::Array(a) => a.iter().filter_map(|x| x.as_float()).collect(),
                other => other.as_float().into_iter().collect::<Vec<_>>(),
            };
            if let Some(x) = floats.iter().find(|x| !x.is_finite()) {
                p.need(false, format!("{key} = {x} is not a finite number"));
            }
        }
        p.0
    }

    /// The checks of what only training uses: rollouts, the update, the run's cadence, pretraining.
    fn training_problems(&self, p: &mut Problems) {
        let (s, t) = (&self.sample, &self.train);
        s.check_rollouts(p);
        p.need(
            t.batch_size > 0 && t.batch_size.is_multiple_of(s.group_size.max(1)),
            format!(
                "sample.group_size = {} does not divide train.batch_size = {} (a training micro-batch holds whole groups)",
                s.group_size, t.batch_size
            ),
        );
        let per_epoch = s.batch_size.saturating_mul(s.num_batches_per_epoch);
        p.need(
            // (an epoch too large to count is reported by the bound on its images)
            t.batch_size == 0
                || per_epoch == usize::MAX
                || per_epoch.is_multiple_of(t.batch_size.max(1)),
            format!(
                "train.batch_size = {} does not divide the {} images of an epoch (sample.batch_size {} × sample.num_batches_per_epoch {})",
                t.batch_size, per_epoch, s.batch_size, s.num_batches_per_epoch
            ),
        );
        p.need(
            t.trunc_steps < s.num_steps,
            format!(
                "train.trunc_steps = {} must be below sample.num_steps = {} (it indexes rollout steps 0..=K)",
                t.trunc_steps, s.num_steps
            ),
        );
        p.need(
            (1..=t.trunc_steps.saturating_add(1)).contains(&t.num_train_timesteps),
            format!(
                "train.num_train_timesteps = {} must be between 1 and train.trunc_steps + 1 = {} (distinct step indices)",
                t.num_train_timesteps,
                t.trunc_steps.saturating_add(1)
            ),
        );
        t.check(p);
        if t.algorithm == Algorithm::FlowGrpo {
            p.need(
                s.sampler == Sampler::Euler,
                "train.algorithm = \"flow_grpo\" rolls out with its SDE on the Euler grid: set \
                 sample.sampler = \"euler\""
                    .into(),
            );
        }
        self.pretrain.check(p);
        self.run.check(p);
    }

    /// Every setting as `key → value` (`train.learning_rate`, `reward.0.url`, …).
    pub fn leaves(&self) -> Result<BTreeMap<String, toml::Value>> {
        let mut out = BTreeMap::new();
        collect_leaves(&toml::Value::try_from(self)?, "", &mut out);
        Ok(out)
    }

    /// The resolved configuration as TOML.
    pub fn to_toml(&self) -> String {
        toml::to_string_pretty(self).unwrap_or_else(|e| format!("# cannot print config: {e}"))
    }
}

/// What a command does with the config, and so which of its settings are validated.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Purpose {
    /// `dgpo train` (and pretraining): every setting.
    Train,
    /// `dgpo sample` and `dgpo eval`: the model, LoRA shape, evaluation sampling and rewards; the
    /// rollout, update and run-cadence rules are not checked.
    Sample,
}

/// Sections whose settings only training reads (skipped by [`Purpose::Sample`]).
const TRAINING_ONLY: [&str; 3] = ["train.", "pretrain.", "run."];

/// Every leaf under `key` of a TOML value, into `out`; arrays of tables are indexed (`reward.0.url`),
/// other arrays are one leaf (`lora.targets`).
fn collect_leaves(v: &toml::Value, key: &str, out: &mut BTreeMap<String, toml::Value>) {
    let join = |k: &str| {
        if key.is_empty() {
            k.to_string()
        } else {
            format!("{key}.{k}")
        }
    };
    match v {
        toml::Value::Table(t) => t.iter().for_each(|(k, v)| collect_leaves(v, &join(k), out)),
        toml::Value::Array(a) if !a.is_empty() && a.iter().all(|x| x.is_table()) => a
            .iter()
            .enumerate()
            .for_each(|(i, v)| collect_leaves(v, &join(&i.to_string()), out)),
        other => {
            out.insert(key.to_string(), other.clone());
        }
    }
}

/// Set `a.b.c = value` in a TOML table; `value` is read as TOML, or as a string if it is not TOML.
fn apply_override(table: &mut toml::Table, assignment: &str) -> Result<()> {
    let (key, raw) = assignment
        .split_once('=')
        .with_context(|| format!("--set {assignment:?}: expected key.path=value"))?;
    let key = key.trim();
    let value: toml::Value = match toml::from_str::<toml::Table>(&format!("v = {}", raw.trim())) {
        Ok(mut t) => t
            .remove("v")
            .unwrap_or(toml::Value::String(raw.to_string())),
        Err(_) => toml::Value::String(raw.trim().to_string()),
    };
    let parts: Vec<&str> = key.split('.').collect();
    if parts.iter().any(|p| p.is_empty()) {
        bail!("--set {assignment:?}: {key:?} is not a key path like train.beta_dpo");
    }
    let mut root = toml::Value::Table(std::mem::take(table));
    let r = set_path(&mut root, &parts, value, assignment);
    if let toml::Value::Table(t) = root {
        *table = t;
    }
    r
}

/// Set `parts` under `v`, creating tables on the way; a number indexes an array (`reward.0.url`).
fn set_path(
    v: &mut toml::Value,
    parts: &[&str],
    value: toml::Value,
    assignment: &str,
) -> Result<()> {
    let (head, rest) = (parts[0], &parts[1..]);
    let child = match v {
        toml::Value::Table(t) => {
            if rest.is_empty() {
                t.insert(head.to_string(), value);
                return Ok(());
            }
            t.entry(head.to_string())
                .or_insert_with(|| toml::Value::Table(toml::Table::new()))
        }
        toml::Value::Array(a) => {
            let len = a.len();
            let i: usize = head.parse().with_context(|| {
                format!("--set {assignment:?}: {head:?} indexes a list of {len}: expected a number")
            })?;
            let slot = a.get_mut(i).with_context(|| {
                format!("--set {assignment:?}: index {i}, but the list has {len} entries")
            })?;
            if rest.is_empty() {
                *slot = value;
                return Ok(());
            }
            slot
        }
        _ => bail!("--set {assignment:?}: {head} is not inside a table"),
    };
    set_path(child, rest, value, assignment)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn overrides_reach_into_lists_of_tables() {
        let text = "[[reward]]\nkind = \"remote\"\nurl = \"http://a:1\"\n";
        let c = Config::from_toml(text, "t", &["reward.0.url=http://b:2".into()]).unwrap();
        assert_eq!(c.reward[0].url.as_deref(), Some("http://b:2"));
        let e = Config::from_toml(text, "t", &["reward.3.url=x".into()]).unwrap_err();
        assert!(e.to_string().contains("index 3, but the list has 1"), "{e}");
        let e = Config::from_toml(text, "t", &["reward.x.url=x".into()]).unwrap_err();
        assert!(e.to_string().contains("expected a number"), "{e}");
    }

    #[test]
    fn empty_file_gives_the_documented_defaults() {
        let c = Config::from_toml("", "t", &[]).unwrap();
        assert_eq!(c, Config::default());
        assert_eq!(c.train.beta_dpo, 100.0);
        assert_eq!(c.train.adam_weight_decay, 1e-4);
        assert_eq!(c.lora.rank, 64);
    }

    #[test]
    fn misspelt_key_is_named_with_its_line() {
        let e = Config::from_toml(
            "[train]\nbeta_dpo = 10\nlerning_rate = 1e-3\n",
            "cfg.toml",
            &[],
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("cfg.toml"), "{e}");
        assert!(e.contains("line 3"), "{e}");
        assert!(e.contains("lerning_rate"), "{e}");
    }

    #[test]
    fn overrides_apply_and_unknown_override_keys_fail() {
        let c = Config::from_toml(
            "[train]\nbeta_dpo = 10\n",
            "t",
            &["train.beta_dpo=50".into(), "model.pretrained=/tmp/m".into()],
        )
        .unwrap();
        assert_eq!(c.train.beta_dpo, 50.0);
        assert_eq!(c.model.pretrained, "/tmp/m");
        let e = Config::from_toml("", "t", &["lora.rnk=8".into()])
            .unwrap_err()
            .to_string();
        assert!(e.contains("rnk") && e.contains("--set"), "{e}");
    }

    #[test]
    fn validation_explains_each_rejected_value() {
        let e = Config::from_toml(
            "[sample]\ngroup_size = 16\nbatch_size = 12\n[train]\nbatch_size = 16\ntrunc_steps = 12\n",
            "t",
            &[],
        )
        .unwrap_err()
        .to_string();
        assert!(
            e.contains("sample.group_size = 16 does not divide sample.batch_size = 12"),
            "{e}"
        );
        assert!(
            e.contains("train.trunc_steps = 12 must be below sample.num_steps = 10"),
            "{e}"
        );
    }

    #[test]
    fn pretrain_tag_weights_name_known_tags_and_leave_one_positive() {
        let bad = |toml: &str| Config::from_toml(toml, "t", &[]).unwrap_err().to_string();
        let e = bad("[pretrain.tag_weights]\ncolour = 2.0\n");
        assert!(
            e.contains("pretrain.tag_weights.colour: unknown tag"),
            "{e}"
        );
        assert!(e.contains("color_attr"), "{e}");
        let e = bad("[pretrain.tag_weights]\ncolors = -1.0\n");
        assert!(e.contains("pretrain.tag_weights.colors = -1"), "{e}");
        let zero = "single_object = 0\ntwo_object = 0\ncounting = 0\ncolors = 0\nposition = 0\n";
        let e = bad(&format!("[pretrain.tag_weights]\n{zero}color_attr = 0\n"));
        assert!(e.contains("every tag weighs 0"), "{e}");
        let c = Config::from_toml(&format!("[pretrain.tag_weights]\n{zero}"), "t", &[]).unwrap();
        assert_eq!(c.pretrain.tag_weights.len(), 5);
        for v in ["-0.1", "1.5"] {
            let e = bad(&format!("[pretrain.caption_noise]\nbinding = {v}\n"));
            assert!(
                e.contains(&format!(
                    "pretrain.caption_noise.binding = {v} must be a probability"
                )),
                "{e}"
            );
        }
        let e = bad("[pretrain.caption_noise]\nbindings = 0.5\n");
        assert!(e.contains("bindings"), "{e}");
    }

    #[test]
    fn relation_layout_defaults_to_anywhere_and_names_its_choices() {
        use crate::testbed::RelationLayout;
        assert_eq!(
            Config::default().pretrain.relation_layout,
            RelationLayout::Anywhere
        );
        let c = Config::from_toml("[pretrain]\nrelation_layout = \"edges\"\n", "t", &[]).unwrap();
        assert_eq!(c.pretrain.relation_layout, RelationLayout::Edges);
        let e =
            Config::from_toml("[pretrain]\nrelation_layout = \"corners\"\n", "t", &[]).unwrap_err();
        let e = format!("{e:#}");
        assert!(
            e.contains("relation_layout") && e.contains("corners"),
            "{e}"
        );
        assert!(e.contains("anywhere") && e.contains("edges"), "{e}");
        // The SD3.5 configs do not name it, and keep the default.
        for f in ["geneval.toml", "ocr.toml", "pickscore.toml"] {
            let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
                .join("configs")
                .join(f);
            if path.exists() {
                let c = Config::load(&path, &[]).unwrap();
                assert_eq!(c.pretrain.relation_layout, RelationLayout::Anywhere, "{f}");
            }
        }
    }

    #[test]
    fn non_finite_numbers_and_impossible_sizes_are_refused_naming_the_key() {
        for (toml, key) in [
            (
                "[train]\nlearning_rate = inf\n",
                "train.learning_rate = inf",
            ),
            ("[train]\nbeta_dpo = inf\n", "train.beta_dpo = inf"),
            (
                "[sample]\nguidance_scale = inf\n",
                "sample.guidance_scale = inf",
            ),
            ("[train]\nbeta_kl = nan\n", "train.beta_kl = NaN"),
            (
                "[[reward]]\nkind = \"shapes_geneval\"\ntimeout_s = inf\n",
                "reward.0.timeout_s = inf",
            ),
        ] {
            let e = Config::from_toml(toml, "t", &[]).unwrap_err().to_string();
            assert!(
                e.contains(&format!("{key} is not a finite number")),
                "{toml}: {e}"
            );
        }
        let e = Config::from_toml("[lora]\nrank = 100000000\n", "t", &[])
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("lora.rank = 100000000") && e.contains("4096"),
            "{e}"
        );
    }

    #[test]
    fn absurd_sizes_are_refused_naming_key_value_and_limit() {
        for (set, want) in [
            ("sample.group_size=100000000", "sample.group_size = 100000000 is above the limit of 65536"),
            ("sample.batch_size=100000000", "sample.batch_size = 100000000 is above the limit of 65536"),
            ("sample.num_batches_per_epoch=100000000", "sample.num_batches_per_epoch = 100000000 is above the limit of 65536"),
            ("sample.num_batches_per_epoch=10000", "sample.batch_size × sample.num_batches_per_epoch = 16 × 10000 images per epoch is above the limit of 65536"),
            ("sample.eval_batch_size=100000000", "sample.eval_batch_size = 100000000 is above the limit of 65536"),
            ("sample.eval_images_per_prompt=100000000", "sample.eval_images_per_prompt = 100000000 is above the limit of 65536"),
            ("sample.num_steps=100000000", "sample.num_steps = 100000000 is above the limit of 1000"),
            ("sample.eval_num_steps=100000000", "sample.eval_num_steps = 100000000 is above the limit of 1000"),
            ("train.batch_size=100000000", "train.batch_size = 100000000 is above the limit of 65536"),
            ("model.resolution=100000000", "model.resolution = 100000000 is above the limit of 8192"),
            ("model.max_sequence_length=1000000", "model.max_sequence_length = 1000000 is above the limit of 512"),
        ] {
            let e = Config::from_toml("", "t", &[set.into()])
                .unwrap_err()
                .to_string();
            assert!(e.contains(want), "{set}: {e}");
        }
        // the largest integers TOML holds neither overflow nor pass
        let e = Config::from_toml(
            "",
            "t",
            &[
                "sample.batch_size=9223372036854775807".into(),
                "sample.num_batches_per_epoch=9223372036854775807".into(),
                "train.trunc_steps=9223372036854775807".into(),
            ],
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("sample.batch_size = 9223372036854775807"), "{e}");
    }

    #[test]
    fn resolution_is_not_explained_by_an_sd3_vae_before_the_model_is_known() {
        // 36 px is a shapes model of 3 cells of 12 px: whether it fits is the model's to say.
        Config::from_toml("[model]\nresolution = 36\n", "t", &[]).unwrap();
        let e = Config::from_toml("[model]\nresolution = 0\n", "t", &[])
            .unwrap_err()
            .to_string();
        assert!(e.contains("model.resolution") && !e.contains("VAE"), "{e}");
    }

    #[test]
    fn sampling_does_not_check_training_only_rules() {
        let text = "[sample]\nnum_steps = 4\n[train]\ntrunc_steps = 4\nlearning_rate = inf\n\
                    [run]\nnum_epochs = 0\n";
        let e = Config::from_toml(text, "t", &[]).unwrap_err().to_string();
        assert!(
            e.contains("train.trunc_steps = 4 must be below sample.num_steps = 4"),
            "{e}"
        );
        let c = Config::from_toml_for(text, "t", &[], Purpose::Sample).unwrap();
        assert_eq!(c.train.trunc_steps, 4);
        // what sampling uses is still checked
        let e = Config::from_toml_for(
            "[sample]\neval_num_steps = 0\nguidance_scale = nan\n",
            "t",
            &[],
            Purpose::Sample,
        )
        .unwrap_err()
        .to_string();
        assert!(
            e.contains("sample.eval_num_steps must be at least 1")
                && e.contains("sample.guidance_scale = NaN is not a finite number"),
            "{e}"
        );
    }

    #[test]
    fn shipped_configs_parse_and_validate() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("configs");
        let mut n = 0;
        for e in std::fs::read_dir(&dir).unwrap() {
            let p = e.unwrap().path();
            if p.extension().is_some_and(|x| x == "toml") {
                Config::load(&p, &[]).unwrap_or_else(|e| panic!("{}: {e:#}", p.display()));
                n += 1;
            }
        }
        assert!(n >= 3, "expected the paper's configs in configs/");
    }
}
