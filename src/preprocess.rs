//! From a decoded image to backbone inputs.
//!
//! An image is resized once to the square evaluation grid (antialiased
//! bicubic) and every branch input is resized from that grid, as the
//! reference does for test images. Training images take the same path: the
//! reference resizes them bilinearly instead, which puts train and test
//! features through different filters; one path for both keeps them
//! comparable. Non-square images are squashed to the square grid (the
//! reference's choice); maps are resized back to the image's own size for
//! display.

use image::RgbImage;

use crate::resample::{Filter, resize};

/// ImageNet channel means, the normalisation every backbone was trained with.
pub const IMAGENET_MEAN: [f32; 3] = [0.485, 0.456, 0.406];
/// ImageNet channel standard deviations.
pub const IMAGENET_STD: [f32; 3] = [0.229, 0.224, 0.225];

/// An image on the square evaluation grid: `(size, size, 3)` interleaved RGB
/// in `[0, 1]` (resampling may overshoot slightly at edges).
#[derive(Debug, Clone)]
pub struct GridImage {
    pub size: usize,
    pub data: Vec<f32>,
}

impl GridImage {
    /// Resizes `rgb` to a `size`×`size` grid.
    pub fn from_rgb(rgb: &RgbImage, size: usize) -> Self {
        let (w, h) = (rgb.width() as usize, rgb.height() as usize);
        let unit: Vec<f32> = rgb.as_raw().iter().map(|&v| f32::from(v) / 255.0).collect();
        let data = resize(&unit, (h, w), 3, (size, size), Filter::Bicubic);
        Self { size, data }
    }

    /// The normalised `(3, size, size)` planar input of a branch.
    pub fn branch_input(&self, size: usize) -> Vec<f32> {
        let resized;
        let hwc = if size == self.size {
            &self.data
        } else {
            resized = resize(
                &self.data,
                (self.size, self.size),
                3,
                (size, size),
                Filter::Bicubic,
            );
            &resized
        };
        normalise_planar(hwc, size * size)
    }
}

/// `(N, 3)` interleaved RGB in `[0, 1]` to ImageNet-normalised `(3, N)` planes.
fn normalise_planar(hwc: &[f32], pixels: usize) -> Vec<f32> {
    let mut out = vec![0.0f32; 3 * pixels];
    for (c, plane) in out.chunks_exact_mut(pixels).enumerate() {
        let (mean, std) = (IMAGENET_MEAN[c], IMAGENET_STD[c]);
        for (o, px) in plane.iter_mut().zip(hwc.chunks_exact(3)) {
            *o = (px[c] - mean) / std;
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn normalisation_matches_imagenet_statistics() {
        let rgb = RgbImage::from_pixel(4, 4, image::Rgb([255, 0, 128]));
        let grid = GridImage::from_rgb(&rgb, 4);
        let input = grid.branch_input(4);
        assert_eq!(input.len(), 3 * 16);
        let want = [
            (1.0 - 0.485) / 0.229,
            (0.0 - 0.456) / 0.224,
            (128.0 / 255.0 - 0.406) / 0.225,
        ];
        for c in 0..3 {
            assert!(
                input[c * 16..(c + 1) * 16]
                    .iter()
                    .all(|v| (v - want[c]).abs() < 1e-5)
            );
        }
    }

    #[test]
    fn non_square_images_fill_the_square_grid() {
        let rgb = RgbImage::from_fn(10, 30, |_, y| image::Rgb([(y * 8) as u8, 0, 0]));
        let grid = GridImage::from_rgb(&rgb, 12);
        assert_eq!(grid.data.len(), 12 * 12 * 3);
        // Red increases from top to bottom over the whole grid.
        let top = grid.data[0];
        let bottom = grid.data[(11 * 12) * 3];
        assert!(top < 0.1 && bottom > 0.8, "{top} {bottom}");
    }
}
