//! Putting the branches on a common scale, from held-out normal images only.
//!
//! The branches' raw scores and maps have unrelated units (a Mahalanobis
//! distance, a distance ratio, a nearest-neighbour distance), so in the
//! paper's product whichever branch has the widest dynamic range decides.
//! Calibration measures each branch on normal images the fit never saw and
//! re-expresses its values relative to that normal behaviour:
//!
//! - maps: the *surprise* `S(v) = −ln(1 − F(v))`, with `F` the distribution
//!   of the branch's map values over all held-out normal pixels. Under
//!   normality `S` is about Exp(1) whatever the branch, and `S > 9.2` means
//!   "rarer than one normal pixel in 10,000". Beyond the largest normal
//!   value the tail is extended exponentially (the slope of the last
//!   decade), so larger anomalies keep ranking higher instead of saturating.
//! - image scores: a robust z-score `(s − median) / (1.4826 · MAD)` of the
//!   held-out normal images' scores.
//!
//! The quantile table stores `F⁻¹` at levels `p = 1 − 10^(−x)`, with `x` in
//! steps of [`LEVEL_STEP`] up to `log10(n)`: dense where anomalies live (the
//! upper tail), coarse in the body, and `S` is linear in `x` there
//! (`S = x · ln 10`).

use serde::{Deserialize, Serialize};

use crate::config::FusionConfig;
use crate::fusion::{
    Branch, BranchOutputs, BranchSet, FusionCalibration, FusionRule, ImageScoreRule, fuse,
};

/// Most map values per branch that the quantile table is fitted on; larger
/// calibration sets are subsampled with a fixed stride.
pub const MAX_CALIBRATION_PIXELS: usize = 4_000_000;
/// Image score rules in the order calibration stores their scores.
pub const IMAGE_SCORE_RULES: [ImageScoreRule; 2] =
    [ImageScoreRule::Paper, ImageScoreRule::Calibrated];

/// Step in `x = −log10(1 − p)` between stored quantile levels.
pub const LEVEL_STEP: f64 = 0.02;
/// Consistency constant of the median absolute deviation for a normal distribution.
const MAD_TO_SIGMA: f64 = 1.4826;
/// Smallest robust scale relative to the median's magnitude (guards a
/// degenerate spread, e.g. two identical held-out scores).
const MIN_RELATIVE_SCALE: f64 = 1e-3;
/// Smallest robust scale in absolute terms.
const MIN_SCALE: f64 = 1e-12;

/// Everything measured on the held-out normal images.
#[derive(Debug, Clone, PartialEq)]
pub struct Calibration {
    /// Each branch's image scores (object, attribution, texture).
    pub branch_scores: [Vec<f64>; 3],
    /// `max(M)` before smoothing, per fusion rule in [`FusionRule::ALL`] order.
    pub map_max: [Vec<f64>; 4],
    /// Fused image scores per (rule, image score rule), index
    /// `rule · 2 + image_rule` in [`FusionRule::ALL`] × [`IMAGE_SCORE_RULES`] order.
    pub fused_scores: Vec<Vec<f64>>,
    /// What the calibrated rules need; `None` without held-out images.
    pub fusion: Option<FusionCalibration>,
    /// Largest smoothed fused-map value under the configured rule (heatmap colour scale).
    pub map_normal_max: f32,
    /// Decision threshold on the configured fused score; `None` without held-out images.
    pub threshold: Option<f64>,
}

impl Calibration {
    /// Measures the branch outputs of held-out normal images. `quantile` sets
    /// the threshold of the configured rules.
    pub fn measure(outputs: &[BranchOutputs], config: &FusionConfig, quantile: f64) -> Self {
        let branch_scores =
            Branch::ALL.map(|b| outputs.iter().map(|o| o.get(b).score).collect::<Vec<_>>());
        if outputs.is_empty() {
            return Self {
                branch_scores,
                map_max: Default::default(),
                fused_scores: vec![Vec::new(); 8],
                fusion: None,
                map_normal_max: 0.0,
                threshold: None,
            };
        }
        let maps = Branch::ALL.map(|b| map_table(outputs, b));
        let scores = [0, 1, 2].map(|i| ScoreCalibration::fit(&branch_scores[i]));
        let unit = ScoreCalibration {
            median: 0.0,
            scale: 1.0,
        };
        let mut fusion = FusionCalibration {
            maps,
            scores,
            map_max: [unit; 4],
        };

        let map_max = FusionRule::ALL.map(|rule| {
            let paper_scores = FusionConfig {
                image_score: ImageScoreRule::Paper,
                ..config.clone()
            };
            outputs
                .iter()
                .map(|o| {
                    f64::from(fuse(o, BranchSet::ALL, rule, &paper_scores, Some(&fusion)).map_max)
                })
                .collect::<Vec<_>>()
        });
        for (slot, values) in fusion.map_max.iter_mut().zip(&map_max) {
            *slot = ScoreCalibration::fit(values);
        }

        let mut fused_scores = Vec::with_capacity(8);
        let mut map_normal_max = 0.0f32;
        for rule in FusionRule::ALL {
            for image_score in IMAGE_SCORE_RULES {
                let c = FusionConfig {
                    image_score,
                    ..config.clone()
                };
                let fused: Vec<_> = outputs
                    .iter()
                    .map(|o| fuse(o, BranchSet::ALL, rule, &c, Some(&fusion)))
                    .collect();
                if (rule, image_score) == (config.rule, config.image_score) {
                    map_normal_max = fused.iter().map(|f| f.map.max()).fold(0.0, f32::max);
                }
                fused_scores.push(fused.iter().map(|f| f.score).collect());
            }
        }
        let mut calibration = Self {
            branch_scores,
            map_max,
            fused_scores,
            fusion: Some(fusion),
            map_normal_max,
            threshold: None,
        };
        calibration.threshold =
            calibration.threshold_for(config.rule, config.image_score, quantile);
        calibration
    }

    /// Held-out fused scores under a rule pair.
    pub fn scores_for(&self, rule: FusionRule, image_score: ImageScoreRule) -> &[f64] {
        let r = FusionRule::ALL.iter().position(|&x| x == rule).unwrap_or(0);
        let i = IMAGE_SCORE_RULES
            .iter()
            .position(|&x| x == image_score)
            .unwrap_or(0);
        self.fused_scores.get(r * 2 + i).map_or(&[], Vec::as_slice)
    }

    /// The `quantile` of the held-out fused scores under a rule pair.
    pub fn threshold_for(
        &self,
        rule: FusionRule,
        image_score: ImageScoreRule,
        quantile: f64,
    ) -> Option<f64> {
        quantile_of(self.scores_for(rule, image_score), quantile)
    }

    /// The `quantile` of one branch's held-out image scores.
    pub fn branch_threshold(&self, branch: Branch, quantile: f64) -> Option<f64> {
        quantile_of(&self.branch_scores[branch as usize], quantile)
    }
}

/// Linear-interpolation quantile (numpy's default); `None` for no data.
pub fn quantile_of(values: &[f64], q: f64) -> Option<f64> {
    if values.is_empty() {
        return None;
    }
    let mut sorted = values.to_vec();
    sorted.sort_by(f64::total_cmp);
    let pos = q.clamp(0.0, 1.0) * (sorted.len() - 1) as f64;
    let (lo, hi) = (pos.floor() as usize, pos.ceil() as usize);
    Some(sorted[lo] + (sorted[hi] - sorted[lo]) * (pos - lo as f64))
}

/// The map quantile table of one branch over all held-out pixels (strided
/// down to [`MAX_CALIBRATION_PIXELS`]).
fn map_table(outputs: &[BranchOutputs], branch: Branch) -> MapCalibration {
    let total: usize = outputs.iter().map(|o| o.get(branch).map.data.len()).sum();
    let stride = total.div_ceil(MAX_CALIBRATION_PIXELS).max(1);
    let mut values: Vec<f32> = outputs
        .iter()
        .flat_map(|o| o.get(branch).map.data.iter().step_by(stride).copied())
        .collect();
    MapCalibration::fit(&mut values)
}

/// Quantiles of one branch's map values on normal pixels.
#[derive(Debug, Clone, PartialEq)]
pub struct MapCalibration {
    /// `F⁻¹(1 − 10^(−i·LEVEL_STEP))` for `i = 0, 1, …`; non-decreasing.
    pub quantiles: Vec<f32>,
}

impl MapCalibration {
    /// Fits on normal map values (any order; sorted in place).
    pub fn fit(values: &mut [f32]) -> Self {
        values.sort_unstable_by(f32::total_cmp);
        let n = values.len();
        if n == 0 {
            return Self {
                quantiles: vec![0.0],
            };
        }
        let x_max = (n as f64).log10();
        let levels = (x_max / LEVEL_STEP).floor() as usize + 1;
        let quantiles = (0..levels)
            .map(|i| {
                let p = 1.0 - 10f64.powf(-(i as f64) * LEVEL_STEP);
                let pos = p * (n - 1) as f64;
                let (lo, hi) = (pos.floor() as usize, pos.ceil() as usize);
                let t = (pos - lo as f64) as f32;
                values[lo] + (values[hi] - values[lo]) * t
            })
            .collect();
        Self { quantiles }
    }

    /// Surprise `−ln(1 − F(v))` of a map value, ≥ 0 and non-decreasing in `v`.
    pub fn surprise(&self, v: f32) -> f32 {
        let q = &self.quantiles;
        if v.is_nan() || v <= q[0] {
            return 0.0;
        }
        let last = q.len() - 1;
        // Index of the last level whose quantile is ≤ v.
        let i = q.partition_point(|&qi| qi <= v) - 1;
        let x = if i < last {
            let span = q[i + 1] - q[i];
            i as f64
                + if span > 0.0 {
                    f64::from((v - q[i]) / span)
                } else {
                    0.0
                }
        } else {
            last as f64 + f64::from(v - q[last]) / self.tail_slope()
        };
        (x * LEVEL_STEP * std::f64::consts::LN_10) as f32
    }

    /// Map-value increase per level step over the last decade of the tail.
    fn tail_slope(&self) -> f64 {
        let q = &self.quantiles;
        let last = q.len() - 1;
        let decade = ((1.0 / LEVEL_STEP) as usize).clamp(1, last.max(1));
        let rise = f64::from(q[last] - q[last.saturating_sub(decade)]) / decade as f64;
        let magnitude = f64::from(q[last].abs()).max(MIN_SCALE);
        rise.max(magnitude * MIN_RELATIVE_SCALE)
    }
}

/// Robust location and scale of one score on normal images.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct ScoreCalibration {
    pub median: f64,
    pub scale: f64,
}

impl ScoreCalibration {
    /// Median and 1.4826·MAD of normal scores (floored, see [`MIN_RELATIVE_SCALE`]).
    pub fn fit(scores: &[f64]) -> Self {
        let median = median(scores);
        let deviations: Vec<f64> = scores.iter().map(|s| (s - median).abs()).collect();
        let mad = MAD_TO_SIGMA * median_or_zero(&deviations);
        let floor = (median.abs() * MIN_RELATIVE_SCALE).max(MIN_SCALE);
        Self {
            median,
            scale: mad.max(floor),
        }
    }

    /// Robust z-score.
    pub fn z(&self, score: f64) -> f64 {
        (score - self.median) / self.scale
    }
}

fn median(values: &[f64]) -> f64 {
    median_or_zero(values)
}

fn median_or_zero(values: &[f64]) -> f64 {
    if values.is_empty() {
        return 0.0;
    }
    let mut sorted = values.to_vec();
    sorted.sort_by(f64::total_cmp);
    let n = sorted.len();
    if n % 2 == 1 {
        sorted[n / 2]
    } else {
        0.5 * (sorted[n / 2 - 1] + sorted[n / 2])
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rng::SplitMix64;

    #[test]
    fn surprise_of_uniform_values_follows_the_tail_probability() {
        // 100,000 values uniform on [0, 1): F(v) = v, so S(v) = −ln(1 − v).
        let mut rng = SplitMix64::new(4);
        let mut values: Vec<f32> = (0..100_000).map(|_| rng.next_f64() as f32).collect();
        let cal = MapCalibration::fit(&mut values);
        for v in [0.5f32, 0.9, 0.99, 0.999] {
            let want = -(1.0 - f64::from(v)).ln();
            let got = f64::from(cal.surprise(v));
            assert!(
                (got - want).abs() < 0.05 * want.max(1.0),
                "S({v}) = {got}, want {want}"
            );
        }
        assert_eq!(cal.surprise(-1.0), 0.0);
    }

    #[test]
    fn surprise_keeps_ranking_beyond_the_largest_normal_value() {
        let mut values: Vec<f32> = (0..1000).map(|i| i as f32 / 1000.0).collect();
        let cal = MapCalibration::fit(&mut values);
        let (a, b, c) = (cal.surprise(0.999), cal.surprise(2.0), cal.surprise(5.0));
        assert!(a < b && b < c, "{a} {b} {c}");
    }

    #[test]
    fn surprise_is_monotone_with_ties() {
        let mut values = vec![0.0f32; 500];
        values.extend((0..500).map(|i| 1.0 + i as f32));
        let cal = MapCalibration::fit(&mut values);
        let mut last = -1.0f32;
        for k in 0..2000 {
            let s = cal.surprise(k as f32 * 0.5 - 10.0);
            assert!(s >= last, "not monotone at {k}");
            last = s;
        }
        // Half the values are exactly zero: F(0) is at least 1/2.
        assert!(cal.surprise(0.5) >= 0.69 * 0.95);
    }

    #[test]
    fn quantile_interpolates_linearly() {
        assert_eq!(quantile_of(&[], 0.5), None);
        assert_eq!(quantile_of(&[3.0, 1.0, 2.0], 0.5), Some(2.0));
        assert_eq!(quantile_of(&[1.0, 2.0], 0.99), Some(1.99));
        assert_eq!(quantile_of(&[1.0, 2.0], 1.0), Some(2.0));
    }

    #[test]
    fn robust_z_score() {
        let cal = ScoreCalibration::fit(&[1.0, 2.0, 3.0, 4.0, 100.0]);
        assert_eq!(cal.median, 3.0);
        assert!((cal.scale - 1.4826).abs() < 1e-12);
        assert!((cal.z(4.4826) - 1.0).abs() < 1e-9);
        // Identical scores: the floor keeps the scale positive.
        let flat = ScoreCalibration::fit(&[2.0, 2.0]);
        assert!(flat.scale > 0.0 && flat.z(2.0) == 0.0);
    }
}
