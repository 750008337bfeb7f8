//! Image decoding and preprocessing: any bytes either decode to an RGB image
//! that preprocesses to a finite grid, or give an `ImageError`; never a panic.

#![no_main]

use std::path::Path;

use beltad::image_io::{DecodeLimits, decode_rgb};
use beltad::preprocess::GridImage;
use libfuzzer_sys::fuzz_target;

/// Side of the evaluation grid the decoded image is resized to.
const GRID: usize = 28;
/// Side of a branch input resized from the grid.
const BRANCH: usize = 14;
/// Smaller than the CLI defaults so that one execution stays fast; the
/// pixel check itself is the same code.
const LIMITS: DecodeLimits = DecodeLimits {
    max_pixels: 1 << 20,
    max_file_bytes: 1 << 20,
};

fuzz_target!(|data: &[u8]| {
    let Ok(rgb) = decode_rgb(data, Path::new("fuzz-input"), &LIMITS) else {
        return;
    };
    assert!(rgb.width() > 0 && rgb.height() > 0);
    assert!(u64::from(rgb.width()) * u64::from(rgb.height()) <= LIMITS.max_pixels);
    let grid = GridImage::from_rgb(&rgb, GRID);
    assert_eq!(grid.data.len(), GRID * GRID * 3);
    assert!(grid.data.iter().all(|v| v.is_finite()));
    let input = grid.branch_input(BRANCH);
    assert_eq!(input.len(), 3 * BRANCH * BRANCH);
    assert!(input.iter().all(|v| v.is_finite()));
});
