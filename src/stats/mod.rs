//! Statistics fitted on normal images: a multivariate Gaussian with
//! Mahalanobis distances ([`gaussian`]) and k-means clustering ([`kmeans`]).
//!
//! Shape convention: a set of `n` samples of dimension `dim` is a flat
//! row-major `f32` slice of length `n * dim`; fitted parameters are kept in
//! `f64` where the numerics need it (covariance, whitening).

pub mod gaussian;
pub mod kmeans;

use thiserror::Error;

/// Why a statistic could not be fitted or rebuilt.
#[derive(Debug, Error, Clone, PartialEq)]
pub enum StatsError {
    #[error("sample buffer holds {len} values, expected {n} samples × {dim} dimensions")]
    ShapeMismatch { len: usize, n: usize, dim: usize },

    #[error("samples must have at least one dimension")]
    ZeroDimension,

    #[error("need at least {needed} samples, got {got}")]
    TooFewSamples { needed: usize, got: usize },

    #[error("sample {sample} has a non-finite value (NaN or infinite) in dimension {dim}")]
    NonFinite { sample: usize, dim: usize },

    #[error(
        "the {estimator} covariance is not positive definite (Cholesky pivot {index} is \
         {value:e}); {hint}"
    )]
    NotPositiveDefinite {
        estimator: &'static str,
        index: usize,
        value: f64,
        hint: &'static str,
    },

    #[error("{what} has {got} values, expected {expected}")]
    PartsShape {
        what: &'static str,
        expected: usize,
        got: usize,
    },

    #[error("{what} has a non-finite value at index {index}")]
    PartsNonFinite { what: &'static str, index: usize },

    #[error(
        "whitening matrix must be lower-triangular with a positive diagonal (entry ({row}, {col}))"
    )]
    NotLowerTriangular { row: usize, col: usize },

    #[error("the ridge must be finite and non-negative, got {0}")]
    InvalidRidge(f64),

    #[error("k-means needs at least one cluster (k = 0)")]
    KMeansZeroClusters,

    #[error("k-means asked for {k} clusters but there are only {n} samples")]
    KMeansTooManyClusters { k: usize, n: usize },

    #[error("k-means needs at least one initialisation (n_init = 0)")]
    KMeansZeroInits,

    #[error("k-means needs at least one iteration (max_iter = 0)")]
    KMeansZeroIterations,

    #[error("k-means tolerance must be finite and non-negative, got {0}")]
    KMeansInvalidTolerance(f64),
}

/// Checks the common shape rules for `n × dim` samples and rejects
/// non-finite values.
pub(crate) fn check_samples(
    samples: &[f32],
    n: usize,
    dim: usize,
    min_samples: usize,
) -> Result<(), StatsError> {
    if dim == 0 {
        return Err(StatsError::ZeroDimension);
    }
    if samples.len() != n * dim {
        return Err(StatsError::ShapeMismatch {
            len: samples.len(),
            n,
            dim,
        });
    }
    if n < min_samples {
        return Err(StatsError::TooFewSamples {
            needed: min_samples,
            got: n,
        });
    }
    match samples.iter().position(|v| !v.is_finite()) {
        Some(i) => Err(StatsError::NonFinite {
            sample: i / dim,
            dim: i % dim,
        }),
        None => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn check_samples_reports_each_rule() {
        assert_eq!(check_samples(&[], 0, 0, 1), Err(StatsError::ZeroDimension));
        assert_eq!(
            check_samples(&[1.0; 5], 2, 3, 1),
            Err(StatsError::ShapeMismatch {
                len: 5,
                n: 2,
                dim: 3
            })
        );
        assert_eq!(
            check_samples(&[1.0; 3], 1, 3, 2),
            Err(StatsError::TooFewSamples { needed: 2, got: 1 })
        );
        assert_eq!(
            check_samples(&[1.0, 2.0, 3.0, f32::NAN], 2, 2, 1),
            Err(StatsError::NonFinite { sample: 1, dim: 1 })
        );
        assert_eq!(check_samples(&[1.0; 4], 2, 2, 2), Ok(()));
    }
}
