//! From image files to the three branches' features.
//!
//! The extractor owns the loaded backbones. Per image it decodes the file,
//! resizes it once to the evaluation grid ([`GridImage`]), derives each
//! branch's input from that grid, and runs the backbones on batches:
//! - object branch: DINOv2 CLS token `(D,)` and patch tokens `(N, D)`;
//! - attribution branch: DINOv2 patch tokens `(N, D)` (one forward shared with
//!   the object branch when both use the same backbone at the same size);
//! - texture branch: PatchCore patch features `(N, C₈ + C₁₆)` from the CNN.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use candle_core::{Device, Tensor};
use image::RgbImage;
use rayon::prelude::*;
use thiserror::Error;

use crate::backbone::{self, BackboneError, CnnBackbone, CnnKind, Dinov2, Dinov2Config};
use crate::branch::texture::{FeatureMap, patch_features};
use crate::config::{BackboneKind, Config};
use crate::image_io::{DecodeLimits, ImageError, load_rgb};
use crate::preprocess::GridImage;
use crate::progress::Progress;
use crate::weights::{WeightsError, WeightsSearch, fingerprint};

/// Images per backbone forward by default.
pub const DEFAULT_BATCH_SIZE: usize = 4;

/// Features could not be computed.
#[derive(Debug, Error)]
pub enum FeatureError {
    #[error(transparent)]
    Image(#[from] ImageError),
    #[error(transparent)]
    Weights(#[from] WeightsError),
    #[error(transparent)]
    Backbone(#[from] BackboneError),
    #[error("{stage}: {source}")]
    Compute {
        stage: &'static str,
        #[source]
        source: candle_core::Error,
    },
}

fn compute(stage: &'static str) -> impl FnOnce(candle_core::Error) -> FeatureError {
    move |source| FeatureError::Compute { stage, source }
}

/// Feature widths of the three branches.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Dims {
    pub object: usize,
    pub attribution: usize,
    pub texture: usize,
}

/// Tokens of one image from one backbone: an optional global token `(D,)`
/// (the ViT's CLS; empty for a CNN) and patch features `(h·w, D)`.
#[derive(Debug, Clone, PartialEq)]
pub struct Tokens {
    pub cls: Vec<f32>,
    pub patches: Vec<f32>,
    pub grid: (usize, usize),
}

impl Tokens {
    /// The mean patch feature `(D,)`, accumulated in f64.
    pub fn mean_patch(&self) -> Vec<f32> {
        let n = (self.grid.0 * self.grid.1).max(1);
        let dim = self.patches.len() / n;
        let mut mean = vec![0.0f64; dim];
        for row in self.patches.chunks_exact(dim.max(1)) {
            for (m, &v) in mean.iter_mut().zip(row) {
                *m += f64::from(v);
            }
        }
        mean.iter().map(|m| (m / n as f64) as f32).collect()
    }
}

/// One image's features for every branch.
#[derive(Debug, Clone)]
pub struct ImageFeatures {
    pub object: Tokens,
    pub attribution: Tokens,
    pub texture: Tokens,
}

/// A decoded image and its features.
pub struct Extracted {
    pub rgb: RgbImage,
    pub features: ImageFeatures,
}

/// The loaded backbones and the input sizes of the branches.
pub struct FeatureExtractor {
    object_vit: Dinov2,
    /// `None` when the attribution branch shares the object branch's backbone.
    attribution_vit: Option<Dinov2>,
    cnn: CnnBackbone,
    sizes: Sizes,
    fingerprints: BTreeMap<String, String>,
    device: Device,
    limits: DecodeLimits,
    batch_size: usize,
}

#[derive(Debug, Clone, Copy)]
struct Sizes {
    eval: usize,
    object: usize,
    attribution: usize,
    texture: usize,
}

impl FeatureExtractor {
    /// Loads the backbones `config` needs from the weights search path.
    pub fn load(config: &Config, search: &WeightsSearch) -> Result<Self, FeatureError> {
        let device = Device::Cpu;
        let mut fingerprints = BTreeMap::new();
        let mut locate = |kind: BackboneKind| -> Result<PathBuf, FeatureError> {
            let path = search.find(kind)?;
            fingerprints.insert(kind.name().to_string(), fingerprint(&path)?);
            tracing::info!(backbone = %kind, path = %path.display(), "loading backbone");
            Ok(path)
        };
        let sizes = Sizes {
            eval: config.fusion.eval_size,
            object: config.object.input_size,
            attribution: config.attribution.input_size,
            texture: config.texture.input_size,
        };

        let object_kind = config.object.backbone;
        let object_vit = load_vit(object_kind, &locate(object_kind)?, sizes.object, &device)?;
        let attribution_kind = config.attribution.backbone;
        let attribution_vit = if attribution_kind == object_kind {
            None
        } else {
            Some(load_vit(
                attribution_kind,
                &locate(attribution_kind)?,
                sizes.attribution,
                &device,
            )?)
        };
        let cnn_kind = match config.texture.backbone {
            BackboneKind::WideResnet50_2 => CnnKind::WideResNet50,
            _ => CnnKind::MobileNetV2,
        };
        let cnn = backbone::load_cnn(cnn_kind, &locate(config.texture.backbone)?, &device)?;

        Ok(Self {
            object_vit,
            attribution_vit,
            cnn,
            sizes,
            fingerprints,
            device,
            limits: DecodeLimits::default(),
            batch_size: DEFAULT_BATCH_SIZE,
        })
    }

    /// Images per forward pass (at least 1).
    pub fn with_batch_size(mut self, batch_size: usize) -> Self {
        self.batch_size = batch_size.max(1);
        self
    }

    /// Decoding limits for every image read.
    pub fn with_limits(mut self, limits: DecodeLimits) -> Self {
        self.limits = limits;
        self
    }

    /// SHA-256 of each loaded weights file, by backbone name.
    pub fn fingerprints(&self) -> &BTreeMap<String, String> {
        &self.fingerprints
    }

    pub fn dims(&self) -> Dims {
        let attribution = self
            .attribution_vit
            .as_ref()
            .unwrap_or(&self.object_vit)
            .hidden_size();
        let (c8, c16) = self.cnn.kind().channels();
        Dims {
            object: self.object_vit.hidden_size(),
            attribution,
            texture: c8 + c16,
        }
    }

    /// Runs `f` on every image in order, with progress. An image that cannot
    /// be read reaches `f` as its error; a failed forward pass stops the run.
    pub fn for_each_image<E: From<FeatureError>>(
        &self,
        paths: &[PathBuf],
        stage: &str,
        progress: &dyn Progress,
        mut f: impl FnMut(&Path, Result<Extracted, ImageError>) -> Result<(), E>,
    ) -> Result<(), E> {
        progress.start(stage, paths.len() as u64);
        for chunk in paths.chunks(self.batch_size) {
            let decoded: Vec<Result<RgbImage, ImageError>> = chunk
                .par_iter()
                .map(|p| load_rgb(p, &self.limits))
                .collect();
            let good: Vec<&RgbImage> = decoded.iter().filter_map(|r| r.as_ref().ok()).collect();
            let mut features = self.extract(&good)?.into_iter();
            for (path, image) in chunk.iter().zip(decoded) {
                let item = image.map(|rgb| Extracted {
                    rgb,
                    features: features.next().expect("one per image"),
                });
                f(path, item)?;
            }
            progress.advance(chunk.len() as u64);
        }
        progress.finish();
        Ok(())
    }

    /// Features of decoded images, one batch per backbone.
    pub fn extract(&self, images: &[&RgbImage]) -> Result<Vec<ImageFeatures>, FeatureError> {
        if images.is_empty() {
            return Ok(Vec::new());
        }
        let grids: Vec<GridImage> = images
            .par_iter()
            .map(|rgb| GridImage::from_rgb(rgb, self.sizes.eval))
            .collect();

        let object = self.vit_tokens(&self.object_vit, &grids, self.sizes.object)?;
        let shared = self.attribution_vit.is_none() && self.sizes.attribution == self.sizes.object;
        let attribution = if shared {
            object.clone()
        } else {
            let vit = self.attribution_vit.as_ref().unwrap_or(&self.object_vit);
            self.vit_tokens(vit, &grids, self.sizes.attribution)?
        };
        let texture = self.texture_features(&grids)?;

        Ok(object
            .into_iter()
            .zip(attribution)
            .zip(texture)
            .map(|((object, attribution), texture)| ImageFeatures {
                object,
                attribution,
                texture,
            })
            .collect())
    }

    /// Per image: CLS token and patch tokens.
    fn vit_tokens(
        &self,
        vit: &Dinov2,
        grids: &[GridImage],
        size: usize,
    ) -> Result<Vec<Tokens>, FeatureError> {
        let batch = self.batch(grids, size)?;
        let tokens = vit.forward(&batch).map_err(compute("DINOv2 forward"))?;
        let (b, n, d) = tokens.dims3().map_err(compute("DINOv2 output"))?;
        let flat: Vec<f32> = tokens
            .flatten_all()
            .and_then(|t| t.to_vec1())
            .map_err(compute("DINOv2 output"))?;
        let side = size / crate::config::VIT_PATCH;
        Ok(flat
            .chunks_exact(n * d)
            .take(b)
            .map(|image| Tokens {
                cls: image[..d].to_vec(),
                patches: image[d..].to_vec(),
                grid: (side, side),
            })
            .collect())
    }

    /// Per image: PatchCore patch features on the stride-8 grid.
    fn texture_features(&self, grids: &[GridImage]) -> Result<Vec<Tokens>, FeatureError> {
        let batch = self.batch(grids, self.sizes.texture)?;
        let maps = self.cnn.forward(&batch).map_err(compute("CNN forward"))?;
        let (b, c8, h8, w8) = maps.stride8.dims4().map_err(compute("CNN output"))?;
        let (_, c16, h16, w16) = maps.stride16.dims4().map_err(compute("CNN output"))?;
        let to_vec = |t: &Tensor| {
            t.flatten_all()
                .and_then(|t| t.to_vec1::<f32>())
                .map_err(compute("CNN output"))
        };
        let (s8, s16) = (to_vec(&maps.stride8)?, to_vec(&maps.stride16)?);
        let (n8, n16) = (c8 * h8 * w8, c16 * h16 * w16);
        Ok((0..b)
            .map(|i| {
                let (patches, grid) = patch_features(
                    FeatureMap {
                        data: &s8[i * n8..(i + 1) * n8],
                        channels: c8,
                        height: h8,
                        width: w8,
                    },
                    FeatureMap {
                        data: &s16[i * n16..(i + 1) * n16],
                        channels: c16,
                        height: h16,
                        width: w16,
                    },
                );
                Tokens {
                    cls: Vec::new(),
                    patches,
                    grid,
                }
            })
            .collect())
    }

    /// `(B, 3, size, size)` normalised inputs.
    fn batch(&self, grids: &[GridImage], size: usize) -> Result<Tensor, FeatureError> {
        let data: Vec<f32> = grids
            .par_iter()
            .flat_map_iter(|g| g.branch_input(size))
            .collect();
        Tensor::from_vec(data, (grids.len(), 3, size, size), &self.device)
            .map_err(compute("input batch"))
    }
}

fn load_vit(
    kind: BackboneKind,
    path: &Path,
    size: usize,
    device: &Device,
) -> Result<Dinov2, FeatureError> {
    let cfg = match kind {
        BackboneKind::Dinov2Vitb14 => Dinov2Config::vit_base(),
        _ => Dinov2Config::vit_small(),
    };
    Ok(backbone::load_dinov2(path, &cfg, (size, size), device)?)
}
