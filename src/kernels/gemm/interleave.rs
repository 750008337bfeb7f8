//! Interleaving rows into a packed panel, `dst[k·width + r] = rows[r][k]`
//! for `k < kc` (a transposition), with zeros in lanes `r ≥ rows.len()`.
//!
//! This is how a row-major A (or a B stored transposed) is packed. The
//! AVX-512 path transposes 16×16 blocks in registers (64 shuffles per
//! block) instead of moving one float at a time.

/// Rows handled per register block.
const BLOCK: usize = 16;

/// See the module doc. `rows.len() ≤ width`, every row holds `kc` floats
/// and `dst` at least `kc · width`.
pub(super) fn interleave(rows: &[&[f32]], kc: usize, width: usize, dst: &mut [f32]) {
    assert!(
        rows.len() <= width && dst.len() >= kc * width,
        "panel too small"
    );
    assert!(
        rows.iter().all(|r| r.len() >= kc),
        "row shorter than the depth"
    );
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx512f") {
        // SAFETY: AVX-512F is available; extents were checked above.
        return unsafe { avx512(rows, kc, width, dst) };
    }
    portable(rows, kc, width, dst)
}

fn portable(rows: &[&[f32]], kc: usize, width: usize, dst: &mut [f32]) {
    for (k, out) in dst[..kc * width].chunks_exact_mut(width).enumerate() {
        for (r, o) in out.iter_mut().enumerate() {
            *o = rows.get(r).map_or(0.0, |row| row[k]);
        }
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn avx512(rows: &[&[f32]], kc: usize, width: usize, dst: &mut [f32]) {
    use std::arch::x86_64::*;
    let mask = |n: usize| -> __mmask16 { if n >= BLOCK { !0 } else { (1u16 << n) - 1 } };
    for group in 0..width.div_ceil(BLOCK) {
        let lane0 = group * BLOCK;
        let lanes = (width - lane0).min(BLOCK);
        let group_rows = &rows[lane0.min(rows.len())..(lane0 + BLOCK).min(rows.len())];
        let mut k = 0;
        while k < kc {
            let n = (kc - k).min(BLOCK);
            let mut v = [_mm512_setzero_ps(); BLOCK];
            for (vr, row) in v.iter_mut().zip(group_rows) {
                // SAFETY: n floats at k are inside the row (row.len() ≥ kc).
                *vr = unsafe { _mm512_maskz_loadu_ps(mask(n), row.as_ptr().add(k)) };
            }
            transpose(&mut v);
            for (j, vj) in v.iter().take(n).enumerate() {
                // SAFETY: (k + j)·width + lane0 + lanes ≤ kc·width ≤ dst.len().
                unsafe {
                    _mm512_mask_storeu_ps(
                        dst.as_mut_ptr().add((k + j) * width + lane0),
                        mask(lanes),
                        *vj,
                    )
                };
            }
            k += BLOCK;
        }
    }
}

/// In-register 16×16 transpose: afterwards `v[c]` lane `r` is the old `v[r]` lane `c`.
#[cfg(target_arch = "x86_64")]
#[inline]
#[target_feature(enable = "avx512f")]
fn transpose(v: &mut [std::arch::x86_64::__m512; BLOCK]) {
    use std::arch::x86_64::*;
    // Pairs of rows, interleaved within 128-bit lanes.
    let mut t = [_mm512_setzero_ps(); BLOCK];
    for i in 0..BLOCK / 2 {
        t[2 * i] = _mm512_unpacklo_ps(v[2 * i], v[2 * i + 1]);
        t[2 * i + 1] = _mm512_unpackhi_ps(v[2 * i], v[2 * i + 1]);
    }
    // u[4j + m], 128-bit lane L: rows 4j .. 4j+4 of column 4L + m.
    let mut u = [_mm512_setzero_ps(); BLOCK];
    for j in 0..BLOCK / 4 {
        let (t0, t1, t2, t3) = (t[4 * j], t[4 * j + 1], t[4 * j + 2], t[4 * j + 3]);
        u[4 * j] = _mm512_shuffle_ps::<0x44>(t0, t2);
        u[4 * j + 1] = _mm512_shuffle_ps::<0xEE>(t0, t2);
        u[4 * j + 2] = _mm512_shuffle_ps::<0x44>(t1, t3);
        u[4 * j + 3] = _mm512_shuffle_ps::<0xEE>(t1, t3);
    }
    // A 4×4 transpose of 128-bit lanes for each m.
    for m in 0..4 {
        let p0 = _mm512_shuffle_f32x4::<0x88>(u[m], u[4 + m]);
        let p1 = _mm512_shuffle_f32x4::<0xDD>(u[m], u[4 + m]);
        let p2 = _mm512_shuffle_f32x4::<0x88>(u[8 + m], u[12 + m]);
        let p3 = _mm512_shuffle_f32x4::<0xDD>(u[8 + m], u[12 + m]);
        v[m] = _mm512_shuffle_f32x4::<0x88>(p0, p2);
        v[8 + m] = _mm512_shuffle_f32x4::<0xDD>(p0, p2);
        v[4 + m] = _mm512_shuffle_f32x4::<0x88>(p1, p3);
        v[12 + m] = _mm512_shuffle_f32x4::<0xDD>(p1, p3);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dispatched_interleave_equals_the_plain_loop() {
        for (n_rows, kc, width) in [
            (14, 37, 14),
            (3, 16, 14),
            (32, 5, 32),
            (20, 33, 32),
            (0, 4, 6),
            (16, 16, 16),
            (6, 70, 6),
        ] {
            let data: Vec<Vec<f32>> = (0..n_rows)
                .map(|r| (0..kc + 3).map(|k| (r * 1000 + k) as f32).collect())
                .collect();
            let rows: Vec<&[f32]> = data.iter().map(|r| &r[..]).collect();
            let mut fast = vec![f32::NAN; kc * width];
            let mut plain = vec![f32::NAN; kc * width];
            interleave(&rows, kc, width, &mut fast);
            portable(&rows, kc, width, &mut plain);
            assert_eq!(fast, plain, "{n_rows} rows, kc {kc}, width {width}");
            for k in 0..kc {
                for r in 0..width {
                    let want = if r < n_rows {
                        (r * 1000 + k) as f32
                    } else {
                        0.0
                    };
                    assert_eq!(plain[k * width + r], want);
                }
            }
        }
    }
}
