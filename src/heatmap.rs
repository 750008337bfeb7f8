//! Rendering anomaly maps as pictures: a colour-mapped heatmap and an overlay
//! of it on the input image, at the image's own size.
//!
//! Colours use a fixed scale per model (see [`DisplayScale`]), not per-image
//! min-max: a normal image then looks calm and an anomaly stands out, and two
//! heatmaps of the same model can be compared by eye.

use image::{Rgb, RgbImage};

use crate::anomaly_map::AnomalyMap;

/// Weight of the heatmap colour in the overlay.
pub const OVERLAY_ALPHA: f32 = 0.5;

/// Map values to colours: `0` at the bottom of the colour map, `high` and
/// above at the top.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct DisplayScale {
    pub high: f32,
}

impl DisplayScale {
    /// Twice the largest fused-map value seen on held-out normal images, so
    /// normal images sit in the lower half of the colour map.
    pub fn from_normal_max(map_normal_max: f32) -> Self {
        let high = 2.0 * map_normal_max;
        Self {
            high: if high.is_finite() && high > 0.0 {
                high
            } else {
                1.0
            },
        }
    }

    fn unit(self, v: f32) -> f32 {
        (v / self.high).clamp(0.0, 1.0)
    }
}

/// The "jet" colour map (blue → cyan → yellow → red), as most inspection
/// tools draw heatmaps.
pub fn jet(t: f32) -> [u8; 3] {
    let channel =
        |centre: f32| ((1.5 - (4.0 * t - centre).abs()).clamp(0.0, 1.0) * 255.0).round() as u8;
    [channel(3.0), channel(2.0), channel(1.0)]
}

/// The heatmap of `map` resized to `width`×`height`.
pub fn heatmap(map: &AnomalyMap, width: u32, height: u32, scale: DisplayScale) -> RgbImage {
    let resized = map.resized(height as usize, width as usize);
    let mut out = RgbImage::new(width, height);
    for (px, &v) in out.pixels_mut().zip(&resized.data) {
        *px = Rgb(jet(scale.unit(v)));
    }
    out
}

/// `image` with `heat` blended over it.
pub fn overlay(image: &RgbImage, heat: &RgbImage) -> RgbImage {
    let mut out = image.clone();
    for (o, h) in out.pixels_mut().zip(heat.pixels()) {
        for c in 0..3 {
            let v = (1.0 - OVERLAY_ALPHA) * f32::from(o.0[c]) + OVERLAY_ALPHA * f32::from(h.0[c]);
            o.0[c] = v.round() as u8;
        }
    }
    out
}

/// Draws the outline of a binary mask (`width`×`height`) onto `image` in `colour`.
pub fn draw_mask_outline(image: &mut RgbImage, mask: &[bool], colour: [u8; 3]) {
    let (w, h) = (image.width() as usize, image.height() as usize);
    let inside = |x: isize, y: isize| {
        x >= 0
            && y >= 0
            && (x as usize) < w
            && (y as usize) < h
            && mask[y as usize * w + x as usize]
    };
    for y in 0..h as isize {
        for x in 0..w as isize {
            let edge = inside(x, y)
                && !(inside(x - 1, y) && inside(x + 1, y) && inside(x, y - 1) && inside(x, y + 1));
            if edge {
                image.put_pixel(x as u32, y as u32, Rgb(colour));
            }
        }
    }
}

/// PNG bytes of an RGB image.
pub fn png_bytes(image: &RgbImage) -> Result<Vec<u8>, image::ImageError> {
    let mut out = std::io::Cursor::new(Vec::new());
    image.write_to(&mut out, image::ImageFormat::Png)?;
    Ok(out.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn jet_runs_from_blue_to_red() {
        assert_eq!(jet(0.0), [0, 0, 128]);
        assert_eq!(jet(0.5), [128, 255, 128]);
        assert_eq!(jet(1.0), [128, 0, 0]);
    }

    #[test]
    fn values_above_the_scale_saturate() {
        let map = AnomalyMap::new(1, 2, vec![0.0, 10.0]);
        let img = heatmap(&map, 2, 1, DisplayScale { high: 1.0 });
        assert_eq!(img.get_pixel(1, 0).0, jet(1.0));
        assert_eq!(img.get_pixel(0, 0).0, jet(0.0));
    }

    #[test]
    fn overlay_blends_half_and_half() {
        let base = RgbImage::from_pixel(1, 1, Rgb([100, 0, 200]));
        let heat = RgbImage::from_pixel(1, 1, Rgb([200, 100, 0]));
        assert_eq!(overlay(&base, &heat).get_pixel(0, 0).0, [150, 50, 100]);
    }

    #[test]
    fn outline_marks_only_the_border() {
        let mut img = RgbImage::new(5, 5);
        let mask: Vec<bool> = (0..25)
            .map(|i| (1..4).contains(&(i % 5)) && (1..4).contains(&(i / 5)))
            .collect();
        draw_mask_outline(&mut img, &mask, [255, 0, 0]);
        assert_eq!(img.get_pixel(1, 1).0, [255, 0, 0]);
        assert_eq!(img.get_pixel(2, 2).0, [0, 0, 0]);
        assert_eq!(img.get_pixel(0, 0).0, [0, 0, 0]);
    }
}
