//! `beltad fit`: fit a detector on normal images and write the model file.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::Args;

use beltad::dataset;
use beltad::detector::Detector;
use beltad::progress::Progress;

use super::{BackboneArgs, ConfigArgs, create_dir, stop_requested};

/// Fit a detector on normal images and write one model file.
///
/// DIR is an MVTec-layout data set (its train/good images are used) or a
/// plain folder of normal images. A share of the images is held out to set
/// the decision threshold without labels. The model file is written
/// atomically: an existing file at the path is replaced only once the new
/// one is complete.
#[derive(Debug, Args)]
pub struct FitArgs {
    /// Folder of normal images, or an MVTec-layout data set.
    #[arg(long, value_name = "DIR")]
    data: PathBuf,
    /// Model file to write (conventionally *.beltad).
    #[arg(long, value_name = "FILE")]
    model: PathBuf,
    #[command(flatten)]
    config: ConfigArgs,
    #[command(flatten)]
    backbones: BackboneArgs,
}

pub fn run(args: &FitArgs, progress: &dyn Progress) -> anyhow::Result<ExitCode> {
    let (detector, seconds) = fit_and_save(
        &args.data,
        &args.model,
        &args.config,
        &args.backbones,
        progress,
    )?;
    print_summary(&detector, &args.model, seconds);
    Ok(ExitCode::SUCCESS)
}

/// Fits on `data` and writes the model to `model`; also returns the fit's
/// wall time in seconds (feature extraction included, backbone loading not).
pub fn fit_and_save(
    data: &Path,
    model: &Path,
    config: &ConfigArgs,
    backbones: &BackboneArgs,
    progress: &dyn Progress,
) -> anyhow::Result<(Detector, f64)> {
    let config = config.load()?;
    let images = dataset::training_images(data)?;
    if let Some(parent) = model.parent().filter(|p| !p.as_os_str().is_empty()) {
        create_dir(parent)?;
    }
    let extractor = backbones.extractor(&config)?;
    let started = std::time::Instant::now();
    let detector = beltad::fit::fit(&config, &extractor, &images, &dataset::name(data), progress)?;
    let seconds = started.elapsed().as_secs_f64();
    // Ctrl-C while the branches were fitted (no image batch since): no model.
    anyhow::ensure!(!stop_requested(), "interrupted");
    detector.to_model_file().save(model)?;
    Ok((detector, seconds))
}

pub fn print_summary(detector: &Detector, model: &Path, seconds: f64) {
    let p = &detector.provenance;
    let threshold = detector
        .calibration
        .threshold
        .map_or("none (no held-out images)".into(), |t| format!("{t:.4}"));
    println!(
        "fitted {} on {} images ({} in the memory bank's images, {} held out) in {:.1} s",
        p.dataset, p.n_fit_images, p.n_bank_images, p.n_calibration_images, seconds
    );
    println!(
        "memory bank: {} entries of {} dims",
        detector.texture.bank.len(),
        detector.texture.bank.dim()
    );
    println!("threshold: {threshold}");
    println!("model written to {}", model.display());
}
