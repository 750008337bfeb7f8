//! Dense linear algebra on row-major buffers: matrix products through the
//! `gemm` crate, squared Euclidean distances, and the Cholesky factor and
//! triangular inverse used for Mahalanobis whitening.
//!
//! Shape convention: a matrix with `rows × cols` entries is a flat slice in
//! row-major order (`m[r * cols + c]`). Views with other strides (a transpose)
//! go through [`MatRef`].
//!
//! Determinism: parallel products split the *output rows* into blocks of a
//! fixed size and run one single-threaded `gemm` per block, so every output
//! entry is summed in the same order whatever the number of rayon threads.

use gemm::Parallelism;
use rayon::prelude::*;
use thiserror::Error;

/// Output rows per task in [`par_matmul`]; fixed so that results do not
/// depend on the number of threads.
pub const PAR_ROW_BLOCK: usize = 64;

/// Independent partial sums in the vector kernels ([`dot`], [`sq_norm`],
/// [`sq_euclidean`]). Sixteen lanes let the compiler use full SIMD registers
/// while the summation order stays fixed by the source, not the instruction set.
const LANES: usize = 16;

/// Scalars `gemm` multiplies for us.
pub trait GemmScalar: Copy + Send + Sync + 'static {
    const ZERO: Self;
    const ONE: Self;
}

impl GemmScalar for f32 {
    const ZERO: Self = 0.0;
    const ONE: Self = 1.0;
}

impl GemmScalar for f64 {
    const ZERO: Self = 0.0;
    const ONE: Self = 1.0;
}

/// Failure of a factorisation.
#[derive(Debug, Error, Clone, PartialEq)]
pub enum LinalgError {
    /// The Cholesky pivot at `index` was not a positive finite number.
    #[error("matrix is not positive definite (pivot {index} is {value:e})")]
    NotPositiveDefinite { index: usize, value: f64 },
}

/// A read-only strided matrix view (`rows × cols`) over a slice.
#[derive(Debug, Clone, Copy)]
pub struct MatRef<'a, T> {
    data: &'a [T],
    offset: usize,
    rows: usize,
    cols: usize,
    row_stride: usize,
    col_stride: usize,
}

impl<'a, T> MatRef<'a, T> {
    /// View `data` as a row-major `rows × cols` matrix.
    ///
    /// Panics if `data.len() != rows * cols` (a caller's shape bug).
    pub fn row_major(data: &'a [T], rows: usize, cols: usize) -> Self {
        assert_eq!(data.len(), rows * cols, "buffer is not {rows}×{cols}");
        Self {
            data,
            offset: 0,
            rows,
            cols,
            row_stride: cols,
            col_stride: 1,
        }
    }

    /// The transposed view (no copy).
    pub fn t(self) -> Self {
        Self {
            rows: self.cols,
            cols: self.rows,
            row_stride: self.col_stride,
            col_stride: self.row_stride,
            ..self
        }
    }

    pub fn rows(&self) -> usize {
        self.rows
    }

    pub fn cols(&self) -> usize {
        self.cols
    }

    /// Rows `start..start + len` of this view.
    pub fn row_range(self, start: usize, len: usize) -> Self {
        assert!(start + len <= self.rows, "row range out of bounds");
        Self {
            offset: self.offset + start * self.row_stride,
            rows: len,
            ..self
        }
    }

    fn ptr(&self) -> *const T {
        // In bounds: `offset` is at most the index of an existing element, or
        // the end of the slice when the view is empty.
        self.data[self.offset..].as_ptr()
    }
}

/// `out (m×n, row-major) = lhs (m×k) · rhs (k×n)`, single-threaded.
pub fn matmul_into<T: GemmScalar>(lhs: MatRef<'_, T>, rhs: MatRef<'_, T>, out: &mut [T]) {
    assert_eq!(lhs.cols, rhs.rows, "inner dimensions differ");
    assert_eq!(
        out.len(),
        lhs.rows * rhs.cols,
        "output buffer has the wrong size"
    );
    if out.is_empty() {
        return;
    }
    if lhs.cols == 0 {
        out.fill(T::ZERO);
        return;
    }
    let n = rhs.cols;
    // SAFETY: the views were bounds-checked when built (every index
    // `offset + r*row_stride + c*col_stride` for r < rows, c < cols lies in
    // the slice), `out` holds exactly m×n row-major entries, and the
    // output does not alias the inputs (it is a unique borrow).
    unsafe {
        gemm::gemm(
            lhs.rows,
            n,
            lhs.cols,
            out.as_mut_ptr(),
            1,
            n as isize,
            false,
            lhs.ptr(),
            lhs.col_stride as isize,
            lhs.row_stride as isize,
            rhs.ptr(),
            rhs.col_stride as isize,
            rhs.row_stride as isize,
            T::ZERO,
            T::ONE,
            false,
            false,
            false,
            Parallelism::None,
        );
    }
}

/// `lhs (m×k) · rhs (k×n)` as a new row-major `m×n` buffer, single-threaded.
pub fn matmul<T: GemmScalar>(lhs: MatRef<'_, T>, rhs: MatRef<'_, T>) -> Vec<T> {
    let mut out = vec![T::ZERO; lhs.rows * rhs.cols];
    matmul_into(lhs, rhs, &mut out);
    out
}

/// `lhs (m×k) · rhs (k×n)` with rayon over blocks of [`PAR_ROW_BLOCK`]
/// output rows; bitwise identical for any number of threads.
pub fn par_matmul<T: GemmScalar>(lhs: MatRef<'_, T>, rhs: MatRef<'_, T>) -> Vec<T> {
    assert_eq!(lhs.cols, rhs.rows, "inner dimensions differ");
    let n = rhs.cols;
    let mut out = vec![T::ZERO; lhs.rows * n];
    if n == 0 {
        return out;
    }
    out.par_chunks_mut(PAR_ROW_BLOCK * n)
        .enumerate()
        .for_each(|(block, chunk)| {
            let rows = chunk.len() / n;
            matmul_into(lhs.row_range(block * PAR_ROW_BLOCK, rows), rhs, chunk);
        });
    out
}

/// Dot product with a fixed summation order.
pub fn dot(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len(), "vectors differ in length");
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx2") {
        // SAFETY: the CPU supports AVX2 (checked just above).
        return unsafe { avx2::dot(a, b) };
    }
    dot_lanes(a, b)
}

/// Squared Euclidean norm with a fixed summation order.
pub fn sq_norm(a: &[f32]) -> f32 {
    dot(a, a)
}

/// Squared Euclidean distance `‖a − b‖²`, summed directly over the
/// differences (no cancellation, unlike the norm expansion).
pub fn sq_euclidean(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len(), "vectors differ in length");
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx2") {
        // SAFETY: the CPU supports AVX2 (checked just above).
        return unsafe { avx2::sq_euclidean(a, b) };
    }
    sq_euclidean_lanes(a, b)
}

/// `sum += row`, widening each value to f64 (cluster and mean sums).
pub fn add_row_f64(sum: &mut [f64], row: &[f32]) {
    assert_eq!(sum.len(), row.len(), "vectors differ in length");
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx2") {
        // SAFETY: the CPU supports AVX2 (checked just above).
        return unsafe { avx2::add_row_f64(sum, row) };
    }
    add_row_f64_plain(sum, row)
}

#[inline(always)]
fn add_row_f64_plain(sum: &mut [f64], row: &[f32]) {
    for (s, &v) in sum.iter_mut().zip(row) {
        *s += f64::from(v);
    }
}

/// The same kernels compiled for AVX2. The lane structure is fixed in the
/// source and no multiply-add is fused, so the results are bitwise those of
/// the portable build; only the speed differs (about 2× on 16-lane loops).
#[cfg(target_arch = "x86_64")]
mod avx2 {
    #[target_feature(enable = "avx2")]
    pub(super) fn dot(a: &[f32], b: &[f32]) -> f32 {
        super::dot_lanes(a, b)
    }

    #[target_feature(enable = "avx2")]
    pub(super) fn sq_euclidean(a: &[f32], b: &[f32]) -> f32 {
        super::sq_euclidean_lanes(a, b)
    }

    #[target_feature(enable = "avx2")]
    pub(super) fn add_row_f64(sum: &mut [f64], row: &[f32]) {
        super::add_row_f64_plain(sum, row)
    }
}

#[inline(always)]
fn dot_lanes(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0.0f32; LANES];
    let mut a_chunks = a.chunks_exact(LANES);
    let mut b_chunks = b.chunks_exact(LANES);
    for (x, y) in (&mut a_chunks).zip(&mut b_chunks) {
        for l in 0..LANES {
            acc[l] += x[l] * y[l];
        }
    }
    for (l, (x, y)) in a_chunks
        .remainder()
        .iter()
        .zip(b_chunks.remainder())
        .enumerate()
    {
        acc[l] += x * y;
    }
    reduce_lanes(&acc)
}

#[inline(always)]
fn sq_euclidean_lanes(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0.0f32; LANES];
    let mut a_chunks = a.chunks_exact(LANES);
    let mut b_chunks = b.chunks_exact(LANES);
    for (x, y) in (&mut a_chunks).zip(&mut b_chunks) {
        for l in 0..LANES {
            let d = x[l] - y[l];
            acc[l] += d * d;
        }
    }
    for (l, (x, y)) in a_chunks
        .remainder()
        .iter()
        .zip(b_chunks.remainder())
        .enumerate()
    {
        let d = x - y;
        acc[l] += d * d;
    }
    reduce_lanes(&acc)
}

/// Pairwise sum of the lanes, in a fixed tree.
#[inline(always)]
fn reduce_lanes(acc: &[f32; LANES]) -> f32 {
    let mut v = *acc;
    let mut width = LANES / 2;
    while width > 0 {
        for l in 0..width {
            v[l] += v[l + width];
        }
        width /= 2;
    }
    v[0]
}

/// Squared norms of the `n` rows of a row-major `n × dim` matrix (parallel).
pub fn row_sq_norms(x: &[f32], n: usize, dim: usize) -> Vec<f32> {
    assert_eq!(x.len(), n * dim, "buffer is not {n}×{dim}");
    if dim == 0 {
        return vec![0.0; n];
    }
    x.par_chunks(dim).map(sq_norm).collect()
}

/// Squared distances between the rows of `x` (`n×dim`) and the rows of `y`
/// (`m×dim`) through `‖x‖² + ‖y‖² − 2·x·y`, clamped at zero, written into
/// `out` (`n×m`, row-major). Single-threaded; callers parallelise over
/// blocks of `x`.
///
/// The expansion turns the work into one `gemm`, but it cancels badly when
/// a distance is small next to the norms; callers that need accurate small
/// distances recompute them with [`sq_euclidean`].
pub fn sq_distances_into(
    x: &[f32],
    x_sq_norms: &[f32],
    y: &[f32],
    y_sq_norms: &[f32],
    dim: usize,
    out: &mut [f32],
) {
    let n = x_sq_norms.len();
    let m = y_sq_norms.len();
    matmul_into(
        MatRef::row_major(x, n, dim),
        MatRef::row_major(y, m, dim).t(),
        out,
    );
    if m == 0 {
        return;
    }
    for (row, &xn) in out.chunks_exact_mut(m).zip(x_sq_norms) {
        for (d, &yn) in row.iter_mut().zip(y_sq_norms) {
            *d = (xn + yn - 2.0 * *d).max(0.0);
        }
    }
}

/// Lower Cholesky factor `L` of a symmetric positive definite `dim × dim`
/// matrix (`a = L·Lᵀ`), row-major with zeros above the diagonal. Only the
/// lower triangle of `a` is read.
pub fn cholesky(a: &[f64], dim: usize) -> Result<Vec<f64>, LinalgError> {
    assert_eq!(a.len(), dim * dim, "matrix is not {dim}×{dim}");
    let mut l = vec![0.0f64; dim * dim];
    for i in 0..dim {
        for j in 0..=i {
            let (done, row_i) = l.split_at(i * dim);
            let row_i = &row_i[..j];
            let row_j = if j == i {
                row_i
            } else {
                &done[j * dim..j * dim + j]
            };
            let s = a[i * dim + j] - dot_f64(row_i, row_j);
            let value = if i == j {
                if !(s.is_finite() && s > 0.0) {
                    return Err(LinalgError::NotPositiveDefinite { index: i, value: s });
                }
                s.sqrt()
            } else {
                s / l[j * dim + j]
            };
            l[i * dim + j] = value;
        }
    }
    Ok(l)
}

/// Inverse of a lower-triangular `dim × dim` matrix with a non-zero
/// diagonal (as returned by [`cholesky`]); the result is lower-triangular.
pub fn lower_triangular_inverse(l: &[f64], dim: usize) -> Vec<f64> {
    assert_eq!(l.len(), dim * dim, "matrix is not {dim}×{dim}");
    let mut w = vec![0.0f64; dim * dim];
    // Row i of W solves W[i,:]·L = e_i restricted to the triangle:
    // W[i,:] = (e_i − Σ_{k<i} L[i,k]·W[k,:]) / L[i,i], rows are contiguous.
    for i in 0..dim {
        let (done, rest) = w.split_at_mut(i * dim);
        let row = &mut rest[..dim];
        row[i] = 1.0;
        for k in 0..i {
            let c = l[i * dim + k];
            if c != 0.0 {
                for (r, &wk) in row[..=k].iter_mut().zip(&done[k * dim..k * dim + k + 1]) {
                    *r -= c * wk;
                }
            }
        }
        let inv_diag = 1.0 / l[i * dim + i];
        for r in &mut row[..=i] {
            *r *= inv_diag;
        }
    }
    w
}

fn dot_f64(a: &[f64], b: &[f64]) -> f64 {
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rng::SplitMix64;

    fn random(n: usize, seed: u64) -> Vec<f32> {
        let mut rng = SplitMix64::new(seed);
        (0..n).map(|_| rng.next_f64() as f32 * 2.0 - 1.0).collect()
    }

    fn naive_matmul(a: &[f64], b: &[f64], m: usize, k: usize, n: usize) -> Vec<f64> {
        let mut c = vec![0.0; m * n];
        for i in 0..m {
            for j in 0..n {
                c[i * n + j] = (0..k).map(|p| a[i * k + p] * b[p * n + j]).sum();
            }
        }
        c
    }

    #[test]
    fn matmul_matches_naive_for_plain_and_transposed_views() {
        let (m, k, n) = (70, 13, 9);
        let a: Vec<f64> = random(m * k, 1).into_iter().map(f64::from).collect();
        let b: Vec<f64> = random(k * n, 2).into_iter().map(f64::from).collect();
        let expected = naive_matmul(&a, &b, m, k, n);
        let got = matmul(MatRef::row_major(&a, m, k), MatRef::row_major(&b, k, n));
        let got_par = par_matmul(MatRef::row_major(&a, m, k), MatRef::row_major(&b, k, n));
        for ((e, g), p) in expected.iter().zip(&got).zip(&got_par) {
            assert!((e - g).abs() < 1e-12 && (e - p).abs() < 1e-12);
        }

        // (Bᵀ)ᵀ with B stored transposed gives the same product.
        let mut bt = vec![0.0; n * k];
        for p in 0..k {
            for j in 0..n {
                bt[j * k + p] = b[p * n + j];
            }
        }
        let via_t = par_matmul(
            MatRef::row_major(&a, m, k),
            MatRef::row_major(&bt, n, k).t(),
        );
        for (e, g) in expected.iter().zip(&via_t) {
            assert!((e - g).abs() < 1e-12);
        }
    }

    #[test]
    fn row_range_of_a_transposed_view_selects_columns() {
        let a: Vec<f64> = (0..12).map(f64::from).collect(); // 3×4
        let at_rows = MatRef::row_major(&a, 3, 4).t().row_range(1, 2); // columns 1..3
        let ones = vec![1.0; 3];
        let sums = matmul(at_rows, MatRef::row_major(&ones, 3, 1));
        assert_eq!(sums, vec![1.0 + 5.0 + 9.0, 2.0 + 6.0 + 10.0]);
    }

    #[test]
    fn vector_kernels_match_naive_sums() {
        let a = random(37, 3);
        let b = random(37, 4);
        let dot_naive: f64 = a.iter().zip(&b).map(|(x, y)| f64::from(x * y)).sum();
        let dist_naive: f64 = a
            .iter()
            .zip(&b)
            .map(|(x, y)| f64::from((x - y) * (x - y)))
            .sum();
        assert!((f64::from(dot(&a, &b)) - dot_naive).abs() < 1e-5);
        assert!((f64::from(sq_euclidean(&a, &b)) - dist_naive).abs() < 1e-5);
        assert_eq!(sq_euclidean(&a, &a), 0.0);
    }

    #[test]
    fn dispatched_kernels_equal_the_portable_ones_bitwise() {
        for len in [1, 15, 16, 17, 128, 301] {
            let a = random(len, 10 + len as u64);
            let b = random(len, 20 + len as u64);
            assert_eq!(dot(&a, &b).to_bits(), dot_lanes(&a, &b).to_bits());
            assert_eq!(
                sq_euclidean(&a, &b).to_bits(),
                sq_euclidean_lanes(&a, &b).to_bits()
            );
        }
    }

    #[test]
    fn sq_distances_match_direct_distances() {
        let (n, m, d) = (5, 7, 19);
        let x = random(n * d, 5);
        let y = random(m * d, 6);
        let mut out = vec![0.0; n * m];
        sq_distances_into(
            &x,
            &row_sq_norms(&x, n, d),
            &y,
            &row_sq_norms(&y, m, d),
            d,
            &mut out,
        );
        for i in 0..n {
            for j in 0..m {
                let direct = sq_euclidean(&x[i * d..(i + 1) * d], &y[j * d..(j + 1) * d]);
                assert!((out[i * m + j] - direct).abs() < 1e-4);
            }
        }
    }

    #[test]
    fn cholesky_reconstructs_and_inverse_is_exact() {
        let d = 6;
        let g: Vec<f64> = random(d * d, 7).into_iter().map(f64::from).collect();
        // a = G·Gᵀ + I is symmetric positive definite.
        let mut a = matmul(MatRef::row_major(&g, d, d), MatRef::row_major(&g, d, d).t());
        for i in 0..d {
            a[i * d + i] += 1.0;
        }
        let l = cholesky(&a, d).unwrap();
        let llt = matmul(MatRef::row_major(&l, d, d), MatRef::row_major(&l, d, d).t());
        for (x, y) in a.iter().zip(&llt) {
            assert!((x - y).abs() < 1e-12);
        }
        let w = lower_triangular_inverse(&l, d);
        let wl = matmul(MatRef::row_major(&w, d, d), MatRef::row_major(&l, d, d));
        for i in 0..d {
            for j in 0..d {
                let expected = if i == j { 1.0 } else { 0.0 };
                assert!((wl[i * d + j] - expected).abs() < 1e-12);
                if j > i {
                    assert_eq!(w[i * d + j], 0.0);
                }
            }
        }
    }

    #[test]
    fn cholesky_rejects_an_indefinite_matrix() {
        let a = [1.0, 2.0, 2.0, 1.0]; // eigenvalues 3 and −1
        assert_eq!(
            cholesky(&a, 2),
            Err(LinalgError::NotPositiveDefinite {
                index: 1,
                value: -3.0
            })
        );
        assert!(cholesky(&[f64::NAN], 1).is_err());
    }
}
