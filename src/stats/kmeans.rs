//! k-means clustering (Lloyd's algorithm with greedy k-means++ seeding).
//!
//! The object branch clusters all patch tokens of the training images with
//! `k = 2`; the smaller cluster is the foreground prototype, the larger the
//! background prototype, and test patches go to the nearest centre.
//!
//! - Seeding: greedy k-means++ (Arthur & Vassilvitskii 2007, with
//!   `2 + ⌊ln k⌋` candidates per centre as scikit-learn), drawn from
//!   [`SplitMix64`] seeded by [`KMeansParams::seed`].
//! - Restarts: `n_init` seedings run one after another from the same
//!   generator; the run with the lowest inertia is kept (the first on ties).
//! - Stopping: labels unchanged, or the summed squared centre shift at most
//!   `tolerance × mean per-feature variance` (scikit-learn's rule), or
//!   `max_iter` iterations.
//! - An empty cluster is moved to the point farthest from its centre.
//! - Assignment: up to [`DIRECT_MAX_CENTRES`] centres (the product's k = 2),
//!   distances are summed directly over the differences, one streaming read
//!   of the data per step and no cancellation; with more centres, blocks of
//!   samples go through the norm expansion and one `gemm` each.
//!   [`KMeans::assign`], the training counts and the inertia always use the
//!   direct distances.
//!
//! Determinism: rows are cut into segments of [`SEGMENT_ROWS`]; each rayon
//! task handles whole segments and returns its partial sums, which are added
//! in segment order. No float is reduced in a thread-dependent order, so a
//! seed gives bitwise the same model on any number of threads.
//!
//! Shapes: data `n × dim` row-major `f32`; centres `k × dim` row-major `f32`.

use rayon::prelude::*;
use serde::{Deserialize, Serialize};

use super::{StatsError, check_samples};
use crate::linalg::{self, row_sq_norms, sq_euclidean, sq_norm};
use crate::rng::SplitMix64;

pub const DEFAULT_K: usize = 2;
pub const DEFAULT_N_INIT: usize = 10;
pub const DEFAULT_MAX_ITER: usize = 300;
/// Relative tolerance, scaled by the mean per-feature variance.
pub const DEFAULT_TOLERANCE: f64 = 1e-4;
pub const DEFAULT_SEED: u64 = 0;

/// Rows per reduction segment. Fixed (not derived from the thread count) so
/// that partial sums always group the same rows. The partial sums take
/// `⌈n / SEGMENT_ROWS⌉ · k · dim · 8` bytes.
pub const SEGMENT_ROWS: usize = 4096;

/// Rows per distance `gemm` inside a segment.
const BLOCK_ROWS: usize = 256;

/// Up to this many centres, distances are computed directly from the
/// differences (one read of each sample, exact); beyond it, through the
/// norm expansion and `gemm`, which is faster for many centres.
pub const DIRECT_MAX_CENTRES: usize = 16;

/// Hyperparameters of [`KMeans::fit`].
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct KMeansParams {
    /// Number of clusters.
    pub k: usize,
    /// Independent seedings; the lowest-inertia run wins.
    pub n_init: usize,
    /// Lloyd iterations per seeding at most.
    pub max_iter: usize,
    /// Convergence tolerance relative to the data's mean feature variance.
    pub tolerance: f64,
    pub seed: u64,
}

impl Default for KMeansParams {
    fn default() -> Self {
        Self {
            k: DEFAULT_K,
            n_init: DEFAULT_N_INIT,
            max_iter: DEFAULT_MAX_ITER,
            tolerance: DEFAULT_TOLERANCE,
            seed: DEFAULT_SEED,
        }
    }
}

impl KMeansParams {
    /// Checks the rules that do not depend on the data (`k ≤ n` is checked
    /// by [`KMeans::fit`]).
    pub fn validate(&self) -> Result<(), StatsError> {
        if self.k == 0 {
            return Err(StatsError::KMeansZeroClusters);
        }
        if self.n_init == 0 {
            return Err(StatsError::KMeansZeroInits);
        }
        if self.max_iter == 0 {
            return Err(StatsError::KMeansZeroIterations);
        }
        if !(self.tolerance.is_finite() && self.tolerance >= 0.0) {
            return Err(StatsError::KMeansInvalidTolerance(self.tolerance));
        }
        Ok(())
    }
}

/// A fitted clustering.
#[derive(Debug, Clone, PartialEq)]
pub struct KMeans {
    dim: usize,
    centres: Vec<f32>,
    counts: Vec<usize>,
    inertia: f64,
    n_iter: usize,
}

impl KMeans {
    /// Cluster `n` samples of dimension `dim`.
    pub fn fit(
        data: &[f32],
        n: usize,
        dim: usize,
        params: &KMeansParams,
    ) -> Result<Self, StatsError> {
        params.validate()?;
        check_samples(data, n, dim, 1)?;
        if params.k > n {
            return Err(StatsError::KMeansTooManyClusters { k: params.k, n });
        }
        let problem = Problem {
            data,
            norms: row_sq_norms(data, n, dim),
            n,
            dim,
            k: params.k,
        };
        let shift_tolerance = params.tolerance * problem.mean_feature_variance();
        let mut rng = SplitMix64::new(params.seed);
        let mut best: Option<KMeans> = None;
        for init in 0..params.n_init {
            let seeds = problem.seed_centres(&mut rng);
            let run = problem.lloyd(seeds, params.max_iter, shift_tolerance);
            tracing::debug!(
                init,
                inertia = run.inertia,
                n_iter = run.n_iter,
                "k-means run"
            );
            if best.as_ref().is_none_or(|b| run.inertia < b.inertia) {
                best = Some(run);
            }
        }
        // n_init ≥ 1 was validated, so a run exists.
        best.ok_or(StatsError::KMeansZeroInits)
    }

    /// Rebuild from stored centres (`k × dim`) and training counts (`k`).
    pub fn from_parts(
        centres: Vec<f32>,
        counts: Vec<usize>,
        dim: usize,
    ) -> Result<Self, StatsError> {
        let k = counts.len();
        if k == 0 {
            return Err(StatsError::KMeansZeroClusters);
        }
        check_samples(&centres, k, dim, 1)?;
        Ok(Self {
            dim,
            centres,
            counts,
            inertia: f64::NAN,
            n_iter: 0,
        })
    }

    pub fn k(&self) -> usize {
        self.counts.len()
    }

    pub fn dim(&self) -> usize {
        self.dim
    }

    /// Cluster centres (`k × dim`).
    pub fn centres(&self) -> &[f32] {
        &self.centres
    }

    /// Centre `c` (`dim`).
    pub fn centre(&self, c: usize) -> &[f32] {
        &self.centres[c * self.dim..(c + 1) * self.dim]
    }

    /// Training samples assigned to each cluster by the final centres.
    pub fn counts(&self) -> &[usize] {
        &self.counts
    }

    /// Sum of squared distances of the training samples to their centres
    /// (NaN for a model rebuilt with [`KMeans::from_parts`]).
    pub fn inertia(&self) -> f64 {
        self.inertia
    }

    /// Lloyd iterations of the kept run.
    pub fn n_iter(&self) -> usize {
        self.n_iter
    }

    /// Index of the nearest centre for each of `n` samples (lowest index on
    /// ties). Distances are computed directly, so this agrees exactly with
    /// [`KMeans::distances`] and with the training [`KMeans::counts`].
    pub fn assign(&self, x: &[f32], n: usize) -> Vec<usize> {
        self.nearest(x, n).into_iter().map(|(c, _)| c).collect()
    }

    /// Euclidean distances of `n` samples to every centre (`n × k`).
    pub fn distances(&self, x: &[f32], n: usize) -> Vec<f32> {
        assert_eq!(x.len(), n * self.dim, "samples are not n × dim");
        x.par_chunks(self.dim)
            .flat_map_iter(|row| {
                self.centres
                    .chunks_exact(self.dim)
                    .map(move |c| sq_euclidean(row, c).sqrt())
            })
            .collect()
    }

    /// Nearest centre and squared distance to it, per sample.
    fn nearest(&self, x: &[f32], n: usize) -> Vec<(usize, f32)> {
        assert_eq!(x.len(), n * self.dim, "samples are not n × dim");
        x.par_chunks(self.dim)
            .map(|row| {
                argmin(
                    self.centres
                        .chunks_exact(self.dim)
                        .map(|c| sq_euclidean(row, c)),
                )
            })
            .collect()
    }
}

/// Index and value of the smallest item, the first one on ties.
fn argmin(values: impl Iterator<Item = f32>) -> (usize, f32) {
    let mut best = (0, f32::INFINITY);
    for (i, v) in values.enumerate() {
        if v < best.1 {
            best = (i, v);
        }
    }
    best
}

/// Validated data with cached row norms.
struct Problem<'a> {
    data: &'a [f32],
    norms: Vec<f32>,
    n: usize,
    dim: usize,
    k: usize,
}

/// One segment's contribution to a Lloyd step.
struct SegmentSums {
    sums: Vec<f64>,
    counts: Vec<usize>,
    changed: usize,
}

impl Problem<'_> {
    fn segments(&self) -> impl IndexedParallelIterator<Item = (&[f32], &[f32])> {
        self.data
            .par_chunks(SEGMENT_ROWS * self.dim)
            .zip(self.norms.par_chunks(SEGMENT_ROWS))
    }

    /// Mean over features of the per-feature variance, from per-segment
    /// sums and sums of squares (f64; only scales the tolerance).
    fn mean_feature_variance(&self) -> f64 {
        let dim = self.dim;
        let parts: Vec<(Vec<f64>, f64)> = self
            .segments()
            .map(|(x, _)| {
                let mut sums = vec![0.0f64; dim];
                let mut sum_sq = 0.0f64;
                for row in x.chunks_exact(dim) {
                    linalg::add_row_f64(&mut sums, row);
                    sum_sq += f64::from(sq_norm(row));
                }
                (sums, sum_sq)
            })
            .collect();
        let mut sums = vec![0.0f64; dim];
        let mut sum_sq = 0.0f64;
        for (s, q) in &parts {
            sums.iter_mut().zip(s).for_each(|(a, b)| *a += b);
            sum_sq += q;
        }
        let n = self.n as f64;
        let mean_sq: f64 = sums.iter().map(|s| (s / n).powi(2)).sum();
        ((sum_sq / n - mean_sq) / dim as f64).max(0.0)
    }

    fn row(&self, i: usize) -> &[f32] {
        &self.data[i * self.dim..(i + 1) * self.dim]
    }

    /// Squared distances of every sample to each of `points` (`m × dim`),
    /// as an `n × m` matrix.
    fn sq_distances_to(&self, points: &[f32]) -> Vec<f32> {
        let m = points.len() / self.dim;
        let mut out = vec![0.0f32; self.n * m];
        if m <= DIRECT_MAX_CENTRES {
            out.par_chunks_mut(m)
                .zip(self.data.par_chunks(self.dim))
                .for_each(|(out, x)| {
                    for (o, p) in out.iter_mut().zip(points.chunks_exact(self.dim)) {
                        *o = sq_euclidean(x, p);
                    }
                });
            return out;
        }
        let point_norms = row_sq_norms(points, m, self.dim);
        out.par_chunks_mut(SEGMENT_ROWS * m)
            .zip(self.segments())
            .for_each(|(out, (x, xn))| {
                for ((out, x), xn) in out
                    .chunks_mut(BLOCK_ROWS * m)
                    .zip(x.chunks(BLOCK_ROWS * self.dim))
                    .zip(xn.chunks(BLOCK_ROWS))
                {
                    linalg::sq_distances_into(x, xn, points, &point_norms, self.dim, out);
                }
            });
        out
    }

    /// Greedy k-means++: each new centre is the best (lowest potential) of
    /// a few candidates drawn with probability proportional to the squared
    /// distance to the centres chosen so far.
    fn seed_centres(&self, rng: &mut SplitMix64) -> Vec<f32> {
        let trials = 2 + (self.k as f64).ln().floor() as usize;
        let first = rng.below(self.n);
        let mut centres = self.row(first).to_vec();
        let mut closest = self.sq_distances_to(&centres);
        let mut potential = ordered_sum(&closest);

        for _ in 1..self.k {
            let cumulative: Vec<f64> = closest
                .iter()
                .scan(0.0f64, |acc, &d| {
                    *acc += f64::from(d);
                    Some(*acc)
                })
                .collect();
            let candidates: Vec<usize> = (0..trials)
                .map(|_| {
                    let target = rng.next_f64() * potential;
                    cumulative.partition_point(|&c| c < target).min(self.n - 1)
                })
                .collect();
            let points: Vec<f32> = candidates
                .iter()
                .flat_map(|&i| self.row(i))
                .copied()
                .collect();
            let dist = self.sq_distances_to(&points);

            let mut best: Option<(f64, usize)> = None;
            for t in 0..trials {
                let pot = ordered_sum_by(self.n, |i| closest[i].min(dist[i * trials + t]));
                if best.is_none_or(|(p, _)| pot < p) {
                    best = Some((pot, t));
                }
            }
            let (pot, t) = best.unwrap_or((potential, 0));
            potential = pot;
            for (i, c) in closest.iter_mut().enumerate() {
                *c = c.min(dist[i * trials + t]);
            }
            centres.extend_from_slice(self.row(candidates[t]));
        }
        centres
    }

    /// Lloyd iterations from `centres`; returns the model with counts and
    /// inertia from an assignment by exact distances to its final centres.
    fn lloyd(&self, mut centres: Vec<f32>, max_iter: usize, shift_tolerance: f64) -> KMeans {
        let (k, dim) = (self.k, self.dim);
        let mut labels = vec![u32::MAX; self.n];
        let mut dists = vec![0.0f32; self.n];
        let mut n_iter = 0;
        let mut last_counts = None;
        while n_iter < max_iter {
            n_iter += 1;
            let step = self.assign_step(&centres, &mut labels, &mut dists);
            if step.changed == 0 && self.k <= DIRECT_MAX_CENTRES {
                // Same labels as the previous step, so the centres are
                // bitwise unchanged, and the labels and distances were
                // computed exactly against them: they are final.
                last_counts = Some(step.counts);
                break;
            }
            let mut new_centres = vec![0.0f32; k * dim];
            for c in 0..k {
                if step.counts[c] == 0 {
                    continue;
                }
                let inv = 1.0 / step.counts[c] as f64;
                for j in 0..dim {
                    new_centres[c * dim + j] = (step.sums[c * dim + j] * inv) as f32;
                }
            }
            self.relocate_empty(&mut new_centres, &step.counts, &dists);
            let shift: f64 = centres
                .iter()
                .zip(&new_centres)
                .map(|(a, b)| f64::from(a - b).powi(2))
                .sum();
            centres = new_centres;
            if step.changed == 0 || shift <= shift_tolerance {
                break;
            }
        }
        let mut model = KMeans {
            dim,
            centres,
            counts: vec![0; k],
            inertia: 0.0,
            n_iter,
        };
        if let Some(counts) = last_counts {
            model.counts = counts;
            model.inertia = ordered_sum(&dists);
            return model;
        }
        let nearest = model.nearest(self.data, self.n);
        for &(c, _) in &nearest {
            model.counts[c] += 1;
        }
        model.inertia = ordered_sum_by(self.n, |i| nearest[i].1);
        model
    }

    /// Assign every sample to its nearest centre and sum the samples per
    /// cluster, in segment order.
    fn assign_step(&self, centres: &[f32], labels: &mut [u32], dists: &mut [f32]) -> SegmentSums {
        let (k, dim) = (self.k, self.dim);
        let centre_norms: Vec<f32> = centres.chunks_exact(dim).map(sq_norm).collect();
        let parts: Vec<SegmentSums> = self
            .segments()
            .zip(labels.par_chunks_mut(SEGMENT_ROWS))
            .zip(dists.par_chunks_mut(SEGMENT_ROWS))
            .map(|(((x, xn), labels), dists)| {
                let mut part = SegmentSums {
                    sums: vec![0.0; k * dim],
                    counts: vec![0; k],
                    changed: 0,
                };
                let mut record = |i: usize, row: &[f32], (c, dist): (usize, f32)| {
                    part.changed += usize::from(labels[i] != c as u32);
                    labels[i] = c as u32;
                    dists[i] = dist;
                    part.counts[c] += 1;
                    linalg::add_row_f64(&mut part.sums[c * dim..(c + 1) * dim], row);
                };
                if k <= DIRECT_MAX_CENTRES {
                    for (i, row) in x.chunks_exact(dim).enumerate() {
                        let nearest =
                            argmin(centres.chunks_exact(dim).map(|c| sq_euclidean(row, c)));
                        record(i, row, nearest);
                    }
                    return part;
                }
                let mut block = vec![0.0f32; BLOCK_ROWS * k];
                for (start, xn) in (0..xn.len()).step_by(BLOCK_ROWS).zip(xn.chunks(BLOCK_ROWS)) {
                    let rows = xn.len();
                    let xb = &x[start * dim..(start + rows) * dim];
                    let block = &mut block[..rows * k];
                    linalg::sq_distances_into(xb, xn, centres, &centre_norms, dim, block);
                    for (r, d) in block.chunks_exact(k).enumerate() {
                        record(
                            start + r,
                            &xb[r * dim..(r + 1) * dim],
                            argmin(d.iter().copied()),
                        );
                    }
                }
                part
            })
            .collect();

        let mut total = SegmentSums {
            sums: vec![0.0; k * dim],
            counts: vec![0; k],
            changed: 0,
        };
        for part in parts {
            total
                .sums
                .iter_mut()
                .zip(&part.sums)
                .for_each(|(a, b)| *a += b);
            total
                .counts
                .iter_mut()
                .zip(&part.counts)
                .for_each(|(a, b)| *a += b);
            total.changed += part.changed;
        }
        total
    }

    /// Give each empty cluster one of the samples farthest from their
    /// centres (largest distance first, lowest index on ties).
    fn relocate_empty(&self, centres: &mut [f32], counts: &[usize], dists: &[f32]) {
        let empty: Vec<usize> = (0..self.k).filter(|&c| counts[c] == 0).collect();
        if empty.is_empty() {
            return;
        }
        let mut order: Vec<usize> = (0..self.n).collect();
        order.sort_by(|&a, &b| dists[b].total_cmp(&dists[a]).then(a.cmp(&b)));
        for (&c, &i) in empty.iter().zip(&order) {
            centres[c * self.dim..(c + 1) * self.dim].copy_from_slice(self.row(i));
        }
    }
}

fn ordered_sum(values: &[f32]) -> f64 {
    values.iter().map(|&v| f64::from(v)).sum()
}

fn ordered_sum_by(n: usize, value: impl Fn(usize) -> f32) -> f64 {
    (0..n).map(|i| f64::from(value(i))).sum()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `per_blob` points around each of `centres` (uniform noise of ±`spread`).
    fn blobs(centres: &[Vec<f32>], per_blob: usize, spread: f32, seed: u64) -> Vec<f32> {
        let mut rng = SplitMix64::new(seed);
        let mut data = Vec::new();
        for c in centres {
            for _ in 0..per_blob {
                data.extend(
                    c.iter()
                        .map(|&v| v + spread * (2.0 * rng.next_f64() as f32 - 1.0)),
                );
            }
        }
        data
    }

    fn three_blob_centres(dim: usize) -> Vec<Vec<f32>> {
        (0..3)
            .map(|b| {
                (0..dim)
                    .map(|j| if j % 3 == b { 10.0 } else { -5.0 })
                    .collect()
            })
            .collect()
    }

    fn params(k: usize, seed: u64) -> KMeansParams {
        KMeansParams {
            k,
            seed,
            ..KMeansParams::default()
        }
    }

    #[test]
    fn recovers_well_separated_blobs() {
        let dim = 7;
        let centres = three_blob_centres(dim);
        let per_blob = 300;
        let data = blobs(&centres, per_blob, 1.0, 1);
        let n = 3 * per_blob;
        let km = KMeans::fit(&data, n, dim, &params(3, 42)).unwrap();

        assert_eq!(km.counts(), &[per_blob; 3]);
        // Each true centre is close to exactly one fitted centre.
        for c in &centres {
            let close = (0..3)
                .filter(|&j| sq_euclidean(c, km.centre(j)) < 0.5)
                .count();
            assert_eq!(close, 1);
        }
        // Labels are constant on each blob.
        let labels = km.assign(&data, n);
        for blob in labels.chunks(per_blob) {
            assert!(blob.iter().all(|&l| l == blob[0]));
        }
        let inertia: f64 = (0..n)
            .map(|i| {
                f64::from(sq_euclidean(
                    &data[i * dim..(i + 1) * dim],
                    km.centre(labels[i]),
                ))
            })
            .sum();
        assert!((km.inertia() - inertia).abs() < 1e-9 * inertia);
    }

    #[test]
    fn unequal_clusters_give_unequal_counts() {
        // The object branch picks the foreground as the smaller cluster.
        let dim = 4;
        let mut data = blobs(&[vec![0.0; dim]], 500, 1.0, 2);
        data.extend(blobs(&[vec![20.0; dim]], 120, 1.0, 3));
        let km = KMeans::fit(&data, 620, dim, &params(2, 0)).unwrap();
        let mut counts = km.counts().to_vec();
        counts.sort();
        assert_eq!(counts, vec![120, 500]);
    }

    #[test]
    fn same_seed_gives_the_same_model() {
        let dim = 5;
        let data = blobs(&three_blob_centres(dim), 200, 6.0, 4);
        let a = KMeans::fit(&data, 600, dim, &params(3, 9)).unwrap();
        let b = KMeans::fit(&data, 600, dim, &params(3, 9)).unwrap();
        assert_eq!(a, b);
    }

    #[test]
    fn result_does_not_depend_on_the_thread_count() {
        // Several segments, so that partial sums are really combined.
        let dim = 24;
        let n = 3 * SEGMENT_ROWS + 517;
        let data = blobs(&three_blob_centres(dim), n / 3 + 1, 12.0, 5);
        let data = &data[..n * dim];
        let p = KMeansParams {
            k: 4,
            n_init: 2,
            ..params(4, 3)
        };
        let run = |threads: usize| {
            let pool = rayon::ThreadPoolBuilder::new()
                .num_threads(threads)
                .build()
                .unwrap();
            pool.install(|| KMeans::fit(data, n, dim, &p).unwrap())
        };
        let one = run(1);
        let two = run(2);
        let three = run(3);
        assert_eq!(one, two);
        assert_eq!(one, three);
        assert_eq!(one.counts().iter().sum::<usize>(), n);

        // Many centres take the gemm path.
        let many = KMeansParams {
            k: DIRECT_MAX_CENTRES + 4,
            n_init: 1,
            ..params(0, 3)
        };
        let run = |threads: usize| {
            let pool = rayon::ThreadPoolBuilder::new()
                .num_threads(threads)
                .build()
                .unwrap();
            pool.install(|| KMeans::fit(data, n, dim, &many).unwrap())
        };
        assert_eq!(run(1), run(2));
    }

    #[test]
    fn many_clusters_are_recovered_through_the_gemm_path() {
        let (dim, per_blob, k) = (8, 40, DIRECT_MAX_CENTRES + 4);
        let mut rng = SplitMix64::new(12);
        let centres: Vec<Vec<f32>> = (0..k)
            .map(|_| (0..dim).map(|_| 100.0 * rng.next_f64() as f32).collect())
            .collect();
        let data = blobs(&centres, per_blob, 0.5, 13);
        let km = KMeans::fit(&data, k * per_blob, dim, &params(k, 4)).unwrap();
        assert_eq!(km.counts(), &vec![per_blob; k][..]);
        let labels = km.assign(&data, k * per_blob);
        for blob in labels.chunks(per_blob) {
            assert!(blob.iter().all(|&l| l == blob[0]));
        }
    }

    #[test]
    fn distances_agree_with_assign() {
        let dim = 3;
        let data = blobs(&three_blob_centres(dim), 50, 2.0, 6);
        let km = KMeans::fit(&data, 150, dim, &params(3, 1)).unwrap();
        let d = km.distances(&data, 150);
        for (row, label) in d.chunks_exact(3).zip(km.assign(&data, 150)) {
            assert!(row.iter().all(|&v| v >= row[label]));
        }
    }

    #[test]
    fn identical_points_do_not_break_the_fit() {
        let data = vec![1.5f32; 10 * 3];
        let km = KMeans::fit(&data, 10, 3, &params(2, 0)).unwrap();
        assert_eq!(km.counts().iter().sum::<usize>(), 10);
        assert_eq!(km.inertia(), 0.0);
    }

    #[test]
    fn k_equal_to_n_puts_one_point_per_cluster() {
        let data = vec![0.0, 0.0, 5.0, 5.0, -5.0, 5.0];
        let km = KMeans::fit(&data, 3, 2, &params(3, 7)).unwrap();
        assert_eq!(km.counts(), &[1, 1, 1]);
        assert_eq!(km.inertia(), 0.0);
    }

    #[test]
    fn rejects_zero_clusters() {
        assert_eq!(params(0, 0).validate(), Err(StatsError::KMeansZeroClusters));
        assert_eq!(
            KMeans::fit(&[0.0; 4], 2, 2, &params(0, 0)),
            Err(StatsError::KMeansZeroClusters)
        );
    }

    #[test]
    fn rejects_more_clusters_than_samples() {
        assert_eq!(
            KMeans::fit(&[0.0; 4], 2, 2, &params(3, 0)),
            Err(StatsError::KMeansTooManyClusters { k: 3, n: 2 })
        );
    }

    #[test]
    fn rejects_zero_inits() {
        let p = KMeansParams {
            n_init: 0,
            ..KMeansParams::default()
        };
        assert_eq!(
            KMeans::fit(&[0.0; 4], 2, 2, &p),
            Err(StatsError::KMeansZeroInits)
        );
    }

    #[test]
    fn rejects_zero_iterations() {
        let p = KMeansParams {
            max_iter: 0,
            ..KMeansParams::default()
        };
        assert_eq!(
            KMeans::fit(&[0.0; 4], 2, 2, &p),
            Err(StatsError::KMeansZeroIterations)
        );
    }

    #[test]
    fn rejects_a_bad_tolerance() {
        for tolerance in [-1.0, f64::NAN] {
            let p = KMeansParams {
                tolerance,
                ..KMeansParams::default()
            };
            assert!(matches!(
                p.validate(),
                Err(StatsError::KMeansInvalidTolerance(_))
            ));
        }
    }

    #[test]
    fn rejects_bad_data() {
        assert_eq!(
            KMeans::fit(&[0.0; 5], 2, 2, &params(1, 0)),
            Err(StatsError::ShapeMismatch {
                len: 5,
                n: 2,
                dim: 2
            })
        );
        assert_eq!(
            KMeans::fit(&[0.0, f32::NAN], 1, 2, &params(1, 0)),
            Err(StatsError::NonFinite { sample: 0, dim: 1 })
        );
    }

    #[test]
    fn from_parts_rebuilds_assignment() {
        let km = KMeans::from_parts(vec![0.0, 0.0, 10.0, 10.0], vec![5, 3], 2).unwrap();
        assert_eq!(km.assign(&[1.0, 1.0, 9.0, 8.0, 5.0, 5.0], 3), vec![0, 1, 0]);
        assert_eq!(
            KMeans::from_parts(vec![0.0; 3], vec![1, 1], 2),
            Err(StatsError::ShapeMismatch {
                len: 3,
                n: 2,
                dim: 2
            })
        );
    }

    #[test]
    fn params_deserialise_with_defaults() {
        let p: KMeansParams = serde_json::from_str(r#"{"k": 3, "seed": 5}"#).unwrap();
        assert_eq!(
            p,
            KMeansParams {
                k: 3,
                seed: 5,
                ..KMeansParams::default()
            }
        );
        assert!(serde_json::from_str::<KMeansParams>(r#"{"clusters": 3}"#).is_err());
        let p: KMeansParams = toml::from_str("k = 2\nn_init = 4").unwrap();
        assert_eq!(p.n_init, 4);
    }

    /// Timing at the object branch's scale (570 images × 25×25 patches × 384).
    /// Run: `cargo test --release --lib timing_ -- --ignored --nocapture`.
    #[test]
    #[ignore]
    fn timing_kmeans_k2_360k_by_384() {
        let (n, dim) = (360_000, 384);
        let data = blobs(&[vec![0.0; dim], vec![1.5; dim]], n / 2, 4.0, 8);
        let start = std::time::Instant::now();
        let km = KMeans::fit(&data, n, dim, &params(2, 0)).unwrap();
        println!(
            "k-means k=2 on {n}x{dim}, n_init={}: {:.2?} ({} iterations in the kept run, counts {:?})",
            DEFAULT_N_INIT,
            start.elapsed(),
            km.n_iter(),
            km.counts()
        );
        assert_eq!(km.counts().iter().sum::<usize>(), n);
    }
}
