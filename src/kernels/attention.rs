//! Multi-head scaled-dot-product self-attention over the fused q|k|v
//! projection of a ViT, on the packed GEMM.
//!
//! Input `qkv`: `(B·T, 3·H·Dh)` row-major, each row `[q | k | v]` with the
//! heads side by side inside each part, q already multiplied by `1/√Dh`.
//! Output: `(B·T, H·Dh)`, head `h` in columns `h·Dh ..`.
//!
//! The products are taken transposed, so that no score matrix has to be
//! re-packed: for every (image, head), `K` (`T × Dh`) and `Vᵀ` (`Dh × T`)
//! are packed once as left operands; then each block of `NR` queries (one
//! micro-kernel column panel) computes
//! - `Sᵀ = K·Q_blockᵀ` (`T × NR`), written straight into a one-panel packed
//!   right operand,
//! - the softmax numerators column by column, `E = exp(Sᵀ − column max)`,
//!   and the column sums,
//! - `Oᵀ = Vᵀ·E` (`Dh × NR`), copied transposed into the output rows and
//!   divided by the sums.
//!
//! Queries never interact, so results do not depend on the thread count.

use std::cell::RefCell;

use rayon::prelude::*;

use super::gemm::{self, Epilogue, Kernel, Lhs, MatMut, MatRef, PackedA, PackedB, Rhs};
use super::vector;

/// Sizes of one attention call.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AttentionShape {
    pub batch: usize,
    pub tokens: usize,
    pub heads: usize,
    pub head_dim: usize,
}

impl AttentionShape {
    fn width(&self) -> usize {
        self.heads * self.head_dim
    }

    /// Multiply-adds ×2 of the two products (`Q·Kᵀ` and `P·V`).
    pub fn flops(&self) -> f64 {
        2.0 * gemm::flops(self.tokens, self.head_dim, self.tokens)
            * (self.batch * self.heads) as f64
    }
}

/// Packed keys and transposed values, reused from call to call (one per
/// image and head).
#[derive(Debug, Default)]
pub struct AttentionWorkspace {
    keys: Vec<PackedA>,
    values_t: Vec<PackedA>,
}

/// Per-thread buffers of one query block.
struct BlockScratch {
    /// `Sᵀ`, then `E`: one packed panel of `T × NR`.
    scores: PackedB,
    /// `Oᵀ`, `Dh × NR`.
    out_t: Vec<f32>,
    /// `O` of the block, `NR × Dh`.
    out: Vec<f32>,
    sums: Vec<f32>,
}

thread_local! {
    static SCRATCH: RefCell<Option<BlockScratch>> = const { RefCell::new(None) };
}

/// Softmax attention of every head of every image; see the module doc.
pub fn multi_head_attention(
    kernel: Kernel,
    shape: AttentionShape,
    qkv: &[f32],
    out: &mut [f32],
    workspace: &mut AttentionWorkspace,
) {
    let AttentionShape {
        batch,
        tokens: t,
        heads,
        head_dim: hd,
    } = shape;
    let d = shape.width();
    assert_eq!(qkv.len(), batch * t * 3 * d, "qkv must be (B·T, 3·H·Dh)");
    assert_eq!(out.len(), batch * t * d, "output must be (B·T, H·Dh)");
    if qkv.is_empty() {
        return;
    }
    let pairs = batch * heads;
    let fits =
        |p: &PackedA, rows, depth| p.kernel() == kernel && p.rows() == rows && p.depth() == depth;
    if workspace.keys.len() != pairs || !workspace.keys.iter().all(|p| fits(p, t, hd)) {
        workspace.keys = (0..pairs)
            .map(|_| PackedA::with_size(kernel, t, hd))
            .collect();
        workspace.values_t = (0..pairs)
            .map(|_| PackedA::with_size(kernel, hd, t))
            .collect();
    }
    // K (T × Dh) and Vᵀ (Dh × T) of image b, head h: strided views into qkv.
    workspace
        .keys
        .par_iter_mut()
        .zip(workspace.values_t.par_iter_mut())
        .enumerate()
        .for_each(|(pair, (keys, values_t))| {
            let (b, h) = (pair / heads, pair % heads);
            let base = b * t * 3 * d + h * hd;
            keys.repack(&MatRef::new(&qkv[base + d..], t, hd, 3 * d, 1));
            values_t.repack(&MatRef::new(&qkv[base + 2 * d..], t, hd, 3 * d, 1).t());
        });

    let nr = kernel.nr();
    let blocks = t.div_ceil(nr);
    let out_ptr = SendPtr(out.as_mut_ptr());
    let workspace = &*workspace;
    (0..pairs * blocks).into_par_iter().for_each(|task| {
        let (pair, block) = (task / blocks, task % blocks);
        let (b, h) = (pair / heads, pair % heads);
        let q0 = block * nr;
        let queries = nr.min(t - q0);
        // Qᵀ of the block: Dh × queries.
        let q_t = MatRef::new(&qkv[(b * t + q0) * 3 * d + h * hd..], queries, hd, 3 * d, 1).t();
        SCRATCH.with(|cell| {
            let mut cell = cell.borrow_mut();
            let fresh = |s: &BlockScratch| {
                s.scores.kernel() == kernel
                    && s.scores.depth() == t
                    && s.sums.len() == nr
                    && s.out_t.len() == hd * nr
            };
            if !cell.as_ref().is_some_and(fresh) {
                *cell = Some(BlockScratch {
                    scores: PackedB::with_size(kernel, t, nr),
                    out_t: vec![0.0; hd * nr],
                    out: vec![0.0; nr * hd],
                    sums: vec![0.0; nr],
                });
            }
            let Some(scratch) = cell.as_mut() else { return };
            let epi = Epilogue::default();
            {
                let Some(s_t) = scratch.scores.single_panel_mut() else {
                    unreachable!("the score panel is NR columns wide")
                };
                gemm::gemm_serial(
                    kernel,
                    Lhs::Packed(&workspace.keys[pair]),
                    Rhs::Source(&q_t),
                    MatMut::new(s_t, t, queries, nr),
                    &epi,
                );
                vector::softmax_columns_unnormalised(
                    s_t,
                    t,
                    queries,
                    nr,
                    &mut scratch.sums[..queries],
                );
            }
            gemm::gemm_serial(
                kernel,
                Lhs::Packed(&workspace.values_t[pair]),
                Rhs::Packed(&scratch.scores),
                MatMut::row_major(&mut scratch.out_t, hd, nr),
                &epi,
            );
            // O = (Oᵀ)ᵀ, then each query row divided by its softmax sum.
            gemm::transpose_into(&scratch.out_t, hd, nr, queries, &mut scratch.out);
            for (j, row) in scratch.out.chunks_exact(hd).take(queries).enumerate() {
                let inv = 1.0 / scratch.sums[j];
                // SAFETY: row q0 + j of image b, columns h·Dh .. (h+1)·Dh of
                // the output: inside `out`, and written by this task only.
                let dst = unsafe {
                    std::slice::from_raw_parts_mut(
                        out_ptr.get().add((b * t + q0 + j) * d + h * hd),
                        hd,
                    )
                };
                for (o, &v) in dst.iter_mut().zip(row) {
                    *o = v * inv;
                }
            }
        });
    });
}

/// A raw output pointer shared by tasks that write disjoint parts.
#[derive(Clone, Copy)]
struct SendPtr(*mut f32);
// SAFETY: only used to build views of disjoint regions (see the call site).
unsafe impl Send for SendPtr {}
// SAFETY: as above.
unsafe impl Sync for SendPtr {}

impl SendPtr {
    fn get(self) -> *mut f32 {
        self.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rng::SplitMix64;

    /// Attention in f64, straight from the definition.
    fn reference(shape: AttentionShape, qkv: &[f32]) -> Vec<f64> {
        let AttentionShape {
            batch,
            tokens: t,
            heads,
            head_dim: hd,
        } = shape;
        let d = heads * hd;
        let at = |b: usize, i: usize, part: usize, h: usize, c: usize| {
            qkv[(b * t + i) * 3 * d + part * d + h * hd + c] as f64
        };
        let mut out = vec![0.0; batch * t * d];
        for b in 0..batch {
            for h in 0..heads {
                for i in 0..t {
                    let scores: Vec<f64> = (0..t)
                        .map(|j| (0..hd).map(|c| at(b, i, 0, h, c) * at(b, j, 1, h, c)).sum())
                        .collect();
                    let max = scores.iter().copied().fold(f64::NEG_INFINITY, f64::max);
                    let e: Vec<f64> = scores.iter().map(|s| (s - max).exp()).collect();
                    let total: f64 = e.iter().sum();
                    for c in 0..hd {
                        out[(b * t + i) * d + h * hd + c] =
                            (0..t).map(|j| e[j] / total * at(b, j, 2, h, c)).sum();
                    }
                }
            }
        }
        out
    }

    fn run(kernel: Kernel, shape: AttentionShape, qkv: &[f32], threads: usize) -> Vec<f32> {
        let mut out = vec![f32::NAN; shape.batch * shape.tokens * shape.width()];
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .build()
            .unwrap();
        let mut ws = AttentionWorkspace::default();
        pool.install(|| multi_head_attention(kernel, shape, qkv, &mut out, &mut ws));
        // A second call reuses the workspace and must give the same result.
        let mut again = vec![0.0; out.len()];
        pool.install(|| multi_head_attention(kernel, shape, qkv, &mut again, &mut ws));
        assert_eq!(out, again);
        out
    }

    #[test]
    fn matches_the_definition_and_is_thread_count_independent() {
        let shape = AttentionShape {
            batch: 2,
            tokens: 61,
            heads: 3,
            head_dim: 20,
        };
        let mut rng = SplitMix64::new(42);
        let qkv: Vec<f32> = (0..shape.batch * shape.tokens * 3 * shape.width())
            .map(|_| (2.0 * rng.next_f64() - 1.0) as f32 * 1.5)
            .collect();
        let want = reference(shape, &qkv);
        for kernel in Kernel::available() {
            let got = run(kernel, shape, &qkv, 1);
            for (g, w) in got.iter().zip(&want) {
                assert!((*g as f64 - w).abs() < 1e-5, "{kernel:?}: {g} vs {w}");
            }
            let three = run(kernel, shape, &qkv, 3);
            assert!(
                got.iter()
                    .zip(&three)
                    .all(|(a, b)| a.to_bits() == b.to_bits()),
                "{kernel:?}"
            );
        }
    }
}
