//! Fitting a detector on a folder of normal images.
//!
//! Steps: hold out a seeded share of the images for calibration; extract
//! features of the rest (every image feeds the object and attribution
//! branches, a seeded share of them the texture memory bank); fit the three
//! branches; score the held-out images to set the label-free threshold.

use std::path::PathBuf;

use thiserror::Error;

use crate::branch::BranchError;
use crate::branch::attribution::AttributionBranch;
use crate::branch::object::ObjectBranch;
use crate::branch::texture::TextureBranch;
use crate::calibration::Calibration;
use crate::config::{Config, MIN_CALIBRATION_IMAGES, MIN_FIT_IMAGES};
use crate::detector::{Detector, Provenance};
use crate::features::{FeatureError, FeatureExtractor, ImageFeatures};
use crate::progress::Progress;
use crate::rng::SplitMix64;

/// A fit that could not be completed.
#[derive(Debug, Error)]
pub enum FitError {
    #[error("{0} training images are too few: need at least {need}", need = MIN_FIT_IMAGES)]
    TooFewImages(usize),
    #[error(transparent)]
    Features(#[from] FeatureError),
    #[error(transparent)]
    Image(#[from] crate::image_io::ImageError),
    #[error(transparent)]
    Branch(#[from] BranchError),
}

/// How the training images are used.
#[derive(Debug, Clone, PartialEq)]
pub struct Split {
    pub fit: Vec<PathBuf>,
    /// Indices into `fit` of the images whose patches feed the memory bank.
    pub bank: Vec<usize>,
    pub calibration: Vec<PathBuf>,
}

/// Splits the images by the config's fractions with its seed.
pub fn split(images: &[PathBuf], config: &Config) -> Result<Split, FitError> {
    let n = images.len();
    let mut held_out = (n as f64 * config.calibration.holdout_fraction).round() as usize;
    if config.calibration.holdout_fraction > 0.0 {
        held_out = held_out.max(MIN_CALIBRATION_IMAGES);
    }
    if n < held_out + MIN_FIT_IMAGES {
        return Err(FitError::TooFewImages(n));
    }
    let mut order: Vec<usize> = (0..n).collect();
    SplitMix64::new(config.seed).shuffle(&mut order);
    let (cal, fit) = order.split_at(held_out);
    let mut fit: Vec<usize> = fit.to_vec();
    let mut cal: Vec<usize> = cal.to_vec();
    fit.sort_unstable();
    cal.sort_unstable();

    let n_bank = ((fit.len() as f64 * config.texture.bank_image_fraction).ceil() as usize)
        .clamp(1, fit.len());
    let mut bank: Vec<usize> = (0..fit.len()).collect();
    SplitMix64::new(config.seed ^ BANK_SEED_SALT).shuffle(&mut bank);
    bank.truncate(n_bank);
    bank.sort_unstable();

    Ok(Split {
        fit: fit.iter().map(|&i| images[i].clone()).collect(),
        bank,
        calibration: cal.iter().map(|&i| images[i].clone()).collect(),
    })
}

/// Keeps the bank shuffle independent of the hold-out shuffle.
const BANK_SEED_SALT: u64 = 0x6261_6e6b;

/// Features of the fit images, gathered per branch.
#[derive(Default)]
struct Gathered {
    cls: Vec<f32>,
    object_patches: Vec<f32>,
    mean_tokens: Vec<f32>,
    texture_patches: Vec<f32>,
}

impl Gathered {
    fn add(&mut self, f: &ImageFeatures, in_bank: bool) {
        self.cls.extend_from_slice(&f.object.cls);
        self.object_patches.extend_from_slice(&f.object.patches);
        self.mean_tokens.extend(f.attribution.mean_patch());
        if in_bank {
            self.texture_patches.extend_from_slice(&f.texture.patches);
        }
    }
}

/// Fits a detector on `images` (normal images only).
pub fn fit(
    config: &Config,
    extractor: &FeatureExtractor,
    images: &[PathBuf],
    dataset: &str,
    progress: &dyn Progress,
) -> Result<Detector, FitError> {
    let split = split(images, config)?;
    tracing::info!(
        fit = split.fit.len(),
        bank = split.bank.len(),
        calibration = split.calibration.len(),
        "fitting"
    );

    let mut gathered = Gathered::default();
    let mut in_bank = vec![false; split.fit.len()];
    split.bank.iter().for_each(|&i| in_bank[i] = true);
    let mut index = 0;
    extractor.for_each_image::<FitError>(
        &split.fit,
        "extracting features",
        progress,
        |_, item| {
            gathered.add(&item?.features, in_bank[index]);
            index += 1;
            Ok(())
        },
    )?;

    progress.start("fitting branches", 3);
    let dims = extractor.dims();
    let object = ObjectBranch::fit(
        &gathered.cls,
        &gathered.object_patches,
        dims.object,
        &config.object,
        config.seed,
    )?;
    drop(std::mem::take(&mut gathered.object_patches));
    progress.advance(1);
    let attribution =
        AttributionBranch::fit(&gathered.mean_tokens, dims.attribution, &config.attribution)?;
    progress.advance(1);
    let texture = TextureBranch::fit(
        &gathered.texture_patches,
        dims.texture,
        &config.texture,
        config.seed,
    )?;
    progress.advance(1);
    progress.finish();

    let mut detector = Detector {
        config: config.clone(),
        object,
        attribution,
        texture,
        calibration: Calibration::measure(&[], &config.fusion, 1.0),
        provenance: Provenance {
            dataset: dataset.to_string(),
            n_fit_images: split.fit.len(),
            n_bank_images: split.bank.len(),
            n_calibration_images: split.calibration.len(),
            weights: extractor.fingerprints().clone(),
            beltad_version: env!("CARGO_PKG_VERSION").to_string(),
        },
    };
    detector.calibration = calibrate(&detector, extractor, &split.calibration, progress)?;
    Ok(detector)
}

/// Scores the held-out normal images and measures the calibration on them.
fn calibrate(
    detector: &Detector,
    extractor: &FeatureExtractor,
    images: &[PathBuf],
    progress: &dyn Progress,
) -> Result<Calibration, FitError> {
    let mut outputs = Vec::with_capacity(images.len());
    extractor.for_each_image::<FitError>(images, "calibrating", progress, |_, item| {
        outputs.push(detector.score(&item?.features)?.branches);
        Ok(())
    })?;
    let config = &detector.config;
    let quantile = config.calibration.threshold_quantile;
    Ok(Calibration::measure(&outputs, &config.fusion, quantile))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Preset;

    fn paths(n: usize) -> Vec<PathBuf> {
        (0..n)
            .map(|i| PathBuf::from(format!("{i:03}.png")))
            .collect()
    }

    #[test]
    fn split_holds_out_a_share_and_picks_half_for_the_bank() {
        let config = Config::preset(Preset::Default);
        let s = split(&paths(40), &config).unwrap();
        assert_eq!(s.calibration.len(), 4);
        assert_eq!(s.fit.len(), 36);
        assert_eq!(s.bank.len(), 18);
        assert!(s.calibration.iter().all(|p| !s.fit.contains(p)));
        assert_eq!(
            split(&paths(40), &config).unwrap(),
            s,
            "same seed, same split"
        );
    }

    #[test]
    fn small_sets_still_hold_out_the_minimum() {
        let config = Config::preset(Preset::Default);
        let s = split(&paths(5), &config).unwrap();
        assert_eq!(s.calibration.len(), MIN_CALIBRATION_IMAGES);
        assert!(matches!(
            split(&paths(3), &config),
            Err(FitError::TooFewImages(3))
        ));
    }

    #[test]
    fn no_hold_out_when_disabled() {
        let mut config = Config::preset(Preset::Default);
        config.calibration.holdout_fraction = 0.0;
        assert!(split(&paths(2), &config).unwrap().calibration.is_empty());
    }
}
