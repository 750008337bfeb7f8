//! Fetching missing weights over the network (only with the `download`
//! feature). DINOv2 and Wide-ResNet50-2 come as safetensors from the Hugging
//! Face hub with the names beltad reads; MobileNetV2 comes as torchvision's
//! pickle checkpoint and is converted to safetensors here.

use std::io::Read;
use std::path::{Path, PathBuf};

use crate::atomic_write::write_atomic;
use crate::config::BackboneKind;
use crate::weights::WeightsError;

/// Largest download accepted, in bytes.
const MAX_DOWNLOAD_BYTES: u64 = 2 * 1024 * 1024 * 1024;

/// Where each backbone's weights are published.
fn source(kind: BackboneKind) -> (&'static str, Format) {
    match kind {
        BackboneKind::Dinov2Vits14 => (
            "https://huggingface.co/facebook/dinov2-small/resolve/main/model.safetensors",
            Format::Safetensors,
        ),
        BackboneKind::Dinov2Vitb14 => (
            "https://huggingface.co/facebook/dinov2-base/resolve/main/model.safetensors",
            Format::Safetensors,
        ),
        BackboneKind::WideResnet50_2 => (
            "https://huggingface.co/timm/wide_resnet50_2.tv_in1k/resolve/main/model.safetensors",
            Format::Safetensors,
        ),
        BackboneKind::MobilenetV2 => (
            "https://download.pytorch.org/models/mobilenet_v2-b0353104.pth",
            Format::TorchPickle,
        ),
    }
}

enum Format {
    Safetensors,
    TorchPickle,
}

/// Downloads the weights of `kind` into `dir` and returns the file's path.
pub fn fetch(kind: BackboneKind, dir: &Path) -> Result<PathBuf, WeightsError> {
    let fail = |message: String| WeightsError::Download { kind, message };
    let (url, format) = source(kind);
    std::fs::create_dir_all(dir).map_err(|e| fail(format!("{}: {e}", dir.display())))?;
    tracing::warn!(%url, "downloading {kind} weights");
    let response = ureq::get(url)
        .call()
        .map_err(|e| fail(format!("{url}: {e}")))?;
    let mut bytes = Vec::new();
    response
        .into_body()
        .into_reader()
        .take(MAX_DOWNLOAD_BYTES)
        .read_to_end(&mut bytes)
        .map_err(|e| fail(format!("{url}: {e}")))?;

    let target = dir.join(kind.weights_file());
    match format {
        Format::Safetensors => {
            safetensors::SafeTensors::deserialize(&bytes)
                .map_err(|e| fail(format!("{url}: not safetensors: {e}")))?;
            write_atomic(&target, &bytes)
                .map_err(|e| fail(format!("{}: {e}", target.display())))?;
        }
        Format::TorchPickle => {
            let pth = dir.join(format!(".{}.pth", kind.name()));
            write_atomic(&pth, &bytes).map_err(|e| fail(format!("{}: {e}", pth.display())))?;
            let tensors =
                candle_core::pickle::read_all(&pth).map_err(|e| fail(format!("{url}: {e}")))?;
            let named: std::collections::HashMap<String, candle_core::Tensor> = tensors
                .into_iter()
                .filter(|(name, _)| !name.ends_with("num_batches_tracked"))
                .collect();
            let temp = dir.join(format!(".{}.partial", kind.weights_file()));
            candle_core::safetensors::save(&named, &temp).map_err(|e| fail(e.to_string()))?;
            std::fs::rename(&temp, &target)
                .map_err(|e| fail(format!("{}: {e}", target.display())))?;
            let _ = std::fs::remove_file(&pth);
        }
    }
    Ok(target)
}
