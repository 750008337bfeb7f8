//! From image files to the three branches' features.
//!
//! The extractor owns the loaded backbones. Per image it decodes the file,
//! resizes it once to the evaluation grid ([`GridImage`]), derives each
//! branch's input from that grid, and runs the backbones on batches:
//! - object branch: DINOv2 CLS token `(D,)` and patch tokens `(N, D)`;
//! - attribution branch: DINOv2 patch tokens `(N, D)` (one forward shared with
//!   the object branch when both use the same backbone at the same size);
//! - texture branch: PatchCore patch features `(N, C₈ + C₁₆)` from the CNN.
//!
//! With a [`FeatureCache`], each of the three feature streams is looked up by
//! the image file's hash first and computed only for the images it misses.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use candle_core::{Device, Tensor};
use image::RgbImage;
use rayon::prelude::*;
use sha2::{Digest, Sha256};
use thiserror::Error;

use crate::backbone::{
    self, BackboneError, CnnBackbone, CnnFeatures, CnnKind, Dinov2, Dinov2Config,
};
use crate::branch::texture::{FeatureMap, patch_features};
use crate::config::{BackboneKind, Config};
use crate::feature_cache::FeatureCache;
use crate::image_io::{DecodeLimits, ImageError, decode_rgb, read_limited};
use crate::model_file::hex;
use crate::preprocess::GridImage;
use crate::progress::Progress;
use crate::weights::{WeightsError, WeightsSearch, fingerprint};

/// Images per backbone forward by default.
pub const DEFAULT_BATCH_SIZE: usize = 4;
/// Version of the path from image file to backbone input; part of every
/// cache key, so bump it when preprocessing changes.
const PREPROCESS_VERSION: u32 = 1;

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
    /// The stop flag was raised (Ctrl-C in the CLI).
    #[error("interrupted")]
    Interrupted,
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

/// A decoded image and, when features are cached, the hash of its file.
struct Decoded {
    rgb: RgbImage,
    digest: Option<String>,
}

/// The three feature streams of an image.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Stream {
    Object,
    Attribution,
    Texture,
}

/// The loaded backbones and the input sizes of the branches.
pub struct FeatureExtractor {
    object_vit: Dinov2,
    /// `None` when the attribution branch uses the object branch's backbone.
    attribution_vit: Option<Dinov2>,
    cnn: CnnBackbone,
    sizes: Sizes,
    /// Backbone name of each stream, for cache keys.
    kinds: [BackboneKind; 3],
    fingerprints: BTreeMap<String, String>,
    device: Device,
    limits: DecodeLimits,
    batch_size: usize,
    cache: Option<FeatureCache>,
    /// Checked between batches; when set, the run stops with [`FeatureError::Interrupted`].
    stop: Option<Arc<AtomicBool>>,
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
        let device = backbone_device();
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
            let path = locate(attribution_kind)?;
            Some(load_vit(
                attribution_kind,
                &path,
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
            kinds: [object_kind, attribution_kind, config.texture.backbone],
            fingerprints,
            device,
            limits: DecodeLimits::default(),
            batch_size: DEFAULT_BATCH_SIZE,
            cache: None,
            stop: None,
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

    /// Looks features up in (and adds them to) an on-disk cache.
    pub fn with_cache(mut self, cache: FeatureCache) -> Self {
        self.cache = Some(cache);
        self
    }

    /// A flag that stops [`FeatureExtractor::for_each_image`] between batches.
    pub fn with_stop_flag(mut self, stop: Arc<AtomicBool>) -> Self {
        self.stop = Some(stop);
        self
    }

    fn check_stop(&self) -> Result<(), FeatureError> {
        match &self.stop {
            Some(stop) if stop.load(Ordering::SeqCst) => Err(FeatureError::Interrupted),
            _ => Ok(()),
        }
    }

    /// SHA-256 of each loaded weights file, by backbone name.
    pub fn fingerprints(&self) -> &BTreeMap<String, String> {
        &self.fingerprints
    }

    pub fn dims(&self) -> Dims {
        let attribution = self.attribution_vit.as_ref().unwrap_or(&self.object_vit);
        let (c8, c16) = self.cnn.kind().channels();
        Dims {
            object: self.object_vit.hidden_size(),
            attribution: attribution.hidden_size(),
            texture: c8 + c16,
        }
    }

    /// Runs `f` on every image in order, with progress. An image that cannot
    /// be read reaches `f` as its error; a failed forward pass or a raised
    /// stop flag (checked before every batch and at the end) stops the run.
    pub fn for_each_image<E: From<FeatureError>>(
        &self,
        paths: &[PathBuf],
        stage: &str,
        progress: &dyn Progress,
        mut f: impl FnMut(&Path, Result<Extracted, ImageError>) -> Result<(), E>,
    ) -> Result<(), E> {
        progress.start(stage, paths.len() as u64);
        for chunk in paths.chunks(self.batch_size) {
            self.check_stop()?;
            let decoded: Vec<Result<Decoded, ImageError>> =
                chunk.par_iter().map(|p| self.decode(p)).collect();
            let good: Vec<&Decoded> = decoded.iter().filter_map(|r| r.as_ref().ok()).collect();
            let mut features = self.extract_decoded(&good)?.into_iter();
            for (path, image) in chunk.iter().zip(decoded) {
                // `extract_decoded` returns one entry per decoded image, in order.
                let item = image.map(|d| (d.rgb, features.next()));
                match item {
                    Ok((rgb, Some(features))) => f(path, Ok(Extracted { rgb, features }))?,
                    Ok((_, None)) => unreachable!("one feature set per decoded image"),
                    Err(e) => f(path, Err(e))?,
                }
            }
            progress.advance(chunk.len() as u64);
        }
        self.check_stop()?;
        progress.finish();
        Ok(())
    }

    /// Features of decoded images (no cache).
    pub fn extract(&self, images: &[&RgbImage]) -> Result<Vec<ImageFeatures>, FeatureError> {
        let decoded: Vec<Decoded> = images
            .iter()
            .map(|rgb| Decoded {
                rgb: (*rgb).clone(),
                digest: None,
            })
            .collect();
        self.extract_decoded(&decoded.iter().collect::<Vec<_>>())
    }

    fn decode(&self, path: &Path) -> Result<Decoded, ImageError> {
        let bytes = read_limited(path, &self.limits)?;
        let digest = self.cache.as_ref().map(|_| hex(&Sha256::digest(&bytes)));
        Ok(Decoded {
            rgb: decode_rgb(&bytes, path, &self.limits)?,
            digest,
        })
    }

    /// Features of decoded images: from the cache where possible, one batch per
    /// backbone for the rest.
    fn extract_decoded(&self, images: &[&Decoded]) -> Result<Vec<ImageFeatures>, FeatureError> {
        let mut grids: Option<Vec<GridImage>> = None;
        let mut streams: Vec<Vec<Tokens>> = Vec::with_capacity(3);
        for stream in [Stream::Object, Stream::Attribution, Stream::Texture] {
            if stream == Stream::Attribution && self.shares_object_forward() {
                streams.push(streams[0].clone());
                continue;
            }
            let key = self.stream_key(stream);
            let mut found: Vec<Option<Tokens>> = images
                .iter()
                .map(|d| Some((self.cache.as_ref()?, d.digest.as_deref()?)))
                .map(|hit| hit.and_then(|(cache, digest)| cache.load(&key, digest)))
                .map(|tokens| tokens.filter(|t| self.fits_stream(stream, t)))
                .collect();
            let missing: Vec<usize> = (0..images.len()).filter(|&i| found[i].is_none()).collect();
            if !missing.is_empty() {
                let grids = grids.get_or_insert_with(|| {
                    images
                        .par_iter()
                        .map(|d| GridImage::from_rgb(&d.rgb, self.sizes.eval))
                        .collect()
                });
                let subset: Vec<&GridImage> = missing.iter().map(|&i| &grids[i]).collect();
                for (&i, tokens) in missing.iter().zip(self.compute(stream, &subset)?) {
                    if let (Some(cache), Some(digest)) = (&self.cache, &images[i].digest) {
                        cache.store(&key, digest, &tokens);
                    }
                    found[i] = Some(tokens);
                }
            }
            streams.push(found.into_iter().flatten().collect());
        }
        let mut streams = streams.into_iter();
        let (object, attribution, texture) = (streams.next(), streams.next(), streams.next());
        Ok(object
            .into_iter()
            .flatten()
            .zip(attribution.into_iter().flatten())
            .zip(texture.into_iter().flatten())
            .map(|((object, attribution), texture)| ImageFeatures {
                object,
                attribution,
                texture,
            })
            .collect())
    }

    /// Whether cached tokens have the widths this stream computes; an entry
    /// that does not (edited, or damaged in a way that still parses) is
    /// recomputed rather than handed to the branches.
    fn fits_stream(&self, stream: Stream, tokens: &Tokens) -> bool {
        let dims = self.dims();
        let vit_grid = |size: usize| {
            let side = size / crate::config::VIT_PATCH;
            (side, side)
        };
        let (cls, width, grid) = match stream {
            Stream::Object => (dims.object, dims.object, Some(vit_grid(self.sizes.object))),
            Stream::Attribution => (
                dims.attribution,
                dims.attribution,
                Some(vit_grid(self.sizes.attribution)),
            ),
            Stream::Texture => (0, dims.texture, None),
        };
        let cells = tokens.grid.0 * tokens.grid.1;
        tokens.cls.len() == cls
            && tokens.patches.len() == cells * width
            && grid.is_none_or(|g| g == tokens.grid)
    }

    /// Whether the attribution branch reuses the object branch's forward pass.
    fn shares_object_forward(&self) -> bool {
        self.attribution_vit.is_none() && self.sizes.attribution == self.sizes.object
    }

    /// Cache key of a stream: backbone, weights, input size, grid, preprocessing.
    fn stream_key(&self, stream: Stream) -> String {
        let (kind, size) = match stream {
            Stream::Object => (self.kinds[0], self.sizes.object),
            Stream::Attribution => (self.kinds[1], self.sizes.attribution),
            Stream::Texture => (self.kinds[2], self.sizes.texture),
        };
        let weights = self
            .fingerprints
            .get(kind.name())
            .map_or("", |f| &f[..f.len().min(16)]);
        format!(
            "{kind}-{weights}-in{size}-grid{}-p{PREPROCESS_VERSION}",
            self.sizes.eval
        )
    }

    fn compute(&self, stream: Stream, grids: &[&GridImage]) -> Result<Vec<Tokens>, FeatureError> {
        match stream {
            Stream::Object => self.vit_tokens(&self.object_vit, grids, self.sizes.object),
            Stream::Attribution => {
                let vit = self.attribution_vit.as_ref().unwrap_or(&self.object_vit);
                self.vit_tokens(vit, grids, self.sizes.attribution)
            }
            Stream::Texture => self.texture_features(grids),
        }
    }

    /// Per image: CLS token and patch tokens.
    fn vit_tokens(
        &self,
        vit: &Dinov2,
        grids: &[&GridImage],
        size: usize,
    ) -> Result<Vec<Tokens>, FeatureError> {
        let batch = self.batch(grids, size)?;
        let tokens = vit.forward(&batch).map_err(compute("DINOv2 forward"))?;
        split_vit_tokens(&tokens, size).map_err(compute("DINOv2 output"))
    }

    /// Per image: PatchCore patch features on the stride-8 grid.
    fn texture_features(&self, grids: &[&GridImage]) -> Result<Vec<Tokens>, FeatureError> {
        let batch = self.batch(grids, self.sizes.texture)?;
        let maps = self.cnn.forward(&batch).map_err(compute("CNN forward"))?;
        cnn_tokens(&maps).map_err(compute("CNN output"))
    }

    /// `(B, 3, size, size)` normalised inputs.
    fn batch(&self, grids: &[&GridImage], size: usize) -> Result<Tensor, FeatureError> {
        let data: Vec<f32> = grids
            .par_iter()
            .flat_map_iter(|g| g.branch_input(size))
            .collect();
        Tensor::from_vec(data, (grids.len(), 3, size, size), &self.device)
            .map_err(compute("input batch"))
    }
}

/// Per image of a ViT output `(B, 1 + N, D)` at input `size`: its CLS token
/// and patch tokens.
pub fn split_vit_tokens(out: &Tensor, size: usize) -> candle_core::Result<Vec<Tokens>> {
    let (_, n, d) = out.dims3()?;
    let flat: Vec<f32> = out.flatten_all()?.to_vec1()?;
    let side = size / crate::config::VIT_PATCH;
    Ok(flat
        .chunks_exact(n * d)
        .map(|image| Tokens {
            cls: image[..d].to_vec(),
            patches: image[d..].to_vec(),
            grid: (side, side),
        })
        .collect())
}

/// Per image of a CNN batch: PatchCore patch features of its stride-8 and
/// stride-16 maps, on the stride-8 grid.
pub fn cnn_tokens(maps: &CnnFeatures) -> candle_core::Result<Vec<Tokens>> {
    let (b, c8, h8, w8) = maps.stride8.dims4()?;
    let (_, c16, h16, w16) = maps.stride16.dims4()?;
    let to_vec = |t: &Tensor| t.flatten_all().and_then(|t| t.to_vec1::<f32>());
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

/// Where the backbones run: the first CUDA GPU when beltad is built with the
/// `cuda` feature and one is present (through candle's operations, not the
/// CPU kernels), else the CPU.
fn backbone_device() -> Device {
    #[cfg(feature = "cuda")]
    match Device::new_cuda(0) {
        Ok(device) => {
            tracing::info!("backbones on CUDA device 0");
            return device;
        }
        Err(e) => tracing::warn!("no CUDA device ({e}); backbones on the CPU"),
    }
    Device::Cpu
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
