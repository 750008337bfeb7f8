//! `beltad eval`: metrics of a fitted model on an MVTec-layout test split.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::Context;
use clap::Args;

use beltad::atomic_write::{AtomicFile, write_atomic};
use beltad::detector::Detector;
use beltad::evaluate::{EvalOptions, Evaluation, Metrics, evaluate};
use beltad::image_io::DecodeLimits;
use beltad::progress::Progress;
use beltad::report;

use super::predict::csv_field;
use super::{BackboneArgs, create_dir, load_model};

/// Evaluate a fitted model on the test split of an MVTec-layout data set.
///
/// Prints image AUROC, pixel AUROC and AUPRO@0.3 for the fused output and
/// for each branch alone, and writes them as JSON:
/// {"dataset", "n_test_images", "fused": {"image_auroc", "pixel_auroc",
/// "aupro_0_3", "aupro_0_3_reference"}, "object": {...}, "attribution":
/// {...}, "texture": {...}, "threshold", "seconds_per_image"}. Maps are
/// compared with the masks on the model's evaluation grid.
#[derive(Debug, Args)]
pub struct EvalArgs {
    /// Model file written by `beltad fit`.
    #[arg(long, value_name = "FILE")]
    model: PathBuf,
    /// MVTec-layout data set (test/good, test/<defect>, ground_truth/<defect>).
    #[arg(long, value_name = "DIR")]
    data: PathBuf,
    /// Write the metrics as JSON here.
    #[arg(long, value_name = "FILE")]
    json: Option<PathBuf>,
    /// Write every test image's scores as CSV here.
    #[arg(long, value_name = "FILE")]
    scores: Option<PathBuf>,
    #[command(flatten)]
    extra: ExtraArgs,
    #[command(flatten)]
    backbones: BackboneArgs,
}

/// Optional analyses of an evaluation.
#[derive(Debug, Clone, Args)]
pub struct ExtraArgs {
    /// Also evaluate every fusion rule and image-score rule on the same
    /// branch outputs, with threshold statistics.
    #[arg(long)]
    rules: bool,
    /// Also evaluate the paper's ablation: every subset of branches.
    #[arg(long)]
    ablation: bool,
    /// Write a browsable HTML report (index.html + pictures) into this
    /// folder; implies --rules and --ablation.
    #[arg(long, value_name = "DIR")]
    report: Option<PathBuf>,
}

impl ExtraArgs {
    pub fn options(&self) -> EvalOptions {
        let report = self.report.is_some();
        EvalOptions {
            rules: self.rules || report,
            ablation: self.ablation || report,
            details: report,
        }
    }

    /// Writes the report if one was asked for.
    pub fn write_report(
        &self,
        e: &Evaluation,
        detector: &Detector,
        limits: &DecodeLimits,
    ) -> anyhow::Result<()> {
        if let Some(dir) = &self.report {
            create_dir(dir)?;
            let index = report::write_report(dir, e, detector, limits)?;
            println!("report written to {}", index.display());
        }
        Ok(())
    }
}

pub fn run(args: &EvalArgs, progress: &dyn Progress) -> anyhow::Result<ExitCode> {
    let (detector, extractor) = load_model(&args.model, &args.backbones)?;
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
    if let Some(path) = &args.json {
        write_json(&evaluation, path)?;
    }
    if let Some(path) = &args.scores {
        write_scores_csv(&evaluation, path)?;
    }
    Ok(ExitCode::SUCCESS)
}

/// Prints the metrics tables.
pub fn print_table(e: &Evaluation) {
    let anomalous = e.images.iter().filter(|r| r.defect.is_some()).count();
    println!(
        "{}: {} test images ({} normal, {} anomalous), {:.3} s per image",
        e.dataset,
        e.n_test_images,
        e.n_test_images - anomalous,
        anomalous,
        e.seconds_per_image
    );
    println!(
        "{:<12} {:>11} {:>11} {:>10} {:>14}",
        "output", "image AUROC", "pixel AUROC", "AUPRO@0.3", "AUPRO (ref.)"
    );
    let rows: [(&str, &Metrics); 4] = [
        ("fused", &e.fused),
        ("object", &e.object),
        ("attribution", &e.attribution),
        ("texture", &e.texture),
    ];
    for (name, m) in rows {
        print_metrics(name, m);
    }
    if let Some(t) = e.threshold {
        let flagged = |anomalous: bool| {
            e.images
                .iter()
                .filter(|r| r.defect.is_some() == anomalous && r.anomalous == Some(true))
                .count()
        };
        println!(
            "fusion {} / score {}, threshold {t:.4}: {}/{anomalous} anomalous and {}/{} normal images flagged",
            e.fusion_rule,
            e.image_score_rule,
            flagged(true),
            flagged(false),
            e.n_test_images - anomalous
        );
    }
    if let Some(rules) = &e.rules {
        println!("\nfusion rules (map rule / image score):");
        println!(
            "{:<34} {:>11} {:>11} {:>10} {:>9} {:>7} {:>7}",
            "rule", "image AUROC", "pixel AUROC", "AUPRO@0.3", "detected", "false+", "missed*"
        );
        for r in rules {
            let m = &r.metrics;
            println!(
                "{:<34} {:>11.4} {:>11.4} {:>10.4} {:>9} {:>7} {:>7}",
                format!("{} / {}", r.rule, r.image_score),
                m.image_auroc,
                m.pixel_auroc,
                m.aupro_0_3,
                r.detected,
                r.false_alarms,
                r.missed_but_seen_by_a_branch
            );
        }
        println!("* anomalies missed although one branch alone flags them at its own threshold");
    }
    if let Some(rows) = &e.ablation {
        println!("\nablation (paper's rule):");
        println!(
            "{:<28} {:>11} {:>13} {:>11} {:>10}",
            "branches", "image AUROC", "max(M) AUROC", "pixel AUROC", "AUPRO@0.3"
        );
        for r in rows {
            println!(
                "{:<28} {:>11.4} {:>13.4} {:>11.4} {:>10.4}",
                r.branches, r.image_auroc, r.map_max_image_auroc, r.pixel_auroc, r.aupro_0_3
            );
        }
    }
}

fn print_metrics(name: &str, m: &Metrics) {
    println!(
        "{name:<12} {:>11.4} {:>11.4} {:>10.4} {:>14.4}",
        m.image_auroc, m.pixel_auroc, m.aupro_0_3, m.aupro_0_3_reference
    );
}

/// Writes the metrics JSON atomically.
pub fn write_json(e: &Evaluation, path: &Path) -> anyhow::Result<()> {
    let text = serde_json::to_string_pretty(e)? + "\n";
    write_atomic(path, text.as_bytes()).with_context(|| format!("{}: cannot write", path.display()))
}

/// Writes per-image scores as CSV atomically.
pub fn write_scores_csv(e: &Evaluation, path: &Path) -> anyhow::Result<()> {
    let mut file =
        AtomicFile::create(path).with_context(|| format!("{}: cannot create", path.display()))?;
    writeln!(
        file,
        "image,defect,score,anomalous,object_score,attribution_score,texture_score"
    )?;
    for r in &e.images {
        writeln!(
            file,
            "{},{},{},{},{},{},{}",
            csv_field(&r.image.display().to_string()),
            csv_field(r.defect.as_deref().unwrap_or("good")),
            r.fused_score,
            r.anomalous.map_or(String::new(), |a| a.to_string()),
            r.object_score,
            r.attribution_score,
            r.texture_score
        )?;
    }
    file.commit()
        .with_context(|| format!("{}: cannot write", path.display()))
}
