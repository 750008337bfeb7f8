//! Detector configuration: the method's hyperparameters, two presets, and
//! their validation.
//!
//! A config is read from TOML (every field optional; missing fields take the
//! preset's value) and must pass [`Config::validate`] before anything is
//! fitted: one rule, one error variant. The `paper` preset carries the
//! reference values of METHOD.md (ViT-S@350, ViT-B@406, WRN50-2@238); the
//! `default` preset runs with the weights shipped beside the project (ViT-S
//! for both semantic branches, sharing one pass at 350 px, and MobileNetV2
//! for texture).

use std::fmt;
use std::path::Path;

use serde::{Deserialize, Serialize};
use thiserror::Error;

use crate::fusion::{FusionRule, ImageScoreRule};
use crate::stats::gaussian::CovarianceEstimator;

/// Frozen backbones the detector can use.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum BackboneKind {
    /// DINOv2 ViT-S/14 (`facebook/dinov2-small`).
    Dinov2Vits14,
    /// DINOv2 ViT-B/14 (`facebook/dinov2-base`).
    Dinov2Vitb14,
    /// torchvision MobileNetV2, ImageNet-1k.
    MobilenetV2,
    /// torchvision Wide-ResNet50-2, ImageNet-1k.
    WideResnet50_2,
}

impl BackboneKind {
    /// File name of the weights inside a weights directory.
    pub fn weights_file(self) -> &'static str {
        match self {
            BackboneKind::Dinov2Vits14 => "dinov2_vits14.safetensors",
            BackboneKind::Dinov2Vitb14 => "dinov2_vitb14.safetensors",
            BackboneKind::MobilenetV2 => "mobilenet_v2.safetensors",
            BackboneKind::WideResnet50_2 => "wide_resnet50_2.safetensors",
        }
    }

    pub fn is_vit(self) -> bool {
        matches!(
            self,
            BackboneKind::Dinov2Vits14 | BackboneKind::Dinov2Vitb14
        )
    }

    pub fn name(self) -> &'static str {
        match self {
            BackboneKind::Dinov2Vits14 => "dinov2_vits14",
            BackboneKind::Dinov2Vitb14 => "dinov2_vitb14",
            BackboneKind::MobilenetV2 => "mobilenet_v2",
            BackboneKind::WideResnet50_2 => "wide_resnet50_2",
        }
    }
}

impl fmt::Display for BackboneKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// Named presets.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "snake_case")]
pub enum Preset {
    /// Runs with the shipped weights: one ViT-S/14 pass at 350 px for both
    /// semantic branches, MobileNetV2 for texture.
    Default,
    /// The paper's backbones (ViT-S@350, ViT-B@406, WRN50-2@238); needs
    /// `dinov2_vitb14.safetensors` and `wide_resnet50_2.safetensors`.
    Paper,
}

/// DINOv2 patch size; ViT input sizes must be multiples of it.
pub const VIT_PATCH: usize = 14;
/// Largest input side accepted for any branch (a 1,400 px ViT input already
/// holds 10,000 tokens).
pub const MAX_INPUT_SIZE: usize = 1400;
/// Smallest CNN input side: stride-16 features need at least a few cells.
pub const MIN_CNN_INPUT: usize = 32;

/// Object branch: CLS Mahalanobis + foreground/background prototypes.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ObjectConfig {
    pub backbone: BackboneKind,
    pub input_size: usize,
    /// Ratio d_bg/d_fg above which a patch counts as strong foreground (τ).
    pub tau: f64,
    pub covariance: CovarianceEstimator,
    /// KMeans restarts (k-means++ init each).
    pub kmeans_restarts: usize,
    pub kmeans_max_iter: usize,
    /// Most patch tokens KMeans is fitted on; above it every image contributes
    /// an equal seeded random share (bounds fit memory on large sets).
    pub kmeans_max_patches: usize,
    /// Gaussian smoothing of the map, in pixels of the branch input.
    pub sigma: f64,
}

/// Attribution branch: mean patch token Mahalanobis + leave-one-patch-out map.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AttributionConfig {
    pub backbone: BackboneKind,
    pub input_size: usize,
    pub covariance: CovarianceEstimator,
    /// Gaussian smoothing of the map, in pixels of the evaluation size.
    pub sigma: f64,
}

/// Texture branch: PatchCore.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TextureConfig {
    pub backbone: BackboneKind,
    pub input_size: usize,
    /// Share of all bank-image patch features kept by the greedy coreset.
    pub coreset_ratio: f64,
    /// Johnson–Lindenstrauss ε of the sparse random projection used while
    /// selecting the coreset.
    pub projection_eps: f64,
    /// Share of the training images whose patches feed the memory bank.
    pub bank_image_fraction: f64,
    /// Memory for the bank images' patch features before the coreset, in
    /// MiB; above it every image contributes an equal seeded random share.
    /// The coreset still keeps `coreset_ratio` of all their patches.
    pub bank_budget_mb: usize,
    /// Neighbourhood size of PatchCore's image-score re-weighting (includes
    /// the nearest bank entry itself).
    pub reweight_k: usize,
    /// Gaussian smoothing of the map, in pixels of the evaluation size.
    pub sigma: f64,
}

/// Fusion of the three branches.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct FusionConfig {
    /// Weight of the object branch's image score, λ_obj.
    pub lambda_obj: f64,
    /// Weight of the fused map's maximum, λ_M.
    pub lambda_map: f64,
    /// Side of the final smoothing kernel (odd).
    pub final_kernel: usize,
    /// σ of the final smoothing kernel.
    pub final_sigma: f64,
    /// Side of the square grid on which maps are fused and evaluated.
    pub eval_size: usize,
    /// How the branch maps are combined (see [`FusionRule`]).
    pub rule: FusionRule,
    /// How the image score is formed (see [`ImageScoreRule`]).
    pub image_score: ImageScoreRule,
    /// α of the soft-OR/AND rule: weight of the arithmetic mean.
    pub soft_or_weight: f64,
}

/// Label-free decision threshold from held-out normal images.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct CalibrationConfig {
    /// Share of the training images held out of every fit and scored to set
    /// the threshold (at least [`MIN_CALIBRATION_IMAGES`] are held out).
    pub holdout_fraction: f64,
    /// Quantile of the held-out images' fused scores used as the threshold.
    pub threshold_quantile: f64,
    /// Most held-out images scored (their maps are kept in memory while the
    /// calibration is measured); the rest of the hold-out is unused.
    pub max_images: usize,
}

/// Fewest held-out normal images a threshold is set from.
pub const MIN_CALIBRATION_IMAGES: usize = 2;
/// Fewest patch tokens KMeans may be limited to.
pub const MIN_KMEANS_PATCHES: usize = 1000;
/// Fewest images left for fitting after the hold-out.
pub const MIN_FIT_IMAGES: usize = 2;

/// The whole detector configuration.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    pub preset: Preset,
    /// Seed of every random choice in a fit.
    pub seed: u64,
    pub object: ObjectConfig,
    pub attribution: AttributionConfig,
    pub texture: TextureConfig,
    pub fusion: FusionConfig,
    pub calibration: CalibrationConfig,
}

impl Default for ObjectConfig {
    fn default() -> Self {
        Self {
            backbone: BackboneKind::Dinov2Vits14,
            input_size: 350,
            tau: 1.14,
            covariance: CovarianceEstimator::LedoitWolf,
            kmeans_restarts: 4,
            kmeans_max_iter: 100,
            kmeans_max_patches: 300_000,
            sigma: 4.0,
        }
    }
}

impl Default for AttributionConfig {
    fn default() -> Self {
        Self {
            backbone: BackboneKind::Dinov2Vits14,
            input_size: 406,
            covariance: CovarianceEstimator::LedoitWolf,
            sigma: 4.0,
        }
    }
}

impl Default for TextureConfig {
    fn default() -> Self {
        Self {
            backbone: BackboneKind::MobilenetV2,
            input_size: 238,
            coreset_ratio: 0.01,
            projection_eps: 0.9,
            bank_image_fraction: 0.5,
            bank_budget_mb: 512,
            reweight_k: 3,
            sigma: 4.0,
        }
    }
}

impl Default for FusionConfig {
    fn default() -> Self {
        Self {
            lambda_obj: 0.01,
            lambda_map: 1.0,
            final_kernel: 5,
            final_sigma: 1.0,
            eval_size: 406,
            rule: FusionRule::Paper,
            image_score: ImageScoreRule::Paper,
            soft_or_weight: 0.5,
        }
    }
}

impl Default for CalibrationConfig {
    fn default() -> Self {
        Self {
            holdout_fraction: 0.1,
            threshold_quantile: 0.99,
            max_images: 100,
        }
    }
}

impl Config {
    /// The values of a preset.
    pub fn preset(preset: Preset) -> Self {
        let mut config = Config {
            preset,
            seed: 0,
            object: ObjectConfig::default(),
            attribution: AttributionConfig::default(),
            texture: TextureConfig::default(),
            fusion: FusionConfig::default(),
            calibration: CalibrationConfig::default(),
        };
        if preset == Preset::Paper {
            config.attribution.backbone = BackboneKind::Dinov2Vitb14;
            config.texture.backbone = BackboneKind::WideResnet50_2;
            let sample = CovarianceEstimator::Sample {
                ridge: crate::stats::gaussian::DEFAULT_RIDGE,
            };
            config.object.covariance = sample;
            config.attribution.covariance = sample;
        } else {
            // Single-forward mode: the attribution branch reads the object
            // branch's ViT-S pass at 350 px instead of a second pass at 406
            // px: with the paper's fusion, better on all three fused
            // metrics averaged over the shipped data sets (README,
            // "Single-forward mode"), at about half the backbone time.
            config.attribution.input_size = config.object.input_size;
        }
        config
    }

    /// Reads a TOML config. Fields it leaves out take the values of the
    /// preset it names (`preset = "paper"`), or of `fallback`.
    pub fn from_toml(text: &str, fallback: Preset) -> Result<Self, ConfigError> {
        let table: toml::Table = text
            .parse()
            .map_err(|e: toml::de::Error| ConfigError::Toml {
                message: e.message().to_string(),
            })?;
        let preset = match table.get("preset") {
            Some(value) => {
                value
                    .clone()
                    .try_into()
                    .map_err(|e: toml::de::Error| ConfigError::Toml {
                        message: format!("preset: {}", e.message()),
                    })?
            }
            None => fallback,
        };
        let mut merged =
            toml::Table::try_from(Config::preset(preset)).map_err(|e| ConfigError::Toml {
                message: e.to_string(),
            })?;
        merge_tables(&mut merged, table);
        let config: Config =
            toml::Value::Table(merged)
                .try_into()
                .map_err(|e: toml::de::Error| ConfigError::Toml {
                    message: e.message().to_string(),
                })?;
        config.validate()?;
        Ok(config)
    }

    /// Reads and validates a TOML config file.
    pub fn from_file(path: &Path, fallback: Preset) -> Result<Self, ConfigError> {
        let read_err = |e: std::io::Error| ConfigError::Read {
            path: path.display().to_string(),
            message: e.to_string(),
        };
        // A device such as `/dev/zero` would be read forever.
        if !std::fs::metadata(path).map_err(read_err)?.is_file() {
            return Err(read_err(std::io::Error::other("not a regular file")));
        }
        let text = std::fs::read_to_string(path).map_err(read_err)?;
        Self::from_toml(&text, fallback).map_err(|e| ConfigError::InFile {
            path: path.display().to_string(),
            error: Box::new(e),
        })
    }

    /// TOML text of this config (every field written out).
    pub fn to_toml(&self) -> String {
        toml::to_string_pretty(self).unwrap_or_default()
    }

    /// Checks every rule; the first broken one is returned.
    pub fn validate(&self) -> Result<(), ConfigError> {
        check_vit("object", self.object.backbone, self.object.input_size)?;
        check_vit(
            "attribution",
            self.attribution.backbone,
            self.attribution.input_size,
        )?;
        check_cnn(self.texture.backbone, self.texture.input_size)?;
        if !(self.object.tau.is_finite() && self.object.tau > 0.0) {
            return Err(ConfigError::Tau(self.object.tau));
        }
        if self.object.kmeans_restarts == 0 || self.object.kmeans_max_iter == 0 {
            return Err(ConfigError::KMeans);
        }
        if self.object.kmeans_max_patches < MIN_KMEANS_PATCHES {
            return Err(ConfigError::KMeansPatches(self.object.kmeans_max_patches));
        }
        if self.texture.bank_budget_mb == 0 {
            return Err(ConfigError::BankBudget);
        }
        if self.calibration.max_images < MIN_CALIBRATION_IMAGES {
            return Err(ConfigError::CalibrationImages(self.calibration.max_images));
        }
        for (branch, sigma) in [
            ("object.sigma", self.object.sigma),
            ("attribution.sigma", self.attribution.sigma),
            ("texture.sigma", self.texture.sigma),
            ("fusion.final_sigma", self.fusion.final_sigma),
        ] {
            if !(sigma.is_finite() && (0.0..=MAX_SIGMA).contains(&sigma)) {
                return Err(ConfigError::Sigma {
                    field: branch,
                    value: sigma,
                });
            }
        }
        check_covariance("object", &self.object.covariance)?;
        check_covariance("attribution", &self.attribution.covariance)?;
        check_fraction("texture.coreset_ratio", self.texture.coreset_ratio)?;
        check_fraction(
            "texture.bank_image_fraction",
            self.texture.bank_image_fraction,
        )?;
        if !(self.texture.projection_eps > 0.0 && self.texture.projection_eps < 1.0) {
            return Err(ConfigError::ProjectionEps(self.texture.projection_eps));
        }
        if self.texture.reweight_k < 2 {
            return Err(ConfigError::ReweightK(self.texture.reweight_k));
        }
        for (field, value) in [
            ("fusion.lambda_obj", self.fusion.lambda_obj),
            ("fusion.lambda_map", self.fusion.lambda_map),
        ] {
            if !(value.is_finite() && value >= 0.0) {
                return Err(ConfigError::Lambda { field, value });
            }
        }
        let alpha = self.fusion.soft_or_weight;
        if !(0.0..=1.0).contains(&alpha) {
            return Err(ConfigError::SoftOrWeight(alpha));
        }
        if self.fusion.final_kernel.is_multiple_of(2) || self.fusion.final_kernel > MAX_KERNEL {
            return Err(ConfigError::FinalKernel(self.fusion.final_kernel));
        }
        if !(MIN_CNN_INPUT..=MAX_INPUT_SIZE).contains(&self.fusion.eval_size) {
            return Err(ConfigError::EvalSize(self.fusion.eval_size));
        }
        if !(self.calibration.holdout_fraction >= 0.0 && self.calibration.holdout_fraction < 1.0) {
            return Err(ConfigError::Holdout(self.calibration.holdout_fraction));
        }
        let q = self.calibration.threshold_quantile;
        if !(q > 0.0 && q <= 1.0) {
            return Err(ConfigError::Quantile(q));
        }
        Ok(())
    }

    /// Copies the fields that only change how fitted branches score images
    /// (τ, smoothing, re-weighting, fusion except the grid, threshold
    /// quantile) from `other`.
    pub fn copy_scoring_fields(&mut self, other: &Config) {
        self.object.tau = other.object.tau;
        self.object.sigma = other.object.sigma;
        self.attribution.sigma = other.attribution.sigma;
        self.texture.sigma = other.texture.sigma;
        self.texture.reweight_k = other.texture.reweight_k;
        self.fusion = FusionConfig {
            eval_size: self.fusion.eval_size,
            ..other.fusion.clone()
        };
        self.calibration.threshold_quantile = other.calibration.threshold_quantile;
    }

    /// The distinct backbones this config needs.
    pub fn backbones(&self) -> Vec<BackboneKind> {
        let mut kinds = vec![self.object.backbone];
        for kind in [self.attribution.backbone, self.texture.backbone] {
            if !kinds.contains(&kind) {
                kinds.push(kind);
            }
        }
        kinds
    }
}

/// Largest Gaussian σ accepted, in pixels.
pub const MAX_SIGMA: f64 = 64.0;
/// Largest final smoothing kernel side.
pub const MAX_KERNEL: usize = 63;

fn check_vit(branch: &'static str, kind: BackboneKind, size: usize) -> Result<(), ConfigError> {
    if !kind.is_vit() {
        return Err(ConfigError::Backbone {
            branch,
            kind,
            want: "a DINOv2 ViT",
        });
    }
    if size == 0 || !size.is_multiple_of(VIT_PATCH) || size > MAX_INPUT_SIZE {
        return Err(ConfigError::VitSize { branch, size });
    }
    Ok(())
}

fn check_cnn(kind: BackboneKind, size: usize) -> Result<(), ConfigError> {
    if kind.is_vit() {
        return Err(ConfigError::Backbone {
            branch: "texture",
            kind,
            want: "a CNN",
        });
    }
    if !(MIN_CNN_INPUT..=MAX_INPUT_SIZE).contains(&size) {
        return Err(ConfigError::CnnSize(size));
    }
    Ok(())
}

fn check_fraction(field: &'static str, value: f64) -> Result<(), ConfigError> {
    if value > 0.0 && value <= 1.0 {
        Ok(())
    } else {
        Err(ConfigError::Fraction { field, value })
    }
}

fn check_covariance(branch: &'static str, est: &CovarianceEstimator) -> Result<(), ConfigError> {
    match est {
        CovarianceEstimator::Sample { ridge } if !(ridge.is_finite() && *ridge >= 0.0) => {
            Err(ConfigError::Ridge {
                branch,
                ridge: *ridge,
            })
        }
        _ => Ok(()),
    }
}

/// Overwrites `base` with `over`, descending into tables so that a partial
/// `[texture]` table keeps the preset's other texture fields.
fn merge_tables(base: &mut toml::Table, over: toml::Table) {
    for (key, value) in over {
        match (base.get_mut(&key), value) {
            (Some(toml::Value::Table(b)), toml::Value::Table(o)) => merge_tables(b, o),
            (_, value) => {
                base.insert(key, value);
            }
        }
    }
}

/// A config that cannot be used, one variant per rule.
#[derive(Debug, Error, PartialEq)]
pub enum ConfigError {
    #[error("cannot read config {path}: {message}")]
    Read { path: String, message: String },
    #[error("invalid config: {message}")]
    Toml { message: String },
    /// Any other error, in the config file `path`.
    #[error("{path}: {error}")]
    InFile {
        path: String,
        error: Box<ConfigError>,
    },
    #[error("{branch}.backbone = {kind} is not {want}")]
    Backbone {
        branch: &'static str,
        kind: BackboneKind,
        want: &'static str,
    },
    #[error(
        "{branch}.input_size = {size}: a ViT input must be a positive multiple of 14, at most {MAX_INPUT_SIZE}"
    )]
    VitSize { branch: &'static str, size: usize },
    #[error("texture.input_size = {0}: must lie in {MIN_CNN_INPUT}..={MAX_INPUT_SIZE}")]
    CnnSize(usize),
    #[error("object.tau = {0}: must be a positive number")]
    Tau(f64),
    #[error("object.kmeans_restarts and object.kmeans_max_iter must be at least 1")]
    KMeans,
    #[error("object.kmeans_max_patches = {0}: must be at least {MIN_KMEANS_PATCHES}")]
    KMeansPatches(usize),
    #[error("texture.bank_budget_mb must be at least 1")]
    BankBudget,
    #[error("calibration.max_images = {0}: must be at least {MIN_CALIBRATION_IMAGES}")]
    CalibrationImages(usize),
    #[error("{field} = {value}: must lie in 0..={MAX_SIGMA}")]
    Sigma { field: &'static str, value: f64 },
    #[error("{branch}.covariance: ridge = {ridge} must be a non-negative number")]
    Ridge { branch: &'static str, ridge: f64 },
    #[error("{field} = {value}: must lie in (0, 1]")]
    Fraction { field: &'static str, value: f64 },
    #[error("texture.projection_eps = {0}: must lie in (0, 1)")]
    ProjectionEps(f64),
    #[error("texture.reweight_k = {0}: must be at least 2 (the nearest entry plus a neighbour)")]
    ReweightK(usize),
    #[error("{field} = {value}: must be a non-negative number")]
    Lambda { field: &'static str, value: f64 },
    #[error("fusion.soft_or_weight = {0}: must lie in [0, 1]")]
    SoftOrWeight(f64),
    #[error("fusion.final_kernel = {0}: must be odd and at most {MAX_KERNEL}")]
    FinalKernel(usize),
    #[error("fusion.eval_size = {0}: must lie in {MIN_CNN_INPUT}..={MAX_INPUT_SIZE}")]
    EvalSize(usize),
    #[error("calibration.holdout_fraction = {0}: must lie in [0, 1)")]
    Holdout(f64),
    #[error("calibration.threshold_quantile = {0}: must lie in (0, 1]")]
    Quantile(f64),
}

#[cfg(test)]
mod tests {
    use super::*;

    fn with(edit: impl FnOnce(&mut Config)) -> Result<(), ConfigError> {
        let mut config = Config::preset(Preset::Default);
        edit(&mut config);
        config.validate()
    }

    #[test]
    fn presets_are_valid() {
        Config::preset(Preset::Default).validate().unwrap();
        Config::preset(Preset::Paper).validate().unwrap();
    }

    #[test]
    fn paper_preset_uses_the_paper_backbones() {
        let c = Config::preset(Preset::Paper);
        assert_eq!(c.attribution.backbone, BackboneKind::Dinov2Vitb14);
        assert_eq!(c.texture.backbone, BackboneKind::WideResnet50_2);
        assert_eq!((c.object.input_size, c.attribution.input_size), (350, 406));
        assert_eq!(c.texture.input_size, 238);
    }

    #[test]
    fn default_preset_shares_one_vit_pass_between_the_semantic_branches() {
        let c = Config::preset(Preset::Default);
        assert_eq!(c.attribution.backbone, c.object.backbone);
        assert_eq!(c.attribution.input_size, c.object.input_size);
        assert_eq!(c.fusion.rule, FusionRule::Paper);
    }

    #[test]
    fn partial_toml_keeps_the_other_preset_values() {
        let c = Config::from_toml("[texture]\ncoreset_ratio = 0.05\n", Preset::Default).unwrap();
        assert_eq!(c.texture.coreset_ratio, 0.05);
        assert_eq!(c.texture.input_size, 238);
        let p = Config::from_toml("preset = \"paper\"\nseed = 3\n", Preset::Default).unwrap();
        assert_eq!(p.texture.backbone, BackboneKind::WideResnet50_2);
        assert_eq!(p.seed, 3);
    }

    #[test]
    fn toml_round_trip() {
        let c = Config::preset(Preset::Paper);
        assert_eq!(Config::from_toml(&c.to_toml(), Preset::Default).unwrap(), c);
    }

    #[test]
    fn wrong_types_and_unknown_fields_are_rejected() {
        assert!(matches!(
            Config::from_toml("[object]\ntau = \"high\"\n", Preset::Default),
            Err(ConfigError::Toml { .. })
        ));
        assert!(matches!(
            Config::from_toml("[object]\ntaux = 1.0\n", Preset::Default),
            Err(ConfigError::Toml { .. })
        ));
        assert!(matches!(
            Config::from_toml("[texture]\ninput_size = -5\n", Preset::Default),
            Err(ConfigError::Toml { .. })
        ));
    }

    #[test]
    fn file_errors_name_the_file() {
        let path = std::env::temp_dir().join(format!("beltad-bad-{}.toml", std::process::id()));
        std::fs::write(&path, "[object]\ntau = -1.0\n").unwrap();
        let err = Config::from_file(&path, Preset::Default).unwrap_err();
        assert!(
            matches!(&err, ConfigError::InFile { error, .. } if **error == ConfigError::Tau(-1.0)),
            "{err}"
        );
        assert!(
            err.to_string().starts_with(&path.display().to_string()),
            "{err}"
        );
        let err = Config::from_file(Path::new("/dev/zero"), Preset::Default).unwrap_err();
        assert!(err.to_string().contains("not a regular file"), "{err}");
    }

    #[test]
    fn vit_size_must_be_a_multiple_of_14() {
        assert!(matches!(
            with(|c| c.object.input_size = 351),
            Err(ConfigError::VitSize { .. })
        ));
        assert!(matches!(
            with(|c| c.attribution.input_size = 0),
            Err(ConfigError::VitSize { .. })
        ));
    }

    #[test]
    fn branch_backbones_must_fit_the_branch() {
        let err = with(|c| c.object.backbone = BackboneKind::MobilenetV2);
        assert!(matches!(err, Err(ConfigError::Backbone { .. })));
        let err = with(|c| c.texture.backbone = BackboneKind::Dinov2Vits14);
        assert!(matches!(err, Err(ConfigError::Backbone { .. })));
    }

    #[test]
    fn cnn_size_is_bounded() {
        assert_eq!(
            with(|c| c.texture.input_size = 8),
            Err(ConfigError::CnnSize(8))
        );
    }

    #[test]
    fn memory_bounds_are_checked() {
        assert_eq!(
            with(|c| c.object.kmeans_max_patches = 10),
            Err(ConfigError::KMeansPatches(10))
        );
        assert_eq!(
            with(|c| c.texture.bank_budget_mb = 0),
            Err(ConfigError::BankBudget)
        );
        assert_eq!(
            with(|c| c.calibration.max_images = 1),
            Err(ConfigError::CalibrationImages(1))
        );
    }

    #[test]
    fn tau_must_be_positive() {
        assert_eq!(with(|c| c.object.tau = 0.0), Err(ConfigError::Tau(0.0)));
        assert!(with(|c| c.object.tau = f64::NAN).is_err());
    }

    #[test]
    fn kmeans_needs_a_restart_and_an_iteration() {
        assert_eq!(
            with(|c| c.object.kmeans_restarts = 0),
            Err(ConfigError::KMeans)
        );
    }

    #[test]
    fn sigma_is_bounded() {
        assert!(matches!(
            with(|c| c.texture.sigma = -1.0),
            Err(ConfigError::Sigma { .. })
        ));
        assert!(matches!(
            with(|c| c.object.sigma = 1e9),
            Err(ConfigError::Sigma { .. })
        ));
    }

    #[test]
    fn ridge_must_be_non_negative() {
        let bad = CovarianceEstimator::Sample { ridge: -1.0 };
        assert!(matches!(
            with(|c| c.object.covariance = bad),
            Err(ConfigError::Ridge { .. })
        ));
    }

    #[test]
    fn fractions_lie_in_zero_one() {
        assert!(matches!(
            with(|c| c.texture.coreset_ratio = 0.0),
            Err(ConfigError::Fraction { .. })
        ));
        assert!(matches!(
            with(|c| c.texture.coreset_ratio = 1.5),
            Err(ConfigError::Fraction { .. })
        ));
        let err = with(|c| c.texture.bank_image_fraction = 0.0);
        assert!(matches!(err, Err(ConfigError::Fraction { .. })));
    }

    #[test]
    fn projection_eps_lies_in_zero_one() {
        assert_eq!(
            with(|c| c.texture.projection_eps = 1.0),
            Err(ConfigError::ProjectionEps(1.0))
        );
    }

    #[test]
    fn reweight_needs_a_neighbour() {
        assert_eq!(
            with(|c| c.texture.reweight_k = 1),
            Err(ConfigError::ReweightK(1))
        );
    }

    #[test]
    fn lambdas_are_non_negative() {
        assert!(matches!(
            with(|c| c.fusion.lambda_obj = -0.1),
            Err(ConfigError::Lambda { .. })
        ));
    }

    #[test]
    fn soft_or_weight_lies_in_zero_one() {
        let err = with(|c| c.fusion.soft_or_weight = 1.5);
        assert_eq!(err, Err(ConfigError::SoftOrWeight(1.5)));
    }

    #[test]
    fn fusion_rules_read_from_toml() {
        let text = "[fusion]\nrule = \"two_of_three\"\nimage_score = \"calibrated\"\n";
        let c = Config::from_toml(text, Preset::Default).unwrap();
        assert_eq!(c.fusion.rule, FusionRule::TwoOfThree);
        assert_eq!(c.fusion.image_score, ImageScoreRule::Calibrated);
    }

    #[test]
    fn final_kernel_is_odd() {
        assert_eq!(
            with(|c| c.fusion.final_kernel = 4),
            Err(ConfigError::FinalKernel(4))
        );
    }

    #[test]
    fn eval_size_is_bounded() {
        assert_eq!(
            with(|c| c.fusion.eval_size = 10),
            Err(ConfigError::EvalSize(10))
        );
    }

    #[test]
    fn holdout_and_quantile_are_bounded() {
        assert_eq!(
            with(|c| c.calibration.holdout_fraction = 1.0),
            Err(ConfigError::Holdout(1.0))
        );
        assert_eq!(
            with(|c| c.calibration.threshold_quantile = 0.0),
            Err(ConfigError::Quantile(0.0))
        );
    }
}
