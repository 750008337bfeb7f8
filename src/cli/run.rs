//! `beltad run`: the whole job in one command: fit on train/good, evaluate
//! on the test split, and draw heatmaps for a sample of test images.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Args;

use beltad::dataset::{self, TestSample};
use beltad::evaluate::evaluate;
use beltad::progress::Progress;

use super::eval::{ExtraArgs, print_table, write_json, write_scores_csv};
use super::fit::{fit_and_save, print_summary};
use super::predict::{Pictures, predict};
use super::{BackboneArgs, ConfigArgs, load_model};

/// Fit, evaluate and draw heatmaps on an MVTec-layout data set in one go.
///
/// Writes into OUT: model.beltad, metrics.json, scores.csv (every test
/// image), and pictures/ (heatmaps, overlays and their score files) for a
/// sample of test images (a few per class).
#[derive(Debug, Args)]
pub struct RunArgs {
    /// MVTec-layout data set.
    #[arg(long, value_name = "DIR")]
    data: PathBuf,
    /// Output folder.
    #[arg(long, value_name = "DIR")]
    out: PathBuf,
    /// Test images per class to draw heatmaps for.
    #[arg(long, default_value_t = 3, value_name = "N")]
    heatmaps_per_class: usize,
    #[command(flatten)]
    extra: ExtraArgs,
    #[command(flatten)]
    config: ConfigArgs,
    #[command(flatten)]
    backbones: BackboneArgs,
}

pub fn run(args: &RunArgs, progress: &dyn Progress) -> anyhow::Result<ExitCode> {
    // Check the test split before spending time on a fit.
    let samples = dataset::test_samples(&args.data)?;
    let model = args.out.join("model.beltad");
    let (fitted, seconds) =
        fit_and_save(&args.data, &model, &args.config, &args.backbones, progress)?;
    print_summary(&fitted, &model, seconds);

    let (detector, extractor) = load_model(&model, &args.backbones)?;
    let evaluation = evaluate(
        &detector,
        &extractor,
        &args.data,
        &args.backbones.limits(),
        args.extra.options(),
        progress,
    )?;
    print_table(&evaluation);
    args.extra
        .write_report(&evaluation, &detector, &args.backbones.limits())?;
    write_json(&evaluation, &args.out.join("metrics.json"))?;
    write_scores_csv(&evaluation, &args.out.join("scores.csv"))?;

    let sample = sample_per_class(&samples, args.heatmaps_per_class);
    let pictures = args.out.join("pictures");
    predict(
        &detector,
        &extractor,
        &sample,
        &pictures,
        Pictures::WithBranches,
        progress,
    )?;
    println!(
        "metrics in {}, heatmaps in {}",
        args.out.join("metrics.json").display(),
        pictures.display()
    );
    Ok(ExitCode::SUCCESS)
}

/// The first `n` images of every class, in class order.
fn sample_per_class(samples: &[TestSample], n: usize) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut seen: Vec<(Option<String>, usize)> = Vec::new();
    for s in samples {
        let count = match seen.iter_mut().find(|(d, _)| *d == s.defect) {
            Some((_, c)) => c,
            None => {
                seen.push((s.defect.clone(), 0));
                &mut seen.last_mut().expect("just pushed").1
            }
        };
        if *count < n {
            out.push(s.image.clone());
            *count += 1;
        }
    }
    out
}
