//! The `dgpo` command line: parses, sets up logging, dispatches. No logic of its own.

use anyhow::{bail, Context, Result};
use clap::{Args, Parser, Subcommand};
use dgpo::config::Config;
use dgpo::plan::{locate_transformer_config, Plan};
use std::path::PathBuf;

#[derive(Parser)]
#[command(
    name = "dgpo",
    version,
    about = "Direct Group Preference Optimization for SD3 / SD3.5 flow-matching models"
)]
struct Cli {
    /// Compute device: cpu, cuda or cuda:N.
    #[arg(long, global = true, default_value = "cpu")]
    device: String,
    /// More log output (-v debug, -vv trace). RUST_LOG overrides.
    #[arg(short, long, global = true, action = clap::ArgAction::Count)]
    verbose: u8,
    /// Only warnings and errors.
    #[arg(short, long, global = true)]
    quiet: bool,
    /// Worker threads for batch-parallel CPU work (default: all available cores). Results are
    /// reproducible bit for bit for a given thread count.
    #[arg(long, global = true, value_parser = clap::value_parser!(u32).range(1..=256))]
    threads: Option<u32>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Args)]
struct ConfigArgs {
    /// TOML configuration file.
    #[arg(long, short)]
    config: PathBuf,
    /// Override a config value, e.g. --set train.beta_dpo=50 (repeatable).
    #[arg(long = "set", value_name = "KEY.PATH=VALUE")]
    set: Vec<String>,
}

#[derive(Subcommand)]
enum Command {
    /// Fine-tune with DGPO.
    #[command(
        after_help = "Example:\n  dgpo train --config configs/geneval.toml --set train.beta_dpo=50 --dry-run"
    )]
    Train {
        #[command(flatten)]
        cfg: ConfigArgs,
        /// Print the resolved config and the plan, then exit.
        #[arg(long)]
        dry_run: bool,
        /// Run directory (default: run.out_dir of the config).
        #[arg(long)]
        out: Option<PathBuf>,
        /// Continue the run in --out from its last checkpoint.
        #[arg(long)]
        resume: bool,
    },
    /// Generate evaluation grids and scores.
    #[command(
        after_help = "Example:\n  dgpo sample --config configs/geneval.toml --prompt \"a photo of a red cube\" --images-per-prompt 4"
    )]
    Sample {
        #[command(flatten)]
        cfg: ConfigArgs,
    },
    /// Write fine-tuned weights as safetensors.
    #[command(after_help = "Example:\n  dgpo export --config configs/geneval.toml --format lora")]
    Export {
        #[command(flatten)]
        cfg: ConfigArgs,
    },
    /// Flow-matching pretraining of the small shapes-testbed model.
    #[command(after_help = "Example:\n  dgpo pretrain --config configs/shapes-pretrain.toml")]
    Pretrain {
        #[command(flatten)]
        cfg: ConfigArgs,
        /// Run directory (default: run.out_dir of the config).
        #[arg(long)]
        out: Option<PathBuf>,
        /// Continue from the run directory's checkpoint.
        #[arg(long)]
        resume: bool,
    },
    /// Score a model on the config's test prompts (GenEval-shapes).
    #[command(
        after_help = "Example:\n  dgpo eval --config configs/shapes-dgpo.toml --checkpoint runs/shapes/model --json eval.json"
    )]
    Eval {
        #[command(flatten)]
        cfg: ConfigArgs,
        /// A shapes pipeline folder (default: model.pretrained of the config).
        #[arg(long)]
        checkpoint: Option<PathBuf>,
        /// Also write the summary as JSON here.
        #[arg(long)]
        json: Option<PathBuf>,
        /// Write a grid of every sampled image (one row per prompt) as PNG here.
        #[arg(long)]
        grid: Option<PathBuf>,
    },
}

fn init_logging(verbose: u8, quiet: bool) {
    use tracing_subscriber::EnvFilter;
    let level = match (quiet, verbose) {
        (true, _) => "warn",
        (false, 0) => "info",
        (false, 1) => "debug",
        _ => "trace",
    };
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(level));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .init();
}

fn main() {
    let cli = Cli::parse();
    // dgpo parallelises over the batch (`dgpo::par`); Candle's own CPU kernels run single-threaded
    // unless the user asks otherwise. Set before any other thread exists.
    if std::env::var_os("RAYON_NUM_THREADS").is_none()
        && std::env::var_os("CANDLE_NUM_THREADS").is_none()
    {
        std::env::set_var("RAYON_NUM_THREADS", "1");
    }
    if let Some(n) = cli.threads {
        dgpo::par::set_threads(n as usize);
    }
    init_logging(cli.verbose, cli.quiet);
    if let Err(e) = run(cli) {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}

fn run(cli: Cli) -> Result<()> {
    let device = dgpo::device(&cli.device)?;
    tracing::debug!(?device, "device ready");
    match cli.command {
        Command::Train {
            cfg,
            dry_run,
            out,
            resume,
        } => {
            let mut config = Config::load(&cfg.config, &cfg.set)?;
            if let Some(out) = out {
                config.run.out_dir = out;
            }
            let transformer = locate_transformer_config(
                &config.model.pretrained,
                config.model.transformer_config.as_deref(),
            )
            .map(|p| {
                dgpo::model::TransformerConfig::from_json_file(&p)
                    .map(|c| (p.clone(), c))
                    .with_context(|| format!("model.pretrained = {:?}", config.model.pretrained))
            })
            .transpose()?;
            let plan = Plan::new(&config, transformer);
            if dry_run {
                println!(
                    "# resolved config ({})\n{}",
                    cfg.config.display(),
                    config.to_toml()
                );
                print!("{}", plan.render(&config));
                return Ok(());
            }
            let out = config.run.out_dir.clone();
            dgpo::train::run(&config, &out, resume, &device)
        }
        Command::Sample { cfg } => {
            Config::load(&cfg.config, &cfg.set)?;
            bail!("`dgpo sample` is not implemented yet (issue #5)")
        }
        Command::Export { cfg } => {
            Config::load(&cfg.config, &cfg.set)?;
            bail!("`dgpo export` is not implemented yet (issue #5)")
        }
        Command::Pretrain { cfg, out, resume } => {
            let config = Config::load(&cfg.config, &cfg.set)?;
            let out = out.unwrap_or_else(|| dgpo::pretrain::default_out(&config));
            dgpo::pretrain::run(&config, &out, resume, &device)
        }
        Command::Eval {
            cfg,
            checkpoint,
            json,
            grid,
        } => {
            let config = Config::load(&cfg.config, &cfg.set)?;
            dgpo::eval::run_cli(
                &config,
                checkpoint.as_deref(),
                json.as_deref(),
                grid.as_deref(),
                &device,
            )
        }
    }
}
