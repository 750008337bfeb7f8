//! `beltad predict`: score images with a fitted model; write heatmaps,
//! overlays and score files.

use std::collections::HashSet;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::Context;
use clap::Args;
use serde::Serialize;

use beltad::atomic_write::{AtomicFile, remove_stale_temps, write_atomic};
use beltad::dataset;
use beltad::detector::{Detector, ImageVerdict};
use beltad::features::FeatureExtractor;
use beltad::fusion::Branch;
use beltad::heatmap::{DisplayScale, heatmap, overlay, png_bytes};
use beltad::progress::Progress;

use super::{BackboneArgs, EXIT_PARTIAL, create_dir, load_model};

/// Score images with a fitted model.
///
/// For every image: a heatmap PNG (jet colour map on the model's fixed scale)
/// in OUT/heatmaps, the heatmap blended over the image in OUT/overlays, and
/// a line in OUT/scores.jsonl and OUT/scores.csv with the fused image score,
/// each branch's score and the decision against the model's threshold. An
/// image that cannot be read is reported in the score files and the run goes
/// on; the exit code is then 3.
#[derive(Debug, Args)]
pub struct PredictArgs {
    /// Model file written by `beltad fit`.
    #[arg(long, value_name = "FILE")]
    model: PathBuf,
    /// Output folder.
    #[arg(long, value_name = "DIR")]
    out: PathBuf,
    /// Images, or folders of images.
    #[arg(required = true, value_name = "IMAGE_OR_DIR")]
    inputs: Vec<PathBuf>,
    /// Write only the score files, no heatmaps or overlays.
    #[arg(long, conflicts_with = "branch_maps")]
    no_images: bool,
    /// Also write each branch's own map over the image (OUT/branches), each
    /// scaled to its own range: shows which branch saw what.
    #[arg(long)]
    branch_maps: bool,
    /// Most images one run scores; more are refused before anything is read
    /// (a guard against a mistyped folder; memory does not grow with it).
    #[arg(long, default_value_t = DEFAULT_MAX_IMAGES, value_name = "N")]
    max_images: usize,
    #[command(flatten)]
    backbones: BackboneArgs,
}

/// One line of the score files.
#[derive(Debug, Default, Serialize)]
pub struct ScoreLine {
    pub image: String,
    pub score: Option<f64>,
    pub anomalous: Option<bool>,
    pub threshold: Option<f64>,
    pub object_score: Option<f64>,
    pub attribution_score: Option<f64>,
    pub texture_score: Option<f64>,
    /// Each branch's robust z-score against held-out normal images.
    pub object_z: Option<f64>,
    pub attribution_z: Option<f64>,
    pub texture_z: Option<f64>,
    /// The branch that finds the image most unusual (largest z-score).
    pub driver: Option<String>,
    pub heatmap: Option<String>,
    pub overlay: Option<String>,
    pub error: Option<String>,
}

/// Default of `--max-images`.
pub const DEFAULT_MAX_IMAGES: usize = 100_000;

const CSV_HEADER: &str = "image,score,anomalous,threshold,object_score,attribution_score,texture_score,\
object_z,attribution_z,texture_z,driver,heatmap,overlay,error";

pub fn run(args: &PredictArgs, progress: &dyn Progress) -> anyhow::Result<ExitCode> {
    let images = expand_inputs(&args.inputs)?;
    anyhow::ensure!(
        images.len() <= args.max_images,
        "{} images exceed --max-images {}; split the run or raise the limit",
        images.len(),
        args.max_images
    );
    let (detector, extractor) = load_model(&args.model, &args.backbones)?;
    let summary = predict(
        &detector,
        &extractor,
        &images,
        &args.out,
        Pictures::from_flags(args.no_images, args.branch_maps),
        progress,
    )?;
    println!(
        "scored {} images: {} anomalous, {} normal, {} unreadable; results in {}",
        summary.scored,
        summary.anomalous,
        summary.scored - summary.anomalous,
        summary.failed,
        args.out.display()
    );
    Ok(if summary.failed > 0 {
        ExitCode::from(EXIT_PARTIAL)
    } else {
        ExitCode::SUCCESS
    })
}

/// Counts of a predict run.
pub struct Summary {
    pub scored: usize,
    pub anomalous: usize,
    pub failed: usize,
}

/// Files and folders on the command line, folders expanded to their images.
pub fn expand_inputs(inputs: &[PathBuf]) -> anyhow::Result<Vec<PathBuf>> {
    let mut images = Vec::new();
    for input in inputs {
        if input.is_dir() {
            images.extend(dataset::images_in(input)?);
        } else if input.exists() {
            images.push(input.clone());
        } else {
            anyhow::bail!("{}: no such file or folder", input.display());
        }
    }
    Ok(images)
}

/// Scores `images`, writing pictures (if `pictures`) and the score files into `out`.
pub fn predict(
    detector: &Detector,
    extractor: &FeatureExtractor,
    images: &[PathBuf],
    out: &Path,
    pictures: Pictures,
    progress: &dyn Progress,
) -> anyhow::Result<Summary> {
    create_dir(out)?;
    if pictures != Pictures::None {
        create_dir(&out.join("heatmaps"))?;
        create_dir(&out.join("overlays"))?;
    }
    if pictures == Pictures::WithBranches {
        create_dir(&out.join("branches"))?;
    }
    for name in ["scores.jsonl", "scores.csv"] {
        remove_stale_temps(&out.join(name));
    }
    let mut jsonl =
        AtomicFile::create(&out.join("scores.jsonl")).context("cannot create scores.jsonl")?;
    let mut csv =
        AtomicFile::create(&out.join("scores.csv")).context("cannot create scores.csv")?;
    writeln!(csv, "{CSV_HEADER}")?;

    let scale = DisplayScale::from_normal_max(detector.calibration.map_normal_max);
    let mut names = UniqueNames::default();
    let mut summary = Summary {
        scored: 0,
        anomalous: 0,
        failed: 0,
    };
    extractor.for_each_image(images, "predicting", progress, |path, item| {
        let line = match item {
            Ok(item) => {
                let verdict = detector.score(&item.features)?;
                let files = match pictures {
                    Pictures::None => None,
                    _ => {
                        let name = names.next(path);
                        if pictures == Pictures::WithBranches {
                            write_branch_maps(out, &name, &item.rgb, &verdict)?;
                        }
                        Some(write_pictures(out, &name, &item.rgb, &verdict, scale)?)
                    }
                };
                summary.scored += 1;
                summary.anomalous += usize::from(verdict.anomalous == Some(true));
                scored_line(path, detector, &verdict, files)
            }
            Err(e) => {
                summary.failed += 1;
                eprintln!("warning: {e}");
                error_line(path, &e.to_string())
            }
        };
        let json = serde_json::to_string(&line).unwrap_or_default();
        writeln!(jsonl, "{json}")?;
        writeln!(csv, "{}", csv_row(&line))?;
        anyhow::Ok(())
    })?;
    jsonl.commit().context("cannot write scores.jsonl")?;
    csv.commit().context("cannot write scores.csv")?;
    Ok(summary)
}

fn scored_line(
    path: &Path,
    detector: &Detector,
    v: &ImageVerdict,
    files: Option<(String, String)>,
) -> ScoreLine {
    let (heatmap, overlay) = files.unzip();
    let z = detector.branch_contributions(&v.branches);
    let driver = z.map(|z| {
        let best = (0..3).max_by(|&a, &b| z[a].total_cmp(&z[b])).unwrap_or(0);
        Branch::ALL[best].name().to_string()
    });
    ScoreLine {
        image: path.display().to_string(),
        score: Some(v.fused.score),
        anomalous: v.anomalous,
        threshold: detector.calibration.threshold,
        object_score: Some(v.branches.object.score),
        attribution_score: Some(v.branches.attribution.score),
        texture_score: Some(v.branches.texture.score),
        object_z: z.map(|z| z[0]),
        attribution_z: z.map(|z| z[1]),
        texture_z: z.map(|z| z[2]),
        driver,
        heatmap,
        overlay,
        error: None,
    }
}

fn error_line(path: &Path, error: &str) -> ScoreLine {
    ScoreLine {
        image: path.display().to_string(),
        error: Some(error.to_string()),
        ..ScoreLine::default()
    }
}

/// Which pictures a predict run draws.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pictures {
    None,
    /// Fused heatmap and overlay.
    Fused,
    /// Fused heatmap and overlay, and each branch's overlay.
    WithBranches,
}

impl Pictures {
    fn from_flags(no_images: bool, branch_maps: bool) -> Self {
        match (no_images, branch_maps) {
            (true, _) => Pictures::None,
            (false, false) => Pictures::Fused,
            (false, true) => Pictures::WithBranches,
        }
    }
}

/// Writes `branches/<name>_<branch>.png`: each branch's map over the image,
/// min-max scaled per image (branch maps have unrelated units).
fn write_branch_maps(
    out: &Path,
    name: &str,
    rgb: &image::RgbImage,
    verdict: &ImageVerdict,
) -> anyhow::Result<()> {
    for branch in Branch::ALL {
        let map = verdict
            .branches
            .get(branch)
            .map
            .clone()
            .min_max_normalised();
        let heat = heatmap(&map, rgb.width(), rgb.height(), DisplayScale { high: 1.0 });
        let path = out.join(format!("branches/{name}_{branch}.png"));
        write_atomic(&path, &png_bytes(&overlay(rgb, &heat))?)
            .with_context(|| format!("{}: cannot write", path.display()))?;
    }
    Ok(())
}

/// Writes `heatmaps/<name>.png` and `overlays/<name>.png`; returns their relative paths.
pub fn write_pictures(
    out: &Path,
    name: &str,
    rgb: &image::RgbImage,
    verdict: &ImageVerdict,
    scale: DisplayScale,
) -> anyhow::Result<(String, String)> {
    let heat = heatmap(&verdict.fused.map, rgb.width(), rgb.height(), scale);
    let blend = overlay(rgb, &heat);
    let heat_rel = format!("heatmaps/{name}.png");
    let overlay_rel = format!("overlays/{name}.png");
    for (rel, picture) in [(&heat_rel, &heat), (&overlay_rel, &blend)] {
        let path = out.join(rel);
        write_atomic(&path, &png_bytes(picture)?)
            .with_context(|| format!("{}: cannot write", path.display()))?;
    }
    Ok((heat_rel, overlay_rel))
}

/// File stems, made unique within a run (`a`, `a-2`, ...).
#[derive(Default)]
pub struct UniqueNames(HashSet<String>);

impl UniqueNames {
    pub fn next(&mut self, path: &Path) -> String {
        let stem = path
            .file_stem()
            .map_or_else(|| "image".into(), |s| s.to_string_lossy().into_owned());
        let mut name = stem.clone();
        let mut k = 2;
        while !self.0.insert(name.clone()) {
            name = format!("{stem}-{k}");
            k += 1;
        }
        name
    }
}

fn csv_row(l: &ScoreLine) -> String {
    let num = |v: Option<f64>| v.map_or(String::new(), |v| v.to_string());
    let fields = [
        csv_field(&l.image),
        num(l.score),
        l.anomalous.map_or(String::new(), |a| a.to_string()),
        num(l.threshold),
        num(l.object_score),
        num(l.attribution_score),
        num(l.texture_score),
        num(l.object_z),
        num(l.attribution_z),
        num(l.texture_z),
        csv_field(l.driver.as_deref().unwrap_or("")),
        csv_field(l.heatmap.as_deref().unwrap_or("")),
        csv_field(l.overlay.as_deref().unwrap_or("")),
        csv_field(l.error.as_deref().unwrap_or("")),
    ];
    fields.join(",")
}

/// RFC 4180 quoting where needed.
pub fn csv_field(s: &str) -> String {
    if s.contains([',', '"', '\n', '\r']) {
        format!("\"{}\"", s.replace('"', "\"\""))
    } else {
        s.to_string()
    }
}
