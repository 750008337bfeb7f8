//! Register-blocked micro-kernels: `C[MR×NR] (+)= Σ_k a[k]ᵀ · b[k]` over one
//! packed A panel (`kc × MR`, k-major) and one packed B panel (`kc × NR`,
//! k-major), `C` row-major with row stride `ldc`.
//!
//! Every kernel sums each output element over k in increasing order with one
//! accumulator per element, starting from zero, and adds the previous C
//! value (when asked) after the sum; so an element's value depends only on
//! its row of A, its column of B and the depth split, never on where the
//! tile lies or which thread runs it.

/// Signature shared by the kernels: `(kc, a, b, c, ldc, load_c)`.
///
/// # Safety
/// `a` must hold `kc·MR` and `b` `kc·NR` readable floats, `c` must address a
/// writable `MR × NR` tile with row stride `ldc`, and the CPU must support
/// the kernel's instruction set.
pub(super) type KernelFn =
    unsafe fn(kc: usize, a: *const f32, b: *const f32, c: *mut f32, ldc: usize, load_c: bool);

/// AVX-512F kernel: 14 rows × 32 columns, 28 zmm accumulators.
#[cfg(target_arch = "x86_64")]
pub(super) mod avx512 {
    use std::arch::x86_64::*;

    /// Rows per tile.
    pub const MR: usize = 14;
    /// Columns per tile (two 16-lane vectors).
    pub const NR: usize = 32;
    const LANES: usize = 16;

    /// # Safety
    /// See [`super::KernelFn`]; needs AVX-512F.
    #[target_feature(enable = "avx512f")]
    pub unsafe fn kernel(
        kc: usize,
        a: *const f32,
        b: *const f32,
        c: *mut f32,
        ldc: usize,
        load_c: bool,
    ) {
        // SAFETY: the caller guarantees the panel and tile extents.
        unsafe {
            for r in 0..MR {
                let row = c.add(r * ldc).cast::<i8>();
                _mm_prefetch::<_MM_HINT_T0>(row);
                _mm_prefetch::<_MM_HINT_T0>(row.add(NR * 4 - 1));
            }
            let mut lo = [_mm512_setzero_ps(); MR];
            let mut hi = [_mm512_setzero_ps(); MR];
            let (mut a, mut b) = (a, b);
            for _ in 0..kc {
                let b0 = _mm512_loadu_ps(b);
                let b1 = _mm512_loadu_ps(b.add(LANES));
                for r in 0..MR {
                    let av = _mm512_set1_ps(*a.add(r));
                    lo[r] = _mm512_fmadd_ps(av, b0, lo[r]);
                    hi[r] = _mm512_fmadd_ps(av, b1, hi[r]);
                }
                a = a.add(MR);
                b = b.add(NR);
            }
            for r in 0..MR {
                let row = c.add(r * ldc);
                if load_c {
                    lo[r] = _mm512_add_ps(lo[r], _mm512_loadu_ps(row));
                    hi[r] = _mm512_add_ps(hi[r], _mm512_loadu_ps(row.add(LANES)));
                }
                _mm512_storeu_ps(row, lo[r]);
                _mm512_storeu_ps(row.add(LANES), hi[r]);
            }
        }
    }
}

/// AVX2 + FMA kernel: 6 rows × 16 columns, 12 ymm accumulators.
#[cfg(target_arch = "x86_64")]
pub(super) mod avx2 {
    use std::arch::x86_64::*;

    /// Rows per tile.
    pub const MR: usize = 6;
    /// Columns per tile (two 8-lane vectors).
    pub const NR: usize = 16;
    const LANES: usize = 8;

    /// # Safety
    /// See [`super::KernelFn`]; needs AVX2 and FMA.
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn kernel(
        kc: usize,
        a: *const f32,
        b: *const f32,
        c: *mut f32,
        ldc: usize,
        load_c: bool,
    ) {
        // SAFETY: the caller guarantees the panel and tile extents.
        unsafe {
            let mut lo = [_mm256_setzero_ps(); MR];
            let mut hi = [_mm256_setzero_ps(); MR];
            let (mut a, mut b) = (a, b);
            for _ in 0..kc {
                let b0 = _mm256_loadu_ps(b);
                let b1 = _mm256_loadu_ps(b.add(LANES));
                for r in 0..MR {
                    let av = _mm256_broadcast_ss(&*a.add(r));
                    lo[r] = _mm256_fmadd_ps(av, b0, lo[r]);
                    hi[r] = _mm256_fmadd_ps(av, b1, hi[r]);
                }
                a = a.add(MR);
                b = b.add(NR);
            }
            for r in 0..MR {
                let row = c.add(r * ldc);
                if load_c {
                    lo[r] = _mm256_add_ps(lo[r], _mm256_loadu_ps(row));
                    hi[r] = _mm256_add_ps(hi[r], _mm256_loadu_ps(row.add(LANES)));
                }
                _mm256_storeu_ps(row, lo[r]);
                _mm256_storeu_ps(row.add(LANES), hi[r]);
            }
        }
    }
}

/// Portable kernel: 4 rows × 8 columns, plain multiply and add.
pub(super) mod portable {
    /// Rows per tile.
    pub const MR: usize = 4;
    /// Columns per tile.
    pub const NR: usize = 8;

    /// # Safety
    /// See [`super::KernelFn`].
    pub unsafe fn kernel(
        kc: usize,
        a: *const f32,
        b: *const f32,
        c: *mut f32,
        ldc: usize,
        load_c: bool,
    ) {
        // SAFETY: the caller guarantees the panel and tile extents.
        unsafe {
            let a = std::slice::from_raw_parts(a, kc * MR);
            let b = std::slice::from_raw_parts(b, kc * NR);
            let mut acc = [[0.0f32; NR]; MR];
            for (ak, bk) in a.chunks_exact(MR).zip(b.chunks_exact(NR)) {
                for r in 0..MR {
                    for j in 0..NR {
                        acc[r][j] += ak[r] * bk[j];
                    }
                }
            }
            for (r, acc_row) in acc.iter().enumerate() {
                let row = std::slice::from_raw_parts_mut(c.add(r * ldc), NR);
                for (o, &v) in row.iter_mut().zip(acc_row) {
                    *o = if load_c { v + *o } else { v };
                }
            }
        }
    }
}
