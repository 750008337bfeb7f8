//! Finding backbone weight files, and fingerprinting them.
//!
//! A weights folder holds one safetensors file per backbone, named as
//! [`BackboneKind::weights_file`] says, with the official checkpoints' tensor
//! names (Hugging Face `facebook/dinov2-*`, torchvision). A file is looked for
//! in this order:
//! 1. the folder given with `--weights`;
//! 2. the folder in the `BELTAD_WEIGHTS` environment variable;
//! 3. the default locations: `./weights`, `../shared/weights`, the same two
//!    beside the project this binary was built from, and
//!    `$XDG_DATA_HOME/beltad/weights` (or `~/.local/share/beltad/weights`);
//! 4. only in a build with the `download` feature: a download from the
//!    Hugging Face hub into the user data folder.
//!
//! Nothing is ever fetched otherwise, and tests never fetch.
//!
//! A model records the SHA-256 of every weights file it was fitted with, so
//! that it refuses to score with other weights.

use std::io::Read;
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};
use thiserror::Error;

use crate::config::BackboneKind;

#[cfg(feature = "download")]
mod download;

/// Environment variable naming a weights folder.
pub const WEIGHTS_ENV: &str = "BELTAD_WEIGHTS";

/// A weights file could not be found or read.
#[derive(Debug, Error)]
pub enum WeightsError {
    #[error("weights for {kind} not found: no {file} in {searched}. {hint}")]
    NotFound {
        kind: BackboneKind,
        file: &'static str,
        searched: String,
        hint: String,
    },
    #[error("{path}: cannot read weights: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[cfg(feature = "download")]
    #[error("download of {kind} weights failed: {message}")]
    Download { kind: BackboneKind, message: String },
}

/// Where weight files are looked for, in order.
#[derive(Debug, Clone)]
pub struct WeightsSearch {
    dirs: Vec<PathBuf>,
}

impl WeightsSearch {
    /// The search order for an optional `--weights` folder.
    pub fn new(explicit: Option<&Path>) -> Self {
        let mut dirs: Vec<PathBuf> = Vec::new();
        dirs.extend(explicit.map(Path::to_path_buf));
        if let Some(env) = std::env::var_os(WEIGHTS_ENV).filter(|v| !v.is_empty()) {
            dirs.push(PathBuf::from(env));
        }
        if explicit.is_none() {
            dirs.extend(default_dirs());
        }
        dirs.dedup();
        Self { dirs }
    }

    /// Path of the weights file of `kind`.
    pub fn find(&self, kind: BackboneKind) -> Result<PathBuf, WeightsError> {
        let file = kind.weights_file();
        if let Some(found) = self.dirs.iter().map(|d| d.join(file)).find(|p| p.is_file()) {
            return Ok(found);
        }
        #[cfg(feature = "download")]
        {
            download::fetch(kind, &user_data_dir())
        }
        #[cfg(not(feature = "download"))]
        {
            let searched = self
                .dirs
                .iter()
                .map(|d| d.display().to_string())
                .collect::<Vec<_>>();
            Err(WeightsError::NotFound {
                kind,
                file,
                searched: searched.join(", "),
                hint: hint(kind),
            })
        }
    }
}

fn default_dirs() -> Vec<PathBuf> {
    let project = Path::new(env!("CARGO_MANIFEST_DIR"));
    vec![
        PathBuf::from("weights"),
        PathBuf::from("../shared/weights"),
        project.join("weights"),
        project.join("../shared/weights"),
        user_data_dir(),
    ]
}

/// `$XDG_DATA_HOME/beltad/weights`, or `~/.local/share/beltad/weights`.
fn user_data_dir() -> PathBuf {
    let base = std::env::var_os("XDG_DATA_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".local/share")))
        .unwrap_or_else(|| PathBuf::from("."));
    base.join("beltad").join("weights")
}

fn hint(kind: BackboneKind) -> String {
    let source = match kind {
        BackboneKind::Dinov2Vits14 => {
            "model.safetensors of facebook/dinov2-small on the Hugging Face hub"
        }
        BackboneKind::Dinov2Vitb14 => {
            "model.safetensors of facebook/dinov2-base on the Hugging Face hub"
        }
        BackboneKind::MobilenetV2 => {
            "torchvision's mobilenet_v2-b0353104.pth converted to safetensors"
        }
        BackboneKind::WideResnet50_2 => {
            "torchvision's wide_resnet50_2-95faca4d.pth (or timm/wide_resnet50_2.tv_in1k) as safetensors"
        }
    };
    format!(
        "Put {source} there as {}, pass --weights DIR, set {WEIGHTS_ENV}, or build with --features download.",
        kind.weights_file()
    )
}

/// SHA-256 of a file's bytes, as lower-case hex.
pub fn fingerprint(path: &Path) -> Result<String, WeightsError> {
    let read_err = |source| WeightsError::Read {
        path: path.to_path_buf(),
        source,
    };
    let mut file = std::fs::File::open(path).map_err(read_err)?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = file.read(&mut buf).map_err(read_err)?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
    }
    Ok(crate::model_file::hex(&hasher.finalize()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn explicit_folder_wins_and_missing_files_name_the_search() {
        let dir = std::env::temp_dir().join(format!("beltad-weights-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("mobilenet_v2.safetensors"), b"x").unwrap();
        let search = WeightsSearch::new(Some(&dir));
        assert_eq!(
            search.find(BackboneKind::MobilenetV2).unwrap(),
            dir.join("mobilenet_v2.safetensors")
        );
        #[cfg(not(feature = "download"))]
        {
            let err = search
                .find(BackboneKind::WideResnet50_2)
                .unwrap_err()
                .to_string();
            assert!(
                err.contains("wide_resnet50_2.safetensors")
                    && err.contains(&*dir.to_string_lossy()),
                "{err}"
            );
        }
    }

    #[test]
    fn fingerprint_is_the_sha256_of_the_bytes() {
        let path = std::env::temp_dir().join(format!("beltad-fp-{}", std::process::id()));
        std::fs::write(&path, b"abc").unwrap();
        assert_eq!(
            fingerprint(&path).unwrap(),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
    }
}
