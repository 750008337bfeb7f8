//! Area under the ROC curve for image scores and for pixel scores, the ROC
//! curves themselves, and the F1-optimal image threshold.
//!
//! The area is the trapezoid sum over the sweep's distinct thresholds, which
//! equals the Mann–Whitney statistic `P(s_anomalous > s_normal) + ½ P(tie)`.
//! It is accumulated in integers (twice the area, in units of pairs) so it is
//! exact up to the final division.

use super::sweep::{CurveThinner, PixelSweep, ScoreSweep};
use super::{MetricError, PixelGroundTruth};

/// L1 length of any ROC curve: it climbs from `(0, 0)` to `(1, 1)`.
const ROC_LENGTH: f64 = 2.0;

/// Image AUROC; `labels[i]` is true for an anomalous image.
pub fn auroc(scores: &[f32], labels: &[bool]) -> Result<f64, MetricError> {
    let sweep = ScoreSweep::from_image_labels(scores, labels)?;
    sweep.require_both_classes()?;
    Ok(sweep.auroc())
}

/// Image ROC curve as `(FPR, TPR)` points, one per distinct score, from
/// `(0, 0)` to `(1, 1)`.
pub fn roc_curve(scores: &[f32], labels: &[bool]) -> Result<Vec<(f64, f64)>, MetricError> {
    let sweep = ScoreSweep::from_image_labels(scores, labels)?;
    sweep.require_both_classes()?;
    Ok(sweep.roc_points().collect())
}

/// The image threshold that maximises F1 (predicting anomalous at
/// `score >= threshold`) and that F1. Among equal F1 values the highest
/// threshold wins. Needs at least one anomalous image.
pub fn f1_optimal_threshold(scores: &[f32], labels: &[bool]) -> Result<(f32, f64), MetricError> {
    let sweep = ScoreSweep::from_image_labels(scores, labels)?;
    if sweep.n_anomalous() == 0 {
        return Err(MetricError::NoAnomalous);
    }
    let n_anomalous = sweep.n_anomalous() as f64;
    let mut best = (f32::INFINITY, 0.0);
    for p in sweep.points() {
        // F1 = 2TP / (2TP + FP + FN) = 2TP / (TP + FP + #anomalous).
        let tp = p.anomalous_above as f64;
        let f1 = 2.0 * tp / (tp + p.normal_above as f64 + n_anomalous);
        if f1 > best.1 {
            best = (p.threshold, f1);
        }
    }
    Ok(best)
}

/// Pixel AUROC over all pixels of all test images (see [`PixelSweep`]).
pub fn pixel_auroc(scores: &[f32], gt: &PixelGroundTruth) -> Result<f64, MetricError> {
    PixelSweep::new(scores, gt)?.auroc()
}

/// Pixel ROC curve as `(FPR, TPR)`, thinned to at most `max_points` points
/// (first and last kept). Panics if `max_points < 2`.
pub fn pixel_roc_curve(
    scores: &[f32],
    gt: &PixelGroundTruth,
    max_points: usize,
) -> Result<Vec<(f64, f64)>, MetricError> {
    PixelSweep::new(scores, gt)?.roc_curve(max_points)
}

impl ScoreSweep {
    /// Mann–Whitney AUROC; both classes must be present.
    pub(crate) fn auroc(&self) -> f64 {
        let mut twice_area: u128 = 0;
        let (mut normal_before, mut anomalous_before) = (0u64, 0u64);
        for p in self.points() {
            let width = u128::from(p.normal_above - normal_before);
            twice_area += width * u128::from(anomalous_before + p.anomalous_above);
            (normal_before, anomalous_before) = (p.normal_above, p.anomalous_above);
        }
        let pairs = self.n_normal() as f64 * self.n_anomalous() as f64;
        twice_area as f64 / (2.0 * pairs)
    }

    /// `(FPR, TPR)` from `(0, 0)` through every distinct threshold; both
    /// classes must be present.
    pub(crate) fn roc_points(&self) -> impl Iterator<Item = (f64, f64)> + '_ {
        let (n_normal, n_anomalous) = (self.n_normal() as f64, self.n_anomalous() as f64);
        let rates = self.points().map(move |p| {
            (
                p.normal_above as f64 / n_normal,
                p.anomalous_above as f64 / n_anomalous,
            )
        });
        std::iter::once((0.0, 0.0)).chain(rates)
    }
}

impl PixelSweep {
    /// Pixel AUROC (ties counted half).
    pub fn auroc(&self) -> Result<f64, MetricError> {
        self.sweep.require_both_classes()?;
        Ok(self.sweep.auroc())
    }

    /// Pixel ROC curve `(FPR, TPR)` thinned to at most `max_points` points.
    /// Panics if `max_points < 2`.
    pub fn roc_curve(&self, max_points: usize) -> Result<Vec<(f64, f64)>, MetricError> {
        self.sweep.require_both_classes()?;
        let mut thinner = CurveThinner::new(ROC_LENGTH, max_points);
        self.sweep.roc_points().for_each(|p| thinner.push(p));
        Ok(thinner.finish())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::metrics::naive;
    use crate::rng::SplitMix64;

    const TOLERANCE: f64 = 1e-12;

    fn labels_of(n_anomalous: usize, n_normal: usize) -> Vec<bool> {
        let mut labels = vec![true; n_anomalous];
        labels.extend(vec![false; n_normal]);
        labels
    }

    /// Scores quantised to `levels` values so that ties are common.
    fn random_scores(rng: &mut SplitMix64, n: usize, levels: usize) -> Vec<f32> {
        (0..n)
            .map(|_| rng.below(levels) as f32 / levels as f32)
            .collect()
    }

    #[test]
    fn hand_case_with_a_tie() {
        // Anomalous 0.9, 0.5, 0.3 against normal 0.5, 0.2, 0.1. Pairs won:
        // 0.9 beats all 3; 0.5 ties 0.5 (½) and beats 2; 0.3 beats 2.
        // (3 + 2.5 + 2) / 9 = 7.5 / 9.
        let scores = [0.9, 0.5, 0.3, 0.5, 0.2, 0.1];
        let got = auroc(&scores, &labels_of(3, 3)).unwrap();
        assert!((got - 7.5 / 9.0).abs() < TOLERANCE, "{got}");
    }

    #[test]
    fn perfect_separation_is_one_and_reversal_is_zero() {
        let scores = [3.0, 2.5, 2.0, 1.0, -1.0];
        let labels = labels_of(3, 2);
        assert_eq!(auroc(&scores, &labels).unwrap(), 1.0);
        let reversed: Vec<f32> = scores.iter().map(|s| -s).collect();
        assert_eq!(auroc(&reversed, &labels).unwrap(), 0.0);
    }

    #[test]
    fn all_tied_scores_give_one_half() {
        assert_eq!(auroc(&[0.3; 6], &labels_of(2, 4)).unwrap(), 0.5);
    }

    #[test]
    fn reversed_scores_give_one_minus_auroc() {
        let mut rng = SplitMix64::new(5);
        let scores = random_scores(&mut rng, 300, 17);
        let labels: Vec<bool> = (0..300).map(|_| rng.below(3) == 0).collect();
        let reversed: Vec<f32> = scores.iter().map(|s| -s).collect();
        let (a, b) = (
            auroc(&scores, &labels).unwrap(),
            auroc(&reversed, &labels).unwrap(),
        );
        assert!((a + b - 1.0).abs() < TOLERANCE, "{a} + {b}");
    }

    #[test]
    fn image_auroc_matches_pairwise_counting() {
        let mut rng = SplitMix64::new(21);
        for trial in 0..40 {
            let n = 2 + rng.below(200);
            let levels = 1 + rng.below(30);
            let scores = random_scores(&mut rng, n, levels);
            let mut labels: Vec<bool> = (0..n).map(|_| rng.below(2) == 0).collect();
            (labels[0], labels[1]) = (true, false);
            let expected = naive::pairwise_auroc(&scores, &labels);
            let got = auroc(&scores, &labels).unwrap();
            assert!(
                (got - expected).abs() < TOLERANCE,
                "trial {trial}: {got} vs {expected}"
            );
        }
    }

    #[test]
    fn pixel_auroc_matches_pairwise_counting() {
        let mut rng = SplitMix64::new(8);
        for trial in 0..20 {
            let case = naive::RandomCase::new(&mut rng);
            let anomalous: Vec<bool> = case.labels.iter().map(|l| *l != 0).collect();
            let expected = naive::pairwise_auroc(&case.scores, &anomalous);
            let got = pixel_auroc(&case.scores, &case.gt).unwrap();
            assert!(
                (got - expected).abs() < TOLERANCE,
                "trial {trial}: {got} vs {expected}"
            );
        }
    }

    #[test]
    fn errors_name_the_problem() {
        assert_eq!(auroc(&[], &[]), Err(MetricError::Empty));
        assert_eq!(
            auroc(&[0.1, 0.2], &[true]),
            Err(MetricError::LengthMismatch {
                scores: 2,
                truth: 1
            })
        );
        assert_eq!(
            auroc(&[0.1, f32::NAN], &[true, false]),
            Err(MetricError::NanScore { index: 1 })
        );
        assert_eq!(
            auroc(&[0.1, 0.2], &[false, false]),
            Err(MetricError::NoAnomalous)
        );
        assert_eq!(
            auroc(&[0.1, 0.2], &[true, true]),
            Err(MetricError::NoNormal)
        );
    }

    #[test]
    fn pixel_auroc_needs_an_anomalous_pixel() {
        let mut gt = PixelGroundTruth::new();
        gt.push_mask(&[false; 4], 2, 2).unwrap();
        assert_eq!(
            pixel_auroc(&[0.1, 0.2, 0.3, 0.4], &gt),
            Err(MetricError::NoAnomalous)
        );
        assert_eq!(
            pixel_auroc(&[0.1, 0.2, 0.3], &gt),
            Err(MetricError::LengthMismatch {
                scores: 3,
                truth: 4
            })
        );
    }

    #[test]
    fn roc_curve_walks_from_origin_to_corner() {
        // Same data as the hand case: thresholds 0.9, 0.5, 0.3, 0.2, 0.1.
        let scores = [0.9, 0.5, 0.3, 0.5, 0.2, 0.1];
        let curve = roc_curve(&scores, &labels_of(3, 3)).unwrap();
        let third = 1.0 / 3.0;
        let expected = [
            (0.0, 0.0),
            (0.0, third),
            (third, 2.0 * third),
            (third, 1.0),
            (2.0 * third, 1.0),
            (1.0, 1.0),
        ];
        assert_eq!(curve.len(), expected.len());
        for (got, want) in curve.iter().zip(expected) {
            assert!((got.0 - want.0).abs() < TOLERANCE && (got.1 - want.1).abs() < TOLERANCE);
        }
    }

    #[test]
    fn pixel_roc_curve_is_thinned_and_keeps_its_ends() {
        let mut rng = SplitMix64::new(3);
        let case = naive::RandomCase::new(&mut rng);
        let curve = pixel_roc_curve(&case.scores, &case.gt, 5).unwrap();
        assert!(curve.len() <= 5 && curve.len() >= 2);
        assert_eq!(curve.first(), Some(&(0.0, 0.0)));
        assert_eq!(curve.last(), Some(&(1.0, 1.0)));
        assert!(
            curve
                .windows(2)
                .all(|w| w[0].0 <= w[1].0 && w[0].1 <= w[1].1)
        );
    }

    #[test]
    fn f1_threshold_hand_case() {
        // Anomalous 0.9, 0.7, 0.2; normal 0.8, 0.1. Thresholds:
        // 0.9: TP1 FP0 -> 2/(1+0+3) = 0.5;  0.8: TP1 FP1 -> 2/5 = 0.4;
        // 0.7: TP2 FP1 -> 4/6 = 0.667;      0.2: TP3 FP1 -> 6/7 = 0.857;
        // 0.1: TP3 FP2 -> 6/8 = 0.75. Best: 0.2 with 6/7.
        let scores = [0.9, 0.7, 0.2, 0.8, 0.1];
        let (threshold, f1) = f1_optimal_threshold(&scores, &labels_of(3, 2)).unwrap();
        assert_eq!(threshold, 0.2);
        assert!((f1 - 6.0 / 7.0).abs() < TOLERANCE);
    }

    #[test]
    fn f1_threshold_needs_an_anomalous_image() {
        let err = f1_optimal_threshold(&[0.1, 0.2], &[false, false]);
        assert_eq!(err, Err(MetricError::NoAnomalous));
    }
}
