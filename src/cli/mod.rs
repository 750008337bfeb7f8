//! Command-line interface. Each verb lives in its own file; this file holds
//! the argument definitions shared between them and maps outcomes to exit
//! codes:
//!
//! - 0: success;
//! - 1: an error (unreadable input, bad config, corrupted model, ...), with a
//!   one-line message naming the file and the problem on stderr;
//! - 2: invalid command-line usage;
//! - 3: `predict` finished but some images could not be read (each is listed
//!   in the scores files with its error);
//! - 130: stopped by Ctrl-C (SIGINT) or SIGTERM before the next batch of
//!   images; nothing half-written is left at an output path. A second
//!   signal ends the process at once.

mod config;
mod eval;
mod fit;
mod predict;
mod progress_bar;
mod run;
mod sweep;

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};

use anyhow::Context;
use clap::builder::TypedValueParser;
use clap::{Args, Parser, Subcommand};

use beltad::config::{Config, Preset};
use beltad::detector::Detector;
use beltad::feature_cache::FeatureCache;
use beltad::features::{DEFAULT_BATCH_SIZE, FeatureExtractor};
use beltad::image_io::{DEFAULT_MAX_FILE_BYTES, DEFAULT_MAX_PIXELS, DecodeLimits};
use beltad::model_file::ModelFile;
use beltad::weights::WeightsSearch;

/// Exit code when some images of a predict run could not be read.
pub const EXIT_PARTIAL: u8 = 3;
/// Exit code after Ctrl-C (128 + SIGINT, the shell's convention).
pub const EXIT_INTERRUPTED: u8 = 130;

/// Unsupervised anomaly detection and localisation for conveyor-belt camera
/// images.
///
/// beltad learns what normal looks like from a folder of normal images only,
/// then gives every new image an anomaly score, a decision against a
/// threshold set from held-out normal images, and a heatmap of where the
/// anomaly lies. It fuses three branches on frozen backbones: an object
/// branch (DINOv2 CLS Mahalanobis + foreground/background prototypes), a
/// semantic attribution branch (mean patch token Mahalanobis with
/// leave-one-patch-out attribution) and a texture branch (PatchCore).
#[derive(Debug, Parser)]
#[command(name = "beltad", version, propagate_version = true)]
pub struct Cli {
    #[command(subcommand)]
    command: Command,
    /// Log more (-v: stages, -vv: details).
    #[arg(short, long, action = clap::ArgAction::Count, global = true)]
    verbose: u8,
    /// No progress bars.
    #[arg(short, long, global = true)]
    quiet: bool,
    /// Worker threads for backbones and search (default: all cores).
    #[arg(long, global = true, value_name = "N")]
    threads: Option<usize>,
}

#[derive(Debug, Subcommand)]
enum Command {
    Fit(fit::FitArgs),
    Predict(predict::PredictArgs),
    Eval(eval::EvalArgs),
    Run(run::RunArgs),
    Sweep(sweep::SweepArgs),
    Config(config::ConfigCmdArgs),
}

/// Options for loading backbones.
#[derive(Debug, Clone, Args)]
pub struct BackboneArgs {
    /// Folder of backbone weights (safetensors). Default: $BELTAD_WEIGHTS,
    /// then ./weights, ../shared/weights and the user data folder.
    #[arg(long, value_name = "DIR")]
    weights: Option<PathBuf>,
    /// Images per backbone forward pass.
    #[arg(long, default_value_t = DEFAULT_BATCH_SIZE, value_name = "N",
          value_parser = clap::value_parser!(u16).range(1..=256).map(usize::from))]
    batch_size: usize,
    /// Largest image accepted, in pixels; larger images are refused before decoding.
    #[arg(long, default_value_t = DEFAULT_MAX_PIXELS, value_name = "PIXELS")]
    max_pixels: u64,
    /// Cache backbone features in this folder (keyed by image content,
    /// weights and input size), so later runs on the same images skip the
    /// backbones.
    #[arg(long, value_name = "DIR")]
    cache: Option<PathBuf>,
    /// Largest image file accepted, in bytes.
    #[arg(long, default_value_t = DEFAULT_MAX_FILE_BYTES, value_name = "BYTES")]
    max_file_bytes: u64,
}

impl BackboneArgs {
    pub fn cache_dir(&self) -> Option<PathBuf> {
        self.cache.clone()
    }

    pub fn weights_dir(&self) -> Option<&Path> {
        self.weights.as_deref()
    }

    pub fn batch_size(&self) -> usize {
        self.batch_size
    }

    pub fn limits(&self) -> DecodeLimits {
        DecodeLimits {
            max_pixels: self.max_pixels,
            max_file_bytes: self.max_file_bytes,
        }
    }

    /// Loads the backbones a config needs.
    pub fn extractor(&self, config: &Config) -> anyhow::Result<FeatureExtractor> {
        let search = WeightsSearch::new(self.weights.as_deref());
        let mut extractor = FeatureExtractor::load(config, &search)?
            .with_batch_size(self.batch_size)
            .with_stop_flag(stop_flag())
            .with_limits(self.limits());
        if let Some(dir) = &self.cache {
            let cache = FeatureCache::open(dir)
                .with_context(|| format!("{}: cannot open feature cache", dir.display()))?;
            extractor = extractor.with_cache(cache);
        }
        Ok(extractor)
    }
}

/// Options choosing the detector configuration.
#[derive(Debug, Clone, Args)]
pub struct ConfigArgs {
    /// TOML config; fields it leaves out take the preset's values.
    #[arg(long, value_name = "FILE")]
    config: Option<PathBuf>,
    /// Preset to start from (`paper` needs ViT-B/14 and WRN50-2 weights).
    #[arg(long, value_enum, default_value_t = Preset::Default)]
    preset: Preset,
    /// Seed of every random choice in the fit (overrides the config).
    #[arg(long, value_name = "N")]
    seed: Option<u64>,
}

impl ConfigArgs {
    pub fn load(&self) -> anyhow::Result<Config> {
        let mut config = match &self.config {
            Some(path) => Config::from_file(path, self.preset)?,
            None => Config::preset(self.preset),
        };
        if let Some(seed) = self.seed {
            config.seed = seed;
        }
        Ok(config)
    }
}

/// Loads a model file and the backbones it was fitted with.
pub fn load_model(
    path: &Path,
    backbones: &BackboneArgs,
) -> anyhow::Result<(Detector, FeatureExtractor)> {
    let shown = path.display().to_string();
    let file = ModelFile::load(path)?;
    let detector = Detector::from_model_file(&file, &shown)?;
    let extractor = backbones.extractor(&detector.config)?;
    detector.check_weights(&shown, extractor.fingerprints())?;
    detector.check_dims(&shown, &extractor.dims())?;
    Ok((detector, extractor))
}

/// Creates an output folder (and its parents).
pub fn create_dir(dir: &Path) -> anyhow::Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("{}: cannot create folder", dir.display()))
}

pub fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => {
            let _ = e.print();
            return ExitCode::from(if e.use_stderr() { 2 } else { 0 });
        }
    };
    init_logging(cli.verbose);
    install_stop_handlers();
    if let Some(Err(e)) = cli.threads.map(set_threads) {
        eprintln!("error: {e:#}");
        return ExitCode::from(2);
    }
    let bars = progress_bar::Bars::new(cli.quiet);
    let outcome = match &cli.command {
        Command::Fit(args) => fit::run(args, &bars),
        Command::Predict(args) => predict::run(args, &bars),
        Command::Eval(args) => eval::run(args, &bars),
        Command::Run(args) => run::run(args, &bars),
        Command::Sweep(args) => sweep::run(args, &bars),
        Command::Config(args) => config::run(args),
    };
    match outcome {
        Ok(code) => code,
        Err(_) if stop_requested() => {
            eprintln!("error: interrupted");
            ExitCode::from(EXIT_INTERRUPTED)
        }
        Err(e) => {
            eprintln!("error: {}", one_line(&e));
            ExitCode::FAILURE
        }
    }
}

/// The error and its causes on one line, without repeating a cause that the
/// message above already quotes.
fn one_line(e: &anyhow::Error) -> String {
    let mut line = String::new();
    for cause in e.chain() {
        let text = cause.to_string();
        if !line.contains(&text) {
            if !line.is_empty() {
                line.push_str(": ");
            }
            line.push_str(&text);
        }
    }
    line.replace('\n', " ")
}

/// Raised by Ctrl-C or SIGTERM; feature extraction stops before its next batch.
fn stop_flag() -> Arc<AtomicBool> {
    static STOP: OnceLock<Arc<AtomicBool>> = OnceLock::new();
    STOP.get_or_init(Arc::default).clone()
}

/// Whether Ctrl-C or SIGTERM has asked the run to stop.
pub fn stop_requested() -> bool {
    stop_flag().load(Ordering::SeqCst)
}

/// The first SIGINT or SIGTERM raises the stop flag; a second one ends the
/// process at once (its temporary files may then remain, as after SIGKILL).
fn install_stop_handlers() {
    let stop = stop_flag();
    for signal in [signal_hook::consts::SIGINT, signal_hook::consts::SIGTERM] {
        // The shutdown is registered first so that it acts only on a flag
        // already raised by an earlier signal.
        let status = i32::from(EXIT_INTERRUPTED);
        let _ = signal_hook::flag::register_conditional_shutdown(signal, status, stop.clone());
        let _ = signal_hook::flag::register(signal, stop.clone());
    }
}

fn init_logging(verbose: u8) {
    let level = match verbose {
        0 => "warn",
        1 => "info",
        _ => "debug",
    };
    let filter = tracing_subscriber::EnvFilter::try_from_env("BELTAD_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(level));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .try_init();
}

fn set_threads(n: usize) -> anyhow::Result<()> {
    anyhow::ensure!(
        (1..=1024).contains(&n),
        "--threads {n}: must lie in 1..=1024"
    );
    // SAFETY: called at start-up, before any other thread exists; candle and
    // gemm read this variable when they size their pools.
    unsafe { std::env::set_var("RAYON_NUM_THREADS", n.to_string()) };
    rayon::ThreadPoolBuilder::new()
        .num_threads(n)
        .build_global()?;
    Ok(())
}
