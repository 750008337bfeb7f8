//! Frozen feature extractors: DINOv2 ViT/14 for the object and attribution
//! branches, and a CNN (MobileNetV2 or Wide-ResNet50-2) for the texture branch.
//!
//! Every backbone takes an ImageNet-normalised batch `(B, 3, H, W)`
//! ([`IMAGENET_MEAN`], [`IMAGENET_STD`]). DINOv2 returns tokens
//! `(B, 1 + N, D)` (CLS first); a CNN returns a stride-8 and a stride-16
//! feature map `(B, C, h, w)` ([`CnnFeatures`]).
//!
//! The `load_*` helpers memory-map a safetensors file and report a missing or
//! mis-shaped tensor by file, key and shapes ([`BackboneError`]).

mod conv;
pub mod dinov2;
pub mod mobilenet_v2;
pub mod synthetic;
mod vit_cpu;
pub mod wide_resnet;

use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Shape, Tensor};
use candle_nn::VarBuilder;

pub use dinov2::{Dinov2, Dinov2Config};
pub use mobilenet_v2::MobileNetV2;
pub use wide_resnet::WideResNet50;

/// DINOv2 patch side in pixels; DINOv2 inputs must be multiples of it.
pub const DINOV2_PATCH_SIZE: usize = dinov2::PATCH_SIZE;
/// ImageNet channel means (RGB) used to normalise every backbone input.
pub const IMAGENET_MEAN: [f32; 3] = [0.485, 0.456, 0.406];
/// ImageNet channel standard deviations (RGB).
pub const IMAGENET_STD: [f32; 3] = [0.229, 0.224, 0.225];

/// Prefix candle puts before the key in a shape-mismatch message.
const SHAPE_MISMATCH_PREFIX: &str = "shape mismatch for ";

/// Failure to build a backbone from a weights file.
#[derive(Debug, thiserror::Error)]
pub enum BackboneError {
    #[error("cannot open weights file {file}: {source}")]
    Open {
        file: PathBuf,
        source: candle_core::Error,
    },
    #[error("weights file {file} has no tensor `{key}`")]
    MissingTensor { file: PathBuf, key: String },
    #[error("weights file {file}: tensor `{key}` has shape {got:?}, expected {expected:?}")]
    TensorShape {
        file: PathBuf,
        key: String,
        expected: Shape,
        got: Shape,
    },
    #[error(
        "DINOv2 input size must be a positive multiple of {DINOV2_PATCH_SIZE} per side, got {height}x{width}"
    )]
    InputSize { height: usize, width: usize },
    #[error("cannot build the backbone from {file}: {source}")]
    Load {
        file: PathBuf,
        source: candle_core::Error,
    },
}

/// Which CNN the texture branch uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CnnKind {
    /// torchvision MobileNetV2: `features[6]` (32 ch) and `features[13]` (96 ch).
    MobileNetV2,
    /// torchvision Wide-ResNet50-2: `layer2` (512 ch) and `layer3` (1024 ch).
    WideResNet50,
}

impl CnnKind {
    /// Channels of the (stride-8, stride-16) maps.
    pub fn channels(self) -> (usize, usize) {
        match self {
            CnnKind::MobileNetV2 => (
                mobilenet_v2::STRIDE8_CHANNELS,
                mobilenet_v2::STRIDE16_CHANNELS,
            ),
            CnnKind::WideResNet50 => (wide_resnet::LAYER2_CHANNELS, wide_resnet::LAYER3_CHANNELS),
        }
    }
}

/// The two feature maps a CNN backbone returns.
#[derive(Debug, Clone)]
pub struct CnnFeatures {
    /// `(B, C8, ⌈H/8⌉, ⌈W/8⌉)`.
    pub stride8: Tensor,
    /// `(B, C16, ⌈H/16⌉, ⌈W/16⌉)`.
    pub stride16: Tensor,
}

/// A CNN that returns a stride-8 and a stride-16 map, whichever it is.
#[derive(Debug, Clone)]
pub enum CnnBackbone {
    MobileNetV2(MobileNetV2),
    WideResNet50(WideResNet50),
}

impl CnnBackbone {
    pub fn kind(&self) -> CnnKind {
        match self {
            CnnBackbone::MobileNetV2(_) => CnnKind::MobileNetV2,
            CnnBackbone::WideResNet50(_) => CnnKind::WideResNet50,
        }
    }

    /// Floating-point operations of one image's forward at `(H, W)`
    /// (convolutions only).
    pub fn forward_flops(&self, input_size: (usize, usize)) -> f64 {
        match self {
            CnnBackbone::MobileNetV2(m) => m.forward_flops(input_size),
            CnnBackbone::WideResNet50(m) => m.forward_flops(input_size),
        }
    }

    /// `(B, 3, H, W)` → the stride-8 and stride-16 maps.
    pub fn forward(&self, x: &Tensor) -> candle_core::Result<CnnFeatures> {
        let (stride8, stride16) = match self {
            CnnBackbone::MobileNetV2(m) => m.forward(x)?,
            CnnBackbone::WideResNet50(m) => m.forward(x)?,
        };
        Ok(CnnFeatures { stride8, stride16 })
    }
}

/// Loads a DINOv2 from a Hugging Face-named safetensors file for inputs of
/// `input_size = (H, W)` pixels.
pub fn load_dinov2(
    path: &Path,
    cfg: &Dinov2Config,
    input_size: (usize, usize),
    device: &Device,
) -> Result<Dinov2, BackboneError> {
    dinov2::patch_grid(input_size).map_err(|_| BackboneError::InputSize {
        height: input_size.0,
        width: input_size.1,
    })?;
    with_weights(path, device, |vb| Dinov2::new(vb, cfg, input_size))
}

/// Loads torchvision MobileNetV2 weights.
pub fn load_mobilenet_v2(path: &Path, device: &Device) -> Result<MobileNetV2, BackboneError> {
    with_weights(path, device, MobileNetV2::new)
}

/// Loads torchvision Wide-ResNet50-2 weights (`layer4` and `fc` are not read).
pub fn load_wide_resnet50_2(path: &Path, device: &Device) -> Result<WideResNet50, BackboneError> {
    with_weights(path, device, WideResNet50::new)
}

/// Loads the CNN of the given kind.
pub fn load_cnn(kind: CnnKind, path: &Path, device: &Device) -> Result<CnnBackbone, BackboneError> {
    Ok(match kind {
        CnnKind::MobileNetV2 => CnnBackbone::MobileNetV2(load_mobilenet_v2(path, device)?),
        CnnKind::WideResNet50 => CnnBackbone::WideResNet50(load_wide_resnet50_2(path, device)?),
    })
}

/// Memory-maps `path` as f32 weights and runs `build` on it.
fn with_weights<T>(
    path: &Path,
    device: &Device,
    build: impl FnOnce(VarBuilder) -> candle_core::Result<T>,
) -> Result<T, BackboneError> {
    // SAFETY: the file is mapped read-only and only read while the builder
    // lives; the tensors are copied out of the mapping before it is dropped.
    // Another process truncating the file meanwhile is not guarded against,
    // as for any memory-mapped read.
    let vb = unsafe { VarBuilder::from_mmaped_safetensors(&[path], DType::F32, device) }.map_err(
        |source| BackboneError::Open {
            file: path.to_path_buf(),
            source,
        },
    )?;
    build(vb).map_err(|e| classify_load_error(path, e))
}

/// Turns candle's missing-tensor and shape errors into [`BackboneError`]s
/// that name the file and key.
fn classify_load_error(file: &Path, err: candle_core::Error) -> BackboneError {
    let file = file.to_path_buf();
    match innermost(&err) {
        candle_core::Error::CannotFindTensor { path } => BackboneError::MissingTensor {
            file,
            key: path.clone(),
        },
        candle_core::Error::SafeTensor(safetensors::SafeTensorError::TensorNotFound(key)) => {
            BackboneError::MissingTensor {
                file,
                key: key.clone(),
            }
        }
        candle_core::Error::UnexpectedShape { msg, expected, got }
            if msg.starts_with(SHAPE_MISMATCH_PREFIX) =>
        {
            BackboneError::TensorShape {
                file,
                key: msg[SHAPE_MISMATCH_PREFIX.len()..].to_string(),
                expected: expected.clone(),
                got: got.clone(),
            }
        }
        _ => BackboneError::Load { file, source: err },
    }
}

/// Strips backtrace, context and path wrappers off a candle error.
fn innermost(err: &candle_core::Error) -> &candle_core::Error {
    match err {
        candle_core::Error::WithBacktrace { inner, .. }
        | candle_core::Error::Context { inner, .. }
        | candle_core::Error::WithPath { inner, .. } => innermost(inner),
        e => e,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn write_safetensors(name: &str, tensors: &[(&str, Tensor)]) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("beltad-backbone-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join(name);
        let map: HashMap<String, Tensor> = tensors
            .iter()
            .map(|(k, t)| (k.to_string(), t.clone()))
            .collect();
        candle_core::safetensors::save(&map, &path).unwrap();
        path
    }

    #[test]
    fn missing_tensor_error_names_file_and_key() {
        let dev = Device::Cpu;
        let path = write_safetensors(
            "missing.safetensors",
            &[(
                "features.0.0.weight",
                Tensor::zeros((32, 3, 3, 3), DType::F32, &dev).unwrap(),
            )],
        );
        let err = load_mobilenet_v2(&path, &dev).unwrap_err();
        match &err {
            BackboneError::MissingTensor { file, key } => {
                assert_eq!(file, &path);
                assert_eq!(key, "features.0.1.weight");
            }
            other => panic!("unexpected error {other}"),
        }
        assert!(err.to_string().contains("missing.safetensors"));
    }

    #[test]
    fn misshaped_tensor_error_names_key_and_shapes() {
        let dev = Device::Cpu;
        let path = write_safetensors(
            "misshaped.safetensors",
            &[(
                "conv1.weight",
                Tensor::zeros((64, 3, 3, 3), DType::F32, &dev).unwrap(),
            )],
        );
        let err = load_wide_resnet50_2(&path, &dev).unwrap_err();
        match &err {
            BackboneError::TensorShape {
                key, expected, got, ..
            } => {
                assert_eq!(key, "conv1.weight");
                assert_eq!(expected.dims(), &[64, 3, 7, 7]);
                assert_eq!(got.dims(), &[64, 3, 3, 3]);
            }
            other => panic!("unexpected error {other}"),
        }
    }

    #[test]
    fn absent_file_and_bad_input_size_are_reported() {
        let dev = Device::Cpu;
        let path = Path::new("/nonexistent/beltad/weights.safetensors");
        assert!(matches!(
            load_cnn(CnnKind::MobileNetV2, path, &dev),
            Err(BackboneError::Open { .. })
        ));
        let err = load_dinov2(path, &Dinov2Config::vit_small(), (350, 351), &dev).unwrap_err();
        assert!(matches!(
            err,
            BackboneError::InputSize {
                height: 350,
                width: 351
            }
        ));
    }

    #[test]
    fn cnn_kinds_report_their_channels() {
        assert_eq!(CnnKind::MobileNetV2.channels(), (32, 96));
        assert_eq!(CnnKind::WideResNet50.channels(), (512, 1024));
    }
}
