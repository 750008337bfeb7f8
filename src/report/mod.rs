//! A browsable evaluation report: one self-contained HTML file (plots inline
//! as SVG) plus a folder of gallery pictures, readable from disk without a
//! server and without JavaScript.
//!
//! It shows the metrics of the fused output and of each branch, every fusion
//! rule side by side, the paper's ablation over branch subsets, ROC and PRO
//! curves, the image-score distributions with the label-free threshold and
//! the F1-optimal one, and a gallery of the worst false positives, the worst
//! false negatives and a spread of detections.

mod html;
pub mod plots;

use std::path::{Path, PathBuf};

use image::RgbImage;
use thiserror::Error;

use crate::atomic_write::write_atomic;
use crate::detector::Detector;
use crate::evaluate::{Details, Evaluation, GalleryItem, GalleryKind};
use crate::heatmap::{DisplayScale, draw_mask_outline, heatmap, overlay, png_bytes};
use crate::image_io::{DecodeLimits, load_mask, load_rgb};

/// Height of a gallery picture in the report, in pixels.
pub const GALLERY_HEIGHT: u32 = 240;
/// Colour of ground-truth outlines.
const OUTLINE: [u8; 3] = [255, 40, 40];

/// A report that could not be written.
#[derive(Debug, Error)]
pub enum ReportError {
    #[error("{path}: cannot write: {source}")]
    Write {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("the evaluation has no curves or gallery (run it with details)")]
    NoDetails,
    #[error("plot: {0}")]
    Plot(String),
    #[error(transparent)]
    Image(#[from] crate::image_io::ImageError),
    #[error("{0}: cannot encode picture")]
    Encode(String),
}

/// Writes `dir/index.html` and `dir/img/*.png`; returns the HTML's path.
pub fn write_report(
    dir: &Path,
    evaluation: &Evaluation,
    detector: &Detector,
    limits: &DecodeLimits,
) -> Result<PathBuf, ReportError> {
    let details = evaluation.details.as_ref().ok_or(ReportError::NoDetails)?;
    let img_dir = dir.join("img");
    std::fs::create_dir_all(&img_dir).map_err(|source| ReportError::Write {
        path: img_dir.clone(),
        source,
    })?;

    let scale = DisplayScale::from_normal_max(detector.calibration.map_normal_max);
    let mut gallery = Vec::with_capacity(details.gallery.len());
    for (k, item) in details.gallery.iter().enumerate() {
        let name = format!("{}_{k:02}.png", kind_slug(item.kind));
        let picture = gallery_picture(item, scale, limits)?;
        let path = img_dir.join(&name);
        let bytes = png_bytes(&picture).map_err(|_| ReportError::Encode(name.clone()))?;
        write_atomic(&path, &bytes).map_err(|source| ReportError::Write { path, source })?;
        gallery.push((item, format!("img/{name}")));
    }

    let plots = plots_of(evaluation, details)?;
    let page = html::page(evaluation, detector, details, &plots, &gallery);
    let index = dir.join("index.html");
    write_atomic(&index, page.as_bytes()).map_err(|source| ReportError::Write {
        path: index.clone(),
        source,
    })?;
    Ok(index)
}

/// The report's SVG plots, in display order, with captions.
pub struct Plots {
    pub svgs: Vec<(String, String)>,
}

fn plots_of(e: &Evaluation, d: &Details) -> Result<Plots, ReportError> {
    let plot = |r: Result<String, String>| r.map_err(ReportError::Plot);
    let scores = |anomalous: bool| -> Vec<f64> {
        e.images
            .iter()
            .filter(|r| r.defect.is_some() == anomalous)
            .map(|r| r.fused_score)
            .collect()
    };
    let mut thresholds = vec![(
        "F1-optimal (uses labels)",
        d.f1_optimal.0,
        plotters::style::RGBColor(0x99, 0x66, 0x00),
    )];
    if let Some(t) = e.threshold {
        thresholds.insert(
            0,
            (
                "model threshold (no labels)",
                t,
                plotters::style::RGBColor(0, 0, 0),
            ),
        );
    }
    let svgs = vec![
        (
            "Image ROC".to_string(),
            plot(plots::curves(
                "Image ROC",
                "false positive rate",
                "true positive rate",
                1.0,
                &d.image_roc,
            ))?,
        ),
        (
            "Pixel ROC".to_string(),
            plot(plots::curves(
                "Pixel ROC",
                "false positive rate",
                "true positive rate",
                1.0,
                &d.pixel_roc,
            ))?,
        ),
        (
            "PRO up to FPR 0.3".to_string(),
            plot(plots::curves(
                "PRO curve",
                "false positive rate",
                "per-region overlap",
                0.3,
                &d.pro,
            ))?,
        ),
        (
            "Image scores".to_string(),
            plot(plots::score_histogram(
                &scores(false),
                &scores(true),
                &thresholds,
            ))?,
        ),
    ];
    Ok(Plots { svgs })
}

fn kind_slug(kind: GalleryKind) -> &'static str {
    match kind {
        GalleryKind::FalsePositive => "false_positive",
        GalleryKind::FalseNegative => "false_negative",
        GalleryKind::Detection => "detection",
    }
}

/// `[image with mask outline | heatmap overlay with mask outline]`, scaled
/// to [`GALLERY_HEIGHT`].
fn gallery_picture(
    item: &GalleryItem,
    scale: DisplayScale,
    limits: &DecodeLimits,
) -> Result<RgbImage, ReportError> {
    let rgb = load_rgb(&item.record.image, limits)?;
    let (w, h) = rgb.dimensions();
    let heat = heatmap(&item.map, w, h, scale);
    let mut left = rgb.clone();
    let mut right = overlay(&rgb, &heat);
    if let Some(mask_path) = &item.record.mask {
        let mask = load_mask(mask_path, (w, h), limits)?;
        draw_mask_outline(&mut left, &mask, OUTLINE);
        draw_mask_outline(&mut right, &mask, OUTLINE);
    }
    let out_h = GALLERY_HEIGHT;
    let out_w = ((w as f64 * out_h as f64 / h as f64).round() as u32).max(1);
    let resize = |img: &RgbImage| {
        image::imageops::resize(img, out_w, out_h, image::imageops::FilterType::Triangle)
    };
    let gap = 6;
    let mut canvas = RgbImage::from_pixel(2 * out_w + gap, out_h, image::Rgb([255, 255, 255]));
    image::imageops::replace(&mut canvas, &resize(&left), 0, 0);
    image::imageops::replace(&mut canvas, &resize(&right), i64::from(out_w + gap), 0);
    Ok(canvas)
}
