//! Evaluating a fitted detector on the test split of an MVTec-layout data
//! set: image AUROC, pixel AUROC and AUPRO@0.3 for the fused output and for
//! each branch alone (its own image score and map).
//!
//! Optionally also: every fusion rule side by side on the same branch
//! outputs ([`EvalOptions::rules`]), with how often a rule misses an
//! anomaly that a branch alone flags at its normal-quantile threshold; and
//! the paper's ablation over every subset of branches
//! ([`EvalOptions::ablation`]).
//!
//! Maps are compared with the masks on the evaluation grid (masks resized by
//! nearest neighbour, as the reference does). AUPRO is reported both exactly
//! (MVTec AD convention) and in the reference script's 200-threshold variant.

use std::path::{Path, PathBuf};
use std::time::Instant;

use serde::Serialize;
use thiserror::Error;

use crate::calibration::IMAGE_SCORE_RULES;
use crate::dataset::{self, DatasetError, TestSample};
use crate::detector::Detector;
use crate::features::{FeatureError, FeatureExtractor};
use crate::fusion::{Branch, BranchOutputs, BranchSet, Fused, FusionRule, ImageScoreRule};
use crate::image_io::{DecodeLimits, ImageError, load_mask};
use crate::metrics::{
    self, AUPRO_MAX_FPR, MetricError, PixelGroundTruth, PixelSweep, REFERENCE_THRESHOLDS,
};
use crate::progress::Progress;

/// An evaluation that could not be completed.
#[derive(Debug, Error)]
pub enum EvalError {
    #[error(transparent)]
    Dataset(#[from] DatasetError),
    #[error(transparent)]
    Features(#[from] FeatureError),
    #[error(transparent)]
    Image(#[from] ImageError),
    #[error(transparent)]
    Branch(#[from] crate::branch::BranchError),
    #[error("{what}: {source}")]
    Metric {
        what: String,
        #[source]
        source: MetricError,
    },
}

/// What to compute beyond the model's own outputs.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct EvalOptions {
    /// Every fusion rule and image-score rule on the same branch outputs.
    pub rules: bool,
    /// The paper's ablation over all seven subsets of branches.
    pub ablation: bool,
    /// Curves, score distributions and a gallery of errors, for a report.
    pub details: bool,
}

/// Points kept per plotted curve.
pub const CURVE_POINTS: usize = 400;
/// Images per gallery section (false positives, false negatives, detections).
pub const GALLERY_PER_KIND: usize = 6;

/// What a report draws beyond the tables.
#[derive(Debug, Clone)]
pub struct Details {
    /// Image ROC `(FPR, TPR)` per output (fused, object, attribution, texture).
    pub image_roc: Vec<(String, Vec<(f64, f64)>)>,
    /// Pixel ROC per output.
    pub pixel_roc: Vec<(String, Vec<(f64, f64)>)>,
    /// PRO curve up to FPR 0.3 per output.
    pub pro: Vec<(String, Vec<(f64, f64)>)>,
    /// Threshold on the fused score with the best F1 on the test labels,
    /// and that F1; reported beside the label-free threshold, never used by it.
    pub f1_optimal: (f64, f64),
    pub gallery: Vec<GalleryItem>,
}

/// Why an image is in the gallery.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GalleryKind {
    /// Normal images with the highest fused scores.
    FalsePositive,
    /// Anomalous images with the lowest fused scores.
    FalseNegative,
    /// Anomalous images above the threshold (a spread over the score range).
    Detection,
}

/// One gallery image: its record and fused map on the evaluation grid.
#[derive(Debug, Clone)]
pub struct GalleryItem {
    pub kind: GalleryKind,
    pub record: ImageRecord,
    pub map: crate::anomaly_map::AnomalyMap,
}

/// The three metrics of one output (fused or one branch).
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Metrics {
    pub image_auroc: f64,
    pub pixel_auroc: f64,
    /// Exact area under PRO up to FPR 0.3, divided by 0.3.
    pub aupro_0_3: f64,
    /// The reference script's variant: 200 thresholds, divided by the largest FPR below 0.3.
    pub aupro_0_3_reference: f64,
}

/// One test image's scores.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ImageRecord {
    pub image: PathBuf,
    /// Defect class, `None` for a normal image.
    pub defect: Option<String>,
    /// Ground-truth mask, `None` for a normal image.
    #[serde(skip)]
    pub mask: Option<PathBuf>,
    pub fused_score: f64,
    pub object_score: f64,
    pub attribution_score: f64,
    pub texture_score: f64,
    /// Decision against the model's threshold.
    pub anomalous: Option<bool>,
}

/// One fusion rule pair on the test set.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct RuleResult {
    pub rule: String,
    pub image_score: String,
    #[serde(flatten)]
    pub metrics: Metrics,
    /// Threshold from the held-out normal images (the model's quantile).
    pub threshold: Option<f64>,
    /// Anomalous test images above the threshold.
    pub detected: usize,
    /// Normal test images above the threshold.
    pub false_alarms: usize,
    /// Anomalous test images this rule misses although at least one branch
    /// alone flags them at its own normal-quantile threshold.
    pub missed_but_seen_by_a_branch: usize,
}

/// One row of the ablation: a subset of branches fused by the paper's rule.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct AblationRow {
    pub branches: String,
    /// Image AUROC of the subset's score (its terms of the paper's sum).
    pub image_auroc: f64,
    /// Image AUROC of `max(M)` of the subset's map product alone.
    pub map_max_image_auroc: f64,
    pub pixel_auroc: f64,
    pub aupro_0_3: f64,
}

/// Results of an evaluation, shaped for JSON.
#[derive(Debug, Clone, Serialize)]
pub struct Evaluation {
    pub dataset: String,
    pub n_test_images: usize,
    pub fused: Metrics,
    pub object: Metrics,
    pub attribution: Metrics,
    pub texture: Metrics,
    pub fusion_rule: String,
    pub image_score_rule: String,
    pub threshold: Option<f64>,
    /// Wall time per test image: decode, backbones, branches, fusion.
    pub seconds_per_image: f64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rules: Option<Vec<RuleResult>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ablation: Option<Vec<AblationRow>>,
    #[serde(skip)]
    pub images: Vec<ImageRecord>,
    #[serde(skip)]
    pub details: Option<Details>,
}

/// Branch outputs and ground truth of the whole test set.
struct Collected {
    records: Vec<ImageRecord>,
    labels: Vec<bool>,
    truth: PixelGroundTruth,
    outputs: Vec<BranchOutputs>,
}

/// Scores every test image of `dir` and computes the metrics.
pub fn evaluate(
    detector: &Detector,
    extractor: &FeatureExtractor,
    dir: &Path,
    limits: &DecodeLimits,
    options: EvalOptions,
    progress: &dyn Progress,
) -> Result<Evaluation, EvalError> {
    let samples = dataset::test_samples(dir)?;
    let started = Instant::now();
    let c = collect(detector, extractor, &samples, limits, progress)?;
    let seconds_per_image = started.elapsed().as_secs_f64() / samples.len() as f64;

    let rule = detector.config.fusion.rule;
    let steps = 4
        + if options.rules { 8 } else { 0 }
        + if options.ablation { 7 } else { 0 }
        + if options.details { 4 } else { 0 };
    progress.start("computing metrics", steps);
    let fused = c.fused_metrics(detector, BranchSet::ALL, rule, "fused")?;
    progress.advance(1);
    let mut singles = Vec::with_capacity(3);
    for b in Branch::ALL {
        singles.push(c.branch_metrics(b)?);
        progress.advance(1);
    }
    let rules = options
        .rules
        .then(|| c.compare_rules(detector, progress))
        .transpose()?;
    let ablation = options
        .ablation
        .then(|| c.ablation(detector, progress))
        .transpose()?;
    let details = options
        .details
        .then(|| c.details(detector, progress))
        .transpose()?;
    progress.finish();

    Ok(Evaluation {
        dataset: dataset::name(dir),
        n_test_images: samples.len(),
        fused: fused.0,
        object: singles[0],
        attribution: singles[1],
        texture: singles[2],
        fusion_rule: rule.name().into(),
        image_score_rule: detector.config.fusion.image_score.name().into(),
        threshold: detector.calibration.threshold,
        seconds_per_image,
        rules,
        ablation,
        images: c.records,
        details,
    })
}

fn collect(
    detector: &Detector,
    extractor: &FeatureExtractor,
    samples: &[TestSample],
    limits: &DecodeLimits,
    progress: &dyn Progress,
) -> Result<Collected, EvalError> {
    let eval = detector.config.fusion.eval_size;
    let paths: Vec<PathBuf> = samples.iter().map(|s| s.image.clone()).collect();
    let mut out = Collected {
        records: Vec::with_capacity(samples.len()),
        labels: Vec::with_capacity(samples.len()),
        truth: PixelGroundTruth::new(),
        outputs: Vec::with_capacity(samples.len()),
    };
    let mut index = 0;
    extractor.for_each_image::<EvalError>(&paths, "evaluating", progress, |_, item| {
        let item = item?;
        let sample = &samples[index];
        index += 1;
        let mask = match &sample.mask {
            Some(path) => {
                let m = load_mask(path, item.rgb.dimensions(), limits)?;
                resize_mask_nearest(&m, item.rgb.dimensions(), eval)
            }
            None => vec![false; eval * eval],
        };
        let verdict = detector.score(&item.features)?;
        let b = &verdict.branches;
        out.records.push(ImageRecord {
            image: sample.image.clone(),
            defect: sample.defect.clone(),
            mask: sample.mask.clone(),
            fused_score: verdict.fused.score,
            object_score: b.object.score,
            attribution_score: b.attribution.score,
            texture_score: b.texture.score,
            anomalous: verdict.anomalous,
        });
        out.labels.push(sample.is_anomalous());
        out.truth
            .push_mask(&mask, eval, eval)
            .map_err(|source| EvalError::Metric {
                what: sample.image.display().to_string(),
                source,
            })?;
        out.outputs.push(verdict.branches);
        Ok(())
    })?;
    Ok(out)
}

impl Collected {
    /// Metrics of a branch alone: its own image score and map.
    fn branch_metrics(&self, branch: Branch) -> Result<Metrics, EvalError> {
        let scores: Vec<f32> = self
            .outputs
            .iter()
            .map(|o| o.get(branch).score as f32)
            .collect();
        let maps: Vec<f32> = self
            .outputs
            .iter()
            .flat_map(|o| o.get(branch).map.data.iter().copied())
            .collect();
        self.metrics_of(branch.name(), &scores, &maps)
    }

    /// Metrics of a fusion, and its per-image fused results' scores.
    fn fused_metrics(
        &self,
        detector: &Detector,
        set: BranchSet,
        rule: FusionRule,
        name: &str,
    ) -> Result<(Metrics, Vec<f64>, Vec<f32>), EvalError> {
        let fused: Vec<Fused> = self
            .outputs
            .iter()
            .map(|o| detector.fuse(o, set, rule))
            .collect();
        let scores: Vec<f64> = fused.iter().map(|f| f.score).collect();
        let map_max: Vec<f32> = fused.iter().map(|f| f.map_max).collect();
        let maps: Vec<f32> = fused
            .iter()
            .flat_map(|f| f.map.data.iter().copied())
            .collect();
        drop(fused);
        let s32: Vec<f32> = scores.iter().map(|&s| s as f32).collect();
        Ok((self.metrics_of(name, &s32, &maps)?, scores, map_max))
    }

    /// Every rule pair, with threshold statistics.
    fn compare_rules(
        &self,
        detector: &Detector,
        progress: &dyn Progress,
    ) -> Result<Vec<RuleResult>, EvalError> {
        let quantile = detector.config.calibration.threshold_quantile;
        let cal = &detector.calibration;
        let branch_flags: Vec<bool> = self
            .outputs
            .iter()
            .map(|o| {
                Branch::ALL.iter().any(|&b| {
                    cal.branch_threshold(b, quantile)
                        .is_some_and(|t| o.get(b).score > t)
                })
            })
            .collect();
        let mut results = Vec::new();
        for rule in FusionRule::ALL {
            for image_score in IMAGE_SCORE_RULES {
                let mut d = detector.clone();
                d.config.fusion.image_score = image_score;
                let name = format!("{} / {}", rule.name(), image_score.name());
                let (metrics, scores, _) = self.fused_metrics(&d, BranchSet::ALL, rule, &name)?;
                let threshold = cal.threshold_for(rule, image_score, quantile);
                let flagged: Vec<bool> = scores
                    .iter()
                    .map(|&s| threshold.is_some_and(|t| s > t))
                    .collect();
                let count = |f: &dyn Fn(usize) -> bool| (0..scores.len()).filter(|&i| f(i)).count();
                results.push(RuleResult {
                    rule: rule.name().into(),
                    image_score: image_score.name().into(),
                    metrics,
                    threshold,
                    detected: count(&|i| self.labels[i] && flagged[i]),
                    false_alarms: count(&|i| !self.labels[i] && flagged[i]),
                    missed_but_seen_by_a_branch: count(&|i| {
                        self.labels[i] && !flagged[i] && branch_flags[i]
                    }),
                });
                progress.advance(1);
            }
        }
        Ok(results)
    }

    /// The seven subsets fused by the paper's rule and score.
    fn ablation(
        &self,
        detector: &Detector,
        progress: &dyn Progress,
    ) -> Result<Vec<AblationRow>, EvalError> {
        let mut paper = detector.clone();
        paper.config.fusion.image_score = ImageScoreRule::Paper;
        let mut rows = Vec::new();
        for set in BranchSet::all_subsets() {
            let name = set.to_string();
            let (m, _, map_max) = self.fused_metrics(&paper, set, FusionRule::Paper, &name)?;
            let map_max_image_auroc =
                metrics::auroc(&map_max, &self.labels).map_err(|source| EvalError::Metric {
                    what: format!("{name} max(M)"),
                    source,
                })?;
            rows.push(AblationRow {
                branches: name,
                image_auroc: m.image_auroc,
                map_max_image_auroc,
                pixel_auroc: m.pixel_auroc,
                aupro_0_3: m.aupro_0_3,
            });
            progress.advance(1);
        }
        Ok(rows)
    }

    /// Curves, the F1-optimal threshold and the gallery.
    fn details(&self, detector: &Detector, progress: &dyn Progress) -> Result<Details, EvalError> {
        let err = |what: &'static str| {
            move |source| EvalError::Metric {
                what: what.into(),
                source,
            }
        };
        let rule = detector.config.fusion.rule;
        let fused: Vec<Fused> = self
            .outputs
            .iter()
            .map(|o| detector.fuse(o, BranchSet::ALL, rule))
            .collect();
        let mut outputs: Vec<(String, Vec<f32>, Vec<f32>)> = Vec::with_capacity(4);
        outputs.push((
            "fused".into(),
            fused.iter().map(|f| f.score as f32).collect(),
            fused
                .iter()
                .flat_map(|f| f.map.data.iter().copied())
                .collect(),
        ));
        for b in Branch::ALL {
            outputs.push((
                b.name().into(),
                self.outputs.iter().map(|o| o.get(b).score as f32).collect(),
                self.outputs
                    .iter()
                    .flat_map(|o| o.get(b).map.data.iter().copied())
                    .collect(),
            ));
        }
        let (mut image_roc, mut pixel_roc, mut pro) = (Vec::new(), Vec::new(), Vec::new());
        for (name, scores, maps) in &outputs {
            image_roc.push((
                name.clone(),
                metrics::roc_curve(scores, &self.labels).map_err(err("image ROC"))?,
            ));
            let sweep = PixelSweep::new(maps, &self.truth).map_err(err("pixel sweep"))?;
            pixel_roc.push((
                name.clone(),
                sweep.roc_curve(CURVE_POINTS).map_err(err("pixel ROC"))?,
            ));
            pro.push((
                name.clone(),
                sweep
                    .pro_curve(AUPRO_MAX_FPR, CURVE_POINTS)
                    .map_err(err("PRO curve"))?,
            ));
            progress.advance(1);
        }
        let (t, f1) =
            metrics::f1_optimal_threshold(&outputs[0].1, &self.labels).map_err(err("F1"))?;
        let gallery = self.gallery(&fused, detector.calibration.threshold);
        Ok(Details {
            image_roc,
            pixel_roc,
            pro,
            f1_optimal: (f64::from(t), f1),
            gallery,
        })
    }

    /// Highest-scoring normals, lowest-scoring anomalies, and detections
    /// spread over the score range.
    fn gallery(&self, fused: &[Fused], threshold: Option<f64>) -> Vec<GalleryItem> {
        let by_score = |anomalous: bool, descending: bool| {
            let mut idx: Vec<usize> = (0..fused.len())
                .filter(|&i| self.labels[i] == anomalous)
                .collect();
            idx.sort_by(|&a, &b| fused[a].score.total_cmp(&fused[b].score));
            if descending {
                idx.reverse();
            }
            idx
        };
        let item = |kind, i: usize| GalleryItem {
            kind,
            record: self.records[i].clone(),
            map: fused[i].map.clone(),
        };
        let mut items: Vec<GalleryItem> = Vec::new();
        let worst_normals = by_score(false, true).into_iter().take(GALLERY_PER_KIND);
        items.extend(worst_normals.map(|i| item(GalleryKind::FalsePositive, i)));
        let worst_anomalies = by_score(true, false).into_iter().take(GALLERY_PER_KIND);
        items.extend(worst_anomalies.map(|i| item(GalleryKind::FalseNegative, i)));
        let detected: Vec<usize> = by_score(true, true)
            .into_iter()
            .filter(|&i| threshold.is_none_or(|t| fused[i].score > t))
            .collect();
        let step = (detected.len() / GALLERY_PER_KIND).max(1);
        let spread = detected.iter().step_by(step).take(GALLERY_PER_KIND);
        items.extend(spread.map(|&i| item(GalleryKind::Detection, i)));
        items
    }

    fn metrics_of(
        &self,
        name: &str,
        image_scores: &[f32],
        map: &[f32],
    ) -> Result<Metrics, EvalError> {
        let err = |what: &str| {
            let what = format!("{name} {what}");
            move |source| EvalError::Metric { what, source }
        };
        let sweep = PixelSweep::new(map, &self.truth).map_err(err("pixel maps"))?;
        Ok(Metrics {
            image_auroc: metrics::auroc(image_scores, &self.labels).map_err(err("image AUROC"))?,
            pixel_auroc: sweep.auroc().map_err(err("pixel AUROC"))?,
            aupro_0_3: sweep.aupro(AUPRO_MAX_FPR).map_err(err("AUPRO"))?,
            aupro_0_3_reference: sweep
                .aupro_reference(AUPRO_MAX_FPR, REFERENCE_THRESHOLDS)
                .map_err(err("reference AUPRO"))?,
        })
    }
}

/// Nearest-neighbour resize of a `(h, w)` mask to `size`×`size`, sampling
/// source index `floor(i·in/out)` as PyTorch's `nearest` mode.
pub fn resize_mask_nearest(mask: &[bool], (w, h): (u32, u32), size: usize) -> Vec<bool> {
    let (w, h) = (w as usize, h as usize);
    let mut out = Vec::with_capacity(size * size);
    for y in 0..size {
        let sy = (y * h / size).min(h - 1);
        for x in 0..size {
            let sx = (x * w / size).min(w - 1);
            out.push(mask[sy * w + sx]);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nearest_mask_resize_samples_floor_positions() {
        // 4x2 (w x h) mask, left half set; to 2x2.
        let mask = vec![true, true, false, false, true, true, false, false];
        assert_eq!(
            resize_mask_nearest(&mask, (4, 2), 2),
            vec![true, false, true, false]
        );
        // Upsampling 1x1 -> 3x3 replicates.
        assert_eq!(resize_mask_nearest(&[true], (1, 1), 3), vec![true; 9]);
    }
}
