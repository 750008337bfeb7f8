//! The on-disk model: a safetensors file with a versioned, checksummed header.
//!
//! Any safetensors reader can open a beltad model (tensors are plain `F32` /
//! `F64` arrays; `__metadata__` holds the config and provenance as strings).
//! beltad adds three guarantees on top:
//! - `format` / `format_version` keys, so a model from another format version
//!   is refused with a clear message rather than misread;
//! - a SHA-256 `checksum` over every other metadata entry and every tensor
//!   (name, dtype, shape, bytes), so a corrupted or edited file is refused;
//! - a deterministic byte layout (sorted keys, sorted tensors), so the same
//!   fit gives the same file, and atomic writes (see [`crate::atomic_write`]).

use std::collections::BTreeMap;
use std::path::Path;

use sha2::{Digest, Sha256};
use thiserror::Error;

use crate::atomic_write::{remove_stale_temps, write_atomic};

/// Value of the `format` metadata key.
pub const FORMAT: &str = "beltad-model";
/// Version of the layout of tensors and metadata this build writes and reads.
pub const FORMAT_VERSION: u32 = 1;
/// safetensors aligns the data section to this many bytes.
const HEADER_ALIGN: usize = 8;
/// Largest header accepted when reading (the reference reader's own bound).
const MAX_HEADER_BYTES: u64 = 100_000_000;

/// Element type of a stored tensor.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DType {
    F32,
    F64,
}

impl DType {
    fn name(self) -> &'static str {
        match self {
            DType::F32 => "F32",
            DType::F64 => "F64",
        }
    }

    fn size(self) -> usize {
        match self {
            DType::F32 => 4,
            DType::F64 => 8,
        }
    }
}

/// One tensor: little-endian bytes plus its type and shape.
#[derive(Debug, Clone, PartialEq)]
pub struct StoredTensor {
    pub dtype: DType,
    pub shape: Vec<usize>,
    pub bytes: Vec<u8>,
}

impl StoredTensor {
    pub fn from_f32(shape: Vec<usize>, values: &[f32]) -> Self {
        assert_eq!(shape.iter().product::<usize>(), values.len());
        let bytes = values.iter().flat_map(|v| v.to_le_bytes()).collect();
        Self {
            dtype: DType::F32,
            shape,
            bytes,
        }
    }

    pub fn from_f64(shape: Vec<usize>, values: &[f64]) -> Self {
        assert_eq!(shape.iter().product::<usize>(), values.len());
        let bytes = values.iter().flat_map(|v| v.to_le_bytes()).collect();
        Self {
            dtype: DType::F64,
            shape,
            bytes,
        }
    }
}

/// Metadata and tensors of a model file.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ModelFile {
    pub metadata: BTreeMap<String, String>,
    pub tensors: BTreeMap<String, StoredTensor>,
}

/// A model file that cannot be written or used.
#[derive(Debug, Error)]
pub enum ModelFileError {
    #[error("{path}: cannot read model file: {source}")]
    Read {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: cannot write model file: {source}")]
    Write {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: not a beltad model file or truncated: {message}")]
    Malformed { path: String, message: String },
    #[error(
        "{path}: model file format version {found}, this beltad reads version {FORMAT_VERSION}; refit the model"
    )]
    Version { path: String, found: String },
    #[error("{path}: checksum mismatch: the model file is corrupted")]
    Checksum { path: String },
    #[error("{path}: tensor `{name}` is missing")]
    MissingTensor { path: String, name: String },
    #[error("{path}: tensor `{name}` has type {found} and shape {shape:?}, expected {expected}")]
    TensorType {
        path: String,
        name: String,
        found: &'static str,
        shape: Vec<usize>,
        expected: String,
    },
    #[error("{path}: metadata `{key}` is missing or invalid")]
    Metadata { path: String, key: String },
}

impl ModelFile {
    /// Serialises with the format keys and checksum set.
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut metadata = self.metadata.clone();
        metadata.insert("format".into(), FORMAT.into());
        metadata.insert("format_version".into(), FORMAT_VERSION.to_string());
        metadata.remove("checksum");
        let checksum = checksum(&metadata, &self.tensors);
        metadata.insert("checksum".into(), checksum);

        let mut header = serde_json::Map::new();
        header.insert(
            "__metadata__".into(),
            serde_json::to_value(&metadata).unwrap_or_default(),
        );
        let mut offset = 0usize;
        for (name, t) in &self.tensors {
            let end = offset + t.bytes.len();
            let entry = serde_json::json!({
                "dtype": t.dtype.name(), "shape": t.shape, "data_offsets": [offset, end]
            });
            header.insert(name.clone(), entry);
            offset = end;
        }
        let mut json = serde_json::Value::Object(header).to_string().into_bytes();
        while !json.len().is_multiple_of(HEADER_ALIGN) {
            json.push(b' ');
        }

        let mut out = Vec::with_capacity(8 + json.len() + offset);
        out.extend_from_slice(&(json.len() as u64).to_le_bytes());
        out.extend_from_slice(&json);
        for t in self.tensors.values() {
            out.extend_from_slice(&t.bytes);
        }
        out
    }

    /// Writes the file atomically (clearing temporary files of earlier,
    /// killed writers first).
    pub fn save(&self, path: &Path) -> Result<(), ModelFileError> {
        remove_stale_temps(path);
        write_atomic(path, &self.to_bytes()).map_err(|source| ModelFileError::Write {
            path: path.display().to_string(),
            source,
        })
    }

    /// Reads a file, checking format, version and checksum.
    pub fn load(path: &Path) -> Result<Self, ModelFileError> {
        let shown = path.display().to_string();
        let read_err = |source| ModelFileError::Read {
            path: shown.clone(),
            source,
        };
        // A device or pipe could be read forever (`/dev/zero`): refuse it first.
        if !std::fs::metadata(path).map_err(read_err)?.is_file() {
            return Err(read_err(std::io::Error::other("not a regular file")));
        }
        let bytes = std::fs::read(path).map_err(read_err)?;
        Self::from_bytes(&bytes, &shown)
    }

    /// Parses bytes; `path` only names the source in errors.
    pub fn from_bytes(bytes: &[u8], path: &str) -> Result<Self, ModelFileError> {
        let malformed = |message: String| ModelFileError::Malformed {
            path: path.into(),
            message,
        };
        if bytes.len() < 8 {
            return Err(malformed(format!(
                "{} bytes, too short for a header",
                bytes.len()
            )));
        }
        let header_len = u64::from_le_bytes(bytes[..8].try_into().unwrap_or_default());
        if header_len > MAX_HEADER_BYTES || header_len > (bytes.len() - 8) as u64 {
            return Err(malformed(format!(
                "header length {header_len} exceeds the file"
            )));
        }
        let parsed =
            safetensors::SafeTensors::deserialize(bytes).map_err(|e| malformed(e.to_string()))?;
        let (_, header) =
            safetensors::SafeTensors::read_metadata(bytes).map_err(|e| malformed(e.to_string()))?;
        let metadata: BTreeMap<String, String> = header
            .metadata()
            .clone()
            .unwrap_or_default()
            .into_iter()
            .collect();

        if metadata.get("format").map(String::as_str) != Some(FORMAT) {
            return Err(malformed("no beltad format marker".into()));
        }
        let version = metadata.get("format_version").cloned().unwrap_or_default();
        if version != FORMAT_VERSION.to_string() {
            return Err(ModelFileError::Version {
                path: path.into(),
                found: version,
            });
        }

        let mut tensors = BTreeMap::new();
        for (name, view) in parsed.tensors() {
            let dtype = match view.dtype() {
                safetensors::Dtype::F32 => DType::F32,
                safetensors::Dtype::F64 => DType::F64,
                other => {
                    return Err(malformed(format!(
                        "tensor `{name}` has unsupported type {other:?}"
                    )));
                }
            };
            let stored = StoredTensor {
                dtype,
                shape: view.shape().to_vec(),
                bytes: view.data().to_vec(),
            };
            tensors.insert(name, stored);
        }

        let mut unsummed = metadata.clone();
        let stated = unsummed.remove("checksum").unwrap_or_default();
        if checksum(&unsummed, &tensors) != stated {
            return Err(ModelFileError::Checksum { path: path.into() });
        }
        Ok(Self { metadata, tensors })
    }

    /// An `f32` tensor with the expected shape (`None` in `shape` = any length).
    pub fn f32_tensor(
        &self,
        path: &str,
        name: &str,
        shape: &[Option<usize>],
    ) -> Result<(Vec<usize>, Vec<f32>), ModelFileError> {
        let t = self.typed(path, name, DType::F32, shape)?;
        let values = t
            .bytes
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .collect();
        Ok((t.shape.clone(), values))
    }

    /// An `f64` tensor with the expected shape (`None` in `shape` = any length).
    pub fn f64_tensor(
        &self,
        path: &str,
        name: &str,
        shape: &[Option<usize>],
    ) -> Result<(Vec<usize>, Vec<f64>), ModelFileError> {
        let t = self.typed(path, name, DType::F64, shape)?;
        let values = t
            .bytes
            .chunks_exact(8)
            .map(|b| f64::from_le_bytes(b.try_into().unwrap_or_default()))
            .collect();
        Ok((t.shape.clone(), values))
    }

    /// A metadata value parsed as `T`.
    pub fn meta<T: std::str::FromStr>(&self, path: &str, key: &str) -> Result<T, ModelFileError> {
        self.metadata
            .get(key)
            .and_then(|v| v.parse().ok())
            .ok_or_else(|| ModelFileError::Metadata {
                path: path.into(),
                key: key.into(),
            })
    }

    fn typed(
        &self,
        path: &str,
        name: &str,
        dtype: DType,
        shape: &[Option<usize>],
    ) -> Result<&StoredTensor, ModelFileError> {
        let t = self
            .tensors
            .get(name)
            .ok_or_else(|| ModelFileError::MissingTensor {
                path: path.into(),
                name: name.into(),
            })?;
        let shape_ok = t.shape.len() == shape.len()
            && t.shape
                .iter()
                .zip(shape)
                .all(|(&have, want)| want.is_none_or(|w| w == have));
        if t.dtype != dtype
            || !shape_ok
            || t.bytes.len() != t.shape.iter().product::<usize>() * dtype.size()
        {
            let expected = format!("{} {:?}", dtype.name(), shape);
            return Err(ModelFileError::TensorType {
                path: path.into(),
                name: name.into(),
                found: t.dtype.name(),
                shape: t.shape.clone(),
                expected,
            });
        }
        Ok(t)
    }
}

/// SHA-256 over sorted metadata entries and sorted tensors, each field length-prefixed.
fn checksum(
    metadata: &BTreeMap<String, String>,
    tensors: &BTreeMap<String, StoredTensor>,
) -> String {
    let mut hasher = Sha256::new();
    let mut field = |bytes: &[u8]| {
        hasher.update((bytes.len() as u64).to_le_bytes());
        hasher.update(bytes);
    };
    for (key, value) in metadata {
        field(key.as_bytes());
        field(value.as_bytes());
    }
    for (name, t) in tensors {
        field(name.as_bytes());
        field(t.dtype.name().as_bytes());
        let shape: Vec<u8> = t
            .shape
            .iter()
            .flat_map(|d| (*d as u64).to_le_bytes())
            .collect();
        field(&shape);
        field(&t.bytes);
    }
    hex(&hasher.finalize())
}

/// Lower-case hexadecimal.
pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> ModelFile {
        let mut m = ModelFile::default();
        m.metadata.insert("config".into(), "seed = 1".into());
        m.tensors.insert(
            "a.bank".into(),
            StoredTensor::from_f32(vec![2, 3], &[1., 2., 3., 4., 5., 6.]),
        );
        m.tensors.insert(
            "b.mean".into(),
            StoredTensor::from_f64(vec![2], &[0.5, -1.5]),
        );
        m
    }

    #[test]
    fn round_trip_and_typed_access() {
        let bytes = sample().to_bytes();
        let back = ModelFile::from_bytes(&bytes, "m").unwrap();
        let (shape, bank) = back.f32_tensor("m", "a.bank", &[None, Some(3)]).unwrap();
        assert_eq!((shape, bank), (vec![2, 3], vec![1., 2., 3., 4., 5., 6.]));
        let (_, mean) = back.f64_tensor("m", "b.mean", &[Some(2)]).unwrap();
        assert_eq!(mean, vec![0.5, -1.5]);
        assert_eq!(back.metadata["format_version"], FORMAT_VERSION.to_string());
    }

    #[test]
    fn bytes_are_deterministic() {
        assert_eq!(sample().to_bytes(), sample().to_bytes());
    }

    #[test]
    fn other_safetensors_readers_can_open_it() {
        let bytes = sample().to_bytes();
        let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
        assert_eq!(st.tensor("a.bank").unwrap().shape(), &[2, 3]);
    }

    #[test]
    fn every_flipped_byte_is_detected() {
        let bytes = sample().to_bytes();
        for i in 0..bytes.len() {
            let mut bad = bytes.clone();
            bad[i] ^= 0x10;
            assert!(
                ModelFile::from_bytes(&bad, "m").is_err(),
                "flip at byte {i} went unnoticed"
            );
        }
    }

    #[test]
    fn every_truncation_is_detected() {
        let bytes = sample().to_bytes();
        for len in 0..bytes.len() {
            assert!(
                ModelFile::from_bytes(&bytes[..len], "m").is_err(),
                "truncation at {len}"
            );
        }
    }

    #[test]
    fn another_format_version_is_refused_by_name() {
        let mut m = sample();
        m.metadata.insert("x".into(), "y".into());
        let mut bytes = m.to_bytes();
        let key = b"\"format_version\":\"1\"";
        let at = bytes.windows(key.len()).position(|w| w == key).unwrap();
        bytes[at + key.len() - 2] = b'9';
        let err = ModelFile::from_bytes(&bytes, "m.beltad").unwrap_err();
        assert!(matches!(err, ModelFileError::Version { .. }), "{err}");
    }

    #[test]
    fn wrong_shape_is_named() {
        let back = ModelFile::from_bytes(&sample().to_bytes(), "m").unwrap();
        let err = back
            .f32_tensor("m", "a.bank", &[None, Some(4)])
            .unwrap_err();
        assert!(err.to_string().contains("a.bank"), "{err}");
        assert!(matches!(
            back.f32_tensor("m", "nope", &[None]),
            Err(ModelFileError::MissingTensor { .. })
        ));
    }
}
