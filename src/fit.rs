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
use crate::features::{Dims, FeatureError, FeatureExtractor, ImageFeatures};
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
        held_out = held_out.clamp(MIN_CALIBRATION_IMAGES, config.calibration.max_images);
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

/// Features of the fit images, gathered per branch, with the per-image
/// patch quotas that bound fit memory.
struct Gathered {
    cls: Vec<f32>,
    object_patches: Vec<f32>,
    mean_tokens: Vec<f32>,
    texture_patches: Vec<f32>,
    /// Texture patches of the bank images before any quota (the coreset
    /// size is a share of these).
    texture_total: usize,
    object_quota: usize,
    texture_quota: usize,
    rng: SplitMix64,
}

impl Gathered {
    fn new(config: &Config, dims: &Dims, n_fit: usize, n_bank: usize) -> Self {
        let bank_patches = config.texture.bank_budget_mb * (1 << 20) / (4 * dims.texture.max(1));
        Self {
            cls: Vec::new(),
            object_patches: Vec::new(),
            mean_tokens: Vec::new(),
            texture_patches: Vec::new(),
            texture_total: 0,
            object_quota: (config.object.kmeans_max_patches / n_fit.max(1)).max(1),
            texture_quota: (bank_patches / n_bank.max(1)).max(1),
            rng: SplitMix64::new(config.seed ^ SUBSAMPLE_SEED_SALT),
        }
    }

    fn add(&mut self, f: &ImageFeatures, in_bank: bool) {
        self.cls.extend_from_slice(&f.object.cls);
        self.mean_tokens.extend(f.attribution.mean_patch());
        let dim = f.object.cls.len();
        let kept = subsample_rows(&f.object.patches, dim, self.object_quota, &mut self.rng);
        self.object_patches.extend_from_slice(&kept);
        if in_bank {
            let dim = f.texture.patches.len() / (f.texture.grid.0 * f.texture.grid.1).max(1);
            self.texture_total += f.texture.patches.len() / dim.max(1);
            let kept = subsample_rows(&f.texture.patches, dim, self.texture_quota, &mut self.rng);
            self.texture_patches.extend_from_slice(&kept);
        }
    }
}

/// Keeps the patch subsampling independent of the other shuffles.
const SUBSAMPLE_SEED_SALT: u64 = 0x7375_6273;

/// `rows` (`n × dim`) if `n ≤ keep`, else `keep` rows picked by a seeded
/// shuffle, in their original order.
fn subsample_rows<'a>(
    rows: &'a [f32],
    dim: usize,
    keep: usize,
    rng: &mut SplitMix64,
) -> std::borrow::Cow<'a, [f32]> {
    let n = rows.len() / dim.max(1);
    if n <= keep {
        return std::borrow::Cow::Borrowed(rows);
    }
    let mut order: Vec<usize> = (0..n).collect();
    rng.shuffle(&mut order);
    let mut picked = order[..keep].to_vec();
    picked.sort_unstable();
    std::borrow::Cow::Owned(
        picked
            .iter()
            .flat_map(|&i| rows[i * dim..(i + 1) * dim].iter().copied())
            .collect(),
    )
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

    let dims = extractor.dims();
    let mut gathered = Gathered::new(config, &dims, split.fit.len(), split.bank.len());
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
        gathered.texture_total,
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

/// Measures the calibration again (after a change of scoring settings) on
/// the held-out images of `images`, the training images it was fitted from.
pub fn recalibrate(
    detector: &mut Detector,
    extractor: &FeatureExtractor,
    images: &[PathBuf],
    progress: &dyn Progress,
) -> Result<(), FitError> {
    let split = split(images, &detector.config)?;
    detector.calibration = calibrate(detector, extractor, &split.calibration, progress)?;
    Ok(())
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
    fn subsampling_keeps_whole_rows_in_order() {
        let rows: Vec<f32> = (0..20).map(|v| v as f32).collect(); // 10 rows of 2
        let mut rng = SplitMix64::new(1);
        let kept = subsample_rows(&rows, 2, 4, &mut rng);
        assert_eq!(kept.len(), 8);
        let firsts: Vec<f32> = kept.chunks(2).map(|r| r[0]).collect();
        assert!(firsts.windows(2).all(|w| w[0] < w[1]), "{firsts:?}");
        assert!(
            kept.chunks(2)
                .all(|r| r[1] == r[0] + 1.0 && r[0] % 2.0 == 0.0)
        );
        assert_eq!(subsample_rows(&rows, 2, 10, &mut rng).len(), 20);
        let again = subsample_rows(&rows, 2, 4, &mut SplitMix64::new(1));
        assert_eq!(again, kept, "seeded");
    }

    #[test]
    fn hold_out_is_capped() {
        let mut config = Config::preset(Preset::Default);
        config.calibration.max_images = 3;
        let s = split(&paths(100), &config).unwrap();
        assert_eq!((s.calibration.len(), s.fit.len()), (3, 97));
    }

    #[test]
    fn no_hold_out_when_disabled() {
        let mut config = Config::preset(Preset::Default);
        config.calibration.holdout_fraction = 0.0;
        assert!(split(&paths(2), &config).unwrap().calibration.is_empty());
    }
}
