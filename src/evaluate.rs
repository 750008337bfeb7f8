//! Evaluating a fitted detector on the test split of an MVTec-layout data
//! set: image AUROC, pixel AUROC and AUPRO@0.3 for the fused output and for
//! each branch alone (its own image score and map).
//!
//! Maps are compared with the masks on the evaluation grid (masks resized by
//! nearest neighbour, as the reference does). AUPRO is reported both exactly
//! (MVTec AD convention) and in the reference script's 200-threshold variant.

use std::path::{Path, PathBuf};
use std::time::Instant;

use serde::Serialize;
use thiserror::Error;

use crate::dataset::{self, DatasetError, TestSample};
use crate::detector::{Detector, ImageVerdict};
use crate::features::{FeatureError, FeatureExtractor};
use crate::fusion::Branch;
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
    pub fused_score: f64,
    pub object_score: f64,
    pub attribution_score: f64,
    pub texture_score: f64,
    /// Decision against the model's threshold.
    pub anomalous: Option<bool>,
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
    pub threshold: Option<f64>,
    /// Wall time per test image: decode, backbones, branches, fusion.
    pub seconds_per_image: f64,
    pub images: Vec<ImageRecord>,
}

/// Maps and labels of the whole test set on the evaluation grid.
struct Collected {
    records: Vec<ImageRecord>,
    labels: Vec<bool>,
    truth: PixelGroundTruth,
    /// Fused, object, attribution, texture maps, each all images concatenated.
    maps: [Vec<f32>; 4],
}

/// Scores every test image of `dir` and computes the metrics.
pub fn evaluate(
    detector: &Detector,
    extractor: &FeatureExtractor,
    dir: &Path,
    limits: &DecodeLimits,
    progress: &dyn Progress,
) -> Result<Evaluation, EvalError> {
    let samples = dataset::test_samples(dir)?;
    let started = Instant::now();
    let collected = collect(detector, extractor, &samples, limits, progress)?;
    let seconds_per_image = started.elapsed().as_secs_f64() / samples.len() as f64;

    progress.start("computing metrics", 4);
    let image_scores = |f: fn(&ImageRecord) -> f64| -> Vec<f32> {
        collected.records.iter().map(|r| f(r) as f32).collect()
    };
    let score_sets = [
        image_scores(|r| r.fused_score),
        image_scores(|r| r.object_score),
        image_scores(|r| r.attribution_score),
        image_scores(|r| r.texture_score),
    ];
    let names = ["fused", "object", "attribution", "texture"];
    let mut results = Vec::with_capacity(4);
    for ((name, scores), map) in names.iter().zip(&score_sets).zip(&collected.maps) {
        results.push(metrics_of(
            name,
            scores,
            &collected.labels,
            map,
            &collected.truth,
        )?);
        progress.advance(1);
    }
    progress.finish();

    Ok(Evaluation {
        dataset: dataset::name(dir),
        n_test_images: samples.len(),
        fused: results[0],
        object: results[1],
        attribution: results[2],
        texture: results[3],
        threshold: detector.calibration.threshold,
        seconds_per_image,
        images: collected.records,
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
        maps: Default::default(),
    };
    let mut index = 0;
    let mut mask_error = None;
    extractor.for_each_image::<EvalError>(&paths, "evaluating", progress, |_, item| {
        let item = item?;
        let sample = &samples[index];
        index += 1;
        let mask = match &sample.mask {
            Some(path) => match load_mask(path, item.rgb.dimensions(), limits) {
                Ok(m) => resize_mask_nearest(&m, item.rgb.dimensions(), eval),
                Err(e) => {
                    mask_error.get_or_insert(e);
                    return Ok(());
                }
            },
            None => vec![false; eval * eval],
        };
        let verdict = detector.score(&item.features)?;
        out.push(sample, &verdict, &mask, eval);
        Ok(())
    })?;
    if let Some(e) = mask_error {
        return Err(e.into());
    }
    Ok(out)
}

impl Collected {
    fn push(&mut self, sample: &TestSample, verdict: &ImageVerdict, mask: &[bool], eval: usize) {
        let b = &verdict.branches;
        self.records.push(ImageRecord {
            image: sample.image.clone(),
            defect: sample.defect.clone(),
            fused_score: verdict.fused.score,
            object_score: b.object.score,
            attribution_score: b.attribution.score,
            texture_score: b.texture.score,
            anomalous: verdict.anomalous,
        });
        self.labels.push(sample.is_anomalous());
        // A mask shape is checked on load, so this cannot fail.
        let _ = self.truth.push_mask(mask, eval, eval);
        self.maps[0].extend_from_slice(&verdict.fused.map.data);
        for (slot, branch) in self.maps[1..].iter_mut().zip(Branch::ALL) {
            slot.extend_from_slice(&b.get(branch).map.data);
        }
    }
}

fn metrics_of(
    name: &str,
    image_scores: &[f32],
    labels: &[bool],
    map: &[f32],
    truth: &PixelGroundTruth,
) -> Result<Metrics, EvalError> {
    let err = |what: &str| {
        let what = format!("{name} {what}");
        move |source| EvalError::Metric { what, source }
    };
    let sweep = PixelSweep::new(map, truth).map_err(err("pixel maps"))?;
    Ok(Metrics {
        image_auroc: metrics::auroc(image_scores, labels).map_err(err("image AUROC"))?,
        pixel_auroc: sweep.auroc().map_err(err("pixel AUROC"))?,
        aupro_0_3: sweep.aupro(AUPRO_MAX_FPR).map_err(err("AUPRO"))?,
        aupro_0_3_reference: sweep
            .aupro_reference(AUPRO_MAX_FPR, REFERENCE_THRESHOLDS)
            .map_err(err("reference AUPRO"))?,
    })
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
