//! Multivariate Gaussian fitted on normal samples, scored with the
//! Mahalanobis distance `d(x) = sqrt((x − μ)ᵀ Σ⁻¹ (x − μ))`.
//!
//! The object branch fits one on the DINOv2 CLS tokens, the attribution
//! branch one on the per-image mean patch tokens. Those tokens come after the
//! final layer norm, so they lie on a hyperplane and the sample covariance is
//! rank-deficient; with fewer images than dimensions (K < D) it is singular
//! several times over. The reference inverts `Σ + 10⁻⁶·I` in f32, which is
//! numerically unstable there; here everything is f64, and a shrinkage
//! estimator (Ledoit–Wolf) is offered as the well-conditioned alternative.
//!
//! Instead of `Σ⁻¹` the model keeps the whitening matrix `W = L⁻¹` of the
//! Cholesky factorisation `Σ = L·Lᵀ`: then `Σ⁻¹ = Wᵀ·W` and
//! `d(x) = ‖W·(x − μ)‖`, a sum of squares that cannot go negative.
//!
//! Shapes: samples are `n × dim` row-major `f32`; the mean is `dim` and the
//! whitening matrix `dim × dim` row-major lower-triangular, both `f64`.

use std::fmt;

use serde::{Deserialize, Serialize};

use super::{StatsError, check_samples};
use crate::linalg::{self, LinalgError, MatRef};

/// Default ridge added to the diagonal of the sample covariance (the
/// reference's value).
pub const DEFAULT_RIDGE: f64 = 1e-6;

/// Fewest samples a covariance can be estimated from.
pub const MIN_SAMPLES: usize = 2;

/// How the covariance matrix is estimated from the centred samples.
///
/// In configuration files: `"ledoit_wolf"`, `"sample"` (default ridge), or
/// `{ sample = { ridge = 1e-5 } }`.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", try_from = "EstimatorRepr")]
pub enum CovarianceEstimator {
    /// Unbiased sample covariance `XcᵀXc / (K − 1)` plus `ridge·I` (the
    /// paper's estimator).
    Sample { ridge: f64 },
    /// Ledoit–Wolf shrinkage of the maximum-likelihood covariance towards a
    /// scaled identity, as scikit-learn's `ledoit_wolf`.
    LedoitWolf,
}

impl CovarianceEstimator {
    /// The configuration name (`sample` or `ledoit_wolf`).
    pub fn name(&self) -> &'static str {
        match self {
            Self::Sample { .. } => "sample",
            Self::LedoitWolf => "ledoit_wolf",
        }
    }

    /// What to try when this estimator's covariance is not positive definite.
    fn remedy(&self) -> &'static str {
        match self {
            Self::Sample { .. } => "try the ledoit_wolf estimator or a larger ridge",
            Self::LedoitWolf => {
                "the samples have (almost) no spread; try the sample estimator with a ridge"
            }
        }
    }
}

impl Default for CovarianceEstimator {
    fn default() -> Self {
        Self::Sample {
            ridge: DEFAULT_RIDGE,
        }
    }
}

impl fmt::Display for CovarianceEstimator {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Sample { ridge } => write!(f, "sample (ridge {ridge:e})"),
            Self::LedoitWolf => f.write_str("ledoit_wolf"),
        }
    }
}

/// Accepted spellings of an estimator: a bare name or the full form.
#[derive(Deserialize)]
#[serde(untagged)]
enum EstimatorRepr {
    Name(EstimatorName),
    Full(EstimatorFull),
}

#[derive(Deserialize)]
#[serde(rename_all = "snake_case")]
enum EstimatorName {
    Sample,
    LedoitWolf,
}

#[derive(Deserialize)]
#[serde(rename_all = "snake_case")]
enum EstimatorFull {
    Sample {
        #[serde(default = "default_ridge")]
        ridge: f64,
    },
    LedoitWolf,
}

fn default_ridge() -> f64 {
    DEFAULT_RIDGE
}

impl TryFrom<EstimatorRepr> for CovarianceEstimator {
    type Error = StatsError;

    fn try_from(repr: EstimatorRepr) -> Result<Self, StatsError> {
        let ridge = match repr {
            EstimatorRepr::Name(EstimatorName::Sample) => DEFAULT_RIDGE,
            EstimatorRepr::Full(EstimatorFull::Sample { ridge }) => ridge,
            EstimatorRepr::Name(EstimatorName::LedoitWolf)
            | EstimatorRepr::Full(EstimatorFull::LedoitWolf) => return Ok(Self::LedoitWolf),
        };
        if !(ridge.is_finite() && ridge >= 0.0) {
            return Err(StatsError::InvalidRidge(ridge));
        }
        Ok(Self::Sample { ridge })
    }
}

/// A fitted Gaussian: mean `μ` and whitening matrix `W` with `Σ⁻¹ = WᵀW`.
#[derive(Debug, Clone, PartialEq)]
pub struct Gaussian {
    dim: usize,
    mean: Vec<f64>,
    whitening: Vec<f64>,
    shrinkage: Option<f64>,
}

impl Gaussian {
    /// Fit on `n` samples of dimension `dim` (`n × dim` row-major).
    pub fn fit(
        samples: &[f32],
        n: usize,
        dim: usize,
        estimator: CovarianceEstimator,
    ) -> Result<Self, StatsError> {
        check_samples(samples, n, dim, MIN_SAMPLES)?;
        if let CovarianceEstimator::Sample { ridge } = estimator
            && !(ridge.is_finite() && ridge >= 0.0)
        {
            return Err(StatsError::InvalidRidge(ridge));
        }
        let estimate = estimate(samples, n, dim, estimator);
        let l = linalg::cholesky(&estimate.covariance, dim).map_err(|e| match e {
            LinalgError::NotPositiveDefinite { index, value } => StatsError::NotPositiveDefinite {
                estimator: estimator.name(),
                index,
                value,
                hint: estimator.remedy(),
            },
        })?;
        tracing::debug!(
            n,
            dim,
            %estimator,
            shrinkage = estimate.shrinkage,
            "fitted Gaussian"
        );
        Ok(Self {
            dim,
            mean: estimate.mean,
            whitening: linalg::lower_triangular_inverse(&l, dim),
            shrinkage: estimate.shrinkage,
        })
    }

    /// Rebuild from stored parts (as saved by a model file), checking shapes,
    /// finiteness and that `whitening` is lower-triangular with a positive
    /// diagonal (as `fit` produces it).
    pub fn from_parts(mean: Vec<f64>, whitening: Vec<f64>, dim: usize) -> Result<Self, StatsError> {
        if dim == 0 {
            return Err(StatsError::ZeroDimension);
        }
        check_part("mean", &mean, dim)?;
        check_part("whitening matrix", &whitening, dim * dim)?;
        for row in 0..dim {
            for col in 0..dim {
                let v = whitening[row * dim + col];
                let bad = if col > row {
                    v != 0.0
                } else {
                    col == row && v <= 0.0
                };
                if bad {
                    return Err(StatsError::NotLowerTriangular { row, col });
                }
            }
        }
        Ok(Self {
            dim,
            mean,
            whitening,
            shrinkage: None,
        })
    }

    pub fn dim(&self) -> usize {
        self.dim
    }

    /// Mean `μ` (`dim`).
    pub fn mean(&self) -> &[f64] {
        &self.mean
    }

    /// Whitening matrix `W = L⁻¹` (`dim × dim`, row-major, lower-triangular).
    pub fn whitening(&self) -> &[f64] {
        &self.whitening
    }

    /// Ledoit–Wolf shrinkage intensity used by the fit; `None` for the sample
    /// estimator and for a Gaussian rebuilt with [`Gaussian::from_parts`].
    pub fn shrinkage(&self) -> Option<f64> {
        self.shrinkage
    }

    /// Mahalanobis distance of one sample (`dim` values).
    pub fn mahalanobis(&self, x: &[f32]) -> f64 {
        assert_eq!(x.len(), self.dim, "sample has the wrong dimension");
        let centred: Vec<f64> = x
            .iter()
            .zip(&self.mean)
            .map(|(&v, m)| f64::from(v) - m)
            .collect();
        let sum_sq: f64 = self
            .whitening
            .chunks_exact(self.dim)
            .enumerate()
            .map(|(i, row)| {
                let z: f64 = row[..=i].iter().zip(&centred).map(|(w, c)| w * c).sum();
                z * z
            })
            .sum();
        sum_sq.sqrt()
    }

    /// Whitened samples `W·(x − μ)` for `n` samples (`n × dim` in and out);
    /// the row norms are the Mahalanobis distances. Multi-threaded.
    pub fn whiten(&self, xs: &[f32], n: usize) -> Vec<f64> {
        assert_eq!(xs.len(), n * self.dim, "samples are not n × dim");
        let centred: Vec<f64> = xs
            .chunks_exact(self.dim)
            .flat_map(|x| x.iter().zip(&self.mean).map(|(&v, m)| f64::from(v) - m))
            .collect();
        linalg::par_matmul(
            MatRef::row_major(&centred, n, self.dim),
            MatRef::row_major(&self.whitening, self.dim, self.dim).t(),
        )
    }

    /// Mahalanobis distances of `n` samples through [`Gaussian::whiten`]
    /// (equal to [`Gaussian::mahalanobis`] up to rounding).
    pub fn mahalanobis_batch(&self, xs: &[f32], n: usize) -> Vec<f64> {
        self.whiten(xs, n)
            .chunks_exact(self.dim)
            .map(|z| z.iter().map(|v| v * v).sum::<f64>().sqrt())
            .collect()
    }
}

fn check_part(what: &'static str, values: &[f64], expected: usize) -> Result<(), StatsError> {
    if values.len() != expected {
        return Err(StatsError::PartsShape {
            what,
            expected,
            got: values.len(),
        });
    }
    match values.iter().position(|v| !v.is_finite()) {
        Some(index) => Err(StatsError::PartsNonFinite { what, index }),
        None => Ok(()),
    }
}

/// Mean and covariance (`dim × dim`, f64) of validated samples.
struct Estimate {
    mean: Vec<f64>,
    covariance: Vec<f64>,
    shrinkage: Option<f64>,
}

fn estimate(samples: &[f32], n: usize, dim: usize, estimator: CovarianceEstimator) -> Estimate {
    let mut mean = vec![0.0f64; dim];
    for x in samples.chunks_exact(dim) {
        for (m, &v) in mean.iter_mut().zip(x) {
            *m += f64::from(v);
        }
    }
    for m in &mut mean {
        *m /= n as f64;
    }
    let centred: Vec<f64> = samples
        .chunks_exact(dim)
        .flat_map(|x| x.iter().zip(&mean).map(|(&v, m)| f64::from(v) - m))
        .collect();

    // Scatter matrix XcᵀXc; gemm fills both triangles.
    let xc = MatRef::row_major(&centred, n, dim);
    let mut scatter = linalg::par_matmul(xc.t(), xc);

    let shrinkage = match estimator {
        CovarianceEstimator::Sample { ridge } => {
            let scale = 1.0 / (n as f64 - 1.0);
            scatter.iter_mut().for_each(|v| *v *= scale);
            add_to_diagonal(&mut scatter, dim, ridge);
            None
        }
        CovarianceEstimator::LedoitWolf => {
            scatter.iter_mut().for_each(|v| *v /= n as f64);
            let (shrinkage, mu) = ledoit_wolf_shrinkage(&centred, &scatter, n, dim);
            scatter.iter_mut().for_each(|v| *v *= 1.0 - shrinkage);
            add_to_diagonal(&mut scatter, dim, shrinkage * mu);
            Some(shrinkage)
        }
    };
    Estimate {
        mean,
        covariance: scatter,
        shrinkage,
    }
}

/// Ledoit–Wolf (2004) optimal shrinkage of the maximum-likelihood covariance
/// `S = XcᵀXc / K` towards `μ·I`, `μ = tr(S)/D`, written as scikit-learn's
/// `ledoit_wolf_shrinkage` computes it:
///
/// - `δ = ‖S − μI‖²_F / D` (distance of `S` from the target),
/// - `β = (Σ_k ‖x_k‖⁴ / K − ‖S‖²_F) / (D·K)` (variance of `S`'s entries),
/// - shrinkage `s = min(β, δ) / δ`, and `Σ = (1 − s)·S + s·μ·I`.
///
/// Returns `(s, μ)`. One dimension gives `s = 0`, as scikit-learn.
fn ledoit_wolf_shrinkage(centred: &[f64], emp_cov: &[f64], n: usize, dim: usize) -> (f64, f64) {
    let mu = (0..dim).map(|i| emp_cov[i * dim + i]).sum::<f64>() / dim as f64;
    if dim == 1 {
        return (0.0, mu);
    }
    let frob_sq: f64 = emp_cov.iter().map(|v| v * v).sum();
    let delta = (frob_sq - dim as f64 * mu * mu) / dim as f64;
    let fourth_moment: f64 = centred
        .chunks_exact(dim)
        .map(|x| {
            let sq: f64 = x.iter().map(|v| v * v).sum();
            sq * sq
        })
        .sum();
    let beta = (fourth_moment / n as f64 - frob_sq) / (dim as f64 * n as f64);
    let beta = beta.min(delta);
    let shrinkage = if beta <= 0.0 || delta <= 0.0 {
        0.0
    } else {
        (beta / delta).min(1.0)
    };
    (shrinkage, mu)
}

fn add_to_diagonal(matrix: &mut [f64], dim: usize, value: f64) {
    for i in 0..dim {
        matrix[i * dim + i] += value;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rng::SplitMix64;

    // Fixtures and expected values from tools/stats_reference.py
    // (numpy 1/(K−1) covariance + 1e-6·I, scipy mahalanobis, sklearn LedoitWolf).
    const FULL: [[f32; 4]; 7] = [
        [0.5, -1.25, 2.0, 0.75],
        [1.5, -0.5, 1.0, 0.25],
        [-0.25, 0.75, 2.5, -1.0],
        [2.0, 1.0, -0.5, 0.5],
        [0.0, -2.0, 1.5, 1.25],
        [1.0, 0.5, 0.25, -0.75],
        [-1.5, 0.25, 3.0, 0.0],
    ];
    const FULL_QUERY: [f32; 4] = [0.3, -0.7, 1.1, 2.2];
    const SMALL: [[f32; 5]; 3] = [
        [0.1, 0.2, -0.3, 0.4, 0.5],
        [-0.6, 0.7, 0.8, -0.9, 1.0],
        [1.1, -1.2, 1.3, 1.4, -1.5],
    ];
    const SMALL_QUERY: [f32; 5] = [0.2, 0.1, 0.0, -0.1, 0.3];

    fn flat<const D: usize>(rows: &[[f32; D]]) -> Vec<f32> {
        rows.iter().flatten().copied().collect()
    }

    fn assert_close(got: f64, expected: f64, rel: f64) {
        assert!(
            (got - expected).abs() <= rel * expected.abs().max(1.0),
            "got {got}, expected {expected}"
        );
    }

    #[test]
    fn sample_estimator_matches_numpy_and_scipy() {
        let g = Gaussian::fit(&flat(&FULL), 7, 4, CovarianceEstimator::default()).unwrap();
        let mean = [
            0.4642857142857143,
            -0.17857142857142858,
            1.3928571428571428,
            0.14285714285714285,
        ];
        for (m, e) in g.mean().iter().zip(mean) {
            assert_close(*m, e, 1e-12);
        }
        assert_close(g.mahalanobis(&FULL_QUERY), 3.661852106018017, 1e-10);
        assert_eq!(g.shrinkage(), None);
    }

    #[test]
    fn ledoit_wolf_matches_sklearn() {
        let samples = flat(&FULL);
        let g = Gaussian::fit(&samples, 7, 4, CovarianceEstimator::LedoitWolf).unwrap();
        assert_close(g.shrinkage().unwrap(), 0.5086836745160679, 1e-12);
        assert_close(g.mahalanobis(&FULL_QUERY), 2.3586450520331916, 1e-10);

        let cov = estimate(&samples, 7, 4, CovarianceEstimator::LedoitWolf).covariance;
        let diag = [
            1.1070670812615302,
            1.0481592565223854,
            1.1722416958665418,
            0.7949809459413795,
        ];
        for (i, e) in diag.into_iter().enumerate() {
            assert_close(cov[i * 4 + i], e, 1e-12);
        }
        assert_close(cov[1], 0.08021491028309094, 1e-12);
    }

    #[test]
    fn rank_deficient_samples_fit_with_both_estimators() {
        // K = 3 samples in D = 5: the sample covariance has rank 2.
        let samples = flat(&SMALL);
        let sample = Gaussian::fit(&samples, 3, 5, CovarianceEstimator::default()).unwrap();
        assert_close(sample.mahalanobis(&SMALL_QUERY), 383.4537058251046, 1e-8);

        let lw = Gaussian::fit(&samples, 3, 5, CovarianceEstimator::LedoitWolf).unwrap();
        assert_close(lw.shrinkage().unwrap(), 0.2817731818720562, 1e-12);
        assert_close(lw.mahalanobis(&SMALL_QUERY), 1.0788514281628767, 1e-10);
        let cov = estimate(&samples, 3, 5, CovarianceEstimator::LedoitWolf).covariance;
        assert_close(cov[1], -0.39741885816470235, 1e-12);
    }

    #[test]
    fn hyperplane_tokens_with_fewer_samples_than_dimensions_fit() {
        // Like layer-normed tokens: every sample sums to zero (a hyperplane)
        // and K = 20 < D = 64.
        let (n, dim) = (20, 64);
        let mut rng = SplitMix64::new(11);
        let mut samples = Vec::with_capacity(n * dim);
        for _ in 0..n {
            let row: Vec<f32> = (0..dim).map(|_| rng.next_f64() as f32 - 0.5).collect();
            let mean = row.iter().sum::<f32>() / dim as f32;
            samples.extend(row.iter().map(|v| v - mean));
        }
        for estimator in [
            CovarianceEstimator::default(),
            CovarianceEstimator::LedoitWolf,
        ] {
            let g = Gaussian::fit(&samples, n, dim, estimator).unwrap();
            let d = g.mahalanobis(&samples[..dim]);
            assert!(d.is_finite() && d > 0.0, "{estimator}: {d}");
        }
    }

    #[test]
    fn mean_has_zero_distance_and_batch_agrees() {
        let samples = flat(&FULL);
        for estimator in [
            CovarianceEstimator::default(),
            CovarianceEstimator::LedoitWolf,
        ] {
            let g = Gaussian::fit(&samples, 7, 4, estimator).unwrap();
            let mean: Vec<f32> = g.mean().iter().map(|&m| m as f32).collect();
            assert!(g.mahalanobis(&mean) < 1e-6);
            let batch = g.mahalanobis_batch(&samples, 7);
            for (x, b) in samples.chunks_exact(4).zip(&batch) {
                assert_close(*b, g.mahalanobis(x), 1e-12);
            }
        }
        let exact = Gaussian::from_parts(vec![0.5, -2.0], vec![1.0, 0.0, 0.0, 1.0], 2).unwrap();
        assert_eq!(exact.mahalanobis(&[0.5, -2.0]), 0.0);
    }

    #[test]
    fn whitening_inverts_the_covariance() {
        // W Σ Wᵀ = I, rank-deficient case included.
        for (samples, n, dim) in [(flat(&FULL), 7, 4), (flat(&SMALL), 3, 5)] {
            for estimator in [
                CovarianceEstimator::default(),
                CovarianceEstimator::LedoitWolf,
            ] {
                let cov = estimate(&samples, n, dim, estimator).covariance;
                let g = Gaussian::fit(&samples, n, dim, estimator).unwrap();
                let w = MatRef::row_major(g.whitening(), dim, dim);
                let ws = linalg::matmul(w, MatRef::row_major(&cov, dim, dim));
                let wswt = linalg::matmul(MatRef::row_major(&ws, dim, dim), w.t());
                for i in 0..dim {
                    for j in 0..dim {
                        let expected = if i == j { 1.0 } else { 0.0 };
                        let got = wswt[i * dim + j];
                        assert!(
                            (got - expected).abs() < 1e-8,
                            "{estimator} ({i},{j}): {got}"
                        );
                    }
                }
            }
        }
    }

    #[test]
    fn whiten_rows_are_w_times_centred_samples() {
        let samples = flat(&FULL);
        let g = Gaussian::fit(&samples, 7, 4, CovarianceEstimator::LedoitWolf).unwrap();
        let z = g.whiten(&samples, 7);
        // Whitening centres the training samples.
        for j in 0..4 {
            let m: f64 = z.chunks_exact(4).map(|r| r[j]).sum::<f64>() / 7.0;
            assert!(m.abs() < 1e-12);
        }
        let row = &z[8..12];
        let x: Vec<f64> = samples[8..12]
            .iter()
            .zip(g.mean())
            .map(|(&v, m)| f64::from(v) - m)
            .collect();
        for (i, &got) in row.iter().enumerate() {
            let expected: f64 = (0..=i).map(|j| g.whitening()[i * 4 + j] * x[j]).sum();
            assert_close(got, expected, 1e-12);
        }
    }

    #[test]
    fn invalid_samples_are_rejected() {
        let est = CovarianceEstimator::default();
        assert_eq!(
            Gaussian::fit(&[1.0, 2.0], 1, 2, est),
            Err(StatsError::TooFewSamples { needed: 2, got: 1 })
        );
        assert_eq!(
            Gaussian::fit(&[1.0, f32::INFINITY, 0.0, 1.0], 2, 2, est),
            Err(StatsError::NonFinite { sample: 0, dim: 1 })
        );
        assert_eq!(
            Gaussian::fit(&[1.0; 4], 2, 2, CovarianceEstimator::Sample { ridge: -1.0 }),
            Err(StatsError::InvalidRidge(-1.0))
        );
    }

    #[test]
    fn singular_covariance_names_the_estimator() {
        // Two identical samples without a ridge: Σ = 0.
        let err = Gaussian::fit(
            &[1.0, 2.0, 1.0, 2.0],
            2,
            2,
            CovarianceEstimator::Sample { ridge: 0.0 },
        )
        .unwrap_err();
        assert!(matches!(
            err,
            StatsError::NotPositiveDefinite {
                estimator: "sample",
                ..
            }
        ));
        assert!(err.to_string().contains("ledoit_wolf"), "{err}");

        let err = Gaussian::fit(&[1.0, 2.0, 1.0, 2.0], 2, 2, CovarianceEstimator::LedoitWolf)
            .unwrap_err();
        assert!(matches!(
            err,
            StatsError::NotPositiveDefinite {
                estimator: "ledoit_wolf",
                ..
            }
        ));
    }

    #[test]
    fn from_parts_round_trips_and_validates() {
        let g = Gaussian::fit(&flat(&FULL), 7, 4, CovarianceEstimator::LedoitWolf).unwrap();
        let rebuilt =
            Gaussian::from_parts(g.mean().to_vec(), g.whitening().to_vec(), g.dim()).unwrap();
        assert_eq!(rebuilt.mahalanobis(&FULL_QUERY), g.mahalanobis(&FULL_QUERY));

        assert_eq!(
            Gaussian::from_parts(vec![0.0; 3], vec![1.0; 4], 2),
            Err(StatsError::PartsShape {
                what: "mean",
                expected: 2,
                got: 3
            })
        );
        assert_eq!(
            Gaussian::from_parts(vec![0.0; 2], vec![1.0; 3], 2),
            Err(StatsError::PartsShape {
                what: "whitening matrix",
                expected: 4,
                got: 3
            })
        );
        assert_eq!(
            Gaussian::from_parts(vec![0.0; 2], vec![1.0, 0.5, 0.0, 1.0], 2),
            Err(StatsError::NotLowerTriangular { row: 0, col: 1 })
        );
        assert_eq!(
            Gaussian::from_parts(vec![0.0; 2], vec![1.0, 0.0, 0.0, -1.0], 2),
            Err(StatsError::NotLowerTriangular { row: 1, col: 1 })
        );
        assert_eq!(
            Gaussian::from_parts(vec![f64::NAN, 0.0], vec![1.0, 0.0, 0.0, 1.0], 2),
            Err(StatsError::PartsNonFinite {
                what: "mean",
                index: 0
            })
        );
        assert_eq!(
            Gaussian::from_parts(vec![], vec![], 0),
            Err(StatsError::ZeroDimension)
        );
    }

    #[test]
    fn estimator_config_spellings() {
        let parse = |s: &str| serde_json::from_str::<CovarianceEstimator>(s);
        assert_eq!(
            parse("\"ledoit_wolf\"").unwrap(),
            CovarianceEstimator::LedoitWolf
        );
        assert_eq!(parse("\"sample\"").unwrap(), CovarianceEstimator::default());
        assert_eq!(
            parse(r#"{"sample": {"ridge": 0.001}}"#).unwrap(),
            CovarianceEstimator::Sample { ridge: 0.001 }
        );
        assert_eq!(
            parse(r#"{"sample": {}}"#).unwrap(),
            CovarianceEstimator::default()
        );
        assert!(parse(r#"{"sample": {"ridge": -1.0}}"#).is_err());
        assert!(parse("\"cholesky\"").is_err());
        for e in [
            CovarianceEstimator::LedoitWolf,
            CovarianceEstimator::Sample { ridge: 0.5 },
        ] {
            let json = serde_json::to_string(&e).unwrap();
            assert_eq!(parse(&json).unwrap(), e, "{json}");
        }
        assert_eq!(CovarianceEstimator::default().name(), "sample");
    }

    #[test]
    fn estimator_reads_from_toml() {
        #[derive(Deserialize)]
        struct Config {
            covariance: CovarianceEstimator,
        }
        let parse = |s: &str| toml::from_str::<Config>(s).map(|c| c.covariance);
        assert_eq!(
            parse("covariance = \"ledoit_wolf\"").unwrap(),
            CovarianceEstimator::LedoitWolf
        );
        assert_eq!(
            parse("covariance = { sample = { ridge = 1e-4 } }").unwrap(),
            CovarianceEstimator::Sample { ridge: 1e-4 }
        );
        assert!(parse("covariance = \"shrunk\"").is_err());
    }

    /// Timing at the object / attribution branches' scale (571 images).
    /// Run: `cargo test --release --lib timing_ -- --ignored --nocapture`.
    #[test]
    #[ignore]
    fn timing_ledoit_wolf_fit() {
        for dim in [384, 768] {
            let n = 571;
            let mut rng = SplitMix64::new(1);
            let samples: Vec<f32> = (0..n * dim).map(|_| rng.next_f64() as f32).collect();
            for estimator in [
                CovarianceEstimator::LedoitWolf,
                CovarianceEstimator::default(),
            ] {
                let start = std::time::Instant::now();
                let g = Gaussian::fit(&samples, n, dim, estimator).unwrap();
                let elapsed = start.elapsed();
                let start = std::time::Instant::now();
                let d = g.mahalanobis_batch(&samples, n);
                println!(
                    "{estimator} fit on {n}x{dim}: {elapsed:.2?}; mahalanobis_batch of {n}: {:.2?}",
                    start.elapsed()
                );
                assert!(d.iter().all(|v| v.is_finite()));
            }
        }

        // K = 200 < D = 768 tokens on a hyperplane: both estimators stay
        // positive definite in f64 and whiten the covariance to I.
        let (n, dim) = (200, 768);
        let mut rng = SplitMix64::new(2);
        let mut samples = Vec::with_capacity(n * dim);
        for _ in 0..n {
            let row: Vec<f32> = (0..dim)
                .map(|_| 4.0 * rng.next_f64() as f32 - 2.0)
                .collect();
            let mean = row.iter().sum::<f32>() / dim as f32;
            samples.extend(row.iter().map(|v| v - mean));
        }
        for estimator in [
            CovarianceEstimator::LedoitWolf,
            CovarianceEstimator::default(),
        ] {
            let cov = estimate(&samples, n, dim, estimator).covariance;
            let g = Gaussian::fit(&samples, n, dim, estimator).unwrap();
            let w = MatRef::row_major(g.whitening(), dim, dim);
            let ws = linalg::par_matmul(w, MatRef::row_major(&cov, dim, dim));
            let wswt = linalg::par_matmul(MatRef::row_major(&ws, dim, dim), w.t());
            let worst = (0..dim * dim)
                .map(|i| (wswt[i] - if i % (dim + 1) == 0 { 1.0 } else { 0.0 }).abs())
                .fold(0.0f64, f64::max);
            println!(
                "{estimator} on {n}x{dim} hyperplane samples: max |W S Wt - I| = {worst:.2e}, \
                 shrinkage {:?}, d(sample 0) = {:.3}",
                g.shrinkage(),
                g.mahalanobis(&samples[..dim])
            );
            assert!(worst < 1e-6);
        }
    }
}
