//! Sparse random projection (Achlioptas 2001; Li, Hastie, Church 2006) and
//! the Johnson–Lindenstrauss target dimension, as scikit-learn's
//! `SparseRandomProjection` and `johnson_lindenstrauss_min_dim`.
//!
//! PatchCore selects its coreset on projected features: pairwise distances
//! are kept within a factor `1 ± ε` while the dimension drops from 1536 to a
//! few hundred.
//!
//! The projection matrix `R` (`n_components × n_features`) has entries
//! `±sqrt(1 / density) / sqrt(n_components)` with probability `density / 2`
//! each and `0` otherwise; the default density is `1 / sqrt(n_features)`.
//! The distribution is scikit-learn's; the random stream is our
//! [`SplitMix64`], so the matrices differ entry by entry.
//!
//! Shapes: input rows `n × n_features`, output rows `n × n_components`.

use rayon::prelude::*;

use super::BankError;
use crate::rng::SplitMix64;

/// Rows per rayon task in [`SparseRandomProjection::project`].
const PROJECT_BLOCK_ROWS: usize = 256;

/// Smallest dimension that keeps all pairwise distances of `n_samples`
/// points within `1 ± eps` with good probability under a random projection:
/// `⌊4 ln n / (eps²/2 − eps³/3)⌋`, as scikit-learn computes it.
///
/// Panics unless `0 < eps < 1` (callers validate configuration first).
pub fn jl_min_dim(n_samples: usize, eps: f64) -> usize {
    assert!(eps > 0.0 && eps < 1.0, "eps must lie in (0, 1), got {eps}");
    let denominator = eps * eps / 2.0 - eps * eps * eps / 3.0;
    (4.0 * (n_samples.max(1) as f64).ln() / denominator) as usize
}

/// A sparse random projection matrix, stored row by row (one row per output
/// component) as the indices of its positive and negative entries.
#[derive(Debug, Clone, PartialEq)]
pub struct SparseRandomProjection {
    n_features: usize,
    n_components: usize,
    density: f64,
    /// Magnitude of every non-zero entry.
    scale: f32,
    /// Feature indices of the non-zero entries, row after row; within a row
    /// the positive entries come first.
    indices: Vec<u32>,
    /// Row `c` owns `indices[row_start[c]..row_start[c + 1]]`.
    row_start: Vec<usize>,
    /// Row `c`'s negative entries start at `indices[negative_start[c]]`.
    negative_start: Vec<usize>,
}

impl SparseRandomProjection {
    /// Projection with scikit-learn's default density `1 / sqrt(n_features)`.
    pub fn new(n_features: usize, n_components: usize, seed: u64) -> Result<Self, BankError> {
        let density = 1.0 / (n_features.max(1) as f64).sqrt();
        Self::with_density(n_features, n_components, density, seed)
    }

    /// Projection with a chosen density in `(0, 1]`.
    pub fn with_density(
        n_features: usize,
        n_components: usize,
        density: f64,
        seed: u64,
    ) -> Result<Self, BankError> {
        if n_features == 0 || n_components == 0 || u32::try_from(n_features).is_err() {
            return Err(BankError::InvalidProjection {
                n_features,
                n_components,
            });
        }
        if !(density > 0.0 && density <= 1.0) {
            return Err(BankError::InvalidDensity(density));
        }
        let mut rng = SplitMix64::new(seed);
        let mut indices = Vec::new();
        let mut row_start = vec![0];
        let mut negative_start = Vec::with_capacity(n_components);
        let mut negatives = Vec::new();
        for _ in 0..n_components {
            negatives.clear();
            for j in 0..n_features as u32 {
                if rng.next_f64() < density {
                    if rng.next_u64() & 1 == 0 {
                        indices.push(j);
                    } else {
                        negatives.push(j);
                    }
                }
            }
            negative_start.push(indices.len());
            indices.extend_from_slice(&negatives);
            row_start.push(indices.len());
        }
        Ok(Self {
            n_features,
            n_components,
            density,
            scale: ((1.0 / density).sqrt() / (n_components as f64).sqrt()) as f32,
            indices,
            row_start,
            negative_start,
        })
    }

    pub fn n_features(&self) -> usize {
        self.n_features
    }

    pub fn n_components(&self) -> usize {
        self.n_components
    }

    pub fn density(&self) -> f64 {
        self.density
    }

    /// Number of stored non-zero entries.
    pub fn nnz(&self) -> usize {
        self.indices.len()
    }

    /// Project `n` rows (`n × n_features` → `n × n_components`), in parallel.
    pub fn project(&self, xs: &[f32], n: usize) -> Vec<f32> {
        assert_eq!(xs.len(), n * self.n_features, "rows are not n × n_features");
        let mut out = vec![0.0f32; n * self.n_components];
        out.par_chunks_mut(PROJECT_BLOCK_ROWS * self.n_components)
            .zip(xs.par_chunks(PROJECT_BLOCK_ROWS * self.n_features))
            .for_each(|(out, xs)| {
                for (y, x) in out
                    .chunks_exact_mut(self.n_components)
                    .zip(xs.chunks_exact(self.n_features))
                {
                    self.project_row(x, y);
                }
            });
        out
    }

    fn project_row(&self, x: &[f32], y: &mut [f32]) {
        for (c, y) in y.iter_mut().enumerate() {
            let (start, neg, end) = (
                self.row_start[c],
                self.negative_start[c],
                self.row_start[c + 1],
            );
            let positive: f32 = self.indices[start..neg]
                .iter()
                .map(|&j| x[j as usize])
                .sum();
            let negative: f32 = self.indices[neg..end].iter().map(|&j| x[j as usize]).sum();
            *y = (positive - negative) * self.scale;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::linalg::sq_euclidean;

    #[test]
    fn jl_dimensions_match_sklearn() {
        // sklearn.random_projection.johnson_lindenstrauss_min_dim, from
        // tools/stats_reference.py.
        assert_eq!(jl_min_dim(256_500, 0.9), 307);
        assert_eq!(jl_min_dim(100_000, 0.9), 284);
        assert_eq!(jl_min_dim(1_000, 0.5), 331);
        assert_eq!(jl_min_dim(10, 0.1), 1973);
    }

    #[test]
    fn matrix_has_the_expected_density_and_signs() {
        let p = SparseRandomProjection::new(400, 300, 1).unwrap();
        assert_eq!(p.density(), 0.05);
        let expected = 400.0 * 300.0 * 0.05;
        let nnz = p.nnz() as f64;
        // Binomial(120000, 0.05): sd ≈ 75.
        assert!((nnz - expected).abs() < 400.0, "nnz {nnz}");
        let negatives: usize = (0..300)
            .map(|c| p.row_start[c + 1] - p.negative_start[c])
            .sum();
        assert!((negatives as f64 / nnz - 0.5).abs() < 0.02);
        assert!((f64::from(p.scale) - (20.0f64 / 300.0).sqrt()).abs() < 1e-6);
    }

    #[test]
    fn projection_is_linear_and_seeded() {
        let p = SparseRandomProjection::new(64, 16, 3).unwrap();
        assert_eq!(p, SparseRandomProjection::new(64, 16, 3).unwrap());
        assert_ne!(p, SparseRandomProjection::new(64, 16, 4).unwrap());
        let mut rng = SplitMix64::new(5);
        let x: Vec<f32> = (0..128).map(|_| rng.next_f64() as f32).collect();
        let y = p.project(&x, 2);
        let sum: Vec<f32> = x[..64].iter().zip(&x[64..]).map(|(a, b)| a + b).collect();
        let y_sum = p.project(&sum, 1);
        for c in 0..16 {
            assert!((y_sum[c] - (y[c] + y[16 + c])).abs() < 1e-5);
        }
    }

    #[test]
    fn projection_roughly_preserves_distances() {
        let (n, d, k) = (40, 2000, 600);
        let mut rng = SplitMix64::new(9);
        let x: Vec<f32> = (0..n * d).map(|_| rng.next_f64() as f32 - 0.5).collect();
        let p = SparseRandomProjection::new(d, k, 2).unwrap();
        let y = p.project(&x, n);
        for i in 1..n {
            let before = sq_euclidean(&x[..d], &x[i * d..(i + 1) * d]);
            let after = sq_euclidean(&y[..k], &y[i * k..(i + 1) * k]);
            let ratio = after / before;
            assert!((0.7..1.3).contains(&ratio), "pair (0, {i}): ratio {ratio}");
        }
    }

    #[test]
    fn rejects_bad_shapes_and_densities() {
        assert!(matches!(
            SparseRandomProjection::new(0, 4, 0),
            Err(BankError::InvalidProjection { .. })
        ));
        assert!(matches!(
            SparseRandomProjection::new(4, 0, 0),
            Err(BankError::InvalidProjection { .. })
        ));
        assert_eq!(
            SparseRandomProjection::with_density(4, 4, 1.5, 0),
            Err(BankError::InvalidDensity(1.5))
        );
        assert_eq!(
            SparseRandomProjection::with_density(4, 4, 0.0, 0),
            Err(BankError::InvalidDensity(0.0))
        );
    }
}
