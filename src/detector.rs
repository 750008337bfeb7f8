//! The fitted detector: three branches, the fusion settings, a label-free
//! decision threshold, and where the model came from.
//!
//! Scoring one image's features gives every branch's output and the fused
//! result; [`Detector::to_model_file`] / [`Detector::from_model_file`] map it
//! to and from the on-disk format.

use std::collections::BTreeMap;

use thiserror::Error;

use crate::branch::BranchError;
use crate::branch::attribution::AttributionBranch;
use crate::branch::object::ObjectBranch;
use crate::branch::texture::TextureBranch;
use crate::config::{Config, ConfigError, Preset};
use crate::features::{Dims, ImageFeatures};
use crate::fusion::{Branch, BranchOutputs, BranchSet, Fused, fuse};
use crate::memory_bank::MemoryBank;
use crate::model_file::{ModelFile, ModelFileError, StoredTensor};
use crate::stats::gaussian::Gaussian;

/// Scores of the held-out normal images, and the threshold set from them.
#[derive(Debug, Clone, PartialEq)]
pub struct Calibration {
    /// Fused image scores of the held-out normal images.
    pub fused_scores: Vec<f64>,
    /// Each branch's image scores on the same images (object, attribution, texture).
    pub branch_scores: [Vec<f64>; 3],
    /// Largest fused-map value on any held-out image (heatmap colour scale).
    pub map_normal_max: f32,
    /// Decision threshold on the fused image score; `None` without held-out images.
    pub threshold: Option<f64>,
}

impl Calibration {
    /// Builds the calibration from held-out scores with the configured quantile.
    pub fn from_scores(
        fused_scores: Vec<f64>,
        branch_scores: [Vec<f64>; 3],
        map_normal_max: f32,
        quantile: f64,
    ) -> Self {
        let threshold = quantile_of(&fused_scores, quantile);
        Self {
            fused_scores,
            branch_scores,
            map_normal_max,
            threshold,
        }
    }
}

/// Linear-interpolation quantile (numpy's default); `None` for no data.
pub fn quantile_of(values: &[f64], q: f64) -> Option<f64> {
    if values.is_empty() {
        return None;
    }
    let mut sorted = values.to_vec();
    sorted.sort_by(f64::total_cmp);
    let pos = q.clamp(0.0, 1.0) * (sorted.len() - 1) as f64;
    let (lo, hi) = (pos.floor() as usize, pos.ceil() as usize);
    Some(sorted[lo] + (sorted[hi] - sorted[lo]) * (pos - lo as f64))
}

/// Where a model came from.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Provenance {
    pub dataset: String,
    pub n_fit_images: usize,
    pub n_bank_images: usize,
    pub n_calibration_images: usize,
    /// SHA-256 of each backbone weights file, by backbone name.
    pub weights: BTreeMap<String, String>,
    pub beltad_version: String,
}

/// A fitted detector.
#[derive(Debug, Clone)]
pub struct Detector {
    pub config: Config,
    pub object: ObjectBranch,
    pub attribution: AttributionBranch,
    pub texture: TextureBranch,
    pub calibration: Calibration,
    pub provenance: Provenance,
}

/// Everything the detector says about one image.
#[derive(Debug, Clone)]
pub struct ImageVerdict {
    pub branches: BranchOutputs,
    pub fused: Fused,
    /// Fused score above the threshold; `None` when the model has no threshold.
    pub anomalous: Option<bool>,
}

/// A model file that does not fit this build or these weights.
#[derive(Debug, Error)]
pub enum DetectorError {
    #[error(transparent)]
    File(#[from] ModelFileError),
    #[error("{path}: stored config is invalid: {source}")]
    Config {
        path: String,
        #[source]
        source: ConfigError,
    },
    #[error("{path}: {message}")]
    Inconsistent { path: String, message: String },
    #[error(
        "{path}: the model was fitted with other {backbone} weights (sha256 {fitted}…) than those loaded ({loaded}…); refit, or pass the weights it was fitted with"
    )]
    WeightsMismatch {
        path: String,
        backbone: String,
        fitted: String,
        loaded: String,
    },
}

impl Detector {
    /// Scores one image.
    pub fn score(&self, features: &ImageFeatures) -> Result<ImageVerdict, BranchError> {
        let eval = self.config.fusion.eval_size;
        let branches = BranchOutputs {
            object: self.object.score(&features.object, eval),
            attribution: self.attribution.score(&features.attribution, eval),
            texture: self.texture.score(&features.texture, eval)?,
        };
        let fused = fuse(&branches, BranchSet::ALL, &self.config.fusion);
        let anomalous = self.calibration.threshold.map(|t| fused.score > t);
        Ok(ImageVerdict {
            branches,
            fused,
            anomalous,
        })
    }

    /// Checks that the loaded backbones give the feature widths this model was fitted on.
    pub fn check_dims(&self, path: &str, dims: &Dims) -> Result<(), DetectorError> {
        let fitted = Dims {
            object: self.object.cls.dim(),
            attribution: self.attribution.mean_token.dim(),
            texture: self.texture.bank.dim(),
        };
        if fitted != *dims {
            let message = format!(
                "the model's feature widths {fitted:?} do not match the loaded backbones' {dims:?}"
            );
            return Err(DetectorError::Inconsistent {
                path: path.into(),
                message,
            });
        }
        if self.object.foreground.len() != fitted.object
            || self.object.background.len() != fitted.object
        {
            let message = "object prototypes do not match the CLS Gaussian's width".to_string();
            return Err(DetectorError::Inconsistent {
                path: path.into(),
                message,
            });
        }
        Ok(())
    }

    /// Checks that `loaded` (backbone name → SHA-256) are the weights this model was fitted with.
    pub fn check_weights(
        &self,
        path: &str,
        loaded: &BTreeMap<String, String>,
    ) -> Result<(), DetectorError> {
        for (backbone, fitted) in &self.provenance.weights {
            match loaded.get(backbone) {
                Some(l) if l == fitted => {}
                other => {
                    return Err(DetectorError::WeightsMismatch {
                        path: path.into(),
                        backbone: backbone.clone(),
                        fitted: fitted.chars().take(12).collect(),
                        loaded: other.map_or("none".into(), |l| l.chars().take(12).collect()),
                    });
                }
            }
        }
        Ok(())
    }

    /// The on-disk form.
    pub fn to_model_file(&self) -> ModelFile {
        let mut file = ModelFile::default();
        let p = &self.provenance;
        let meta = [
            ("config", self.config.to_toml()),
            ("dataset", p.dataset.clone()),
            ("n_fit_images", p.n_fit_images.to_string()),
            ("n_bank_images", p.n_bank_images.to_string()),
            ("n_calibration_images", p.n_calibration_images.to_string()),
            (
                "weights",
                serde_json::to_string(&p.weights).unwrap_or_default(),
            ),
            ("beltad_version", p.beltad_version.clone()),
            (
                "map_normal_max",
                self.calibration.map_normal_max.to_string(),
            ),
            (
                "threshold",
                self.calibration
                    .threshold
                    .map_or("none".into(), |t| t.to_string()),
            ),
        ];
        for (k, v) in meta {
            file.metadata.insert(k.into(), v);
        }

        let t = &mut file.tensors;
        put_gaussian(t, "object.cls", &self.object.cls);
        let d = self.object.foreground.len();
        t.insert(
            "object.foreground".into(),
            StoredTensor::from_f32(vec![d], &self.object.foreground),
        );
        t.insert(
            "object.background".into(),
            StoredTensor::from_f32(vec![d], &self.object.background),
        );
        put_gaussian(t, "attribution.mean_token", &self.attribution.mean_token);
        let bank = &self.texture.bank;
        t.insert(
            "texture.memory_bank".into(),
            StoredTensor::from_f32(vec![bank.len(), bank.dim()], bank.features()),
        );
        let c = &self.calibration;
        t.insert(
            "calibration.fused_scores".into(),
            StoredTensor::from_f64(vec![c.fused_scores.len()], &c.fused_scores),
        );
        for (b, scores) in Branch::ALL.iter().zip(&c.branch_scores) {
            let name = format!("calibration.{}_scores", b.name());
            t.insert(name, StoredTensor::from_f64(vec![scores.len()], scores));
        }
        file
    }

    /// Rebuilds a detector, checking every tensor against the stored config.
    pub fn from_model_file(file: &ModelFile, path: &str) -> Result<Self, DetectorError> {
        let config_text: String = file.meta(path, "config")?;
        let config = Config::from_toml(&config_text, Preset::Default).map_err(|source| {
            DetectorError::Config {
                path: path.into(),
                source,
            }
        })?;
        let inconsistent = |message: String| DetectorError::Inconsistent {
            path: path.into(),
            message,
        };

        let cls = get_gaussian(file, path, "object.cls")?;
        let d = cls.dim();
        let (_, foreground) = file.f32_tensor(path, "object.foreground", &[Some(d)])?;
        let (_, background) = file.f32_tensor(path, "object.background", &[Some(d)])?;
        let object = ObjectBranch {
            cls,
            foreground,
            background,
            tau: config.object.tau as f32,
            sigma: config.object.sigma,
            input_size: config.object.input_size,
        };
        let attribution = AttributionBranch {
            mean_token: get_gaussian(file, path, "attribution.mean_token")?,
            sigma: config.attribution.sigma,
        };
        let (shape, bank) = file.f32_tensor(path, "texture.memory_bank", &[None, None])?;
        let bank =
            MemoryBank::new(bank, shape[0], shape[1]).map_err(|e| inconsistent(e.to_string()))?;
        let texture = TextureBranch {
            bank,
            reweight_k: config.texture.reweight_k,
            sigma: config.texture.sigma,
        };

        let (_, fused_scores) = file.f64_tensor(path, "calibration.fused_scores", &[None])?;
        let mut branch_scores: [Vec<f64>; 3] = Default::default();
        for (b, slot) in Branch::ALL.iter().zip(&mut branch_scores) {
            let name = format!("calibration.{}_scores", b.name());
            *slot = file.f64_tensor(path, &name, &[Some(fused_scores.len())])?.1;
        }
        let threshold_text: String = file.meta(path, "threshold")?;
        let threshold = match threshold_text.as_str() {
            "none" => None,
            // A NaN threshold would silently call every image normal.
            t => Some(
                t.parse()
                    .ok()
                    .filter(|t: &f64| t.is_finite())
                    .ok_or_else(|| {
                        inconsistent(format!("threshold `{t}` is not a finite number"))
                    })?,
            ),
        };
        let calibration = Calibration {
            fused_scores,
            branch_scores,
            map_normal_max: file.meta(path, "map_normal_max")?,
            threshold,
        };
        let weights_json: String = file.meta(path, "weights")?;
        let provenance = Provenance {
            dataset: file.meta(path, "dataset")?,
            n_fit_images: file.meta(path, "n_fit_images")?,
            n_bank_images: file.meta(path, "n_bank_images")?,
            n_calibration_images: file.meta(path, "n_calibration_images")?,
            weights: serde_json::from_str(&weights_json)
                .map_err(|e| inconsistent(format!("weights: {e}")))?,
            beltad_version: file.meta(path, "beltad_version")?,
        };
        Ok(Self {
            config,
            object,
            attribution,
            texture,
            calibration,
            provenance,
        })
    }
}

fn put_gaussian(t: &mut BTreeMap<String, StoredTensor>, prefix: &str, g: &Gaussian) {
    let d = g.dim();
    t.insert(
        format!("{prefix}.mean"),
        StoredTensor::from_f64(vec![d], g.mean()),
    );
    t.insert(
        format!("{prefix}.whitening"),
        StoredTensor::from_f64(vec![d, d], g.whitening()),
    );
}

fn get_gaussian(file: &ModelFile, path: &str, prefix: &str) -> Result<Gaussian, DetectorError> {
    let (shape, mean) = file.f64_tensor(path, &format!("{prefix}.mean"), &[None])?;
    let d = shape[0];
    let (_, whitening) =
        file.f64_tensor(path, &format!("{prefix}.whitening"), &[Some(d), Some(d)])?;
    Gaussian::from_parts(mean, whitening, d).map_err(|e| DetectorError::Inconsistent {
        path: path.into(),
        message: format!("{prefix}: {e}"),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quantile_interpolates_linearly() {
        assert_eq!(quantile_of(&[], 0.5), None);
        assert_eq!(quantile_of(&[3.0, 1.0, 2.0], 0.5), Some(2.0));
        assert_eq!(quantile_of(&[1.0, 2.0], 0.99), Some(1.99));
        assert_eq!(quantile_of(&[1.0, 2.0], 1.0), Some(2.0));
    }
}
