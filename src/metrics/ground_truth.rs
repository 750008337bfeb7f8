//! Pixel ground truth: test masks labelled into 8-connected defect regions.
//!
//! Masks are pushed one test image at a time; each mask's defect pixels are
//! split into 8-connected components (a region never spans two images) and
//! numbered `1..=K` across the whole test set in push order, then in raster
//! order of each region's first pixel. Label 0 is a normal pixel.
//!
//! The per-pixel label map is stored run-length encoded: one run per row of a
//! region, so a test set of 1e8 mostly normal pixels costs kilobytes rather
//! than 4 bytes a pixel. [`PixelGroundTruth::image_labels`] expands one image.

use std::ops::Range;

use super::MetricError;

/// Offsets to the 8 neighbours of a pixel, as `(row, column)` steps.
const NEIGHBOURS_8: [(isize, isize); 8] = [
    (-1, -1),
    (-1, 0),
    (-1, 1),
    (0, -1),
    (0, 1),
    (1, -1),
    (1, 0),
    (1, 1),
];

/// A horizontal stretch of one region's pixels, in test-set pixel indices.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) struct LabelRun {
    pub start: usize,
    pub len: usize,
    pub label: u32,
}

impl LabelRun {
    pub(crate) fn end(&self) -> usize {
        self.start + self.len
    }
}

/// Where one pushed image's pixels sit in the concatenated test set.
#[derive(Debug, Clone, Copy, PartialEq)]
struct ImageExtent {
    offset: usize,
    height: usize,
    width: usize,
}

/// Labelled defect regions of every test image, built with
/// [`push_mask`](Self::push_mask) in the same order as the anomaly maps.
#[derive(Debug, Clone, Default)]
pub struct PixelGroundTruth {
    images: Vec<ImageExtent>,
    /// Sorted by `start`, non-overlapping.
    runs: Vec<LabelRun>,
    /// Pixel count of region `k` at index `k - 1`.
    component_sizes: Vec<u64>,
    n_pixels: usize,
}

impl PixelGroundTruth {
    pub fn new() -> Self {
        Self::default()
    }

    /// Appends one test image's mask, `(height, width)` row-major, `true` =
    /// defect pixel; a normal image gets an all-false mask.
    pub fn push_mask(
        &mut self,
        mask: &[bool],
        height: usize,
        width: usize,
    ) -> Result<(), MetricError> {
        if height.checked_mul(width) != Some(mask.len()) {
            return Err(MetricError::MaskShape {
                len: mask.len(),
                height,
                width,
            });
        }
        let offset = self.n_pixels;
        if mask.contains(&true) {
            let (labels, sizes) = label_components(mask, height, width);
            if u32::try_from(self.component_sizes.len() + sizes.len()).is_err() {
                return Err(MetricError::TooManyComponents);
            }
            let first = self.component_sizes.len() as u32;
            self.push_runs(&labels, width, offset, first);
            self.component_sizes.extend(sizes);
        }
        self.images.push(ImageExtent {
            offset,
            height,
            width,
        });
        self.n_pixels += mask.len();
        Ok(())
    }

    /// Appends the runs of one image's local labels (1-based), shifted by
    /// `first` so the ids continue the test set's numbering.
    fn push_runs(&mut self, labels: &[u32], width: usize, offset: usize, first: u32) {
        for (row, row_labels) in labels.chunks_exact(width).enumerate() {
            let mut col = 0;
            while col < width {
                let label = row_labels[col];
                let len = row_labels[col..]
                    .iter()
                    .take_while(|l| **l == label)
                    .count();
                if label != 0 {
                    self.runs.push(LabelRun {
                        start: offset + row * width + col,
                        len,
                        label: first + label,
                    });
                }
                col += len;
            }
        }
    }

    pub fn n_images(&self) -> usize {
        self.images.len()
    }

    /// Pixels over all pushed images.
    pub fn n_pixels(&self) -> usize {
        self.n_pixels
    }

    /// Number of defect regions `K` over all images.
    pub fn n_components(&self) -> usize {
        self.component_sizes.len()
    }

    /// Pixel count of each region; region `k` is at index `k - 1`.
    pub fn component_sizes(&self) -> &[u64] {
        &self.component_sizes
    }

    pub fn n_anomalous_pixels(&self) -> usize {
        self.runs.iter().map(|r| r.len).sum()
    }

    pub fn n_normal_pixels(&self) -> usize {
        self.n_pixels - self.n_anomalous_pixels()
    }

    /// Range of image `index`'s pixels in the concatenated scores.
    pub fn image_pixels(&self, index: usize) -> Option<Range<usize>> {
        let image = self.images.get(index)?;
        Some(image.offset..image.offset + image.height * image.width)
    }

    /// Dense label map `(H, W)` of image `index`: 0 normal, `k` region id.
    pub fn image_labels(&self, index: usize) -> Option<Vec<u32>> {
        let pixels = self.image_pixels(index)?;
        let mut labels = vec![0; pixels.len()];
        let first_run = self.runs.partition_point(|r| r.start < pixels.start);
        for run in self.runs[first_run..]
            .iter()
            .take_while(|r| r.start < pixels.end)
        {
            let local = run.start - pixels.start;
            labels[local..local + run.len].fill(run.label);
        }
        Some(labels)
    }

    pub(crate) fn runs(&self) -> &[LabelRun] {
        &self.runs
    }
}

/// Labels the 8-connected components of a `(height, width)` mask by flood
/// fill: returns a map of local ids (0 = normal, 1-based in raster order of
/// each region's first pixel) and each region's size.
fn label_components(mask: &[bool], height: usize, width: usize) -> (Vec<u32>, Vec<u64>) {
    let mut labels = vec![0u32; mask.len()];
    let mut sizes = Vec::new();
    let mut stack = Vec::new();
    for seed in 0..mask.len() {
        if !mask[seed] || labels[seed] != 0 {
            continue;
        }
        let id = sizes.len() as u32 + 1;
        labels[seed] = id;
        stack.push(seed);
        let mut size = 0;
        while let Some(pixel) = stack.pop() {
            size += 1;
            for n in neighbours(pixel, height, width) {
                if mask[n] && labels[n] == 0 {
                    labels[n] = id;
                    stack.push(n);
                }
            }
        }
        sizes.push(size);
    }
    (labels, sizes)
}

/// Indices of the in-bounds 8-neighbours of `pixel`.
fn neighbours(pixel: usize, height: usize, width: usize) -> impl Iterator<Item = usize> {
    let (row, col) = ((pixel / width) as isize, (pixel % width) as isize);
    NEIGHBOURS_8.iter().filter_map(move |(dr, dc)| {
        let (r, c) = (row + dr, col + dc);
        let inside = (0..height as isize).contains(&r) && (0..width as isize).contains(&c);
        inside.then(|| r as usize * width + c as usize)
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::metrics::naive;
    use crate::rng::SplitMix64;

    fn mask_from(rows: &[&str]) -> (Vec<bool>, usize, usize) {
        let mask = rows
            .iter()
            .flat_map(|r| r.chars().map(|c| c == '#'))
            .collect();
        (mask, rows.len(), rows[0].len())
    }

    fn ground_truth(masks: &[&[&str]]) -> PixelGroundTruth {
        let mut gt = PixelGroundTruth::new();
        for rows in masks {
            let (mask, h, w) = mask_from(rows);
            gt.push_mask(&mask, h, w).unwrap();
        }
        gt
    }

    #[test]
    fn diagonal_neighbours_join_one_region() {
        let gt = ground_truth(&[&["#...", ".#..", "..#.", "...#"]]);
        assert_eq!(gt.component_sizes(), &[4]);
    }

    #[test]
    fn separate_regions_are_numbered_in_raster_order() {
        let gt = ground_truth(&[&["##..", "....", "..##", "..#."]]);
        assert_eq!(gt.component_sizes(), &[2, 3]);
        let labels = gt.image_labels(0).unwrap();
        assert_eq!(labels, vec![1, 1, 0, 0, 0, 0, 0, 0, 0, 0, 2, 2, 0, 0, 2, 0]);
    }

    #[test]
    fn a_u_shape_is_one_region() {
        // The flood fill must reach back up the left arm.
        let gt = ground_truth(&[&["#.#", "#.#", "###"]]);
        assert_eq!(gt.component_sizes(), &[7]);
    }

    #[test]
    fn regions_never_span_images() {
        // Image 0's last pixel and image 1's first would touch if the images
        // were one strip; they must stay two regions.
        let gt = ground_truth(&[&["..", ".#"], &["#.", ".."]]);
        assert_eq!(gt.component_sizes(), &[1, 1]);
        assert_eq!(gt.image_labels(1).unwrap(), vec![2, 0, 0, 0]);
    }

    #[test]
    fn normal_images_count_pixels_but_no_regions() {
        let gt = ground_truth(&[&["...", "..."], &["#..", "..."]]);
        assert_eq!(
            (gt.n_pixels(), gt.n_normal_pixels(), gt.n_anomalous_pixels()),
            (12, 11, 1)
        );
        assert_eq!(gt.n_images(), 2);
        assert_eq!(gt.image_pixels(1), Some(6..12));
        assert_eq!(gt.image_labels(0).unwrap(), vec![0; 6]);
        assert_eq!(gt.image_labels(2), None);
    }

    #[test]
    fn wrong_mask_shape_is_rejected() {
        let mut gt = PixelGroundTruth::new();
        let err = gt.push_mask(&[false; 5], 2, 3).unwrap_err();
        assert_eq!(
            err,
            MetricError::MaskShape {
                len: 5,
                height: 2,
                width: 3
            }
        );
        assert_eq!(gt.n_pixels(), 0);
    }

    #[test]
    fn labels_match_an_independent_labelling_on_random_masks() {
        let mut rng = SplitMix64::new(11);
        for _ in 0..50 {
            let (h, w) = (1 + rng.below(12), 1 + rng.below(12));
            let density = rng.next_f64();
            let mask: Vec<bool> = (0..h * w).map(|_| rng.next_f64() < density).collect();
            let mut gt = PixelGroundTruth::new();
            gt.push_mask(&mask, h, w).unwrap();
            let expected = naive::label_8_connected(&mask, h, w);
            assert_eq!(gt.image_labels(0).unwrap(), expected);
            let total: u64 = gt.component_sizes().iter().sum();
            assert_eq!(total as usize, mask.iter().filter(|m| **m).count());
        }
    }
}
