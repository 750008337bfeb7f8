//! The sorted threshold sweep shared by every metric and curve.
//!
//! Normal and anomalous samples are sorted separately: normal samples need
//! only their score (4 bytes each), anomalous ones also carry a group id
//! (their ground-truth component). Walking both lists down from the top
//! score, one step per distinct value, yields cumulative counts from which
//! FPR, TPR and PRO follow without any per-threshold allocation.

use rayon::prelude::*;

use super::{MetricError, PixelGroundTruth, check_scores};

const SIGN_BIT: u32 = 0x8000_0000;
const GROUP_BITS: u32 = 32;
const GROUP_MASK: u64 = 0xFFFF_FFFF;

/// Maps a non-NaN score to a `u32` whose unsigned order is the score's
/// numeric order, so sorting and tie tests work on integers. `-0.0` and
/// `+0.0` map to the same key.
pub(crate) fn order_key(score: f32) -> u32 {
    let bits = if score == 0.0 { 0 } else { score.to_bits() };
    if bits & SIGN_BIT != 0 {
        !bits
    } else {
        bits | SIGN_BIT
    }
}

/// Inverse of [`order_key`].
pub(crate) fn score_of_key(key: u32) -> f32 {
    let bits = if key & SIGN_BIT != 0 {
        key & !SIGN_BIT
    } else {
        !key
    };
    f32::from_bits(bits)
}

fn pack(score: f32, group: u32) -> u64 {
    (u64::from(order_key(score)) << GROUP_BITS) | u64::from(group)
}

fn packed_key(packed: u64) -> u32 {
    (packed >> GROUP_BITS) as u32
}

fn packed_group(packed: u64) -> usize {
    (packed & GROUP_MASK) as usize
}

/// Scores split by class and sorted ascending, ready to be swept from the top.
#[derive(Debug, Clone)]
pub(crate) struct ScoreSweep {
    /// Order keys of the normal samples.
    normal: Vec<u32>,
    /// `order_key << 32 | group` of the anomalous samples.
    anomalous: Vec<u64>,
    /// What one anomalous sample of each group adds to `weight_above`.
    group_weights: Vec<f64>,
}

/// Cumulative counts at one threshold: everything with score `>= threshold`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) struct SweepPoint {
    pub threshold: f32,
    pub normal_above: u64,
    pub anomalous_above: u64,
    /// Sum of the group weights of the anomalous samples above.
    pub weight_above: f64,
}

impl ScoreSweep {
    /// Sorts the two classes (in parallel). `anomalous` holds packed
    /// `(score, group)` values as made by `pack`.
    fn new(mut normal: Vec<u32>, mut anomalous: Vec<u64>, group_weights: Vec<f64>) -> Self {
        normal.par_sort_unstable();
        anomalous.par_sort_unstable();
        Self {
            normal,
            anomalous,
            group_weights,
        }
    }

    /// One score per image, `labels[i]` true for an anomalous image; every
    /// anomalous image is its own group of weight 1.
    pub(crate) fn from_image_labels(scores: &[f32], labels: &[bool]) -> Result<Self, MetricError> {
        check_scores(scores, labels.len())?;
        let pairs = scores.iter().zip(labels);
        let normal = pairs.clone().filter(|(_, l)| !**l);
        let anomalous = pairs.filter(|(_, l)| **l);
        Ok(Self::new(
            normal.map(|(s, _)| order_key(*s)).collect(),
            anomalous.map(|(s, _)| pack(*s, 0)).collect(),
            vec![1.0],
        ))
    }

    pub(crate) fn n_normal(&self) -> u64 {
        self.normal.len() as u64
    }

    pub(crate) fn n_anomalous(&self) -> u64 {
        self.anomalous.len() as u64
    }

    /// Errors unless both classes are present.
    pub(crate) fn require_both_classes(&self) -> Result<(), MetricError> {
        if self.anomalous.is_empty() {
            return Err(MetricError::NoAnomalous);
        }
        if self.normal.is_empty() {
            return Err(MetricError::NoNormal);
        }
        Ok(())
    }

    /// Lowest and highest score over both classes (`None` when empty).
    pub(crate) fn score_range(&self) -> Option<(f32, f32)> {
        let firsts = [
            self.normal.first().copied(),
            self.anomalous.first().map(|p| packed_key(*p)),
        ];
        let lasts = [
            self.normal.last().copied(),
            self.anomalous.last().map(|p| packed_key(*p)),
        ];
        let lo = firsts.into_iter().flatten().min()?;
        let hi = lasts.into_iter().flatten().max()?;
        Some((score_of_key(lo), score_of_key(hi)))
    }

    /// One point per distinct score, from the highest score down.
    pub(crate) fn points(&self) -> SweepPoints<'_> {
        SweepPoints {
            sweep: self,
            normal_left: self.normal.len(),
            anomalous_left: self.anomalous.len(),
            point: SweepPoint {
                threshold: f32::INFINITY,
                normal_above: 0,
                anomalous_above: 0,
                weight_above: 0.0,
            },
        }
    }
}

/// Iterator behind [`ScoreSweep::points`]: `normal[..normal_left]` and
/// `anomalous[..anomalous_left]` have not yet entered.
pub(crate) struct SweepPoints<'a> {
    sweep: &'a ScoreSweep,
    normal_left: usize,
    anomalous_left: usize,
    point: SweepPoint,
}

impl SweepPoints<'_> {
    fn next_normal_key(&self) -> Option<u32> {
        self.normal_left
            .checked_sub(1)
            .map(|i| self.sweep.normal[i])
    }

    fn next_anomalous_key(&self) -> Option<u32> {
        let i = self.anomalous_left.checked_sub(1)?;
        Some(packed_key(self.sweep.anomalous[i]))
    }

    fn enter_normal(&mut self, key: u32) {
        while self.next_normal_key() == Some(key) {
            self.normal_left -= 1;
            self.point.normal_above += 1;
        }
    }

    fn enter_anomalous(&mut self, key: u32) {
        // Summing the step first keeps the running total's rounding small.
        let mut step_weight = 0.0;
        while self.next_anomalous_key() == Some(key) {
            self.anomalous_left -= 1;
            let group = packed_group(self.sweep.anomalous[self.anomalous_left]);
            step_weight += self.sweep.group_weights[group];
            self.point.anomalous_above += 1;
        }
        self.point.weight_above += step_weight;
    }
}

impl Iterator for SweepPoints<'_> {
    type Item = SweepPoint;

    fn next(&mut self) -> Option<SweepPoint> {
        // `None < Some(_)`, so the max is the next distinct key of either class.
        let key = self.next_normal_key().max(self.next_anomalous_key())?;
        self.enter_normal(key);
        self.enter_anomalous(key);
        self.point.threshold = score_of_key(key);
        Some(self.point)
    }
}

/// The sorted sweep of every test pixel, built once and queried for pixel
/// AUROC, AUPRO (both conventions) and the pixel curves.
///
/// Memory: 4 bytes per normal pixel and 8 per anomalous pixel, on top of the
/// caller's scores; nothing is allocated per threshold.
#[derive(Debug, Clone)]
pub struct PixelSweep {
    pub(crate) sweep: ScoreSweep,
    pub(crate) n_components: usize,
}

impl PixelSweep {
    /// Splits `scores` (all maps concatenated in push order) by the ground
    /// truth and sorts them.
    pub fn new(scores: &[f32], gt: &PixelGroundTruth) -> Result<Self, MetricError> {
        check_scores(scores, gt.n_pixels())?;
        let mut normal = Vec::with_capacity(gt.n_normal_pixels());
        let mut anomalous = Vec::with_capacity(gt.n_anomalous_pixels());
        let mut cursor = 0;
        for run in gt.runs() {
            normal.extend(scores[cursor..run.start].iter().map(|s| order_key(*s)));
            let run_scores = &scores[run.start..run.end()];
            anomalous.extend(run_scores.iter().map(|s| pack(*s, run.label)));
            cursor = run.end();
        }
        normal.extend(scores[cursor..].iter().map(|s| order_key(*s)));
        Ok(Self {
            sweep: ScoreSweep::new(normal, anomalous, component_weights(gt)),
            n_components: gt.component_sizes().len(),
        })
    }

    /// `(FPR, PRO)` at a sweep point. PRO is capped at 1 so that summation
    /// rounding on a fully covered test set cannot push it past.
    pub(crate) fn fpr_pro(&self, point: &SweepPoint) -> (f64, f64) {
        let fpr = point.normal_above as f64 / self.sweep.n_normal() as f64;
        let pro = point.weight_above / self.n_components as f64;
        (fpr, pro.min(1.0))
    }
}

/// Weight of one pixel of component `k` is `1 / size_k`, so a fully covered
/// component adds 1 and the weight total over components is `K · PRO`.
/// Index 0 (normal) is unused.
fn component_weights(gt: &PixelGroundTruth) -> Vec<f64> {
    let sizes = gt.component_sizes().iter();
    std::iter::once(0.0)
        .chain(sizes.map(|s| 1.0 / *s as f64))
        .collect()
}

/// Streams points of a curve whose coordinates both never decrease and keeps
/// at most `max_points` of them, spaced by L1 arc length; the first and last
/// points are always kept. `length_bound` bounds the curve's total L1 length.
pub(crate) struct CurveThinner {
    step: f64,
    max_points: usize,
    kept: Vec<(f64, f64)>,
    pending: Option<(f64, f64)>,
}

impl CurveThinner {
    pub(crate) fn new(length_bound: f64, max_points: usize) -> Self {
        assert!(max_points >= 2, "a curve needs room for its two end points");
        Self {
            step: length_bound / (max_points - 2) as f64,
            max_points,
            kept: Vec::with_capacity(max_points),
            pending: None,
        }
    }

    pub(crate) fn push(&mut self, point: (f64, f64)) {
        let Some(last) = self.kept.last() else {
            self.kept.push(point);
            return;
        };
        let travelled = (point.0 - last.0) + (point.1 - last.1);
        // One slot stays free for the final point, whatever rounding does.
        if travelled >= self.step && self.kept.len() + 1 < self.max_points {
            self.kept.push(point);
            self.pending = None;
        } else {
            self.pending = Some(point);
        }
    }

    pub(crate) fn finish(mut self) -> Vec<(f64, f64)> {
        self.kept.extend(self.pending);
        self.kept
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn order_key_follows_numeric_order() {
        let ascending = [
            f32::NEG_INFINITY,
            -3.5e20,
            -1.0,
            -1e-40, // subnormal
            0.0,
            1e-40,
            0.25,
            1.0,
            7e30,
            f32::INFINITY,
        ];
        for pair in ascending.windows(2) {
            assert!(order_key(pair[0]) < order_key(pair[1]), "{pair:?}");
        }
        for s in ascending {
            assert_eq!(score_of_key(order_key(s)).to_bits(), s.to_bits());
        }
    }

    #[test]
    fn negative_zero_ties_positive_zero() {
        assert_eq!(order_key(-0.0), order_key(0.0));
    }

    #[test]
    fn points_group_ties_across_classes() {
        // normal 0.5, 0.2; anomalous 0.5, 0.9 (groups of weight 1).
        let sweep =
            ScoreSweep::from_image_labels(&[0.5, 0.9, 0.2, 0.5], &[false, true, false, true])
                .unwrap();
        let got: Vec<_> = sweep
            .points()
            .map(|p| (p.threshold, p.normal_above, p.anomalous_above))
            .collect();
        assert_eq!(got, vec![(0.9, 0, 1), (0.5, 1, 2), (0.2, 2, 2)]);
    }

    #[test]
    fn score_range_spans_both_classes() {
        let sweep = ScoreSweep::from_image_labels(&[0.5, -2.0, 3.0], &[true, false, true]).unwrap();
        assert_eq!(sweep.score_range(), Some((-2.0, 3.0)));
    }

    #[test]
    fn thinner_keeps_ends_and_respects_the_budget() {
        let n = 10_000;
        let curve = (0..=n).map(|i| (i as f64 / n as f64, (i as f64 / n as f64).sqrt()));
        for max_points in [2, 3, 10, 100] {
            let mut thinner = CurveThinner::new(2.0, max_points);
            curve.clone().for_each(|p| thinner.push(p));
            let kept = thinner.finish();
            assert!(kept.len() <= max_points, "{} > {max_points}", kept.len());
            assert_eq!(kept.first(), Some(&(0.0, 0.0)));
            assert_eq!(kept.last(), Some(&(1.0, 1.0)));
        }
    }

    #[test]
    fn thinner_keeps_a_short_curve_whole() {
        let mut thinner = CurveThinner::new(2.0, 100);
        [(0.0, 0.0), (0.5, 0.5), (1.0, 1.0)]
            .into_iter()
            .for_each(|p| thinner.push(p));
        assert_eq!(thinner.finish().len(), 3);
    }
}
