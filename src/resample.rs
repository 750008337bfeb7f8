//! Separable resampling with PyTorch's antialiased convention.
//!
//! One resampler serves three jobs: resizing images to a branch's input size,
//! upsampling patch-grid anomaly maps to the evaluation size, and resampling
//! DINOv2 position embeddings to a new patch grid. The weights follow
//! `F.interpolate(..., align_corners=False, antialias=True)` (the PIL filter
//! formula): for a scale `s = in/out` the output sample `i` is centred at
//! `c = s·(i + 0.5)` and reads the input taps `j` in
//! `[trunc(c − R + 0.5), trunc(c + R + 0.5))`, clipped to the input, with
//! weight `K((j − c + 0.5)/max(s, 1))` normalised to sum 1, where the support
//! `R = r·max(s, 1)` for a kernel of radius `r`. timm resamples DINOv2
//! position embeddings exactly this way (cubic, a = −0.5), which is why the
//! same code reproduces its tables.
//!
//! For upsampling with the bilinear kernel these weights coincide with plain
//! half-pixel bilinear interpolation, so maps need no second code path.
//!
//! Data is interleaved `(H, W, C)`; a single-channel map is `C = 1`.

/// Interpolation kernel.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Filter {
    /// Triangle kernel, radius 1.
    Bilinear,
    /// Keys cubic kernel, radius 2, with PIL's and PyTorch-antialias's a = −0.5.
    Bicubic,
}

/// Keys' cubic coefficient used by PIL and by PyTorch's antialiased bicubic.
const CUBIC_A: f64 = -0.5;

impl Filter {
    fn radius(self) -> f64 {
        match self {
            Filter::Bilinear => 1.0,
            Filter::Bicubic => 2.0,
        }
    }

    fn weight(self, x: f64) -> f64 {
        let x = x.abs();
        match self {
            Filter::Bilinear => (1.0 - x).max(0.0),
            Filter::Bicubic => {
                let a = CUBIC_A;
                if x < 1.0 {
                    ((a + 2.0) * x - (a + 3.0)) * x * x + 1.0
                } else if x < 2.0 {
                    (((x - 5.0) * x + 8.0) * x - 4.0) * a
                } else {
                    0.0
                }
            }
        }
    }
}

/// The input taps of one output sample: `weights[k]` applies to input `start + k`.
#[derive(Debug, Clone, PartialEq)]
pub struct Taps {
    pub start: usize,
    pub weights: Vec<f32>,
}

/// Per-output-sample taps for resampling an axis of length `in_len` to `out_len`.
pub fn axis_taps(in_len: usize, out_len: usize, filter: Filter) -> Vec<Taps> {
    assert!(in_len > 0 && out_len > 0, "resampling needs non-empty axes");
    let scale = in_len as f64 / out_len as f64;
    let stretch = scale.max(1.0);
    let support = filter.radius() * stretch;
    (0..out_len)
        .map(|i| {
            let centre = scale * (i as f64 + 0.5);
            // Truncation towards zero, as in the reference; negatives clip to 0.
            let lo = ((centre - support + 0.5) as i64).max(0) as usize;
            let hi = ((centre + support + 0.5) as i64).min(in_len as i64) as usize;
            let raw: Vec<f64> = (lo..hi)
                .map(|j| filter.weight((j as f64 - centre + 0.5) / stretch))
                .collect();
            let total: f64 = raw.iter().sum();
            let norm = if total != 0.0 { total } else { 1.0 };
            Taps {
                start: lo,
                weights: raw.iter().map(|w| (w / norm) as f32).collect(),
            }
        })
        .collect()
}

/// How much larger than input and output together the rows-first
/// intermediate may grow before the columns are resampled first instead.
const MAX_INTERMEDIATE_RATIO: usize = 4;

/// Resizes interleaved `(in_h, in_w, channels)` data to `(out_h, out_w, channels)`.
///
/// Rows are resampled first, then columns, as PyTorch does; except for an
/// extreme sliver (say 1×16,000,000 px), whose rows-first intermediate
/// `(in_h, out_w)` would need far more memory than the image itself: there
/// the columns go first (the result differs only by float rounding).
pub fn resize(
    src: &[f32],
    (in_h, in_w): (usize, usize),
    channels: usize,
    (out_h, out_w): (usize, usize),
    filter: Filter,
) -> Vec<f32> {
    assert_eq!(
        src.len(),
        in_h * in_w * channels,
        "resize: data does not match its shape"
    );
    if (in_h, in_w) == (out_h, out_w) {
        return src.to_vec();
    }
    let rows_first = in_h.saturating_mul(out_w);
    let bound = MAX_INTERMEDIATE_RATIO.saturating_mul(in_h * in_w + out_h * out_w);
    if rows_first > bound && out_h * in_w < rows_first {
        let tall = resample_columns(src, (in_h, in_w), channels, out_h, filter);
        return resample_rows(&tall, (out_h, in_w), channels, out_w, filter);
    }
    let wide = resample_rows(src, (in_h, in_w), channels, out_w, filter);
    resample_columns(&wide, (in_h, out_w), channels, out_h, filter)
}

/// Horizontal pass: `(h, in_w, C)` to `(h, out_w, C)`.
fn resample_rows(
    src: &[f32],
    (h, in_w): (usize, usize),
    channels: usize,
    out_w: usize,
    filter: Filter,
) -> Vec<f32> {
    let x_taps = axis_taps(in_w, out_w, filter);
    let mut wide = vec![0.0f32; h * out_w * channels];
    for y in 0..h {
        let row = &src[y * in_w * channels..(y + 1) * in_w * channels];
        let out_row = &mut wide[y * out_w * channels..(y + 1) * out_w * channels];
        for (x, taps) in x_taps.iter().enumerate() {
            let out = &mut out_row[x * channels..(x + 1) * channels];
            for (k, &w) in taps.weights.iter().enumerate() {
                let px = &row[(taps.start + k) * channels..(taps.start + k + 1) * channels];
                for (o, &v) in out.iter_mut().zip(px) {
                    *o += w * v;
                }
            }
        }
    }
    wide
}

/// Vertical pass: `(in_h, w, C)` to `(out_h, w, C)`.
fn resample_columns(
    src: &[f32],
    (in_h, w): (usize, usize),
    channels: usize,
    out_h: usize,
    filter: Filter,
) -> Vec<f32> {
    let y_taps = axis_taps(in_h, out_h, filter);
    let stride = w * channels;
    let mut out = vec![0.0f32; out_h * stride];
    for (y, taps) in y_taps.iter().enumerate() {
        let out_row = &mut out[y * stride..(y + 1) * stride];
        for (k, &w) in taps.weights.iter().enumerate() {
            let in_row = &src[(taps.start + k) * stride..(taps.start + k + 1) * stride];
            for (o, &v) in out_row.iter_mut().zip(in_row) {
                *o += w * v;
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn taps_sum_to_one() {
        for &(i, o) in &[(37, 25), (37, 29), (25, 350), (618, 406), (7, 7), (1, 5)] {
            for filter in [Filter::Bilinear, Filter::Bicubic] {
                for t in axis_taps(i, o, filter) {
                    let s: f32 = t.weights.iter().sum();
                    assert!((s - 1.0).abs() < 1e-5, "{i}->{o} {filter:?}: sum {s}");
                    assert!(t.start + t.weights.len() <= i);
                }
            }
        }
    }

    #[test]
    fn bilinear_upsampling_matches_half_pixel_interpolation() {
        // 2 -> 4: output centres at source coordinates -0.25, 0.25, 0.75, 1.25,
        // clamped at the borders: [a, 0.75a+0.25b, 0.25a+0.75b, b].
        let out = resize(&[1.0, 5.0], (1, 2), 1, (1, 4), Filter::Bilinear);
        let want = [1.0, 2.0, 4.0, 5.0];
        for (o, w) in out.iter().zip(want) {
            assert!((o - w).abs() < 1e-6, "{out:?}");
        }
    }

    #[test]
    fn downsampling_by_two_with_bilinear_is_box_like() {
        // Antialiased triangle of width 2 over a 4 -> 2 reduction: taps at
        // distance 0.5 weigh 0.75, those at 1.5 weigh 0.25, borders renormalised.
        let out = resize(&[0.0, 4.0, 8.0, 12.0], (1, 4), 1, (1, 2), Filter::Bilinear);
        // Sample 0: centre 1.0, taps 0..2 with weights (0.75, 0.75, 0.25) / 1.75.
        let s0 = (0.75 * 0.0 + 0.75 * 4.0 + 0.25 * 8.0) / 1.75;
        let s1 = (0.25 * 4.0 + 0.75 * 8.0 + 0.75 * 12.0) / 1.75;
        assert!(
            (out[0] - s0).abs() < 1e-5 && (out[1] - s1).abs() < 1e-5,
            "{out:?}"
        );
    }

    #[test]
    fn constant_input_stays_constant_and_channels_stay_separate() {
        let src: Vec<f32> = (0..5 * 7).flat_map(|_| [2.0, -3.0]).collect();
        let out = resize(&src, (5, 7), 2, (11, 3), Filter::Bicubic);
        for px in out.chunks(2) {
            assert!((px[0] - 2.0).abs() < 1e-5 && (px[1] + 3.0).abs() < 1e-5);
        }
    }

    #[test]
    fn a_sliver_is_resized_columns_first_without_a_huge_intermediate() {
        // Rows first would need 4,000,000 × 406 × 3 floats (19 GB).
        let n = 4_000_000;
        let src: Vec<f32> = (0..n).flat_map(|i| [(i % 2) as f32, 1.0, 0.0]).collect();
        let out = resize(&src, (n, 1), 3, (406, 406), Filter::Bicubic);
        assert_eq!(out.len(), 406 * 406 * 3);
        for px in out.chunks(3) {
            assert!(
                (px[0] - 0.5).abs() < 1e-3 && (px[1] - 1.0).abs() < 1e-5,
                "{px:?}"
            );
        }
        // Both orders agree up to rounding where both are affordable.
        let src: Vec<f32> = (0..3 * 900).map(|i| (i % 17) as f32).collect();
        let rows = resample_columns(
            &resample_rows(&src, (900, 3), 1, 20, Filter::Bicubic),
            (900, 20),
            1,
            20,
            Filter::Bicubic,
        );
        let columns = resize(&src, (900, 3), 1, (20, 20), Filter::Bicubic);
        for (a, b) in rows.iter().zip(&columns) {
            assert!((a - b).abs() < 1e-4, "{a} {b}");
        }
    }

    #[test]
    fn same_size_is_identity() {
        let src: Vec<f32> = (0..12).map(|v| v as f32).collect();
        assert_eq!(resize(&src, (3, 4), 1, (3, 4), Filter::Bicubic), src);
    }
}
