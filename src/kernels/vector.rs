//! Row-wise vector kernels of the transformer: layer norm, softmax and the
//! exact (erf) GELU, with an AVX-512 path (masked tails, no scalar
//! remainder) chosen at run time and a portable path elsewhere.
//!
//! - `exp` (softmax): Cody–Waite reduction `x = n·ln2 + r`, |r| ≤ ln2/2,
//!   degree-7 Taylor polynomial of `e^r`, scaled by `2^n`; ≈ 1 ulp.
//! - `erf` (GELU): on |x| < 4, eight intervals of width ½ with a degree-7
//!   polynomial each in `t = |x| − centre` (least-squares fits at Chebyshev
//!   nodes, made for this crate); |error| ≤ 8·10⁻⁸. `erf = ±1` beyond 4
//!   (erfc(4) ≈ 1.5·10⁻⁸).
//!
//! Every function treats each row alone with a fixed operation order, so
//! results do not depend on how rows are spread over threads.

/// Width of one erf interval.
const ERF_STEP: f32 = 0.5;
/// Number of erf intervals; |x| ≥ `ERF_INTERVALS · ERF_STEP` gives ±1.
const ERF_INTERVALS: usize = 8;
/// Polynomial degree per erf interval.
const ERF_DEGREE: usize = 7;
/// `ERF_POLY[d][i]`: coefficient of `t^d` on interval `i` (`t = |x| − (i + ½)·ERF_STEP`).
/// Padded to 16 lanes for the AVX-512 table lookup.
#[rustfmt::skip]
const ERF_POLY: [[f32; 16]; ERF_DEGREE + 1] = [
    [2.763264e-1, 7.1115565e-1, 9.2290014e-1, 9.866717e-1, 9.985373e-1, 9.998994e-1, 9.999957e-1, 9.999999e-1, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0],
    [1.0600141, 6.4293104e-1, 2.3652112e-1, 5.2774996e-2, 7.1423193e-3, 5.862773e-4, 2.9189012e-5, 8.8142883e-7, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0],
    [-2.6500297e-1, -4.8219815e-1, -2.9565173e-1, -9.2356205e-2, -1.6070157e-2, -1.6122675e-3, -9.4869334e-5, -3.306071e-6, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0],
    [-3.0917048e-1, 2.678835e-2, 1.6753589e-1, 9.015739e-2, 2.1724513e-2, 2.7603803e-3, 1.9581262e-4, 7.970328e-6, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0],
    [1.2693456e-1, 1.5067562e-1, -6.132035e-3, -4.8105523e-2, -1.9088257e-2, -3.2577105e-3, -2.8616944e-4, -1.37854095e-5, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0],
    [8.003627e-2, -5.321709e-2, -4.7186553e-2, 6.618473e-3, 1.066006e-2, 2.756291e-3, 3.1362884e-4, 1.833006e-5, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0],
    [-3.9340794e-2, -2.658283e-2, 2.0597737e-2, 9.049495e-3, -2.779565e-3, -1.6678505e-3, -2.7375843e-4, -2.0692421e-5, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0],
    [-1.580337e-2, 1.7885495e-2, 3.7451107e-3, -5.9330994e-3, -7.215269e-4, 6.358155e-4, 1.7359655e-4, 1.7144726e-5, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0],
];

/// `ln 2` split so that `n · LN2_HI` is exact for the `n` that occur.
const LN2_HI: f32 = 0.693_145_75;
const LN2_LO: f32 = 1.428_606_8e-6;
/// exp overflows above this argument.
const EXP_ARG_MAX: f32 = 88.7;
/// exp is 0 in f32 below this argument.
const EXP_ARG_MIN: f32 = -104.0;
/// `1/k!` for k = 0..=7: Taylor coefficients of `e^r`.
const EXP_TAYLOR: [f32; 8] = [
    1.0,
    1.0,
    0.5,
    1.0 / 6.0,
    1.0 / 24.0,
    1.0 / 120.0,
    1.0 / 720.0,
    1.0 / 5040.0,
];

fn has_avx512() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::arch::is_x86_feature_detected!("avx512f")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// erf by the piecewise polynomial (the portable twin of the AVX-512 path).
pub fn erf(x: f32) -> f32 {
    let ax = x.abs();
    if ax.is_nan() {
        return x;
    }
    let value = if ax >= ERF_INTERVALS as f32 * ERF_STEP {
        1.0
    } else {
        let i = ((ax / ERF_STEP) as usize).min(ERF_INTERVALS - 1);
        let t = ax - (i as f32 * ERF_STEP + ERF_STEP / 2.0);
        let mut p = ERF_POLY[ERF_DEGREE][i];
        for d in (0..ERF_DEGREE).rev() {
            p = p.mul_add(t, ERF_POLY[d][i]);
        }
        p
    };
    value.copysign(x)
}

/// `x · Φ(x) = x/2 · (1 + erf(x/√2))`.
pub fn gelu_erf(x: f32) -> f32 {
    0.5 * x * (1.0 + erf(x * std::f32::consts::FRAC_1_SQRT_2))
}

/// Applies [`gelu_erf`] to every element.
pub fn gelu_erf_in_place(values: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    if has_avx512() {
        // SAFETY: AVX-512F is available (checked just above).
        return unsafe { avx512::gelu_erf_in_place(values) };
    }
    values.iter_mut().for_each(|v| *v = gelu_erf(*v));
}

/// Softmax of one row in place: `e^(x − max) / Σ e^(x − max)`.
pub fn softmax_in_place(row: &mut [f32]) {
    if row.is_empty() {
        return;
    }
    #[cfg(target_arch = "x86_64")]
    if has_avx512() {
        // SAFETY: AVX-512F is available (checked just above).
        return unsafe { avx512::softmax_in_place(row) };
    }
    let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let mut sum = 0.0;
    for v in row.iter_mut() {
        *v = (*v - max).exp();
        sum += *v;
    }
    let inv = 1.0 / sum;
    row.iter_mut().for_each(|v| *v *= inv);
}

/// Column-wise softmax numerators of the `rows × cols` matrix stored
/// row-major with row stride `stride`, in place:
/// `x[i][j] ← e^(x[i][j] − max_i x[i][j])`, and `sums[j] = Σ_i` of the new
/// values (the caller divides by them later).
pub fn softmax_columns_unnormalised(
    data: &mut [f32],
    rows: usize,
    cols: usize,
    stride: usize,
    sums: &mut [f32],
) {
    assert!(cols <= stride && sums.len() == cols, "column count");
    assert!(
        rows == 0 || (rows - 1) * stride + cols <= data.len(),
        "matrix exceeds the buffer"
    );
    if rows == 0 || cols == 0 {
        sums.fill(0.0);
        return;
    }
    #[cfg(target_arch = "x86_64")]
    if has_avx512() {
        // SAFETY: AVX-512F is available (checked just above).
        return unsafe { avx512::softmax_columns(data, rows, cols, stride, sums) };
    }
    for (j, sum) in sums.iter_mut().enumerate() {
        let max = (0..rows)
            .map(|i| data[i * stride + j])
            .fold(f32::NEG_INFINITY, f32::max);
        *sum = 0.0;
        for i in 0..rows {
            let e = (data[i * stride + j] - max).exp();
            data[i * stride + j] = e;
            *sum += e;
        }
    }
}

/// Layer norm of every `d`-wide row of `x` into `out`:
/// `(x − mean) / √(var + eps) · gamma + beta`, biased variance.
pub fn layer_norm_rows(x: &[f32], gamma: &[f32], beta: &[f32], eps: f32, out: &mut [f32]) {
    let d = gamma.len();
    assert!(
        d > 0 && beta.len() == d,
        "layer norm parameters must have the row width"
    );
    assert!(
        x.len() == out.len() && x.len().is_multiple_of(d),
        "rows of width {d}"
    );
    for (row, dst) in x.chunks_exact(d).zip(out.chunks_exact_mut(d)) {
        #[cfg(target_arch = "x86_64")]
        if has_avx512() {
            // SAFETY: AVX-512F is available (checked just above).
            unsafe { avx512::layer_norm_row(row, gamma, beta, eps, dst) };
            continue;
        }
        layer_norm_row_portable(row, gamma, beta, eps, dst);
    }
}

fn layer_norm_row_portable(row: &[f32], gamma: &[f32], beta: &[f32], eps: f32, out: &mut [f32]) {
    let n = row.len() as f32;
    let mean = row.iter().sum::<f32>() / n;
    let var = row.iter().map(|v| (v - mean) * (v - mean)).sum::<f32>() / n;
    let rstd = 1.0 / (var + eps).sqrt();
    for (((o, &v), &g), &b) in out.iter_mut().zip(row).zip(gamma).zip(beta) {
        *o = ((v - mean) * rstd).mul_add(g, b);
    }
}

/// Copies `src` into `dst` (same length) with 16-lane vector moves and a
/// masked tail: for the short row copies of panel packing, where a `memcpy`
/// call costs more than the copy.
#[cfg(target_arch = "x86_64")]
#[inline]
#[target_feature(enable = "avx512f")]
pub(crate) fn copy_avx512(src: &[f32], dst: &mut [f32]) {
    avx512::copy(src, dst)
}

#[cfg(target_arch = "x86_64")]
mod avx512 {
    use super::*;
    use std::arch::x86_64::*;

    const LANES: usize = 16;

    #[inline]
    #[target_feature(enable = "avx512f")]
    pub(super) fn copy(src: &[f32], dst: &mut [f32]) {
        assert_eq!(
            src.len(),
            dst.len(),
            "copy between slices of different lengths"
        );
        for (s, d) in src.chunks(LANES).zip(dst.chunks_mut(LANES)) {
            let m = lanes(s.len());
            // SAFETY: the mask covers exactly the chunk's elements.
            unsafe {
                _mm512_mask_storeu_ps(d.as_mut_ptr(), m, _mm512_maskz_loadu_ps(m, s.as_ptr()))
            };
        }
    }

    /// Mask of the first `n ≤ 16` lanes.
    #[inline]
    fn lanes(n: usize) -> __mmask16 {
        if n >= LANES { !0 } else { (1u16 << n) - 1 }
    }

    #[inline]
    #[target_feature(enable = "avx512f")]
    fn exp(x: __m512) -> __m512 {
        let x = _mm512_max_ps(
            _mm512_min_ps(x, _mm512_set1_ps(EXP_ARG_MAX)),
            _mm512_set1_ps(EXP_ARG_MIN),
        );
        let n = _mm512_roundscale_ps::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(
            _mm512_mul_ps(x, _mm512_set1_ps(std::f32::consts::LOG2_E)),
        );
        let r = _mm512_fnmadd_ps(n, _mm512_set1_ps(LN2_HI), x);
        let r = _mm512_fnmadd_ps(n, _mm512_set1_ps(LN2_LO), r);
        let mut p = _mm512_set1_ps(EXP_TAYLOR[7]);
        for &c in EXP_TAYLOR[..7].iter().rev() {
            p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(c));
        }
        _mm512_scalef_ps(p, n)
    }

    #[inline]
    #[target_feature(enable = "avx512f")]
    fn erf(x: __m512) -> __m512 {
        let sign = _mm512_set1_epi32(i32::MIN);
        let bits = _mm512_castps_si512(x);
        let ax = _mm512_castsi512_ps(_mm512_andnot_si512(sign, bits));
        let limit = ERF_INTERVALS as f32 * ERF_STEP;
        let saturated = _mm512_cmp_ps_mask::<_CMP_GE_OQ>(ax, _mm512_set1_ps(limit));
        let scaled = _mm512_mul_ps(ax, _mm512_set1_ps(1.0 / ERF_STEP));
        let idx = _mm512_min_epi32(
            _mm512_cvttps_epi32(scaled),
            _mm512_set1_epi32(ERF_INTERVALS as i32 - 1),
        );
        let centre = _mm512_fmadd_ps(
            _mm512_cvtepi32_ps(idx),
            _mm512_set1_ps(ERF_STEP),
            _mm512_set1_ps(ERF_STEP / 2.0),
        );
        let t = _mm512_sub_ps(ax, centre);
        // SAFETY: each table row holds 16 floats.
        let coeff =
            |d: usize| unsafe { _mm512_permutexvar_ps(idx, _mm512_loadu_ps(ERF_POLY[d].as_ptr())) };
        let mut p = coeff(ERF_DEGREE);
        for d in (0..ERF_DEGREE).rev() {
            p = _mm512_fmadd_ps(p, t, coeff(d));
        }
        let p = _mm512_mask_mov_ps(p, saturated, _mm512_set1_ps(1.0));
        // Restore the sign of x.
        let sign_bits = _mm512_and_si512(sign, bits);
        _mm512_castsi512_ps(_mm512_or_si512(_mm512_castps_si512(p), sign_bits))
    }

    #[target_feature(enable = "avx512f")]
    pub(super) fn gelu_erf_in_place(values: &mut [f32]) {
        let half = _mm512_set1_ps(0.5);
        let one = _mm512_set1_ps(1.0);
        let scale = _mm512_set1_ps(std::f32::consts::FRAC_1_SQRT_2);
        for chunk in values.chunks_mut(LANES) {
            let m = lanes(chunk.len());
            let p = chunk.as_mut_ptr();
            // SAFETY: the mask covers exactly the chunk's elements.
            unsafe {
                let x = _mm512_maskz_loadu_ps(m, p);
                let e = erf(_mm512_mul_ps(x, scale));
                let y = _mm512_mul_ps(_mm512_mul_ps(half, x), _mm512_add_ps(one, e));
                _mm512_mask_storeu_ps(p, m, y);
            }
        }
    }

    #[target_feature(enable = "avx512f")]
    pub(super) fn softmax_in_place(row: &mut [f32]) {
        let mut vmax = _mm512_set1_ps(f32::NEG_INFINITY);
        for chunk in row.chunks(LANES) {
            // SAFETY: masked load of the chunk's elements.
            let x = unsafe { _mm512_mask_loadu_ps(vmax, lanes(chunk.len()), chunk.as_ptr()) };
            vmax = _mm512_max_ps(vmax, x);
        }
        let max = _mm512_set1_ps(_mm512_reduce_max_ps(vmax));
        let mut vsum = _mm512_setzero_ps();
        for chunk in row.chunks_mut(LANES) {
            let m = lanes(chunk.len());
            let p = chunk.as_mut_ptr();
            // SAFETY: masked access to the chunk's elements.
            unsafe {
                let e = exp(_mm512_sub_ps(_mm512_maskz_loadu_ps(m, p), max));
                let e = _mm512_maskz_mov_ps(m, e);
                vsum = _mm512_add_ps(vsum, e);
                _mm512_mask_storeu_ps(p, m, e);
            }
        }
        let inv = _mm512_set1_ps(1.0 / _mm512_reduce_add_ps(vsum));
        for chunk in row.chunks_mut(LANES) {
            let m = lanes(chunk.len());
            let p = chunk.as_mut_ptr();
            // SAFETY: masked access to the chunk's elements.
            unsafe { _mm512_mask_storeu_ps(p, m, _mm512_mul_ps(_mm512_maskz_loadu_ps(m, p), inv)) };
        }
    }

    #[target_feature(enable = "avx512f")]
    pub(super) fn softmax_columns(
        data: &mut [f32],
        rows: usize,
        cols: usize,
        stride: usize,
        sums: &mut [f32],
    ) {
        for c0 in (0..cols).step_by(LANES) {
            let m = lanes(cols - c0);
            let mut vmax = _mm512_set1_ps(f32::NEG_INFINITY);
            for i in 0..rows {
                // SAFETY: masked lanes c0.. < cols of row i, inside data (asserted by the caller).
                vmax = _mm512_max_ps(vmax, unsafe {
                    _mm512_mask_loadu_ps(vmax, m, data.as_ptr().add(i * stride + c0))
                });
            }
            let mut vsum = _mm512_setzero_ps();
            for i in 0..rows {
                // SAFETY: as above.
                unsafe {
                    let p = data.as_mut_ptr().add(i * stride + c0);
                    let e = _mm512_maskz_mov_ps(
                        m,
                        exp(_mm512_sub_ps(_mm512_maskz_loadu_ps(m, p), vmax)),
                    );
                    vsum = _mm512_add_ps(vsum, e);
                    _mm512_mask_storeu_ps(p, m, e);
                }
            }
            // SAFETY: masked lanes c0.. < cols of sums.
            unsafe { _mm512_mask_storeu_ps(sums.as_mut_ptr().add(c0), m, vsum) };
        }
    }

    #[target_feature(enable = "avx512f")]
    pub(super) fn layer_norm_row(
        row: &[f32],
        gamma: &[f32],
        beta: &[f32],
        eps: f32,
        out: &mut [f32],
    ) {
        let n = row.len();
        let mut vsum = _mm512_setzero_ps();
        for chunk in row.chunks(LANES) {
            // SAFETY: masked load of the chunk's elements.
            vsum = _mm512_add_ps(vsum, unsafe {
                _mm512_maskz_loadu_ps(lanes(chunk.len()), chunk.as_ptr())
            });
        }
        let mean = _mm512_reduce_add_ps(vsum) / n as f32;
        let vmean = _mm512_set1_ps(mean);
        let mut vsq = _mm512_setzero_ps();
        for chunk in row.chunks(LANES) {
            let m = lanes(chunk.len());
            // SAFETY: masked load of the chunk's elements.
            let d =
                unsafe { _mm512_maskz_sub_ps(m, _mm512_maskz_loadu_ps(m, chunk.as_ptr()), vmean) };
            vsq = _mm512_fmadd_ps(d, d, vsq);
        }
        let var = _mm512_reduce_add_ps(vsq) / n as f32;
        let rstd = _mm512_set1_ps(1.0 / (var + eps).sqrt());
        for (start, chunk) in (0..n).step_by(LANES).zip(row.chunks(LANES)) {
            let m = lanes(chunk.len());
            // SAFETY: masked access to `chunk.len()` elements at `start` of
            // row, gamma, beta and out (all of length n).
            unsafe {
                let x = _mm512_maskz_loadu_ps(m, chunk.as_ptr());
                let g = _mm512_maskz_loadu_ps(m, gamma.as_ptr().add(start));
                let b = _mm512_maskz_loadu_ps(m, beta.as_ptr().add(start));
                let y = _mm512_fmadd_ps(_mm512_mul_ps(_mm512_sub_ps(x, vmean), rstd), g, b);
                _mm512_mask_storeu_ps(out.as_mut_ptr().add(start), m, y);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// erf in f64 by its Maclaurin series (|x| ≤ 3) or the asymptotic
    /// continued fraction of erfc (|x| > 3): a reference independent of the fit.
    fn erf_reference(x: f64) -> f64 {
        let ax = x.abs();
        let value = if ax <= 3.0 {
            let mut term = ax;
            let mut sum = ax;
            let mut n = 0.0;
            while term.abs() > 1e-17 * sum.abs() {
                n += 1.0;
                term *= -ax * ax / n;
                sum += term / (2.0 * n + 1.0);
            }
            sum * 2.0 / std::f64::consts::PI.sqrt()
        } else {
            // erfc(x) = e^{-x²}/√π · 1/(x + 1/2/(x + 1/(x + 3/2/(x + …)))).
            let mut f = ax;
            for k in (1..60).rev() {
                f = ax + (k as f64 / 2.0) / f;
            }
            1.0 - (-ax * ax).exp() / (std::f64::consts::PI.sqrt() * f)
        };
        value.copysign(x)
    }

    fn samples() -> Vec<f32> {
        (0..20_001).map(|i| -10.0 + i as f32 * 1e-3).collect()
    }

    #[test]
    fn erf_is_within_1e7_of_the_series() {
        let worst = samples()
            .into_iter()
            .map(|x| (erf(x) as f64 - erf_reference(x as f64)).abs())
            .fold(0.0, f64::max);
        assert!(worst < 1e-7, "max erf error {worst:e}");
        assert_eq!(erf(0.0), 0.0);
        assert_eq!(erf(-5.0), -1.0);
        assert!(erf(f32::NAN).is_nan());
    }

    #[test]
    fn vector_gelu_matches_scalar_and_exact_formula() {
        let xs = samples();
        let mut v = xs.clone();
        gelu_erf_in_place(&mut v);
        for (&x, &y) in xs.iter().zip(&v) {
            let exact = 0.5 * x as f64 * (1.0 + erf_reference(x as f64 / 2f64.sqrt()));
            assert!(
                (y as f64 - exact).abs() <= 1e-7 * (1.0 + x.abs() as f64),
                "gelu({x}) = {y}, exact {exact}"
            );
            assert_eq!(y, gelu_erf(x), "vector and scalar gelu differ at {x}");
        }
    }

    #[test]
    fn softmax_matches_f64_reference_for_odd_lengths() {
        for len in [1usize, 5, 16, 17, 626, 841] {
            let row: Vec<f32> = (0..len)
                .map(|i| ((i * 37 % 101) as f32 - 50.0) * 0.3)
                .collect();
            let max = row
                .iter()
                .copied()
                .fold(f64::NEG_INFINITY, |a, b| a.max(b as f64));
            let exps: Vec<f64> = row.iter().map(|&v| (v as f64 - max).exp()).collect();
            let total: f64 = exps.iter().sum();
            let mut got = row.clone();
            softmax_in_place(&mut got);
            for ((g, e), &v) in got.iter().zip(&exps).zip(&row) {
                let want = e / total;
                // `x − max` is rounded in f32 first: a relative error of ~|x − max|·2⁻²⁴.
                let arg_err = (v as f64 - max).abs() * f32::EPSILON as f64;
                assert!(
                    (*g as f64 - want).abs() <= (3e-7 + arg_err) * want + 1e-30,
                    "len {len}: {g} vs {want}"
                );
            }
        }
        let mut extreme = vec![0.0f32, -200.0, 1e4];
        softmax_in_place(&mut extreme);
        assert_eq!(extreme, vec![0.0, 0.0, 1.0]);
    }

    #[test]
    fn column_softmax_matches_f64_reference() {
        let (rows, stride) = (37, 40);
        for cols in [1usize, 16, 19, 33] {
            let mut data: Vec<f32> = (0..rows * stride)
                .map(|i| ((i * 29 % 53) as f32 - 26.0) * 0.4)
                .collect();
            let original = data.clone();
            let mut sums = vec![f32::NAN; cols];
            softmax_columns_unnormalised(&mut data, rows, cols, stride, &mut sums);
            for j in 0..cols {
                let col: Vec<f64> = (0..rows).map(|i| original[i * stride + j] as f64).collect();
                let max = col.iter().copied().fold(f64::NEG_INFINITY, f64::max);
                let total: f64 = col.iter().map(|v| (v - max).exp()).sum();
                assert!(
                    (sums[j] as f64 - total).abs() < 1e-5 * total,
                    "sum of column {j}"
                );
                for i in 0..rows {
                    let want = (col[i] - max).exp();
                    assert!(
                        (data[i * stride + j] as f64 - want).abs() < 3e-6 * want.max(1e-3),
                        "({i}, {j})"
                    );
                }
            }
            // Columns past `cols` are left alone.
            for i in 0..rows {
                assert_eq!(
                    data[i * stride + cols..(i + 1) * stride],
                    original[i * stride + cols..(i + 1) * stride]
                );
            }
        }
    }

    #[test]
    fn layer_norm_matches_f64_reference() {
        for d in [3usize, 16, 33, 384] {
            let rows = 3;
            let x: Vec<f32> = (0..rows * d)
                .map(|i| ((i * 13 % 29) as f32 - 9.0) * 0.7 + 5.0)
                .collect();
            let gamma: Vec<f32> = (0..d).map(|i| 1.0 + (i % 5) as f32 * 0.1).collect();
            let beta: Vec<f32> = (0..d).map(|i| (i % 3) as f32 * 0.2 - 0.2).collect();
            let mut out = vec![0.0; rows * d];
            layer_norm_rows(&x, &gamma, &beta, 1e-6, &mut out);
            for r in 0..rows {
                let row: Vec<f64> = x[r * d..(r + 1) * d].iter().map(|&v| v as f64).collect();
                let mean = row.iter().sum::<f64>() / d as f64;
                let var = row.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / d as f64;
                for j in 0..d {
                    let want =
                        (row[j] - mean) / (var + 1e-6).sqrt() * gamma[j] as f64 + beta[j] as f64;
                    let got = out[r * d + j] as f64;
                    assert!(
                        (got - want).abs() < 2e-6 * (1.0 + want.abs()),
                        "d {d}: {got} vs {want}"
                    );
                }
            }
        }
    }

    #[test]
    fn portable_layer_norm_agrees_with_dispatched() {
        let d = 50;
        let x: Vec<f32> = (0..d).map(|i| (i as f32).sin() * 3.0).collect();
        let gamma = vec![1.5; d];
        let beta = vec![0.25; d];
        let mut a = vec![0.0; d];
        let mut b = vec![0.0; d];
        layer_norm_rows(&x, &gamma, &beta, 1e-6, &mut a);
        layer_norm_row_portable(&x, &gamma, &beta, 1e-6, &mut b);
        for (p, q) in a.iter().zip(&b) {
            assert!((p - q).abs() < 1e-5, "{p} vs {q}");
        }
    }
}
