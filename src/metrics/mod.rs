//! Evaluation metrics: image AUROC, pixel AUROC and the per-region overlap
//! (PRO) curve with its normalised area (AUPRO), plus curves for plotting.
//!
//! Conventions, stated once for the whole module:
//!
//! - A higher score means more anomalous. A sample is *predicted anomalous at
//!   threshold `t`* when its score is `>= t` (the reference variant of AUPRO
//!   is the one exception, see [`PixelSweep::aupro_reference`]).
//! - Image metrics take one score per test image and a label per image
//!   (`true` = anomalous: the image has a defect pixel or lies in a defect
//!   folder).
//! - Pixel metrics take every test image's anomaly map, each `(H, W)`
//!   row-major, concatenated in the order the masks were pushed into a
//!   [`PixelGroundTruth`]; so `scores.len()` equals the ground truth's pixel
//!   count.
//! - Curves sweep the threshold down over the distinct score values and start
//!   at `(0, 0)` (threshold above every score). Samples with equal scores
//!   enter together, so a tie between a normal and an anomalous sample is a
//!   straight segment: ROC areas count ties half (Mann–Whitney U).
//! - Scores must not be NaN; infinities are allowed and `-0.0` ties `+0.0`.
//!
//! The pixel metrics share one sorted sweep ([`PixelSweep`]): build it once
//! (one parallel sort) and query every metric and curve from it. The free
//! functions ([`pixel_auroc`], [`aupro`], ...) build a sweep per call.

mod auroc;
mod ground_truth;
mod pro;
mod sweep;

#[cfg(test)]
mod naive;

pub use auroc::{auroc, f1_optimal_threshold, pixel_auroc, pixel_roc_curve, roc_curve};
pub use ground_truth::PixelGroundTruth;
pub use pro::{AUPRO_MAX_FPR, REFERENCE_THRESHOLDS, aupro, aupro_reference, pro_curve};
pub use sweep::PixelSweep;

/// Why a metric could not be computed.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum MetricError {
    #[error("no scores were given")]
    Empty,
    #[error("{scores} scores but {truth} ground-truth entries; they must pair one to one")]
    LengthMismatch { scores: usize, truth: usize },
    #[error("score {index} is NaN; every score must be a number")]
    NanScore { index: usize },
    #[error("there is no anomalous sample, so the metric is undefined")]
    NoAnomalous,
    #[error("there is no normal sample, so the false positive rate is undefined")]
    NoNormal,
    #[error("mask has {len} pixels but its shape is {height}x{width}")]
    MaskShape {
        len: usize,
        height: usize,
        width: usize,
    },
    #[error("the ground truth holds more than u32::MAX connected components")]
    TooManyComponents,
    #[error("the FPR limit must lie in (0, 1], got {max_fpr}")]
    InvalidMaxFpr { max_fpr: f64 },
    #[error("the reference AUPRO needs at least 2 thresholds, got {n_thresholds}")]
    TooFewThresholds { n_thresholds: usize },
    #[error("all scores are equal, so no thresholds can be spread between min and max")]
    ConstantScores,
    #[error("the reference AUPRO spaces thresholds between min and max, so scores must be finite")]
    InfiniteScores,
    #[error("no sampled threshold gives a false positive rate in (0, {max_fpr})")]
    NoReferencePoints { max_fpr: f64 },
}

/// Checks what every metric needs of its scores: present, paired one to one
/// with `truth_len` ground-truth entries, and free of NaN.
fn check_scores(scores: &[f32], truth_len: usize) -> Result<(), MetricError> {
    use rayon::prelude::*;

    if scores.is_empty() {
        return Err(MetricError::Empty);
    }
    if scores.len() != truth_len {
        return Err(MetricError::LengthMismatch {
            scores: scores.len(),
            truth: truth_len,
        });
    }
    match scores.par_iter().position_first(|s| s.is_nan()) {
        Some(index) => Err(MetricError::NanScore { index }),
        None => Ok(()),
    }
}
