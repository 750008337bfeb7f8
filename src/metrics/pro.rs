//! Per-region overlap (PRO) and its normalised area, AUPRO (Bergmann et al.,
//! "The MVTec Anomaly Detection Dataset", IJCV 2021).
//!
//! At threshold `t`, PRO(t) is the mean over all ground-truth regions of the
//! share of the region's pixels with score `>= t`, and FPR(t) the share of all
//! normal pixels with score `>= t`. The PRO curve joins `(0, 0)` (threshold
//! above every score) to the points of every distinct score, descending, by
//! straight lines; AUPRO@`m` is its area over FPR in `[0, m]`, with the curve
//! cut by linear interpolation at exactly `m`, divided by `m`.
//!
//! [`aupro_reference`] is the variant computed by the widely copied reference
//! script (200 evenly spaced thresholds, normalised by the largest FPR
//! sampled); its numbers differ slightly and are reported under that name.

use super::sweep::{CurveThinner, PixelSweep};
use super::{MetricError, PixelGroundTruth};

/// The FPR limit of the MVTec AD convention, "AUPRO@0.3".
pub const AUPRO_MAX_FPR: f64 = 0.3;

/// Threshold count of the reference script's variant.
pub const REFERENCE_THRESHOLDS: usize = 200;

/// Exact AUPRO@`max_fpr` over all test pixels (see [`PixelSweep::aupro`]).
pub fn aupro(scores: &[f32], gt: &PixelGroundTruth, max_fpr: f64) -> Result<f64, MetricError> {
    PixelSweep::new(scores, gt)?.aupro(max_fpr)
}

/// Reference-script variant of AUPRO (see [`PixelSweep::aupro_reference`]).
pub fn aupro_reference(
    scores: &[f32],
    gt: &PixelGroundTruth,
    max_fpr: f64,
    n_thresholds: usize,
) -> Result<f64, MetricError> {
    PixelSweep::new(scores, gt)?.aupro_reference(max_fpr, n_thresholds)
}

/// PRO curve `(FPR, PRO)` from `(0, 0)` up to FPR = `max_fpr`, thinned to at
/// most `max_points` points. Panics if `max_points < 2`.
pub fn pro_curve(
    scores: &[f32],
    gt: &PixelGroundTruth,
    max_fpr: f64,
    max_points: usize,
) -> Result<Vec<(f64, f64)>, MetricError> {
    PixelSweep::new(scores, gt)?.pro_curve(max_fpr, max_points)
}

impl PixelSweep {
    /// Exact AUPRO@`max_fpr` in `[0, 1]`: every distinct score is a threshold.
    pub fn aupro(&self, max_fpr: f64) -> Result<f64, MetricError> {
        let mut area = TrapezoidArea::default();
        self.visit_pro_curve(max_fpr, |point| area.push(point))?;
        Ok(area.total / max_fpr)
    }

    /// PRO curve `(FPR, PRO)` from `(0, 0)` to FPR = `max_fpr`, thinned to at
    /// most `max_points` points. Panics if `max_points < 2`.
    pub fn pro_curve(
        &self,
        max_fpr: f64,
        max_points: usize,
    ) -> Result<Vec<(f64, f64)>, MetricError> {
        // The curve climbs at most max_fpr in FPR and 1 in PRO.
        let mut thinner = CurveThinner::new(max_fpr + 1.0, max_points);
        self.visit_pro_curve(max_fpr, |point| thinner.push(point))?;
        Ok(thinner.finish())
    }

    /// Variant of the reference script: `n_thresholds` thresholds
    /// `t_i = min + i·(max − min)/n_thresholds`, `i = 0..n_thresholds`; at
    /// each, a pixel counts when its score is strictly `> t_i`. The points
    /// with FPR strictly below `max_fpr` are kept, their FPR divided by the
    /// largest kept FPR, and the trapezoid area under them is returned (no
    /// `(0, 0)` start, no interpolation at `max_fpr`).
    pub fn aupro_reference(&self, max_fpr: f64, n_thresholds: usize) -> Result<f64, MetricError> {
        check_max_fpr(max_fpr)?;
        self.sweep.require_both_classes()?;
        if n_thresholds < 2 {
            return Err(MetricError::TooFewThresholds { n_thresholds });
        }
        let kept: Vec<(f64, f64)> = self
            .reference_points(n_thresholds)?
            .into_iter()
            .filter(|(fpr, _)| *fpr < max_fpr)
            .collect();
        let largest_fpr = kept.iter().map(|p| p.0).fold(0.0, f64::max);
        if largest_fpr <= 0.0 {
            return Err(MetricError::NoReferencePoints { max_fpr });
        }
        let mut area = TrapezoidArea::default();
        kept.into_iter().for_each(|point| area.push(point));
        Ok(area.total / largest_fpr)
    }

    /// `(FPR, PRO)` with strict `>` at the reference thresholds, from the
    /// highest threshold down (so FPR never decreases).
    fn reference_points(&self, n_thresholds: usize) -> Result<Vec<(f64, f64)>, MetricError> {
        let Some((lo, hi)) = self.sweep.score_range() else {
            return Err(MetricError::Empty);
        };
        if lo == hi {
            return Err(MetricError::ConstantScores);
        }
        let (lo, step) = (
            f64::from(lo),
            (f64::from(hi) - f64::from(lo)) / n_thresholds as f64,
        );
        let mut points = self.sweep.points().peekable();
        let mut above = (0.0, 0.0);
        let mut out = Vec::with_capacity(n_thresholds);
        for i in (0..n_thresholds).rev() {
            let threshold = lo + i as f64 * step;
            while let Some(p) = points.next_if(|p| f64::from(p.threshold) > threshold) {
                above = self.fpr_pro(&p);
            }
            out.push(above);
        }
        Ok(out)
    }

    /// Calls `visit` with `(0, 0)`, then `(FPR, PRO)` at each distinct score
    /// while FPR < `max_fpr`, then the curve's point at exactly `max_fpr`.
    fn visit_pro_curve(
        &self,
        max_fpr: f64,
        mut visit: impl FnMut((f64, f64)),
    ) -> Result<(), MetricError> {
        check_max_fpr(max_fpr)?;
        self.sweep.require_both_classes()?;
        let mut previous = (0.0, 0.0);
        visit(previous);
        for p in self.sweep.points() {
            let (fpr, pro) = self.fpr_pro(&p);
            if fpr >= max_fpr {
                // previous.0 < max_fpr <= fpr, so the division is safe.
                let share = (max_fpr - previous.0) / (fpr - previous.0);
                visit((max_fpr, previous.1 + share * (pro - previous.1)));
                return Ok(());
            }
            visit((fpr, pro));
            previous = (fpr, pro);
        }
        // Unreachable: the lowest score's point has FPR exactly 1.
        Ok(())
    }
}

fn check_max_fpr(max_fpr: f64) -> Result<(), MetricError> {
    if max_fpr > 0.0 && max_fpr <= 1.0 {
        Ok(())
    } else {
        Err(MetricError::InvalidMaxFpr { max_fpr })
    }
}

/// Running trapezoid area under points pushed in order of increasing x.
#[derive(Debug, Default)]
struct TrapezoidArea {
    previous: Option<(f64, f64)>,
    total: f64,
}

impl TrapezoidArea {
    /// Adds the segment from the previous point; the first point starts the curve.
    fn push(&mut self, point: (f64, f64)) {
        if let Some((x0, y0)) = self.previous {
            self.total += (point.0 - x0) * (y0 + point.1) / 2.0;
        }
        self.previous = Some(point);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::metrics::naive;
    use crate::rng::SplitMix64;

    const TOLERANCE: f64 = 1e-9;

    /// Two 4x4 images. Image A has a diagonal pair region C1 = {(0,0), (1,1)}
    /// with scores 0.9 and 0.4, and normal pixels (0,3) = 0.8, (2,2) = 0.4.
    /// Image B has a 2x2 region C2 = rows 2-3, cols 2-3 with scores 0.8, 0.6
    /// / 0.6, 0.1, and normal pixel (0,0) = 0.6. Every other pixel is 0.
    /// 26 normal pixels; PRO weights 1/2 per C1 pixel, 1/4 per C2 pixel.
    fn hand_case() -> (Vec<f32>, PixelGroundTruth) {
        let mut scores = vec![0.0; 32];
        for (index, score) in [(0, 0.9), (5, 0.4), (3, 0.8), (10, 0.4)] {
            scores[index] = score;
        }
        for (index, score) in [(10, 0.8), (11, 0.6), (14, 0.6), (15, 0.1), (0, 0.6)] {
            scores[16 + index] = score;
        }
        let mut gt = PixelGroundTruth::new();
        let mut mask_a = [false; 16];
        (mask_a[0], mask_a[5]) = (true, true);
        let mut mask_b = [false; 16];
        [10, 11, 14, 15].into_iter().for_each(|i| mask_b[i] = true);
        gt.push_mask(&mask_a, 4, 4).unwrap();
        gt.push_mask(&mask_b, 4, 4).unwrap();
        (scores, gt)
    }

    #[test]
    fn hand_case_aupro() {
        // Threshold: (FPR, PRO)
        //   0.9: (0, 1/4)   0.8: (1/26, 3/8)   0.6: (2/26, 5/8)
        //   0.4: (3/26, 7/8)   0.1: (3/26, 1)   0.0: (1, 1)
        // Area to 0.3: 0 + (0.3125 + 0.5 + 0.75)/26 + 0 + (0.3 − 3/26)·1
        //   = 0.3 − 1.4375/26; divided by 0.3: 1 − 1.4375/7.8.
        let (scores, gt) = hand_case();
        let got = aupro(&scores, &gt, AUPRO_MAX_FPR).unwrap();
        assert!((got - (1.0 - 1.4375 / 7.8)).abs() < TOLERANCE, "{got}");
    }

    #[test]
    fn hand_case_aupro_interpolates_inside_a_segment() {
        // Limit 1.5/26 cuts the segment (1/26, 0.375)-(2/26, 0.625) at
        // PRO 0.5. Area (0.3125 + (0.375 + 0.5)/4)/26 = 0.53125/26;
        // divided by 1.5/26: 0.53125/1.5.
        let (scores, gt) = hand_case();
        let got = aupro(&scores, &gt, 1.5 / 26.0).unwrap();
        assert!((got - 0.53125 / 1.5).abs() < TOLERANCE, "{got}");
    }

    #[test]
    fn hand_case_pixel_auroc() {
        // Normal pixels below (ties ½) each anomalous pixel:
        // 0.9: 26; 0.4: 23 + ½; 0.8: 25 + ½; 0.6: 24 + ½ twice; 0.1: 23.
        // Sum 147 of 6·26 = 156 pairs.
        let (scores, gt) = hand_case();
        let got = crate::metrics::pixel_auroc(&scores, &gt).unwrap();
        assert!((got - 147.0 / 156.0).abs() < TOLERANCE, "{got}");
    }

    #[test]
    fn hand_case_reference_variant() {
        // Two thresholds: 0 and 0.45 (strict >).
        //   0.45: FP {0.8, 0.6} -> 2/26; C1 1/2, C2 3/4 -> PRO 5/8.
        //   0:    FP {0.8, 0.6, 0.4} -> 3/26; C1 1, C2 1 -> PRO 1.
        // Area (1/26)·(5/8 + 1)/2, divided by 3/26: 0.8125/3.
        let (scores, gt) = hand_case();
        let got = aupro_reference(&scores, &gt, AUPRO_MAX_FPR, 2).unwrap();
        assert!((got - 0.8125 / 3.0).abs() < TOLERANCE, "{got}");
    }

    #[test]
    fn hand_case_pro_curve_ends_at_the_limit() {
        let (scores, gt) = hand_case();
        let curve = pro_curve(&scores, &gt, AUPRO_MAX_FPR, 100).unwrap();
        let expected = [
            (0.0, 0.0),
            (0.0, 0.25),
            (1.0 / 26.0, 0.375),
            (2.0 / 26.0, 0.625),
            (3.0 / 26.0, 0.875),
            (3.0 / 26.0, 1.0),
            (0.3, 1.0),
        ];
        assert_eq!(curve.len(), expected.len());
        for (got, want) in curve.iter().zip(expected) {
            assert!((got.0 - want.0).abs() < TOLERANCE && (got.1 - want.1).abs() < TOLERANCE);
        }
    }

    #[test]
    fn perfect_maps_score_one_and_reversed_maps_zero() {
        let (_, gt) = hand_case();
        let perfect: Vec<f32> = (0..2)
            .flat_map(|i| gt.image_labels(i).unwrap())
            .map(|l| if l == 0 { 0.0 } else { 1.0 })
            .collect();
        assert_eq!(aupro(&perfect, &gt, AUPRO_MAX_FPR).unwrap(), 1.0);
        let reversed: Vec<f32> = perfect.iter().map(|s| 1.0 - s).collect();
        assert_eq!(aupro(&reversed, &gt, AUPRO_MAX_FPR).unwrap(), 0.0);
    }

    #[test]
    fn aupro_matches_a_brute_force_threshold_loop() {
        let mut rng = SplitMix64::new(2024);
        for trial in 0..30 {
            let case = naive::RandomCase::new(&mut rng);
            let max_fpr = [AUPRO_MAX_FPR, 0.05, 1.0][trial % 3];
            let expected = naive::aupro(&case.scores, &case.labels, max_fpr);
            let got = aupro(&case.scores, &case.gt, max_fpr).unwrap();
            assert!(
                (got - expected).abs() < TOLERANCE,
                "trial {trial}: {got} vs {expected}"
            );
            assert!((0.0..=1.0).contains(&got));
        }
    }

    #[test]
    fn reference_variant_matches_a_brute_force_threshold_loop() {
        let mut rng = SplitMix64::new(77);
        let mut compared = 0;
        for _ in 0..30 {
            let case = naive::RandomCase::new(&mut rng);
            let n = 2 + rng.below(60);
            let Some(expected) = naive::aupro_reference(&case.scores, &case.labels, 0.3, n) else {
                continue;
            };
            let got = aupro_reference(&case.scores, &case.gt, 0.3, n).unwrap();
            assert!(
                (got - expected).abs() < TOLERANCE,
                "n {n}: {got} vs {expected}"
            );
            compared += 1;
        }
        assert!(
            compared >= 20,
            "only {compared} random cases were comparable"
        );
    }

    #[test]
    fn one_sweep_answers_every_query() {
        let mut rng = SplitMix64::new(9);
        let case = naive::RandomCase::new(&mut rng);
        let sweep = PixelSweep::new(&case.scores, &case.gt).unwrap();
        assert_eq!(sweep.aupro(0.3), aupro(&case.scores, &case.gt, 0.3));
        assert_eq!(
            sweep.auroc(),
            crate::metrics::pixel_auroc(&case.scores, &case.gt)
        );
        // The thinned curve's trapezoid area is close to the exact area.
        let curve = sweep.pro_curve(0.3, 1000).unwrap();
        let mut area = TrapezoidArea::default();
        curve.iter().for_each(|p| area.push(*p));
        assert!((area.total / 0.3 - sweep.aupro(0.3).unwrap()).abs() < 0.01);
        assert_eq!(curve.last().map(|p| p.0), Some(0.3));
    }

    /// Expected values from `tools/metrics_reference.py` (scikit-learn
    /// `roc_auc_score`, scipy 8-connected labelling, numpy PRO).
    #[test]
    fn matches_python_reference_values() {
        let (image_scores, image_labels, scores, gt) = naive::python_case();
        let image = crate::metrics::auroc(&image_scores, &image_labels).unwrap();
        let pixel = crate::metrics::pixel_auroc(&scores, &gt).unwrap();
        let exact = aupro(&scores, &gt, AUPRO_MAX_FPR).unwrap();
        let reference = aupro_reference(&scores, &gt, AUPRO_MAX_FPR, REFERENCE_THRESHOLDS);
        let expected = naive::PYTHON_EXPECTED;
        assert!(
            (image - expected[0]).abs() < TOLERANCE,
            "image AUROC {image}"
        );
        assert!(
            (pixel - expected[1]).abs() < TOLERANCE,
            "pixel AUROC {pixel}"
        );
        assert!((exact - expected[2]).abs() < TOLERANCE, "AUPRO {exact}");
        assert!(
            (reference.unwrap() - expected[3]).abs() < TOLERANCE,
            "reference AUPRO"
        );
    }

    #[test]
    fn errors_name_the_problem() {
        let (scores, gt) = hand_case();
        assert_eq!(
            aupro(&[], &PixelGroundTruth::new(), 0.3),
            Err(MetricError::Empty)
        );
        assert_eq!(
            aupro(&scores[..31], &gt, 0.3),
            Err(MetricError::LengthMismatch {
                scores: 31,
                truth: 32
            })
        );
        let mut with_nan = scores.clone();
        with_nan[17] = f32::NAN;
        assert_eq!(
            aupro(&with_nan, &gt, 0.3),
            Err(MetricError::NanScore { index: 17 })
        );
        for max_fpr in [0.0, -0.1, 1.5, f64::NAN] {
            let err = aupro(&scores, &gt, max_fpr).unwrap_err();
            assert!(
                matches!(err, MetricError::InvalidMaxFpr { .. }),
                "{max_fpr}"
            );
        }
        let err = aupro_reference(&scores, &gt, 0.3, 1);
        assert_eq!(err, Err(MetricError::TooFewThresholds { n_thresholds: 1 }));
    }

    #[test]
    fn no_anomalous_pixel_is_an_error() {
        let mut gt = PixelGroundTruth::new();
        gt.push_mask(&[false; 6], 2, 3).unwrap();
        let scores = [0.1, 0.5, 0.2, 0.3, 0.0, 0.9];
        assert_eq!(aupro(&scores, &gt, 0.3), Err(MetricError::NoAnomalous));
        assert_eq!(
            pro_curve(&scores, &gt, 0.3, 10),
            Err(MetricError::NoAnomalous)
        );
        assert_eq!(
            aupro_reference(&scores, &gt, 0.3, 200),
            Err(MetricError::NoAnomalous)
        );
    }

    #[test]
    fn reference_variant_degenerate_cases_are_errors() {
        let (_, gt) = hand_case();
        assert_eq!(
            aupro_reference(&[0.5; 32], &gt, 0.3, 200),
            Err(MetricError::ConstantScores)
        );
        // Normal pixels all at the minimum: strict `>` never counts one, so
        // no sampled FPR is above 0.
        let perfect: Vec<f32> = (0..2)
            .flat_map(|i| gt.image_labels(i).unwrap())
            .map(|l| if l == 0 { 0.0 } else { 1.0 })
            .collect();
        let err = aupro_reference(&perfect, &gt, 0.3, 200);
        assert_eq!(err, Err(MetricError::NoReferencePoints { max_fpr: 0.3 }));
    }

    /// Speed on a test-set-sized case: 500 images of 406x406 (82.4M pixels),
    /// half with a disc-shaped defect. Prints timings, asserts no time. Run:
    /// `cargo test --lib metrics::pro::tests::speed -- --ignored --nocapture`.
    #[test]
    #[ignore = "timing run on 82M pixels; several seconds and ~1 GB"]
    fn speed_on_82m_pixels() {
        use std::time::Instant;
        const N_IMAGES: usize = 500;
        const SIDE: usize = 406;
        let mut rng = SplitMix64::new(1);
        let (mut gt, mut scores) = (PixelGroundTruth::new(), Vec::new());
        let start = Instant::now();
        for image in 0..N_IMAGES {
            let (cy, cx, radius) = (rng.below(SIDE), rng.below(SIDE), 5 + rng.below(50));
            let mask: Vec<bool> = (0..SIDE * SIDE)
                .map(|i| {
                    image % 2 == 1
                        && (i / SIDE).abs_diff(cy).pow(2) + (i % SIDE).abs_diff(cx).pow(2)
                            < radius * radius
                })
                .collect();
            gt.push_mask(&mask, SIDE, SIDE).unwrap();
            scores.extend(
                mask.iter()
                    .map(|m| rng.next_f64() as f32 + if *m { 0.5 } else { 0.0 }),
            );
        }
        eprintln!(
            "{} pixels, {} regions, {} anomalous; built in {:.2?}",
            gt.n_pixels(),
            gt.n_components(),
            gt.n_anomalous_pixels(),
            start.elapsed()
        );

        let t = Instant::now();
        let auroc = crate::metrics::pixel_auroc(&scores, &gt).unwrap();
        eprintln!(
            "pixel_auroc (sort included) {:.2?} -> {auroc:.6}",
            t.elapsed()
        );
        let t = Instant::now();
        let exact = aupro(&scores, &gt, AUPRO_MAX_FPR).unwrap();
        eprintln!(
            "aupro (sort included)       {:.2?} -> {exact:.6}",
            t.elapsed()
        );

        let t = Instant::now();
        let sweep = PixelSweep::new(&scores, &gt).unwrap();
        eprintln!("PixelSweep::new             {:.2?}", t.elapsed());
        let t = Instant::now();
        let _ = sweep.auroc().unwrap();
        eprintln!("  .auroc()                  {:.2?}", t.elapsed());
        let t = Instant::now();
        let _ = sweep.aupro(AUPRO_MAX_FPR).unwrap();
        eprintln!("  .aupro(0.3)               {:.2?}", t.elapsed());
        let t = Instant::now();
        let reference = sweep
            .aupro_reference(AUPRO_MAX_FPR, REFERENCE_THRESHOLDS)
            .unwrap();
        eprintln!(
            "  .aupro_reference          {:.2?} -> {reference:.6}",
            t.elapsed()
        );
        let t = Instant::now();
        let _ = (
            sweep.roc_curve(500).unwrap(),
            sweep.pro_curve(AUPRO_MAX_FPR, 500).unwrap(),
        );
        eprintln!("  both curves               {:.2?}", t.elapsed());
        assert!(auroc > 0.5 && exact > 0.0);
    }
}
