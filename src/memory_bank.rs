//! PatchCore memory bank: a coreset of training patch features and exact
//! nearest-neighbour search against it.
//!
//! - [`coreset`]: greedy k-center selection of the bank entries.
//! - [`projection`]: the sparse random projection the selection runs on.
//! - [`MemoryBank`]: exact nearest entry (Euclidean) of each query patch,
//!   and the nearest entries of an entry for PatchCore's re-weighting.
//!
//! Shapes: a bank is `n × dim` row-major `f32`; queries are `nq × dim`.

pub mod coreset;
pub mod projection;

pub use coreset::greedy_coreset;
pub use projection::{SparseRandomProjection, jl_min_dim};

use rayon::prelude::*;
use thiserror::Error;

use crate::linalg::{self, MatRef, row_sq_norms, sq_euclidean};

/// Queries per rayon task in [`MemoryBank::nearest`].
const QUERY_BLOCK: usize = 64;

/// Bank entries per `gemm` in [`MemoryBank::nearest`].
const BANK_BLOCK: usize = 1024;

/// Factor on the worst-case rounding bound of the norm expansion, so that
/// the candidate window surely holds the true nearest entry.
const ROUNDING_SAFETY: f32 = 4.0;

/// Why a bank could not be built or searched.
#[derive(Debug, Error, Clone, PartialEq)]
pub enum BankError {
    #[error("the memory bank is empty")]
    Empty,

    #[error("features must have at least one dimension")]
    ZeroDimension,

    #[error("feature buffer holds {len} values, expected {n} rows × {dim} dimensions")]
    ShapeMismatch { len: usize, n: usize, dim: usize },

    #[error("feature row {row} has a non-finite value")]
    NonFinite { row: usize },

    #[error("query buffer holds {len} values, not {nq} queries of the bank dimension {dim}")]
    QueryDimMismatch { len: usize, nq: usize, dim: usize },

    #[error("query {query} has a non-finite value")]
    NonFiniteQuery { query: usize },

    #[error("bank entry {entry} does not exist (the bank has {len} entries)")]
    EntryOutOfRange { entry: usize, len: usize },

    #[error("projection epsilon must lie in (0, 1), got {0}")]
    InvalidEps(f64),

    #[error("projection density must lie in (0, 1], got {0}")]
    InvalidDensity(f64),

    #[error("cannot project {n_features} features to {n_components} components")]
    InvalidProjection {
        n_features: usize,
        n_components: usize,
    },
}

/// Checks that `features` holds `n` finite rows of `dim` values.
pub(crate) fn check_rows(features: &[f32], n: usize, dim: usize) -> Result<(), BankError> {
    if dim == 0 {
        return Err(BankError::ZeroDimension);
    }
    if features.len() != n * dim {
        return Err(BankError::ShapeMismatch {
            len: features.len(),
            n,
            dim,
        });
    }
    match features.iter().position(|v| !v.is_finite()) {
        Some(i) => Err(BankError::NonFinite { row: i / dim }),
        None => Ok(()),
    }
}

/// The memory bank: `n` entries of dimension `dim`, with cached norms.
#[derive(Debug, Clone, PartialEq)]
pub struct MemoryBank {
    features: Vec<f32>,
    n: usize,
    dim: usize,
    sq_norms: Vec<f32>,
}

impl MemoryBank {
    /// A bank holding `features` (`n × dim`); it must not be empty.
    pub fn new(features: Vec<f32>, n: usize, dim: usize) -> Result<Self, BankError> {
        check_rows(&features, n, dim)?;
        if n == 0 {
            return Err(BankError::Empty);
        }
        let sq_norms = row_sq_norms(&features, n, dim);
        Ok(Self {
            features,
            n,
            dim,
            sq_norms,
        })
    }

    /// A bank of the rows `indices` of `features` (`n × dim`), e.g. a coreset.
    pub fn from_rows(
        features: &[f32],
        n: usize,
        dim: usize,
        indices: &[usize],
    ) -> Result<Self, BankError> {
        if dim == 0 {
            return Err(BankError::ZeroDimension);
        }
        if features.len() != n * dim {
            return Err(BankError::ShapeMismatch {
                len: features.len(),
                n,
                dim,
            });
        }
        if let Some(&entry) = indices.iter().find(|&&i| i >= n) {
            return Err(BankError::EntryOutOfRange { entry, len: n });
        }
        let rows = indices
            .iter()
            .flat_map(|&i| &features[i * dim..(i + 1) * dim])
            .copied()
            .collect();
        Self::new(rows, indices.len(), dim)
    }

    /// Number of entries.
    pub fn len(&self) -> usize {
        self.n
    }

    /// Always false: an empty bank cannot be built.
    pub fn is_empty(&self) -> bool {
        self.n == 0
    }

    pub fn dim(&self) -> usize {
        self.dim
    }

    /// All entries (`n × dim`).
    pub fn features(&self) -> &[f32] {
        &self.features
    }

    /// Entry `i` (`dim`).
    pub fn entry(&self, i: usize) -> &[f32] {
        &self.features[i * self.dim..(i + 1) * self.dim]
    }

    /// The exact nearest entry of each of `nq` queries and its Euclidean
    /// distance, the lowest index on ties.
    ///
    /// Candidates come from the norm expansion `‖q‖² + ‖b‖² − 2·q·b`
    /// evaluated with `gemm` in blocks (fast), but that expansion cancels
    /// when a distance is small next to the norms, which is exactly the case
    /// of a normal patch near its bank entry: its absolute error is up to
    /// about `dim · 2⁻²⁴ · (‖q‖ + ‖b‖)²`. Every entry whose expanded distance
    /// is within that bound of the best is kept as a candidate, and the
    /// candidates' distances are recomputed directly from the differences.
    /// So the winner and its distance are those of a brute-force search with
    /// [`sq_euclidean`], not the noisy expansion.
    pub fn nearest(&self, queries: &[f32], nq: usize) -> Result<Vec<(usize, f32)>, BankError> {
        if queries.len() != nq * self.dim {
            return Err(BankError::QueryDimMismatch {
                len: queries.len(),
                nq,
                dim: self.dim,
            });
        }
        if let Some(i) = queries.iter().position(|v| !v.is_finite()) {
            return Err(BankError::NonFiniteQuery {
                query: i / self.dim,
            });
        }
        let bank_norms: Vec<f32> = self.sq_norms.iter().map(|v| v.sqrt()).collect();
        let error_scale = ROUNDING_SAFETY * (self.dim as f32 + 3.0) * f32::EPSILON / 2.0;
        Ok(queries
            .par_chunks(QUERY_BLOCK * self.dim)
            .flat_map_iter(|block| self.nearest_block(block, &bank_norms, error_scale))
            .collect())
    }

    /// Nearest entries for one block of queries.
    fn nearest_block(
        &self,
        queries: &[f32],
        bank_norms: &[f32],
        error_scale: f32,
    ) -> Vec<(usize, f32)> {
        let dim = self.dim;
        let nq = queries.len() / dim;
        let q_sq = row_sq_norms(queries, nq, dim);
        let q_norms: Vec<f32> = q_sq.iter().map(|v| v.sqrt()).collect();
        let mut windows = vec![CandidateWindow::default(); nq];
        let mut dots = vec![0.0f32; nq * BANK_BLOCK];

        for start in (0..self.n).step_by(BANK_BLOCK) {
            let len = BANK_BLOCK.min(self.n - start);
            let bank =
                MatRef::row_major(&self.features[start * dim..(start + len) * dim], len, dim);
            let dots = &mut dots[..nq * len];
            linalg::matmul_into(MatRef::row_major(queries, nq, dim), bank.t(), dots);
            for (q, (window, dots)) in windows.iter_mut().zip(dots.chunks_exact(len)).enumerate() {
                for (b, &dot) in dots.iter().enumerate() {
                    let j = start + b;
                    let expanded = q_sq[q] + self.sq_norms[j] - 2.0 * dot;
                    let bound = error_scale * (q_norms[q] + bank_norms[j]).powi(2);
                    window.offer(j, expanded - bound, expanded + bound);
                }
            }
        }

        windows
            .into_iter()
            .enumerate()
            .map(|(q, window)| {
                let query = &queries[q * dim..(q + 1) * dim];
                let (j, d) = window.resolve(|j| sq_euclidean(query, self.entry(j)));
                (j, d.sqrt())
            })
            .collect()
    }

    /// Entry `entry` itself (distance 0) followed by its `k − 1` nearest
    /// other entries, closest first (lowest index on ties); `k` is capped at
    /// the bank size. PatchCore's re-weighting uses the neighbours of the
    /// nearest entry of the most anomalous patch.
    pub fn k_nearest_entries(
        &self,
        entry: usize,
        k: usize,
    ) -> Result<Vec<(usize, f32)>, BankError> {
        if entry >= self.n {
            return Err(BankError::EntryOutOfRange { entry, len: self.n });
        }
        let k = k.min(self.n);
        if k == 0 {
            return Ok(Vec::new());
        }
        let centre = self.entry(entry);
        let mut others: Vec<(f32, usize)> = self
            .features
            .par_chunks(self.dim)
            .map(|x| sq_euclidean(x, centre))
            .enumerate()
            .filter(|&(j, _)| j != entry)
            .map(|(j, d)| (d, j))
            .collect();
        let by_distance =
            |a: &(f32, usize), b: &(f32, usize)| a.0.total_cmp(&b.0).then(a.1.cmp(&b.1));
        if k - 1 < others.len() {
            others.select_nth_unstable_by(k - 1, by_distance);
            others.truncate(k - 1);
        }
        others.sort_by(by_distance);
        let mut result = vec![(entry, 0.0)];
        result.extend(others.into_iter().map(|(d, j)| (j, d.sqrt())));
        Ok(result)
    }
}

/// Entries that may still be a query's nearest: those whose lower bound on
/// the squared distance does not exceed the smallest upper bound seen.
#[derive(Debug, Clone)]
struct CandidateWindow {
    best_upper: f32,
    candidates: Vec<(usize, f32)>,
    /// Length at which the list is next pruned (doubles when pruning keeps
    /// most candidates, so that many exact ties stay linear).
    prune_at: usize,
}

impl Default for CandidateWindow {
    fn default() -> Self {
        Self {
            best_upper: f32::INFINITY,
            candidates: Vec::new(),
            prune_at: WINDOW_PRUNE_LEN,
        }
    }
}

/// Candidate lists longer than this are pruned against the current best
/// upper bound before growing further.
const WINDOW_PRUNE_LEN: usize = 64;

impl CandidateWindow {
    fn offer(&mut self, entry: usize, lower: f32, upper: f32) {
        if lower > self.best_upper {
            return;
        }
        if upper < self.best_upper {
            self.best_upper = upper;
        }
        if self.candidates.len() >= self.prune_at {
            let limit = self.best_upper;
            self.candidates.retain(|&(_, l)| l <= limit);
            self.prune_at = WINDOW_PRUNE_LEN.max(2 * self.candidates.len());
        }
        self.candidates.push((entry, lower));
    }

    /// The candidate with the smallest exact squared distance (lowest index
    /// on ties; candidates arrive in index order).
    fn resolve(self, exact_sq: impl Fn(usize) -> f32) -> (usize, f32) {
        let mut best = (usize::MAX, f32::INFINITY);
        for (entry, lower) in self.candidates {
            if lower > self.best_upper {
                continue;
            }
            let d = exact_sq(entry);
            if d < best.1 || best.0 == usize::MAX {
                best = (entry, d);
            }
        }
        best
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rng::SplitMix64;

    fn uniform(n: usize, dim: usize, seed: u64, scale: f32, offset: f32) -> Vec<f32> {
        let mut rng = SplitMix64::new(seed);
        (0..n * dim)
            .map(|_| offset + scale * rng.next_f64() as f32)
            .collect()
    }

    fn brute_force(bank: &MemoryBank, queries: &[f32]) -> Vec<(usize, f32)> {
        queries
            .chunks_exact(bank.dim())
            .map(|q| {
                let mut best = (0, f32::INFINITY);
                for j in 0..bank.len() {
                    let d = sq_euclidean(q, bank.entry(j));
                    if d < best.1 {
                        best = (j, d);
                    }
                }
                (best.0, best.1.sqrt())
            })
            .collect()
    }

    #[test]
    fn nearest_equals_brute_force() {
        // Bank sizes across several gemm blocks; queries across several
        // rayon blocks.
        for (n, nq, dim, seed) in [(2500, 150, 24, 1), (700, 70, 130, 2), (1, 5, 3, 3)] {
            let bank = MemoryBank::new(uniform(n, dim, seed, 1.0, 0.0), n, dim).unwrap();
            let queries = uniform(nq, dim, seed + 100, 1.0, 0.0);
            assert_eq!(
                bank.nearest(&queries, nq).unwrap(),
                brute_force(&bank, &queries)
            );
        }
    }

    #[test]
    fn nearest_is_exact_when_the_norm_expansion_cancels() {
        // Large common offset, tiny spread: ‖q‖² ≈ 10⁸ dwarfs the distances,
        // so the expansion alone cannot tell the entries apart.
        let (n, nq, dim) = (400, 60, 16);
        let bank = MemoryBank::new(uniform(n, dim, 4, 0.05, 1000.0), n, dim).unwrap();
        let queries = uniform(nq, dim, 5, 0.05, 1000.0);
        let got = bank.nearest(&queries, nq).unwrap();
        assert_eq!(got, brute_force(&bank, &queries));
        for ((_, d), q) in got.iter().zip(queries.chunks_exact(dim)) {
            assert!(*d < 0.2, "distance {d} for query {:?}", &q[..2]);
        }
    }

    #[test]
    fn ties_and_duplicates_go_to_the_lowest_index() {
        // Entries 1 and 3 are identical; a query on them must return 1.
        let dim = 3;
        let features = vec![5.0, 5.0, 5.0, 1.0, 2.0, 3.0, 9.0, 9.0, 9.0, 1.0, 2.0, 3.0];
        let bank = MemoryBank::new(features, 4, dim).unwrap();
        let got = bank.nearest(&[1.0, 2.0, 3.0, 1.0, 2.0, 3.5], 2).unwrap();
        assert_eq!(got, vec![(1, 0.0), (1, 0.5)]);

        // Equidistant entries: the query (0,0,0) between ±1 on the first axis.
        let bank = MemoryBank::new(vec![1.0, 0.0, 0.0, -1.0, 0.0, 0.0], 2, 3).unwrap();
        assert_eq!(bank.nearest(&[0.0, 0.0, 0.0], 1).unwrap(), vec![(0, 1.0)]);

        // A bank full of duplicates of random rows.
        let (n, dim) = (300, 8);
        let base = uniform(30, dim, 6, 1.0, 0.0);
        let features: Vec<f32> = (0..n)
            .flat_map(|i| base[(i % 30) * dim..(i % 30 + 1) * dim].to_vec())
            .collect();
        let bank = MemoryBank::new(features, n, dim).unwrap();
        let queries = uniform(50, dim, 7, 1.0, 0.0);
        let got = bank.nearest(&queries, 50).unwrap();
        assert_eq!(got, brute_force(&bank, &queries));
        assert!(got.iter().all(|&(j, _)| j < 30));
    }

    #[test]
    fn nearest_does_not_depend_on_the_thread_count() {
        let (n, nq, dim) = (3000, 300, 20);
        let bank = MemoryBank::new(uniform(n, dim, 8, 1.0, 0.0), n, dim).unwrap();
        let queries = uniform(nq, dim, 9, 1.0, 0.0);
        let run = |threads: usize| {
            let pool = rayon::ThreadPoolBuilder::new()
                .num_threads(threads)
                .build()
                .unwrap();
            pool.install(|| bank.nearest(&queries, nq).unwrap())
        };
        assert_eq!(run(1), run(2));
    }

    #[test]
    fn k_nearest_entries_start_with_the_entry_itself() {
        let features = vec![0.0, 0.0, 3.0, 0.0, 1.0, 0.0, 0.0, 0.0, 0.0, 2.0];
        let bank = MemoryBank::new(features, 5, 2).unwrap();
        // Entry 3 duplicates entry 0: the entry itself still comes first.
        assert_eq!(
            bank.k_nearest_entries(3, 3).unwrap(),
            vec![(3, 0.0), (0, 0.0), (2, 1.0)]
        );
        assert_eq!(
            bank.k_nearest_entries(1, 10).unwrap(),
            vec![(1, 0.0), (2, 2.0), (0, 3.0), (3, 3.0), (4, 13f32.sqrt())]
        );
        assert!(bank.k_nearest_entries(1, 0).unwrap().is_empty());
        assert_eq!(
            bank.k_nearest_entries(5, 3),
            Err(BankError::EntryOutOfRange { entry: 5, len: 5 })
        );
    }

    #[test]
    fn k_nearest_entries_match_a_full_sort() {
        let (n, dim) = (500, 6);
        let bank = MemoryBank::new(uniform(n, dim, 10, 1.0, 0.0), n, dim).unwrap();
        let mut all: Vec<(f32, usize)> = (0..n)
            .filter(|&j| j != 17)
            .map(|j| (sq_euclidean(bank.entry(17), bank.entry(j)), j))
            .collect();
        all.sort_by(|a, b| a.0.total_cmp(&b.0).then(a.1.cmp(&b.1)));
        let got = bank.k_nearest_entries(17, 8).unwrap();
        assert_eq!(got[0], (17, 0.0));
        for (g, e) in got[1..].iter().zip(&all) {
            assert_eq!(*g, (e.1, e.0.sqrt()));
        }
    }

    #[test]
    fn rejects_empty_banks_and_bad_shapes() {
        assert_eq!(MemoryBank::new(vec![], 0, 4), Err(BankError::Empty));
        assert_eq!(MemoryBank::new(vec![], 0, 0), Err(BankError::ZeroDimension));
        assert_eq!(
            MemoryBank::new(vec![0.0; 5], 2, 2),
            Err(BankError::ShapeMismatch {
                len: 5,
                n: 2,
                dim: 2
            })
        );
        assert_eq!(
            MemoryBank::new(vec![0.0, 1.0, f32::NAN, 0.0], 2, 2),
            Err(BankError::NonFinite { row: 1 })
        );
        let bank = MemoryBank::new(vec![0.0; 4], 2, 2).unwrap();
        assert_eq!(
            bank.nearest(&[0.0; 3], 1),
            Err(BankError::QueryDimMismatch {
                len: 3,
                nq: 1,
                dim: 2
            })
        );
        assert_eq!(
            bank.nearest(&[0.0, f32::INFINITY], 1),
            Err(BankError::NonFiniteQuery { query: 0 })
        );
        assert!(bank.nearest(&[], 0).unwrap().is_empty());
    }

    #[test]
    fn from_rows_gathers_the_selected_entries() {
        let features: Vec<f32> = (0..12).map(|v| v as f32).collect(); // 4 × 3
        let bank = MemoryBank::from_rows(&features, 4, 3, &[2, 0]).unwrap();
        assert_eq!(bank.features(), &[6.0, 7.0, 8.0, 0.0, 1.0, 2.0]);
        assert_eq!(
            MemoryBank::from_rows(&features, 4, 3, &[4]),
            Err(BankError::EntryOutOfRange { entry: 4, len: 4 })
        );
        assert_eq!(
            MemoryBank::from_rows(&features, 4, 3, &[]),
            Err(BankError::Empty)
        );
    }

    /// Timing of one test image's search (900 patches) against banks of the
    /// texture branch's size. Run:
    /// `cargo test --release --lib timing_ -- --ignored --nocapture`.
    #[test]
    #[ignore]
    fn timing_nearest_900_queries() {
        for (n, dim) in [(2_565, 128), (9_000, 1536)] {
            let bank = MemoryBank::new(uniform(n, dim, 1, 1.0, 0.0), n, dim).unwrap();
            let queries = uniform(900, dim, 2, 1.0, 0.0);
            let start = std::time::Instant::now();
            let got = bank.nearest(&queries, 900).unwrap();
            let first = start.elapsed();
            let start = std::time::Instant::now();
            let _ = bank.nearest(&queries, 900).unwrap();
            println!(
                "nearest of 900 against {n}x{dim}: {first:.2?} (again: {:.2?})",
                start.elapsed()
            );
            assert_eq!(got.len(), 900);
        }
    }
}
