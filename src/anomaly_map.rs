//! Anomaly maps: per-pixel anomaly scores on a grid, and the operations the
//! branches apply to them (upsampling, Gaussian smoothing, min-max
//! normalisation).
//!
//! A map is `(height, width)` row-major `f32`.

use crate::resample::{Filter, resize};

/// A map whose range is below this share of its magnitude counts as flat.
pub const FLAT_RANGE: f32 = 1e-5;

/// Gaussian kernels extend to this many σ on each side (scipy's default).
pub const GAUSSIAN_TRUNCATE: f64 = 4.0;

/// A single-channel score map.
#[derive(Debug, Clone, PartialEq)]
pub struct AnomalyMap {
    pub height: usize,
    pub width: usize,
    pub data: Vec<f32>,
}

impl AnomalyMap {
    pub fn new(height: usize, width: usize, data: Vec<f32>) -> Self {
        assert_eq!(
            data.len(),
            height * width,
            "anomaly map data does not match its shape"
        );
        Self {
            height,
            width,
            data,
        }
    }

    /// Bilinear resize (half-pixel centres, as `F.interpolate(mode="bilinear")`).
    pub fn resized(&self, height: usize, width: usize) -> Self {
        let data = resize(
            &self.data,
            (self.height, self.width),
            1,
            (height, width),
            Filter::Bilinear,
        );
        Self::new(height, width, data)
    }

    /// Largest value (−∞ for an empty map).
    pub fn max(&self) -> f32 {
        self.data.iter().copied().fold(f32::NEG_INFINITY, f32::max)
    }

    /// Rescales to `[0, 1]`. A constant map becomes all zeros, and so does a
    /// map whose range is only float rounding (below [`FLAT_RANGE`] of its
    /// magnitude): stretching rounding noise to full range would draw
    /// structure that is not there.
    pub fn min_max_normalised(mut self) -> Self {
        let lo = self.data.iter().copied().fold(f32::INFINITY, f32::min);
        let hi = self.max();
        let range = hi - lo;
        let flat = range.is_nan() || range <= FLAT_RANGE * hi.abs().max(lo.abs());
        for v in &mut self.data {
            *v = if flat { 0.0 } else { (*v - lo) / range };
        }
        self
    }

    /// Gaussian smoothing with σ in pixels, kernel truncated at
    /// [`GAUSSIAN_TRUNCATE`]·σ, borders reflected. σ = 0 leaves the map as is.
    pub fn gaussian_blurred(&self, sigma: f64) -> Self {
        if sigma <= 0.0 {
            return self.clone();
        }
        let radius = (GAUSSIAN_TRUNCATE * sigma + 0.5) as usize;
        self.separable_blur(&gaussian_kernel(radius, sigma))
    }

    /// Gaussian smoothing with an explicit odd kernel side.
    pub fn gaussian_blurred_with_kernel(&self, side: usize, sigma: f64) -> Self {
        if sigma <= 0.0 || side < 3 {
            return self.clone();
        }
        self.separable_blur(&gaussian_kernel(side / 2, sigma))
    }

    /// Elementwise product.
    pub fn product(maps: &[&AnomalyMap]) -> Self {
        let first = maps[0];
        let mut data = first.data.clone();
        for map in &maps[1..] {
            assert_eq!((map.height, map.width), (first.height, first.width));
            for (d, v) in data.iter_mut().zip(&map.data) {
                *d *= v;
            }
        }
        Self::new(first.height, first.width, data)
    }

    fn separable_blur(&self, kernel: &[f32]) -> Self {
        let radius = kernel.len() / 2;
        let (h, w) = (self.height, self.width);
        // Horizontal pass over a reflected copy of each row.
        let mut rows = vec![0.0f32; h * w];
        let mut padded = vec![0.0f32; w + 2 * radius];
        for y in 0..h {
            let src = &self.data[y * w..(y + 1) * w];
            for (i, p) in padded.iter_mut().enumerate() {
                *p = src[reflect(i as isize - radius as isize, w)];
            }
            for (x, out) in rows[y * w..(y + 1) * w].iter_mut().enumerate() {
                *out = kernel.iter().zip(&padded[x..]).map(|(k, v)| k * v).sum();
            }
        }
        let mut out = vec![0.0f32; h * w];
        for (k, kv) in kernel.iter().enumerate() {
            for y in 0..h {
                let sy = reflect(y as isize + k as isize - radius as isize, h);
                let (dst, src) = (&mut out[y * w..(y + 1) * w], &rows[sy * w..(sy + 1) * w]);
                for (d, s) in dst.iter_mut().zip(src) {
                    *d += kv * s;
                }
            }
        }
        Self::new(h, w, out)
    }
}

/// Normalised 1-D Gaussian of side `2·radius + 1`.
fn gaussian_kernel(radius: usize, sigma: f64) -> Vec<f32> {
    let raw: Vec<f64> = (0..=2 * radius)
        .map(|i| {
            let x = i as f64 - radius as f64;
            (-0.5 * x * x / (sigma * sigma)).exp()
        })
        .collect();
    let total: f64 = raw.iter().sum();
    raw.iter().map(|v| (v / total) as f32).collect()
}

/// Mirror an index into `0..len` (`d c b | a b c d | c b a`, scipy's "mirror").
fn reflect(i: isize, len: usize) -> usize {
    if len == 1 {
        return 0;
    }
    let period = 2 * (len as isize - 1);
    let m = i.rem_euclid(period);
    (if m < len as isize { m } else { period - m }) as usize
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn blur_preserves_the_sum_of_an_interior_impulse() {
        let mut data = vec![0.0; 41 * 41];
        data[20 * 41 + 20] = 1.0;
        let map = AnomalyMap::new(41, 41, data).gaussian_blurred(2.0);
        let total: f32 = map.data.iter().sum();
        assert!((total - 1.0).abs() < 1e-4, "{total}");
        // Peak of a 2-D Gaussian with σ = 2 sampled on the grid: about 1/(2πσ²).
        let peak = map.data[20 * 41 + 20];
        assert!(
            (peak - 1.0 / (2.0 * std::f32::consts::PI * 4.0)).abs() < 2e-3,
            "{peak}"
        );
        // Symmetric.
        assert!((map.data[20 * 41 + 17] - map.data[20 * 41 + 23]).abs() < 1e-7);
        assert!((map.data[17 * 41 + 20] - map.data[20 * 41 + 17]).abs() < 1e-7);
    }

    #[test]
    fn blur_keeps_a_constant_map_constant() {
        let map = AnomalyMap::new(5, 7, vec![3.0; 35]).gaussian_blurred(4.0);
        assert!(map.data.iter().all(|v| (v - 3.0).abs() < 1e-5));
    }

    #[test]
    fn reflect_mirrors_without_repeating_the_edge() {
        let idx: Vec<usize> = (-3..7).map(|i| reflect(i, 4)).collect();
        assert_eq!(idx, vec![3, 2, 1, 0, 1, 2, 3, 2, 1, 0]);
    }

    #[test]
    fn min_max_normalisation() {
        let map = AnomalyMap::new(1, 3, vec![2.0, 4.0, 3.0]).min_max_normalised();
        assert_eq!(map.data, vec![0.0, 1.0, 0.5]);
        let flat = AnomalyMap::new(1, 2, vec![5.0, 5.0]).min_max_normalised();
        assert_eq!(flat.data, vec![0.0, 0.0]);
        // Rounding noise of an upsampled constant is not stretched to [0, 1].
        let noisy = AnomalyMap::new(1, 3, vec![0.7, 0.7 + 1e-7, 0.7 - 1e-7]).min_max_normalised();
        assert_eq!(noisy.data, vec![0.0; 3]);
    }

    #[test]
    fn product_multiplies_elementwise() {
        let a = AnomalyMap::new(1, 2, vec![2.0, 3.0]);
        let b = AnomalyMap::new(1, 2, vec![0.5, 2.0]);
        assert_eq!(AnomalyMap::product(&[&a, &b]).data, vec![1.0, 6.0]);
    }

    #[test]
    fn kernel_of_five_with_sigma_one() {
        let k = gaussian_kernel(2, 1.0);
        let e1 = (-0.5f64).exp();
        let e2 = (-2.0f64).exp();
        let total = 1.0 + 2.0 * e1 + 2.0 * e2;
        assert!((k[2] as f64 - 1.0 / total).abs() < 1e-7);
        assert!((k[0] as f64 - e2 / total).abs() < 1e-7);
    }
}
