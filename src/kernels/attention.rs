//! Multi-head scaled-dot-product self-attention over the fused q|k|v
//! projection of a ViT, on the packed GEMM.
//!
//! Input `qkv`: `(B·T, 3·H·Dh)` row-major, each row `[q | k | v]` with the
//! heads side by side inside each part, q already multiplied by `1/√Dh`.
//! Output: `(B·T, H·Dh)`, head `h` in columns `h·Dh ..`.
//!
//! For every (image, head), `Kᵀ` and `V` are packed once; then each block
//! of [`ROW_BLOCK_PANELS`] row panels of queries computes its score rows
//! `S = Q·Kᵀ` into a per-thread buffer (kept in L2), applies the row softmax
//! and multiplies by `V` straight into the output. Rows never interact, so
//! results do not depend on the thread count.

use std::cell::RefCell;

use rayon::prelude::*;

use super::AlignedBuf;
use super::gemm::{self, Epilogue, Kernel, Lhs, MatMut, MatRef, PackedB, Rhs};
use super::vector;

/// Query rows per task, in micro-kernel row panels (56 rows for AVX-512).
const ROW_BLOCK_PANELS: usize = 4;

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

/// Packed keys and values, reused from call to call (one per image and head).
#[derive(Debug, Default)]
pub struct AttentionWorkspace {
    keys: Vec<PackedB>,
    values: Vec<PackedB>,
}

thread_local! {
    static SCORES: RefCell<AlignedBuf> = RefCell::new(AlignedBuf::default());
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
        |p: &PackedB, depth, cols| p.kernel() == kernel && p.depth() == depth && p.cols() == cols;
    if workspace.keys.len() != pairs || !workspace.keys.iter().all(|p| fits(p, hd, t)) {
        workspace.keys = (0..pairs)
            .map(|_| PackedB::with_size(kernel, hd, t))
            .collect();
        workspace.values = (0..pairs)
            .map(|_| PackedB::with_size(kernel, t, hd))
            .collect();
    }
    // Kᵀ (Dh × T) and V (T × Dh) of image b, head h: strided views into qkv.
    workspace
        .keys
        .par_iter_mut()
        .zip(workspace.values.par_iter_mut())
        .enumerate()
        .for_each(|(pair, (keys, values))| {
            let (b, h) = (pair / heads, pair % heads);
            let base = b * t * 3 * d + h * hd;
            let k_view = MatRef::new(&qkv[base + d..], t, hd, 3 * d, 1);
            keys.repack(&k_view.t());
            values.repack(&MatRef::new(&qkv[base + 2 * d..], t, hd, 3 * d, 1));
        });

    let rows_per_task = ROW_BLOCK_PANELS * kernel.mr();
    let blocks = t.div_ceil(rows_per_task);
    let out_ptr = SendPtr(out.as_mut_ptr());
    let workspace = &*workspace;
    (0..pairs * blocks).into_par_iter().for_each(|task| {
        let (pair, block) = (task / blocks, task % blocks);
        let (b, h) = (pair / heads, pair % heads);
        let r0 = block * rows_per_task;
        let rows = rows_per_task.min(t - r0);
        let q = MatRef::new(&qkv[(b * t + r0) * 3 * d + h * hd..], rows, hd, 3 * d, 1);
        SCORES.with(|scores| {
            let mut scores = scores.borrow_mut();
            scores.ensure(rows * t);
            let s = &mut scores.as_mut_slice()[..rows * t];
            let epi = Epilogue::default();
            gemm::gemm_serial(
                kernel,
                Lhs::Source(&q),
                Rhs::Packed(&workspace.keys[pair]),
                MatMut::row_major(s, rows, t),
                &epi,
            );
            s.chunks_exact_mut(t).for_each(vector::softmax_in_place);
            let p = MatRef::row_major(s, rows, t);
            // SAFETY: rows r0.. of image b, columns h·Dh .. (h+1)·Dh of the
            // output: inside `out`, and written by this task only.
            let o = unsafe {
                let at = out_ptr.get().add((b * t + r0) * d + h * hd);
                MatMut::from_raw_parts(at, rows, hd, d)
            };
            gemm::gemm_serial(
                kernel,
                Lhs::Source(&p),
                Rhs::Packed(&workspace.values[pair]),
                o,
                &epi,
            );
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
