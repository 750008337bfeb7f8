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
use crate::calibration::{Calibration, IMAGE_SCORE_RULES, MapCalibration, ScoreCalibration};
use crate::config::{Config, ConfigError, Preset};
use crate::features::{Dims, ImageFeatures};
use crate::fusion::{Branch, BranchOutputs, BranchSet, Fused, FusionCalibration, FusionRule, fuse};
use crate::memory_bank::MemoryBank;
use crate::model_file::{ModelFile, ModelFileError, StoredTensor};
use crate::stats::gaussian::Gaussian;

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
        let fused = self.fuse(&branches, BranchSet::ALL, self.config.fusion.rule);
        let anomalous = self.calibration.threshold.map(|t| fused.score > t);
        Ok(ImageVerdict {
            branches,
            fused,
            anomalous,
        })
    }

    /// Adopts the scoring fields of `config` (see
    /// [`Config::copy_scoring_fields`]); the calibration must be measured again.
    pub fn apply_scoring_config(&mut self, config: &Config) {
        self.config.copy_scoring_fields(config);
        let c = &self.config;
        self.object.tau = c.object.tau as f32;
        self.object.sigma = c.object.sigma;
        self.attribution.sigma = c.attribution.sigma;
        self.texture.sigma = c.texture.sigma;
        self.texture.reweight_k = c.texture.reweight_k;
    }

    /// Fuses branch outputs of `set` by `rule`, with the model's calibration.
    pub fn fuse(&self, branches: &BranchOutputs, set: BranchSet, rule: FusionRule) -> Fused {
        let calibration = self.calibration.fusion.as_ref();
        fuse(branches, set, rule, &self.config.fusion, calibration)
    }

    /// Each branch's robust z-score against the held-out normal images: how
    /// strongly each branch finds the image unusual, on one scale. `None`
    /// without held-out images.
    pub fn branch_contributions(&self, branches: &BranchOutputs) -> Option<[f64; 3]> {
        self.calibration
            .fusion
            .as_ref()
            .map(|c| c.branch_z(branches))
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
        put_calibration(t, &self.calibration);
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

        let calibration = get_calibration(file, path, &config)?;
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

/// Held-out scores as `(rows, n)` tables, map quantile tables per branch.
fn put_calibration(t: &mut BTreeMap<String, StoredTensor>, c: &Calibration) {
    let table = |rows: &[Vec<f64>]| {
        let n = rows.first().map_or(0, Vec::len);
        let flat: Vec<f64> = rows.iter().flatten().copied().collect();
        StoredTensor::from_f64(vec![rows.len(), n], &flat)
    };
    t.insert("calibration.branch_scores".into(), table(&c.branch_scores));
    t.insert("calibration.map_max".into(), table(&c.map_max));
    t.insert("calibration.fused_scores".into(), table(&c.fused_scores));
    if let Some(fusion) = &c.fusion {
        for (b, map) in Branch::ALL.iter().zip(&fusion.maps) {
            let name = format!("calibration.{}_map_quantiles", b.name());
            t.insert(
                name,
                StoredTensor::from_f32(vec![map.quantiles.len()], &map.quantiles),
            );
        }
    }
}

fn get_calibration(
    file: &ModelFile,
    path: &str,
    config: &Config,
) -> Result<Calibration, DetectorError> {
    let table = |name: &str, rows: usize| -> Result<Vec<Vec<f64>>, DetectorError> {
        let (shape, flat) = file.f64_tensor(path, name, &[Some(rows), None])?;
        Ok((0..rows)
            .map(|r| flat[r * shape[1]..(r + 1) * shape[1]].to_vec())
            .collect())
    };
    let to3 = |v: Vec<Vec<f64>>| -> [Vec<f64>; 3] { [v[0].clone(), v[1].clone(), v[2].clone()] };
    let to4 = |v: Vec<Vec<f64>>| -> [Vec<f64>; 4] {
        [v[0].clone(), v[1].clone(), v[2].clone(), v[3].clone()]
    };
    let branch_scores = to3(table("calibration.branch_scores", 3)?);
    let map_max = to4(table("calibration.map_max", 4)?);
    let fused_scores = table(
        "calibration.fused_scores",
        FusionRule::ALL.len() * IMAGE_SCORE_RULES.len(),
    )?;

    let n = branch_scores[0].len();
    let fusion = if n == 0 {
        None
    } else {
        let mut maps = Vec::with_capacity(3);
        for b in Branch::ALL {
            let name = format!("calibration.{}_map_quantiles", b.name());
            let (_, quantiles) = file.f32_tensor(path, &name, &[None])?;
            if quantiles.is_empty() || quantiles.windows(2).any(|w| w[0].is_nan() || w[0] > w[1]) {
                return Err(DetectorError::Inconsistent {
                    path: path.into(),
                    message: format!("{name} is not a non-decreasing table"),
                });
            }
            maps.push(MapCalibration { quantiles });
        }
        let maps: [MapCalibration; 3] = [maps[0].clone(), maps[1].clone(), maps[2].clone()];
        Some(FusionCalibration {
            maps,
            scores: [0, 1, 2].map(|i| ScoreCalibration::fit(&branch_scores[i])),
            map_max: [0, 1, 2, 3].map(|i| ScoreCalibration::fit(&map_max[i])),
        })
    };
    let rows_ok = branch_scores
        .iter()
        .chain(&map_max)
        .chain(&fused_scores)
        .all(|r| r.len() == n);
    if !rows_ok {
        return Err(DetectorError::Inconsistent {
            path: path.into(),
            message: "calibration tables disagree on the number of held-out images".into(),
        });
    }
    // A NaN score would make a NaN threshold, which silently calls every image normal.
    let all_finite = branch_scores
        .iter()
        .chain(&map_max)
        .chain(&fused_scores)
        .flatten()
        .all(|v| v.is_finite());
    if !all_finite {
        return Err(DetectorError::Inconsistent {
            path: path.into(),
            message: "calibration tables hold a value that is not a finite number".into(),
        });
    }
    let mut calibration = Calibration {
        branch_scores,
        map_max,
        fused_scores,
        fusion,
        map_normal_max: file.meta(path, "map_normal_max")?,
        threshold: None,
    };
    let quantile = config.calibration.threshold_quantile;
    calibration.threshold =
        calibration.threshold_for(config.fusion.rule, config.fusion.image_score, quantile);
    Ok(calibration)
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
