//! Texture branch: PatchCore (Roth et al., CVPR 2022) on CNN patch features.
//!
//! Patch features: the stride-8 and stride-16 feature maps are each locally
//! aggregated with a 3×3 average pool (stride 1, zero padding counted, as
//! `AvgPool2d(3, 1, 1)`), both are brought to the stride-8 grid by adaptive
//! average pooling, and concatenated: `(H₈·W₈, C₈ + C₁₆)`.
//!
//! Fit: a greedy k-center coreset of the patch features of the bank images
//! becomes the memory bank (see [`crate::memory_bank`]).
//!
//! Score: every patch's distance to its nearest bank entry. The image score
//! re-weights the largest distance `d*` by how isolated its nearest entry
//! `m*` is: `w = 1 − exp(d*/√D) / Σ_j exp(‖p* − m_j‖/√D)` over the nearest
//! bank entries `m_j` of `m*` other than `m*` itself (the reference's
//! choice). The map is min-max normalised on the patch grid, upsampled to the
//! evaluation grid and smoothed.

use crate::anomaly_map::AnomalyMap;
use crate::branch::{BranchError, BranchOutput};
use crate::config::TextureConfig;
use crate::features::Tokens;
use crate::memory_bank::{BankError, MemoryBank, greedy_coreset};

/// Side of the local aggregation window.
const AGGREGATION_WINDOW: usize = 3;

/// A fitted texture branch.
#[derive(Debug, Clone)]
pub struct TextureBranch {
    pub bank: MemoryBank,
    pub reweight_k: usize,
    pub sigma: f64,
}

/// One CNN feature map of one image, `(channels, height, width)` planar.
#[derive(Debug, Clone, Copy)]
pub struct FeatureMap<'a> {
    pub data: &'a [f32],
    pub channels: usize,
    pub height: usize,
    pub width: usize,
}

/// PatchCore patch features of one image: `(H₈·W₈, C₈ + C₁₆)` on the stride-8 grid.
pub fn patch_features(stride8: FeatureMap, stride16: FeatureMap) -> (Vec<f32>, (usize, usize)) {
    let grid = (stride8.height, stride8.width);
    let a = adaptive_avg_pool(&avg_pool_3x3(stride8), stride8, grid);
    let b = adaptive_avg_pool(&avg_pool_3x3(stride16), stride16, grid);
    let (c8, c16) = (stride8.channels, stride16.channels);
    let cells = grid.0 * grid.1;
    let mut out = vec![0.0f32; cells * (c8 + c16)];
    for (cell, row) in out.chunks_exact_mut(c8 + c16).enumerate() {
        for c in 0..c8 {
            row[c] = a[c * cells + cell];
        }
        for c in 0..c16 {
            row[c8 + c] = b[c * cells + cell];
        }
    }
    (out, grid)
}

/// 3×3 mean with stride 1 and zero padding 1, dividing by 9 everywhere.
fn avg_pool_3x3(map: FeatureMap) -> Vec<f32> {
    let (h, w) = (map.height, map.width);
    let r = AGGREGATION_WINDOW as isize / 2;
    let norm = (AGGREGATION_WINDOW * AGGREGATION_WINDOW) as f32;
    let mut out = vec![0.0f32; map.data.len()];
    for (src, dst) in map
        .data
        .chunks_exact(h * w)
        .zip(out.chunks_exact_mut(h * w))
    {
        for y in 0..h as isize {
            for x in 0..w as isize {
                let mut sum = 0.0f32;
                for yy in (y - r).max(0)..(y + r + 1).min(h as isize) {
                    for xx in (x - r).max(0)..(x + r + 1).min(w as isize) {
                        sum += src[yy as usize * w + xx as usize];
                    }
                }
                dst[y as usize * w + x as usize] = sum / norm;
            }
        }
    }
    out
}

/// `AdaptiveAvgPool2d(out)`: output cell i averages input rows
/// `floor(i·H/out) .. ceil((i+1)·H/out)` (likewise columns).
fn adaptive_avg_pool(planes: &[f32], map: FeatureMap, (oh, ow): (usize, usize)) -> Vec<f32> {
    let (h, w) = (map.height, map.width);
    if (h, w) == (oh, ow) {
        return planes.to_vec();
    }
    let span = |i: usize, n: usize, o: usize| (i * n / o, ((i + 1) * n).div_ceil(o));
    let mut out = vec![0.0f32; map.channels * oh * ow];
    for (src, dst) in planes
        .chunks_exact(h * w)
        .zip(out.chunks_exact_mut(oh * ow))
    {
        for oy in 0..oh {
            let (y0, y1) = span(oy, h, oh);
            for ox in 0..ow {
                let (x0, x1) = span(ox, w, ow);
                let mut sum = 0.0f32;
                for y in y0..y1 {
                    sum += src[y * w + x0..y * w + x1].iter().sum::<f32>();
                }
                dst[oy * ow + ox] = sum / ((y1 - y0) * (x1 - x0)) as f32;
            }
        }
    }
    out
}

impl TextureBranch {
    /// Builds the memory bank from `(n, D)` patch features of the bank
    /// images, which may be a subsample of `total_patches` (the coreset keeps
    /// `coreset_ratio` of the total, as many as the subsample allows).
    pub fn fit(
        features: &[f32],
        dim: usize,
        total_patches: usize,
        config: &TextureConfig,
        seed: u64,
    ) -> Result<Self, BranchError> {
        let n = features.len() / dim;
        if n == 0 {
            let message = "no patch features to build a memory bank from".into();
            return Err(BranchError::Invalid {
                branch: "texture",
                message,
            });
        }
        // As the reference: int(n × ratio), at least one entry.
        let total = total_patches.max(n);
        let n_select = ((total as f64 * config.coreset_ratio) as usize).clamp(1, n);
        let bank_err = |source| BranchError::Bank {
            branch: "texture",
            source,
        };
        let picked = greedy_coreset(features, n, dim, n_select, config.projection_eps, seed)
            .map_err(bank_err)?;
        let mut bank = Vec::with_capacity(picked.len() * dim);
        for &i in &picked {
            bank.extend_from_slice(&features[i * dim..(i + 1) * dim]);
        }
        tracing::debug!(patches = n, bank = picked.len(), "texture memory bank");
        let bank = MemoryBank::new(bank, picked.len(), dim).map_err(bank_err)?;
        Ok(Self {
            bank,
            reweight_k: config.reweight_k,
            sigma: config.sigma,
        })
    }

    /// Scores one image from its patch features.
    pub fn score(&self, tokens: &Tokens, eval_size: usize) -> Result<BranchOutput, BranchError> {
        let (features, grid) = (&tokens.patches[..], tokens.grid);
        let bank_err = |source| BranchError::Bank {
            branch: "texture",
            source,
        };
        let dim = self.bank.dim();
        let nearest = self
            .bank
            .nearest(features, features.len() / dim)
            .map_err(bank_err)?;
        let distances: Vec<f32> = nearest.iter().map(|&(_, d)| d).collect();
        let score = self.image_score(features, &nearest).map_err(bank_err)?;
        let map = AnomalyMap::new(grid.0, grid.1, distances)
            .min_max_normalised()
            .resized(eval_size, eval_size)
            .gaussian_blurred(self.sigma);
        Ok(BranchOutput { score, map })
    }

    /// `w · d*` with PatchCore's neighbourhood re-weighting.
    fn image_score(&self, features: &[f32], nearest: &[(usize, f32)]) -> Result<f64, BankError> {
        let dim = self.bank.dim();
        let Some((star, &(entry, d_star))) = nearest
            .iter()
            .enumerate()
            .max_by(|a, b| a.1.1.total_cmp(&b.1.1))
        else {
            return Ok(0.0);
        };
        let p_star = &features[star * dim..(star + 1) * dim];
        let scale = (dim as f64).sqrt();
        // exp(d*)/Σ exp(d_j) = 1/Σ exp(d_j − d*), which cannot overflow.
        let sum: f64 = self
            .bank
            .k_nearest_entries(entry, self.reweight_k)?
            .iter()
            .filter(|&&(j, _)| j != entry)
            .map(|&(j, _)| {
                let d_j = f64::from(euclidean(p_star, self.bank.entry(j)));
                ((d_j - f64::from(d_star)) / scale).exp()
            })
            .sum();
        // A one-entry bank has no neighbourhood to compare with: no re-weighting.
        let weight = if sum > 0.0 { 1.0 - 1.0 / sum } else { 1.0 };
        Ok(weight * f64::from(d_star))
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

    #[test]
    fn avg_pool_counts_padding() {
        let data = vec![9.0f32; 9];
        let map = FeatureMap {
            data: &data,
            channels: 1,
            height: 3,
            width: 3,
        };
        let out = avg_pool_3x3(map);
        // Corner sees 4 of 9 cells, edge 6, centre 9.
        assert_eq!(out, vec![4.0, 6.0, 4.0, 6.0, 9.0, 6.0, 4.0, 6.0, 4.0]);
    }

    #[test]
    fn adaptive_pool_upsamples_by_replication() {
        let data = vec![1.0, 2.0, 3.0, 4.0];
        let map = FeatureMap {
            data: &data,
            channels: 1,
            height: 2,
            width: 2,
        };
        let out = adaptive_avg_pool(&data, map, (4, 4));
        assert_eq!(&out[..4], &[1.0, 1.0, 2.0, 2.0]);
        assert_eq!(&out[12..], &[3.0, 3.0, 4.0, 4.0]);
    }

    #[test]
    fn adaptive_pool_overlapping_windows() {
        // 3 -> 2: windows [0, 2) and [1, 3).
        let data = vec![1.0, 2.0, 4.0];
        let map = FeatureMap {
            data: &data,
            channels: 1,
            height: 1,
            width: 3,
        };
        assert_eq!(adaptive_avg_pool(&data, map, (1, 2)), vec![1.5, 3.0]);
    }

    #[test]
    fn patch_features_concatenate_on_the_stride8_grid() {
        let a = vec![1.0f32; 2 * 4 * 4];
        let b = vec![2.0f32; 3 * 2 * 2];
        let (f, grid) = patch_features(
            FeatureMap {
                data: &a,
                channels: 2,
                height: 4,
                width: 4,
            },
            FeatureMap {
                data: &b,
                channels: 3,
                height: 2,
                width: 2,
            },
        );
        assert_eq!(grid, (4, 4));
        assert_eq!(f.len(), 16 * 5);
        // Interior cell (1,1): full 3x3 window of ones; stride-16 cell (0,0) window partly padded.
        let row = &f[5 * 5..6 * 5];
        assert_eq!(&row[..2], &[1.0, 1.0]);
        assert!((row[2] - 2.0 * 4.0 / 9.0).abs() < 1e-6, "{row:?}");
    }

    #[test]
    fn reweighting_follows_the_formula() {
        // Bank: m0 = 0, m1 = 1, m2 = 3 (1-D). Query patches: 0.1 and 10.
        let bank = MemoryBank::new(vec![0.0, 1.0, 3.0], 3, 1).unwrap();
        let branch = TextureBranch {
            bank,
            reweight_k: 3,
            sigma: 0.0,
        };
        let tokens = Tokens {
            cls: vec![],
            patches: vec![0.1, 10.0],
            grid: (1, 2),
        };
        let out = branch.score(&tokens, 2).unwrap();
        // p* = 10, m* = m2 (d* = 7); neighbours of m2 other than itself: m1, m0.
        let (d1, d0) = (9.0f64, 10.0f64);
        let w = 1.0 - 7.0f64.exp() / (d1.exp() + d0.exp());
        assert!(
            (out.score - w * 7.0).abs() < 1e-9,
            "{} vs {}",
            out.score,
            w * 7.0
        );
    }
}
