//! Every image and mask of the shipped data sets decodes, and every mask
//! matches its image: guards the decoder's strictness (e.g. the truncated-JPEG
//! check) against refusing real files.

use std::path::Path;

use beltad::dataset;
use beltad::image_io::{DecodeLimits, load_mask, load_rgb};

#[test]
fn all_shipped_images_and_masks_load() {
    let data = Path::new(env!("CARGO_MANIFEST_DIR")).join("../shared/data");
    let limits = DecodeLimits::default();
    let mut images = 0;
    for entry in std::fs::read_dir(&data).unwrap() {
        let root = entry.unwrap().path();
        if !dataset::is_mvtec(&root) {
            continue;
        }
        for path in dataset::training_images(&root).unwrap() {
            load_rgb(&path, &limits).unwrap();
            images += 1;
        }
        for sample in dataset::test_samples(&root).unwrap() {
            let rgb = load_rgb(&sample.image, &limits).unwrap();
            if let Some(mask) = &sample.mask {
                let m = load_mask(mask, rgb.dimensions(), &limits).unwrap();
                assert!(m.iter().any(|&v| v), "{}: empty mask", mask.display());
            }
            images += 1;
        }
    }
    assert!(
        images > 1500,
        "only {images} images found under {}",
        data.display()
    );
}
