//! The `dgpo` command line: parses, sets up logging, dispatches. No logic of its own.

use anyhow::{Context, Result};
use clap::{Args, Parser, Subcommand};
use dgpo::config::{Config, Purpose};
use dgpo::train::plan::{locate_transformer_config, Plan};
use std::path::PathBuf;

/// mimalloc instead of the system allocator: Candle allocates a fresh buffer for every tensor op,
/// and glibc serves the large ones with mmap, so every op paid page faults and kernel page zeroing
/// (about 15 % of a CPU pretraining step in `perf`). mimalloc reuses freed memory.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

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
    /// CUDA: cudarc's settings for one stream (event tracking off, memory pool kept); not yet
    /// measured on a GPU, so off by default.
    #[arg(long, global = true)]
    cuda_single_stream: bool,
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
        /// With --resume: accept a change of this config key although it defines the run (e.g.
        /// train.learning_rate); repeatable. Budget, evaluation cadence and reward addresses may
        /// change without it.
        #[arg(long = "allow-config-change", value_name = "KEY", requires = "resume")]
        allow_config_change: Vec<String>,
        /// Write no TensorBoard event files (as run.tensorboard = false).
        #[arg(long)]
        no_tensorboard: bool,
    },
    /// Generate evaluation grids and scores from one or several models on the same noise.
    #[command(
        after_help = "Examples:\n  dgpo sample --config configs/shapes.toml --checkpoint runs/shapes --prompt \"a photo of two red circles\" --images-per-prompt 4\n  dgpo sample --config configs/shapes.toml --checkpoint configs/shapes/base --checkpoint runs/shapes --out runs/compare   # side by side on the test prompts"
    )]
    Sample {
        #[command(flatten)]
        cfg: ConfigArgs,
        /// Model to sample (repeat for a side-by-side grid): a dgpo train run folder or one of its
        /// checkpoints/epoch-N, a pipeline folder, a LoRA .safetensors or peft folder, a single-file
        /// or diffusers transformer (on the config's base). Default: model.pretrained.
        #[arg(long = "checkpoint")]
        checkpoints: Vec<PathBuf>,
        /// Weights of a run checkpoint: the slow EMA (as evaluated) or the raw optimizer weights.
        #[arg(long, value_enum, default_value = "ema")]
        weights: dgpo::train::run_dir::WeightsChoice,
        /// A prompt (repeatable).
        #[arg(long)]
        prompt: Vec<String>,
        /// Prompt file: GenEval .jsonl (enables GenEval scores) or text, one prompt per line.
        /// Default without --prompt: prompts.test of the config.
        #[arg(long)]
        prompts: Option<PathBuf>,
        /// Images per prompt (default: sample.eval_images_per_prompt).
        #[arg(long)]
        images_per_prompt: Option<usize>,
        /// Seed of the initial noise (default: run.seed); image i of prompt p gets the same noise for every model.
        #[arg(long)]
        seed: Option<u64>,
        /// Sampler steps (default: sample.eval_num_steps).
        #[arg(long)]
        steps: Option<usize>,
        /// Classifier-free guidance scale (default: sample.guidance_scale).
        #[arg(long = "cfg")]
        guidance: Option<f64>,
        /// euler or dpm_solver2m (default: sample.sampler).
        #[arg(long, value_parser = parse_sampler)]
        sampler: Option<dgpo::config::Sampler>,
        /// Images per forward batch (default: sample.eval_batch_size).
        #[arg(long)]
        batch_size: Option<usize>,
        /// Initial noise as safetensors ([n_images, C, H, W] prompt-major, or [images_per_prompt, C, H, W]).
        #[arg(long)]
        noise: Option<PathBuf>,
        /// Output folder (default: <run.out_dir>/samples).
        #[arg(long)]
        out: Option<PathBuf>,
    },
    /// Write fine-tuned weights as safetensors (LoRA, merged diffusers folder, or single file).
    #[command(
        after_help = "Examples:\n  dgpo export --checkpoint runs/shapes --format lora --out shapes_lora.safetensors\n  dgpo export --checkpoint runs/shapes/checkpoints/epoch-00040 --format diffusers --dtype f16 --out shapes-dgpo\n  dgpo export --checkpoint runs/shapes --format single-file --weights raw --out shapes_sd3.safetensors"
    )]
    Export {
        /// A dgpo train run folder (its last checkpoint) or one of its checkpoints/epoch-N.
        #[arg(long)]
        checkpoint: PathBuf,
        /// lora: diffusers/peft adapter file; diffusers: merged pipeline folder; single-file: merged
        /// transformer in the StabilityAI layout.
        #[arg(long, value_enum)]
        format: dgpo::cli::export::ExportFormat,
        /// Output file (lora, single-file) or folder (diffusers).
        #[arg(long)]
        out: PathBuf,
        /// Storage dtype.
        #[arg(long, value_enum, default_value = "f32")]
        dtype: dgpo::cli::export::ExportDtype,
        /// The slow-EMA weights (what evaluation uses, as the reference code saves) or the raw ones.
        #[arg(long, value_enum, default_value = "ema")]
        weights: dgpo::train::run_dir::WeightsChoice,
        /// Shard the diffusers transformer above this size (e.g. 10GB, 500MB).
        #[arg(long, default_value = "10GB", value_parser = parse_size)]
        max_shard_size: usize,
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
        after_help = "Example:\n  dgpo eval --config configs/shapes.toml --checkpoint runs/shapes --json eval.json"
    )]
    Eval {
        #[command(flatten)]
        cfg: ConfigArgs,
        /// A dgpo train run folder (its last checkpoint, EMA weights) or checkpoints/epoch-N, a
        /// pipeline folder, a LoRA or a single-file / diffusers transformer on the config's base
        /// (default: model.pretrained of the config).
        #[arg(long)]
        checkpoint: Option<PathBuf>,
        /// Also write the summary as JSON here.
        #[arg(long)]
        json: Option<PathBuf>,
        /// Write a grid of every sampled image (one row per prompt) as PNG here.
        #[arg(long)]
        grid: Option<PathBuf>,
    },
    /// Draw report.html (curves, per-tag curves, loss terms, timings, grids, configs) for one run or
    /// several overlaid; with several, print when each first reaches each GenEval score.
    #[command(
        after_help = "Examples:\n  dgpo report runs/shapes\n  dgpo report runs/compare/dgpo runs/compare/flow_grpo --out runs/compare/report.html"
    )]
    Report {
        /// `dgpo train` run folders.
        #[arg(required = true)]
        runs: Vec<PathBuf>,
        /// Output page (default: <run>/report.html for one run, ./report.html for several).
        #[arg(long)]
        out: Option<PathBuf>,
        /// Also write the time-to-score table as JSON here.
        #[arg(long)]
        json: Option<PathBuf>,
    },
    /// Serve dgpo's in-process rewards over HTTP (JSON protocol: GET /health, POST /compute).
    #[command(
        name = "reward-server",
        after_help = "Examples:\n  dgpo reward-server --reward shapes_geneval --port 18085\n  \
                      dgpo reward-server --config configs/shapes.toml --host 0.0.0.0 --port 18085"
    )]
    RewardServer {
        /// Serve the [[reward]] modules of this config (weighted as there).
        #[arg(long, short, conflicts_with = "reward")]
        config: Option<PathBuf>,
        /// Serve this reward kind with weight 1 (repeatable), e.g. shapes_geneval.
        #[arg(long)]
        reward: Vec<String>,
        #[arg(long, default_value = "127.0.0.1")]
        host: String,
        #[arg(long, default_value_t = 18085)]
        port: u16,
        /// Worker threads answering requests.
        #[arg(long, default_value_t = 2)]
        workers: usize,
    },
}

fn parse_sampler(s: &str) -> Result<dgpo::config::Sampler, String> {
    match s {
        "euler" => Ok(dgpo::config::Sampler::Euler),
        "dpm_solver2m" | "dpm" => Ok(dgpo::config::Sampler::DpmSolver2m),
        _ => Err(format!("{s:?}: expected euler or dpm_solver2m")),
    }
}

fn parse_size(s: &str) -> Result<usize, String> {
    dgpo::cli::export::parse_size(s).map_err(|e| format!("{e:#}"))
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
    if cli.cuda_single_stream {
        dgpo::cuda_single_stream(&device)?;
    }
    tracing::debug!(?device, "device ready");
    match cli.command {
        Command::Train {
            cfg,
            dry_run,
            out,
            resume,
            allow_config_change,
            no_tensorboard,
        } => {
            let mut config = Config::load(&cfg.config, &cfg.set)?;
            if let Some(out) = out {
                config.run.out_dir = out;
            }
            if no_tensorboard {
                config.run.tensorboard = false;
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
            // The [[reward]] tables are checked (no model loaded, no server contacted).
            dgpo::reward::Rewards::validate(&config.reward)?;
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
            let opts = dgpo::train::RunOptions {
                resume,
                allow_config_change,
                stop_after: None,
            };
            dgpo::train::run_with(&config, &out, &opts, &device)
        }
        Command::Report { runs, out, json } => dgpo::report::cli(&runs, out, json.as_deref()),
        Command::Sample {
            cfg,
            checkpoints,
            weights,
            prompt,
            prompts,
            images_per_prompt,
            seed,
            steps,
            guidance,
            sampler,
            batch_size,
            noise,
            out,
        } => {
            let config = Config::load_for(&cfg.config, &cfg.set, Purpose::Sample)?;
            let out = out.unwrap_or_else(|| config.run.out_dir.join("samples"));
            let mut a = dgpo::cli::sample::SampleArgs::from_config(&config, out);
            a.checkpoints = checkpoints;
            a.weights = weights;
            a.prompts = prompt;
            a.prompt_file = prompts;
            a.noise = noise;
            a.images_per_prompt = images_per_prompt.unwrap_or(a.images_per_prompt);
            a.seed = seed.unwrap_or(a.seed);
            a.steps = steps.unwrap_or(a.steps);
            a.guidance = guidance.unwrap_or(a.guidance);
            a.sampler = sampler.unwrap_or(a.sampler);
            a.batch_size = batch_size.unwrap_or(a.batch_size);
            dgpo::cli::sample::run(&config, &a, &device).map(|_| ())
        }
        Command::Export {
            checkpoint,
            format,
            out,
            dtype,
            weights,
            max_shard_size,
        } => {
            let args = dgpo::cli::export::ExportArgs {
                checkpoint,
                format,
                dtype,
                weights,
                out,
                max_shard_bytes: max_shard_size,
            };
            let r = dgpo::cli::export::export(&args, &device)?;
            for f in &r.files {
                println!("{}", f.display());
            }
            println!(
                "exported {} tensors ({:.2} MB) as {:?}",
                r.tensors,
                r.bytes as f64 / 1e6,
                format
            );
            Ok(())
        }
        Command::Pretrain { cfg, out, resume } => {
            let config = Config::load(&cfg.config, &cfg.set)?;
            let out = out.unwrap_or_else(|| dgpo::train::pretrain::default_out(&config));
            dgpo::train::pretrain::run(&config, &out, resume, &device)
        }
        Command::Eval {
            cfg,
            checkpoint,
            json,
            grid,
        } => {
            let config = Config::load_for(&cfg.config, &cfg.set, Purpose::Sample)?;
            dgpo::cli::eval::run_cli(
                &config,
                checkpoint.as_deref(),
                json.as_deref(),
                grid.as_deref(),
                &device,
            )
        }
        Command::RewardServer {
            config,
            reward,
            host,
            port,
            workers,
        } => {
            let cfgs = match config {
                Some(c) => Config::load(&c, &[])?.reward,
                None if reward.is_empty() => anyhow::bail!(
                    "reward-server: name what to serve with --reward KIND (e.g. shapes_geneval) or \
                     --config FILE"
                ),
                None => reward
                    .iter()
                    .map(|k| dgpo::config::RewardConfig {
                        kind: k.clone(),
                        ..Default::default()
                    })
                    .collect(),
            };
            let rewards = dgpo::reward::Rewards::from_config(&cfgs)?;
            let names: Vec<&str> = cfgs.iter().map(|r| r.kind.as_str()).collect();
            let server = dgpo::reward::serve::RewardServer::start(
                &format!("{host}:{port}"),
                rewards,
                dgpo::reward::serve::ServeOptions {
                    threads: workers,
                    max_requests: None,
                },
            )?;
            println!(
                "serving {} at {} (GET /health, POST /compute); Ctrl-C stops",
                names.join(" + "),
                server.url()
            );
            server.wait();
            Ok(())
        }
    }
}
