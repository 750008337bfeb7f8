//! Object branch ("MACLU"): where does the image stop looking like belt and
//! coal?
//!
//! Fit: a Gaussian on the CLS tokens of the normal images, and KMeans (k = 2)
//! on all their patch tokens; the smaller cluster is the foreground prototype
//! (coal), the larger the background prototype (belt).
//!
//! Score: the image score is the Mahalanobis distance of the CLS token. For
//! each patch, `r = d_bg / (d_fg + ε)` with `d_*` the Euclidean distance to a
//! prototype. Patches with `r > τ` are confidently foreground and take the
//! mean `r` of this image's background patches (those nearer `μ_bg`), so the
//! map keeps the patches that are neither clearly coal nor clearly belt. The
//! map is upsampled bilinearly to the branch input size, min-max normalised,
//! smoothed with σ, and resized to the evaluation grid.

use crate::anomaly_map::AnomalyMap;
use crate::branch::{BranchError, BranchOutput};
use crate::config::ObjectConfig;
use crate::features::Tokens;
use crate::stats::gaussian::Gaussian;
use crate::stats::kmeans::{KMeans, KMeansParams};

/// Guards the ratio against a patch sitting exactly on the foreground prototype.
pub const RATIO_EPS: f32 = 1e-6;
/// Clusters of the foreground/background split.
const PROTOTYPES: usize = 2;

/// A fitted object branch.
#[derive(Debug, Clone)]
pub struct ObjectBranch {
    pub cls: Gaussian,
    pub foreground: Vec<f32>,
    pub background: Vec<f32>,
    pub tau: f32,
    pub sigma: f64,
    pub input_size: usize,
}

impl ObjectBranch {
    /// Fits on `(K, D)` CLS tokens and `(K·N, D)` patch tokens.
    pub fn fit(
        cls: &[f32],
        patches: &[f32],
        dim: usize,
        config: &ObjectConfig,
        seed: u64,
    ) -> Result<Self, BranchError> {
        let stats = |source| BranchError::Stats {
            branch: "object",
            source,
        };
        let cls_gaussian =
            Gaussian::fit(cls, cls.len() / dim, dim, config.covariance).map_err(stats)?;

        let params = KMeansParams {
            k: PROTOTYPES,
            n_init: config.kmeans_restarts,
            max_iter: config.kmeans_max_iter,
            seed,
            ..KMeansParams::default()
        };
        let kmeans = KMeans::fit(patches, patches.len() / dim, dim, &params).map_err(stats)?;
        let counts = kmeans.counts();
        let (fg, bg) = if counts[0] <= counts[1] {
            (0, 1)
        } else {
            (1, 0)
        };
        let centre = |i: usize| kmeans.centres()[i * dim..(i + 1) * dim].to_vec();
        tracing::debug!(?counts, "object prototypes");

        Ok(Self {
            cls: cls_gaussian,
            foreground: centre(fg),
            background: centre(bg),
            tau: config.tau as f32,
            sigma: config.sigma,
            input_size: config.input_size,
        })
    }

    /// Scores one image from its CLS token and patch tokens.
    pub fn score(&self, tokens: &Tokens, eval_size: usize) -> BranchOutput {
        let score = self.cls.mahalanobis(&tokens.cls);
        let ratios = self.patch_ratios(&tokens.patches);
        // Bilinear interpolation takes its extremes at grid points, so
        // normalising on the grid equals normalising after the upsampling.
        let map = AnomalyMap::new(tokens.grid.0, tokens.grid.1, ratios)
            .min_max_normalised()
            .resized(self.input_size, self.input_size)
            .gaussian_blurred(self.sigma)
            .resized(eval_size, eval_size);
        BranchOutput { score, map }
    }

    /// `r_i` per patch after the mean replacement of strong foreground.
    pub fn patch_ratios(&self, patches: &[f32]) -> Vec<f32> {
        let dim = self.foreground.len();
        let mut ratios = Vec::with_capacity(patches.len() / dim);
        let (mut bg_sum, mut bg_count) = (0.0f64, 0usize);
        for p in patches.chunks_exact(dim) {
            let d_fg = euclidean(p, &self.foreground);
            let d_bg = euclidean(p, &self.background);
            let r = d_bg / (d_fg + RATIO_EPS);
            if d_bg <= d_fg {
                bg_sum += f64::from(r);
                bg_count += 1;
            }
            ratios.push(r);
        }
        // An image without any background patch has no belt to compare with;
        // its strong-foreground patches then take the mean over all patches.
        let replacement = if bg_count > 0 {
            (bg_sum / bg_count as f64) as f32
        } else {
            ratios.iter().map(|&r| f64::from(r)).sum::<f64>() as f32 / ratios.len().max(1) as f32
        };
        for r in &mut ratios {
            if *r > self.tau {
                *r = replacement;
            }
        }
        ratios
    }
}

fn euclidean(a: &[f32], b: &[f32]) -> f32 {
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y) * (x - y))
        .sum::<f32>()
        .sqrt()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::stats::gaussian::CovarianceEstimator;

    fn branch(fg: Vec<f32>, bg: Vec<f32>, tau: f32) -> ObjectBranch {
        let cls = Gaussian::fit(
            &[0.0, 0.0, 1.0, 1.0, 2.0, 0.0],
            3,
            2,
            CovarianceEstimator::LedoitWolf,
        )
        .unwrap();
        ObjectBranch {
            cls,
            foreground: fg,
            background: bg,
            tau,
            sigma: 0.0,
            input_size: 4,
        }
    }

    #[test]
    fn strong_foreground_takes_the_background_mean() {
        // fg at (0,0), bg at (10,0). The first three patches are nearer the
        // background, the last one sits close to the foreground prototype.
        let b = branch(vec![0.0, 0.0], vec![10.0, 0.0], 1.14);
        let patches = [9.0, 0.0, 8.0, 0.0, 5.2, 0.0, 1.0, 0.0];
        let r = b.patch_ratios(&patches);
        let bg_mean = (1.0 / 9.0 + 2.0 / 8.0 + 4.8 / 5.2) / 3.0;
        assert!((r[0] - 1.0 / 9.0).abs() < 1e-5);
        // 4.8 / 5.2 < 1: nearer the background, kept.
        assert!((r[2] - 4.8 / 5.2).abs() < 1e-5);
        // 9 / 1 > τ: replaced.
        assert!((r[3] - bg_mean as f32).abs() < 1e-5, "{r:?}");
    }

    #[test]
    fn ambiguous_patches_keep_their_ratio() {
        let b = branch(vec![0.0, 0.0], vec![10.0, 0.0], 1.14);
        // 5.3 / 4.7 = 1.128 <= τ: nearer foreground but ambiguous, so kept.
        let r = b.patch_ratios(&[4.7, 0.0, 9.0, 0.0]);
        assert!((r[0] - 5.3 / 4.7).abs() < 1e-5, "{r:?}");
    }

    #[test]
    fn fit_picks_the_smaller_cluster_as_foreground() {
        // 6 patches around (0,0), 2 around (5,5).
        let patches = [
            0.0, 0.1, 0.1, 0.0, -0.1, 0.0, 0.0, -0.1, 0.05, 0.05, -0.05, 0.0, 5.0, 5.0, 5.1, 5.0,
        ];
        let cls = [0.0, 1.0, 1.0, 0.0, 0.5, 0.5, 0.2, 0.9];
        let config = ObjectConfig {
            covariance: CovarianceEstimator::LedoitWolf,
            ..ObjectConfig::default()
        };
        let b = ObjectBranch::fit(&cls, &patches, 2, &config, 1).unwrap();
        assert!(
            b.foreground[0] > 4.0 && b.background[0].abs() < 0.5,
            "{b:?}"
        );
    }

    #[test]
    fn map_is_normalised_and_on_the_eval_grid() {
        let b = branch(vec![0.0, 0.0], vec![10.0, 0.0], 1.14);
        let patches: Vec<f32> = (0..4).flat_map(|i| [6.0 + i as f32, 0.0]).collect();
        let tokens = Tokens {
            cls: vec![0.5, 0.5],
            patches,
            grid: (2, 2),
        };
        let out = b.score(&tokens, 6);
        assert_eq!((out.map.height, out.map.width), (6, 6));
        let max = out.map.max();
        assert!(
            max <= 1.0 + 1e-6 && out.map.data.iter().all(|&v| v >= -1e-6),
            "{max}"
        );
        assert!(out.score.is_finite() && out.score >= 0.0);
    }
}
