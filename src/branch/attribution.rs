//! Semantic attribution branch ("MA2Patch"): how far is the image's mean
//! patch token from normal, and which patches put it there?
//!
//! Fit: a Gaussian on `g`, the mean of an image's N patch tokens, over the
//! normal images.
//!
//! Score: `s_attr = D(g)`, the Mahalanobis distance of `g`. Each patch's
//! contribution is what removing it changes: `c_i = |D(g) − D(g₋ᵢ)|` with
//! `g₋ᵢ = (N·g − p_i)/(N − 1)`. All N contributions come from one whitening
//! of the tokens, no loop of distance evaluations: with `W` the whitening
//! matrix (`D(x) = ‖W(x − μ)‖`), `u = W(g − μ)` and `e_i = W(g − p_i)`,
//!
//! `D(g₋ᵢ)² − D(g)² = 2·u·e_i/(N − 1) + ‖e_i‖²/(N − 1)²`,
//!
//! and `D(g₋ᵢ) − D(g)` is that difference over `D(g₋ᵢ) + D(g)`, which avoids
//! subtracting two nearly equal distances. The map is upsampled to the
//! evaluation grid and smoothed, and deliberately not normalised: its
//! magnitude carries the global deviation into the fusion.

use crate::anomaly_map::AnomalyMap;
use crate::branch::{BranchError, BranchOutput};
use crate::config::AttributionConfig;
use crate::features::Tokens;
use crate::stats::gaussian::Gaussian;

/// A fitted attribution branch.
#[derive(Debug, Clone)]
pub struct AttributionBranch {
    pub mean_token: Gaussian,
    pub sigma: f64,
}

impl AttributionBranch {
    /// Fits on `(K, D)` mean patch tokens, one row per normal image.
    pub fn fit(
        mean_tokens: &[f32],
        dim: usize,
        config: &AttributionConfig,
    ) -> Result<Self, BranchError> {
        let n = mean_tokens.len() / dim;
        let mean_token =
            Gaussian::fit(mean_tokens, n, dim, config.covariance).map_err(|source| {
                BranchError::Stats {
                    branch: "attribution",
                    source,
                }
            })?;
        Ok(Self {
            mean_token,
            sigma: config.sigma,
        })
    }

    /// Scores one image from its patch tokens.
    pub fn score(&self, tokens: &Tokens, eval_size: usize) -> BranchOutput {
        let (score, contributions) = self.contributions(&tokens.patches);
        let map = AnomalyMap::new(tokens.grid.0, tokens.grid.1, contributions)
            .resized(eval_size, eval_size)
            .gaussian_blurred(self.sigma);
        BranchOutput { score, map }
    }

    /// `D(g)` and the leave-one-patch-out contributions `c_i`.
    pub fn contributions(&self, patches: &[f32]) -> (f64, Vec<f32>) {
        let dim = self.mean_token.dim();
        let n = patches.len() / dim;
        let whitened = self.mean_token.whiten(patches, n);

        let mut u = vec![0.0f64; dim];
        for z in whitened.chunks_exact(dim) {
            for (a, b) in u.iter_mut().zip(z) {
                *a += b;
            }
        }
        u.iter_mut().for_each(|v| *v /= n as f64);
        let d_g = u.iter().map(|v| v * v).sum::<f64>().sqrt();
        if n < 2 {
            return (d_g, vec![0.0; n]);
        }

        let m = (n - 1) as f64;
        let contributions = whitened
            .chunks_exact(dim)
            .map(|z| {
                // e_i = u − z_i = W(g − p_i).
                let (mut ue, mut ee) = (0.0f64, 0.0f64);
                for (a, b) in u.iter().zip(z) {
                    let e = a - b;
                    ue += a * e;
                    ee += e * e;
                }
                let diff_sq = 2.0 * ue / m + ee / (m * m);
                let d_without = (d_g * d_g + diff_sq).max(0.0).sqrt();
                let denom = d_without + d_g;
                (if denom > 0.0 { diff_sq / denom } else { 0.0 }).abs() as f32
            })
            .collect();
        (d_g, contributions)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rng::SplitMix64;
    use crate::stats::gaussian::CovarianceEstimator;

    fn fitted(dim: usize) -> AttributionBranch {
        let mut rng = SplitMix64::new(11);
        let samples: Vec<f32> = (0..40 * dim).map(|_| rng.next_f64() as f32 - 0.5).collect();
        let config = AttributionConfig {
            covariance: CovarianceEstimator::LedoitWolf,
            ..AttributionConfig::default()
        };
        AttributionBranch::fit(&samples, dim, &config).unwrap()
    }

    #[test]
    fn closed_form_matches_leaving_each_patch_out() {
        let dim = 5;
        let branch = fitted(dim);
        let mut rng = SplitMix64::new(5);
        let n = 9;
        let patches: Vec<f32> = (0..n * dim)
            .map(|_| 2.0 * rng.next_f64() as f32 - 1.0)
            .collect();
        let (d_g, c) = branch.contributions(&patches);

        let mean_of = |rows: Vec<&[f32]>| -> Vec<f32> {
            let mut g = vec![0.0f32; dim];
            for r in &rows {
                for (a, b) in g.iter_mut().zip(*r) {
                    *a += b / rows.len() as f32;
                }
            }
            g
        };
        let all: Vec<&[f32]> = patches.chunks(dim).collect();
        assert!((d_g - branch.mean_token.mahalanobis(&mean_of(all.clone()))).abs() < 1e-4);
        for (i, &ci) in c.iter().enumerate() {
            let rest: Vec<&[f32]> = all
                .iter()
                .enumerate()
                .filter(|(j, _)| *j != i)
                .map(|(_, r)| *r)
                .collect();
            let direct = (d_g - branch.mean_token.mahalanobis(&mean_of(rest))).abs();
            assert!(
                (f64::from(ci) - direct).abs() < 1e-4 * (1.0 + direct),
                "patch {i}: {ci} vs {direct}"
            );
        }
    }

    #[test]
    fn an_outlier_patch_gets_the_largest_contribution() {
        let dim = 4;
        let branch = fitted(dim);
        let mut patches = vec![0.0f32; 16 * dim];
        patches[7 * dim..8 * dim].copy_from_slice(&[8.0, -8.0, 8.0, -8.0]);
        let tokens = Tokens {
            cls: vec![],
            patches: patches.clone(),
            grid: (4, 4),
        };
        let out = branch.score(&tokens, 8);
        let (_, c) = branch.contributions(&patches);
        let best = c
            .iter()
            .enumerate()
            .max_by(|a, b| a.1.total_cmp(b.1))
            .unwrap()
            .0;
        assert_eq!(best, 7);
        assert_eq!((out.map.height, out.map.width), (8, 8));
    }
}
