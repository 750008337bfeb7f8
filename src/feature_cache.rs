//! An on-disk cache of backbone features, so that re-running an evaluation
//! with other branch or fusion settings (a τ sweep, another covariance
//! estimator) skips the backbones.
//!
//! Entries are keyed by the SHA-256 of the image file's bytes and by a
//! *stream* name that fixes everything the features depend on: backbone,
//! weights fingerprint, input size, evaluation grid and preprocessing
//! version. Layout: `<dir>/<stream>/<digest[..2]>/<digest>.tok`. A file holds a
//! small header and the raw little-endian `f32` values; it is written
//! atomically, and an entry that does not parse is ignored and recomputed.

use std::path::{Path, PathBuf};

use crate::atomic_write::write_atomic;
use crate::features::Tokens;

/// Magic bytes of a cache entry.
const MAGIC: &[u8; 4] = b"BTOK";
/// Layout version of a cache entry.
const ENTRY_VERSION: u32 = 1;
/// Bytes before the values: magic, version, grid h, grid w, cls len, patches len.
const HEADER_BYTES: usize = 4 + 5 * 4;

/// A folder of cached features.
#[derive(Debug, Clone)]
pub struct FeatureCache {
    dir: PathBuf,
}

impl FeatureCache {
    /// Opens (and creates) a cache folder.
    pub fn open(dir: &Path) -> std::io::Result<Self> {
        std::fs::create_dir_all(dir)?;
        Ok(Self {
            dir: dir.to_path_buf(),
        })
    }

    fn entry(&self, stream: &str, digest: &str) -> PathBuf {
        let shard = digest.get(..2).unwrap_or("00");
        self.dir
            .join(stream)
            .join(shard)
            .join(format!("{digest}.tok"))
    }

    /// The cached tokens, if present and well-formed.
    pub fn load(&self, stream: &str, digest: &str) -> Option<Tokens> {
        let bytes = std::fs::read(self.entry(stream, digest)).ok()?;
        decode(&bytes)
    }

    /// Stores tokens; a failure only costs a recomputation later, so it is logged, not raised.
    pub fn store(&self, stream: &str, digest: &str, tokens: &Tokens) {
        let path = self.entry(stream, digest);
        let result = path
            .parent()
            .map_or(Ok(()), std::fs::create_dir_all)
            .and_then(|_| write_atomic(&path, &encode(tokens)));
        if let Err(e) = result {
            tracing::warn!(path = %path.display(), error = %e, "cannot write feature cache entry");
        }
    }
}

fn encode(t: &Tokens) -> Vec<u8> {
    let mut out = Vec::with_capacity(HEADER_BYTES + 4 * (t.cls.len() + t.patches.len()));
    out.extend_from_slice(MAGIC);
    for v in [
        ENTRY_VERSION,
        t.grid.0 as u32,
        t.grid.1 as u32,
        t.cls.len() as u32,
        t.patches.len() as u32,
    ] {
        out.extend_from_slice(&v.to_le_bytes());
    }
    for v in t.cls.iter().chain(&t.patches) {
        out.extend_from_slice(&v.to_le_bytes());
    }
    out
}

fn decode(bytes: &[u8]) -> Option<Tokens> {
    if bytes.len() < HEADER_BYTES || &bytes[..4] != MAGIC {
        return None;
    }
    let word = |i: usize| {
        u32::from_le_bytes(bytes[4 + 4 * i..8 + 4 * i].try_into().unwrap_or_default()) as usize
    };
    let (version, h, w, n_cls, n_patches) = (word(0), word(1), word(2), word(3), word(4));
    let body = &bytes[HEADER_BYTES..];
    if version != ENTRY_VERSION as usize || body.len() != 4 * (n_cls + n_patches) || h * w == 0 {
        return None;
    }
    let values: Vec<f32> = body
        .chunks_exact(4)
        .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
        .collect();
    if n_patches % (h * w) != 0 {
        return None;
    }
    Some(Tokens {
        cls: values[..n_cls].to_vec(),
        patches: values[n_cls..].to_vec(),
        grid: (h, w),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Tokens {
        Tokens {
            cls: vec![1.0, -2.0],
            patches: (0..12).map(|v| v as f32 * 0.5).collect(),
            grid: (2, 3),
        }
    }

    #[test]
    fn round_trip() {
        let dir = std::env::temp_dir().join(format!("beltad-cache-{}", std::process::id()));
        let cache = FeatureCache::open(&dir).unwrap();
        assert_eq!(cache.load("s", "abcd"), None);
        cache.store("s", "abcd", &sample());
        assert_eq!(cache.load("s", "abcd"), Some(sample()));
        assert_eq!(cache.load("other", "abcd"), None);
    }

    #[test]
    fn damaged_entries_are_ignored() {
        let bytes = encode(&sample());
        assert_eq!(decode(&bytes), Some(sample()));
        assert_eq!(decode(&bytes[..bytes.len() - 1]), None);
        let mut bad = bytes.clone();
        bad[0] = b'X';
        assert_eq!(decode(&bad), None);
        let mut grid = bytes;
        grid[8] = 5; // grid height 5 no longer divides the patch count
        assert_eq!(decode(&grid), None);
    }
}
