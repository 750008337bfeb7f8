//! Greedy k-center coreset selection (farthest-point sampling), as
//! PatchCore uses it to shrink the memory bank to a fraction of the training
//! patch features (Roth et al. 2022, Alg. 1).
//!
//! Starting from index 0 (the reference's choice), each step adds the point
//! whose distance to the nearest already-selected point is largest; ties go
//! to the lowest index. Selection runs on sparse-random-projected features
//! when the Johnson–Lindenstrauss dimension for `(n, ε)` is below the
//! feature dimension, else on the raw features (the reference's fallback).
//!
//! Each step costs `O(n)`: every point's distance to its nearest selected
//! point is refreshed against the new one. Most refreshes are skipped
//! exactly by the triangle inequality: if the new point `s` lies at least
//! twice as far from a point's current nearest centre `c` as the point
//! itself (`‖c − s‖ ≥ 2‖x − c‖`), then `‖x − s‖ ≥ ‖x − c‖` and nothing
//! changes. A rounding margin keeps the skipped refreshes those that could
//! not change a computed value, so the selection equals the plain
//! algorithm's.
//!
//! Shapes: features `n × dim` row-major.

use std::borrow::Cow;

use rayon::prelude::*;

use super::projection::{SparseRandomProjection, jl_min_dim};
use super::{BankError, check_rows};
use crate::linalg::sq_euclidean;

/// Points per rayon task in the refresh pass.
const REFRESH_CHUNK: usize = 8192;

/// Marks a selected point in the distance array (never the farthest again).
const SELECTED: f32 = f32::NEG_INFINITY;

/// Indices of a greedy k-center coreset of `n_select` of the `n` feature
/// rows (`n_select` is capped at `n`), in selection order.
///
/// `projection_eps` (in `(0, 1)`) sets the Johnson–Lindenstrauss target
/// dimension; `seed` the projection matrix.
pub fn greedy_coreset(
    features: &[f32],
    n: usize,
    dim: usize,
    n_select: usize,
    projection_eps: f64,
    seed: u64,
) -> Result<Vec<usize>, BankError> {
    check_rows(features, n, dim)?;
    if !(projection_eps > 0.0 && projection_eps < 1.0) {
        return Err(BankError::InvalidEps(projection_eps));
    }
    let n_select = n_select.min(n);
    if n_select == 0 {
        return Ok(Vec::new());
    }
    let target = jl_min_dim(n, projection_eps);
    let (space, space_dim): (Cow<'_, [f32]>, usize) = if target < dim {
        let projection = SparseRandomProjection::new(dim, target, seed)?;
        (Cow::Owned(projection.project(features, n)), target)
    } else {
        (Cow::Borrowed(features), dim)
    };
    tracing::debug!(n, dim, space_dim, n_select, "greedy coreset");
    Ok(k_center_greedy(&space, n, space_dim, n_select))
}

/// Greedy k-center selection of `n_select ≤ n` rows of `points` (`n × dim`),
/// starting at row 0, with exact triangle-inequality pruning.
pub fn k_center_greedy(points: &[f32], n: usize, dim: usize, n_select: usize) -> Vec<usize> {
    assert_eq!(points.len(), n * dim, "points are not n × dim");
    assert!(n_select <= n, "cannot select {n_select} of {n} points");
    assert!(dim > 0, "points need at least one dimension");
    if n_select == 0 {
        return Vec::new();
    }
    let row = |i: usize| &points[i * dim..(i + 1) * dim];
    let margin = 1.0 + prune_margin(dim);

    // Squared distance of every point to its nearest selected point, and
    // which selected point (position in `selected`) that is.
    let mut min_sq: Vec<f32> = points
        .par_chunks(dim)
        .map(|x| sq_euclidean(x, row(0)))
        .collect();
    let mut owner = vec![0u32; n];
    min_sq[0] = SELECTED;
    let mut selected = vec![0usize];
    let mut farthest = argmax(&min_sq);

    while selected.len() < n_select {
        let s = farthest;
        let new_owner = selected.len() as u32;
        let centre_sq: Vec<f32> = selected
            .par_iter()
            .map(|&c| sq_euclidean(row(c), row(s)))
            .collect();
        selected.push(s);
        min_sq[s] = SELECTED;

        let chunk_max: Vec<(f32, usize)> = min_sq
            .par_chunks_mut(REFRESH_CHUNK)
            .zip(owner.par_chunks_mut(REFRESH_CHUNK))
            .enumerate()
            .map(|(chunk, (min_sq, owner))| {
                let base = chunk * REFRESH_CHUNK;
                for (offset, (m, o)) in min_sq.iter_mut().zip(owner.iter_mut()).enumerate() {
                    // Selected points carry −∞, so they are always skipped.
                    if centre_sq[*o as usize] > 4.0 * *m * margin {
                        continue;
                    }
                    let d = sq_euclidean(row(base + offset), row(s));
                    if d < *m {
                        *m = d;
                        *o = new_owner;
                    }
                }
                let (value, offset) = argmax_with_value(min_sq);
                (value, base + offset)
            })
            .collect();
        farthest = first_max(&chunk_max);
    }
    selected
}

/// Relative slack on the pruning test that covers the rounding of the
/// computed squared distances (about `dim` f32 roundings each): with it,
/// a skipped refresh could not have lowered a computed distance.
fn prune_margin(dim: usize) -> f32 {
    let unit_roundoff = f64::from(f32::EPSILON) / 2.0;
    let gamma = (dim as f64 + 2.0) * unit_roundoff;
    (8.0 * gamma / (1.0 - gamma)) as f32
}

/// Index of the largest value, the lowest index on ties.
fn argmax(values: &[f32]) -> usize {
    let chunk_max: Vec<(f32, usize)> = values
        .par_chunks(REFRESH_CHUNK)
        .enumerate()
        .map(|(chunk, v)| {
            let (value, offset) = argmax_with_value(v);
            (value, chunk * REFRESH_CHUNK + offset)
        })
        .collect();
    first_max(&chunk_max)
}

fn argmax_with_value(values: &[f32]) -> (f32, usize) {
    let mut best = (f32::NEG_INFINITY, 0);
    for (i, &v) in values.iter().enumerate() {
        if v > best.0 {
            best = (v, i);
        }
    }
    best
}

/// The index of the first chunk maximum among equal maxima.
fn first_max(chunk_max: &[(f32, usize)]) -> usize {
    let mut best = (f32::NEG_INFINITY, 0);
    for &(value, index) in chunk_max {
        if value > best.0 {
            best = (value, index);
        }
    }
    best.1
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rng::SplitMix64;

    /// The textbook algorithm, one full refresh per step.
    fn brute_force(points: &[f32], n: usize, dim: usize, n_select: usize) -> Vec<usize> {
        let row = |i: usize| &points[i * dim..(i + 1) * dim];
        let mut min_sq: Vec<f32> = (0..n).map(|i| sq_euclidean(row(i), row(0))).collect();
        let mut selected = vec![0];
        min_sq[0] = SELECTED;
        while selected.len() < n_select {
            let s = argmax_with_value(&min_sq).1;
            selected.push(s);
            for (i, m) in min_sq.iter_mut().enumerate() {
                *m = m.min(sq_euclidean(row(i), row(s)));
            }
            min_sq[s] = SELECTED;
        }
        selected
    }

    fn uniform(n: usize, dim: usize, seed: u64) -> Vec<f32> {
        let mut rng = SplitMix64::new(seed);
        (0..n * dim).map(|_| rng.next_f64() as f32).collect()
    }

    #[test]
    fn picks_one_point_per_cluster_first() {
        // Five tight clusters far apart; point 0 is in cluster 0.
        let (dim, per) = (8, 40);
        let mut rng = SplitMix64::new(1);
        let mut data = Vec::new();
        for c in 0..5 {
            for _ in 0..per {
                data.extend((0..dim).map(|j| {
                    let centre = if j == c { 100.0 } else { 0.0 };
                    centre + rng.next_f64() as f32
                }));
            }
        }
        let picked = greedy_coreset(&data, 5 * per, dim, 5, 0.9, 0).unwrap();
        assert_eq!(picked[0], 0);
        let mut clusters: Vec<usize> = picked.iter().map(|&i| i / per).collect();
        clusters.sort();
        assert_eq!(clusters, vec![0, 1, 2, 3, 4]);
    }

    #[test]
    fn pruned_selection_equals_brute_force() {
        for (n, dim, n_select, seed) in [(3000, 16, 300, 2), (2000, 64, 150, 3), (500, 3, 499, 4)] {
            let data = uniform(n, dim, seed);
            assert_eq!(
                k_center_greedy(&data, n, dim, n_select),
                brute_force(&data, n, dim, n_select),
                "n={n} dim={dim}"
            );
        }
    }

    #[test]
    fn duplicates_are_never_selected_twice() {
        // Ten distinct points, each repeated three times.
        let base = uniform(10, 4, 5);
        let data: Vec<f32> = (0..30)
            .flat_map(|i| base[(i % 10) * 4..(i % 10 + 1) * 4].to_vec())
            .collect();
        let picked = k_center_greedy(&data, 30, 4, 30);
        let mut sorted = picked.clone();
        sorted.sort();
        sorted.dedup();
        assert_eq!(sorted.len(), 30);
        // The first ten picks are the ten distinct points, lowest indices.
        let mut first: Vec<usize> = picked[..10].to_vec();
        first.sort();
        assert_eq!(first, (0..10).collect::<Vec<_>>());
    }

    #[test]
    fn selection_is_deterministic_across_thread_counts() {
        let (n, dim) = (20_000, 12);
        let data = uniform(n, dim, 6);
        let run = |threads: usize| {
            let pool = rayon::ThreadPoolBuilder::new()
                .num_threads(threads)
                .build()
                .unwrap();
            pool.install(|| greedy_coreset(&data, n, dim, 200, 0.9, 7).unwrap())
        };
        let one = run(1);
        assert_eq!(one, run(2));
        assert_eq!(one, run(3));
        assert_eq!(one.len(), 200);
    }

    #[test]
    fn projects_only_when_the_jl_dimension_is_smaller() {
        // n = 50 at eps 0.9 needs 96 dimensions: 200-d features are projected,
        // 64-d ones are used as they are.
        assert_eq!(jl_min_dim(50, 0.9), 96);
        let wide = uniform(50, 200, 8);
        let projected = SparseRandomProjection::new(200, 96, 1)
            .unwrap()
            .project(&wide, 50);
        assert_eq!(
            greedy_coreset(&wide, 50, 200, 10, 0.9, 1).unwrap(),
            k_center_greedy(&projected, 50, 96, 10)
        );
        let narrow = uniform(50, 64, 9);
        assert_eq!(
            greedy_coreset(&narrow, 50, 64, 10, 0.9, 1).unwrap(),
            k_center_greedy(&narrow, 50, 64, 10)
        );
    }

    #[test]
    fn selection_size_is_capped_and_inputs_checked() {
        let data = uniform(6, 2, 10);
        assert_eq!(greedy_coreset(&data, 6, 2, 100, 0.9, 0).unwrap().len(), 6);
        assert!(greedy_coreset(&data, 6, 2, 0, 0.9, 0).unwrap().is_empty());
        assert_eq!(
            greedy_coreset(&data, 6, 2, 3, 1.0, 0),
            Err(BankError::InvalidEps(1.0))
        );
        assert!(matches!(
            greedy_coreset(&data, 5, 2, 3, 0.9, 0),
            Err(BankError::ShapeMismatch { .. })
        ));
    }

    /// `n × dim` points around `clusters` random centres (a crude stand-in
    /// for patch features, which are far from uniform).
    fn clustered(n: usize, dim: usize, clusters: usize, seed: u64) -> Vec<f32> {
        let centres = uniform(clusters, dim, seed);
        let mut rng = SplitMix64::new(seed + 1);
        (0..n)
            .flat_map(|_| {
                let c = rng.below(clusters);
                let noise: Vec<f32> = (0..dim).map(|_| 0.3 * rng.next_f64() as f32).collect();
                centres[c * dim..(c + 1) * dim]
                    .iter()
                    .zip(noise)
                    .map(|(a, b)| 4.0 * a + b)
                    .collect::<Vec<_>>()
            })
            .collect()
    }

    /// Timing at the texture branch's scale: 1% coresets.
    /// Run: `cargo test --release --lib timing_ -- --ignored --nocapture`.
    #[test]
    #[ignore]
    fn timing_greedy_coreset_one_percent() {
        for (n, dim) in [(256_500, 128), (100_000, 1536)] {
            for (name, data) in [
                ("uniform", uniform(n, dim, 1)),
                ("clustered", clustered(n, dim, 200, 2)),
            ] {
                let target = jl_min_dim(n, 0.9);
                if target < dim {
                    let start = std::time::Instant::now();
                    let p = SparseRandomProjection::new(dim, target, 0).unwrap();
                    let _ = p.project(&data, n);
                    println!(
                        "  projection {dim} -> {target} of {n} rows: {:.2?}",
                        start.elapsed()
                    );
                }
                let start = std::time::Instant::now();
                let picked = greedy_coreset(&data, n, dim, n / 100, 0.9, 0).unwrap();
                println!(
                    "coreset of {} from {n}x{dim} ({name}, JL dim {}): {:.2?}",
                    picked.len(),
                    jl_min_dim(n, 0.9),
                    start.elapsed()
                );
            }
        }
    }
}
