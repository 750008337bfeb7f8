//! Sensitivity sweeps: one configuration field over a range of values, with
//! the metrics at every point (the paper's τ and input-size studies, for any
//! data set and any numeric field).
//!
//! Backbone features come from the feature cache, so points that only change
//! how features are scored (τ, smoothing, fusion, threshold quantile) reuse
//! the fitted branches and only recalibrate; points that change what is
//! fitted (input sizes, covariance, coreset ratio, ...) refit on cached or
//! newly computed features.

use std::path::PathBuf;

use serde::Serialize;
use thiserror::Error;

use crate::config::{Config, ConfigError, Preset};
use crate::detector::Detector;
use crate::evaluate::{EvalError, EvalOptions, Metrics, evaluate};
use crate::features::FeatureExtractor;
use crate::fit::{FitError, fit, recalibrate};
use crate::image_io::DecodeLimits;
use crate::progress::Progress;

/// Most points one sweep accepts.
pub const MAX_POINTS: usize = 200;

/// A sweep that could not be run.
#[derive(Debug, Error)]
pub enum SweepError {
    #[error(
        "sweep `{0}`: expected FIELD=VALUES, e.g. object.tau=1.05:1.25:0.01 or object.input_size=224,280,350"
    )]
    Syntax(String),
    #[error("sweep `{field}`: {message}")]
    Values { field: String, message: String },
    #[error("sweep {field} = {value}: {source}")]
    Config {
        field: String,
        value: f64,
        #[source]
        source: ConfigError,
    },
    #[error(transparent)]
    Fit(Box<FitError>),
    #[error(transparent)]
    Eval(Box<EvalError>),
    #[error("loading backbones for {field} = {value}: {message}")]
    Backbones {
        field: String,
        value: f64,
        message: String,
    },
}

impl From<FitError> for SweepError {
    fn from(e: FitError) -> Self {
        SweepError::Fit(Box::new(e))
    }
}

impl From<EvalError> for SweepError {
    fn from(e: EvalError) -> Self {
        SweepError::Eval(Box::new(e))
    }
}

/// One field and the values it takes.
#[derive(Debug, Clone, PartialEq)]
pub struct SweepSpec {
    /// Dotted config path, e.g. `object.tau`.
    pub field: String,
    pub values: Vec<f64>,
}

impl SweepSpec {
    /// Parses `FIELD=START:STOP:STEP` (inclusive) or `FIELD=V1,V2,...`.
    pub fn parse(text: &str) -> Result<Self, SweepError> {
        let (field, values) = text
            .split_once('=')
            .ok_or_else(|| SweepError::Syntax(text.into()))?;
        let field = field.trim().to_string();
        let bad = |message: String| SweepError::Values {
            field: field.clone(),
            message,
        };
        let number = |s: &str| {
            s.trim()
                .parse::<f64>()
                .map_err(|_| bad(format!("`{s}` is not a number")))
        };
        let values: Vec<f64> = if values.contains(':') {
            let parts: Vec<&str> = values.split(':').collect();
            let [start, stop, step] = parts[..] else {
                return Err(bad("a range needs START:STOP:STEP".into()));
            };
            let (start, stop, step) = (number(start)?, number(stop)?, number(step)?);
            if !(step > 0.0 && stop >= start && start.is_finite() && stop.is_finite()) {
                return Err(bad("a range needs START <= STOP and STEP > 0".into()));
            }
            let n = ((stop - start) / step + 1e-9).floor() as usize + 1;
            if n > MAX_POINTS {
                return Err(bad(format!("{n} points; at most {MAX_POINTS}")));
            }
            (0..n)
                .map(|i| round_step(start + i as f64 * step))
                .collect()
        } else {
            values.split(',').map(number).collect::<Result<_, _>>()?
        };
        if values.is_empty() || values.len() > MAX_POINTS {
            return Err(bad(format!("needs 1 to {MAX_POINTS} values")));
        }
        Ok(Self { field, values })
    }

    /// `base` with this field set to `value` (validated).
    pub fn apply(&self, base: &Config, value: f64) -> Result<Config, SweepError> {
        let config_err = |source| SweepError::Config {
            field: self.field.clone(),
            value,
            source,
        };
        let mut table = toml::Table::try_from(base).map_err(|e| {
            config_err(ConfigError::Toml {
                message: e.to_string(),
            })
        })?;
        let mut slot = &mut table;
        let mut keys = self.field.split('.').peekable();
        while let Some(key) = keys.next() {
            let unknown = || {
                config_err(ConfigError::Toml {
                    message: format!("no numeric field `{}`", self.field),
                })
            };
            if keys.peek().is_none() {
                let current = slot.get(key).ok_or_else(unknown)?;
                let new = match current {
                    toml::Value::Integer(_) if value.fract() == 0.0 => {
                        toml::Value::Integer(value as i64)
                    }
                    toml::Value::Integer(_) | toml::Value::Float(_) => toml::Value::Float(value),
                    _ => return Err(unknown()),
                };
                slot.insert(key.to_string(), new);
            } else {
                slot = slot
                    .get_mut(key)
                    .and_then(toml::Value::as_table_mut)
                    .ok_or_else(unknown)?;
            }
        }
        let text = toml::to_string(&table).map_err(|e| {
            config_err(ConfigError::Toml {
                message: e.to_string(),
            })
        })?;
        Config::from_toml(&text, Preset::Default).map_err(config_err)
    }
}

/// Removes the binary noise of `start + i·step`.
fn round_step(v: f64) -> f64 {
    (v * 1e9).round() / 1e9
}

/// The metrics at one value.
#[derive(Debug, Clone, Serialize)]
pub struct SweepPoint {
    pub value: f64,
    pub fused: Metrics,
    pub object: Metrics,
    pub attribution: Metrics,
    pub texture: Metrics,
    /// Whether the branches were refitted for this point (else only recalibrated).
    pub refitted: bool,
}

/// All points of one sweep.
#[derive(Debug, Clone, Serialize)]
pub struct SweepResult {
    pub field: String,
    pub points: Vec<SweepPoint>,
}

/// Where a sweep reads its images and how it loads backbones.
pub struct SweepContext<'a> {
    pub data: PathBuf,
    pub dataset: String,
    pub training_images: Vec<PathBuf>,
    pub limits: DecodeLimits,
    /// Loads the backbones a config needs (with the feature cache attached).
    pub load: &'a dyn Fn(&Config) -> Result<FeatureExtractor, String>,
}

/// Runs one sweep from `base`.
pub fn run_sweep(
    base: &Config,
    spec: &SweepSpec,
    ctx: &SweepContext,
    progress: &dyn Progress,
) -> Result<SweepResult, SweepError> {
    let mut fitted: Option<(Config, Detector)> = None;
    let mut points = Vec::with_capacity(spec.values.len());
    for &value in &spec.values {
        let config = spec.apply(base, value)?;
        tracing::info!(field = %spec.field, value, "sweep point");
        let extractor = (ctx.load)(&config).map_err(|message| SweepError::Backbones {
            field: spec.field.clone(),
            value,
            message,
        })?;
        let reuse = fitted
            .as_ref()
            .is_some_and(|(c, _)| !needs_refit(c, &config));
        let detector = match (&mut fitted, reuse) {
            (Some((_, detector)), true) => {
                detector.apply_scoring_config(&config);
                recalibrate(detector, &extractor, &ctx.training_images, progress)?;
                detector.clone()
            }
            _ => {
                let detector = fit(
                    &config,
                    &extractor,
                    &ctx.training_images,
                    &ctx.dataset,
                    progress,
                )?;
                fitted = Some((config.clone(), detector.clone()));
                detector
            }
        };
        let e = evaluate(
            &detector,
            &extractor,
            &ctx.data,
            &ctx.limits,
            EvalOptions::default(),
            progress,
        )?;
        points.push(SweepPoint {
            value,
            fused: e.fused,
            object: e.object,
            attribution: e.attribution,
            texture: e.texture,
            refitted: !reuse,
        });
    }
    Ok(SweepResult {
        field: spec.field.clone(),
        points,
    })
}

/// Whether going from `fitted` to `new` changes what the branches fit.
pub fn needs_refit(fitted: &Config, new: &Config) -> bool {
    let mut scoring_only = fitted.clone();
    scoring_only.copy_scoring_fields(new);
    scoring_only != *new
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges_and_lists_parse() {
        let s = SweepSpec::parse("object.tau=1.05:1.25:0.05").unwrap();
        assert_eq!(s.field, "object.tau");
        assert_eq!(s.values, vec![1.05, 1.1, 1.15, 1.2, 1.25]);
        let l = SweepSpec::parse("object.input_size=224, 280,350").unwrap();
        assert_eq!(l.values, vec![224.0, 280.0, 350.0]);
    }

    #[test]
    fn bad_specs_are_named() {
        assert!(matches!(
            SweepSpec::parse("object.tau"),
            Err(SweepError::Syntax(_))
        ));
        assert!(matches!(
            SweepSpec::parse("object.tau=1:0:0.1"),
            Err(SweepError::Values { .. })
        ));
        assert!(matches!(
            SweepSpec::parse("object.tau=a,b"),
            Err(SweepError::Values { .. })
        ));
        assert!(matches!(
            SweepSpec::parse("object.tau=0:1000:0.001"),
            Err(SweepError::Values { .. })
        ));
    }

    #[test]
    fn apply_sets_integers_and_floats_and_validates() {
        let base = Config::preset(Preset::Default);
        let size = SweepSpec::parse("object.input_size=280").unwrap();
        assert_eq!(size.apply(&base, 280.0).unwrap().object.input_size, 280);
        let tau = SweepSpec::parse("object.tau=1.2").unwrap();
        assert_eq!(tau.apply(&base, 1.2).unwrap().object.tau, 1.2);
        assert!(matches!(
            size.apply(&base, 281.0),
            Err(SweepError::Config { .. })
        ));
        let unknown = SweepSpec::parse("object.nope=1").unwrap();
        assert!(unknown.apply(&base, 1.0).is_err());
        let table = SweepSpec::parse("object=1").unwrap();
        assert!(table.apply(&base, 1.0).is_err());
    }

    #[test]
    fn only_fitting_fields_need_a_refit() {
        let base = Config::preset(Preset::Default);
        let mut tau = base.clone();
        tau.object.tau = 1.2;
        tau.fusion.lambda_obj = 0.5;
        assert!(!needs_refit(&base, &tau));
        let mut size = base.clone();
        size.object.input_size = 280;
        assert!(needs_refit(&base, &size));
    }
}
