//! Model file loading: any bytes either load into a detector that scores
//! features of its own widths, or give a `ModelFileError` / `DetectorError`;
//! never a panic.
//!
//! The first input byte picks how the rest is used:
//! - 0: the bytes are the file;
//! - 1: the bytes patch a small valid model file (`offset: u16, xor: u8`
//!   triples), then cut it to a length (checksum and parser checks);
//! - 2: the bytes edit the small model's metadata and tensors, and the file
//!   is written with a fresh checksum, so that the checks behind the
//!   checksum (shapes, config, consistency) are reached.

#![no_main]

use std::sync::OnceLock;

use beltad::anomaly_map::AnomalyMap;
use beltad::branch::BranchOutput;
use beltad::branch::attribution::AttributionBranch;
use beltad::branch::object::ObjectBranch;
use beltad::branch::texture::TextureBranch;
use beltad::calibration::Calibration;
use beltad::config::{Config, Preset};
use beltad::detector::{Detector, Provenance};
use beltad::features::{Dims, ImageFeatures, Tokens};
use beltad::fusion::BranchOutputs;
use beltad::memory_bank::MemoryBank;
use beltad::model_file::{DType, ModelFile};
use beltad::stats::gaussian::Gaussian;
use libfuzzer_sys::fuzz_target;

/// Width of the object and attribution features of the small model.
const DIM: usize = 3;
/// Width of the texture features.
const TEXTURE_DIM: usize = 2;
/// Entries of the memory bank.
const BANK: usize = 4;
/// Patch grid of the synthetic features scored with a loaded model.
const GRID: (usize, usize) = (2, 3);
/// Evaluation grid of the small model (kept small so that scoring is quick).
const EVAL_SIZE: usize = 32;
/// ViT input side of the small model (two patches).
const SMALL_VIT_INPUT: usize = 28;
/// Smoothing of the small model's maps: none, as the blur dominates the time
/// of one execution; config edits (mode 2) set σ = 2.5 and reach it.
const SMALL_SIGMA: f64 = 0.0;
/// Values written by tensor edits.
const SPECIAL: [f64; 8] = [0.0, -1.0, 1e30, -1e30, f64::NAN, f64::INFINITY, 1e-300, 2.5];

fn gaussian(dim: usize) -> Gaussian {
    let mut whitening = vec![0.0; dim * dim];
    for i in 0..dim {
        whitening[i * dim + i] = 1.0 + i as f64;
    }
    Gaussian::from_parts(vec![0.5; dim], whitening, dim).expect("valid parts")
}

/// Branch outputs of three made-up held-out images.
fn held_out_outputs() -> Vec<BranchOutputs> {
    let output = |score: f64, level: f32| BranchOutput {
        score,
        map: AnomalyMap::new(
            EVAL_SIZE,
            EVAL_SIZE,
            (0..EVAL_SIZE * EVAL_SIZE)
                .map(|i| level + (i % 5) as f32 * 0.1)
                .collect(),
        ),
    };
    (0..3)
        .map(|i| BranchOutputs {
            object: output(1.0 + f64::from(i), 0.5),
            attribution: output(0.2 * f64::from(i), 0.1),
            texture: output(0.5 + 0.1 * f64::from(i), 0.3),
        })
        .collect()
}

fn small_model() -> ModelFile {
    // Small sizes and kernels, so that one execution stays fast.
    let mut config = Config::preset(Preset::Default);
    config.fusion.eval_size = EVAL_SIZE;
    config.object.input_size = SMALL_VIT_INPUT;
    config.attribution.input_size = SMALL_VIT_INPUT;
    config.texture.input_size = EVAL_SIZE;
    config.object.sigma = SMALL_SIGMA;
    config.attribution.sigma = SMALL_SIGMA;
    config.texture.sigma = SMALL_SIGMA;
    let bank: Vec<f32> = (0..BANK * TEXTURE_DIM).map(|i| i as f32 * 0.25).collect();
    let detector = Detector {
        object: ObjectBranch {
            cls: gaussian(DIM),
            foreground: vec![1.0; DIM],
            background: vec![-1.0; DIM],
            tau: config.object.tau as f32,
            sigma: config.object.sigma,
            input_size: config.object.input_size,
        },
        attribution: AttributionBranch {
            mean_token: gaussian(DIM),
            sigma: config.attribution.sigma,
        },
        texture: TextureBranch {
            bank: MemoryBank::new(bank, BANK, TEXTURE_DIM).expect("valid bank"),
            reweight_k: config.texture.reweight_k,
            sigma: config.texture.sigma,
        },
        calibration: Calibration::measure(
            &held_out_outputs(),
            &config.fusion,
            config.calibration.threshold_quantile,
        ),
        provenance: Provenance {
            dataset: "fuzz".into(),
            n_fit_images: 4,
            n_bank_images: 2,
            n_calibration_images: 2,
            weights: Default::default(),
            beltad_version: "fuzz".into(),
        },
        config,
    };
    detector.to_model_file()
}

fn small() -> &'static (ModelFile, Vec<u8>) {
    static SMALL: OnceLock<(ModelFile, Vec<u8>)> = OnceLock::new();
    SMALL.get_or_init(|| {
        let file = small_model();
        let bytes = file.to_bytes();
        (file, bytes)
    })
}

/// Loads `bytes` as the CLI does and scores features of the model's widths;
/// whether it got as far as a score.
fn load_and_score(bytes: &[u8]) -> bool {
    let Ok(file) = ModelFile::from_bytes(bytes, "fuzz.beltad") else {
        return false;
    };
    let Ok(detector) = Detector::from_model_file(&file, "fuzz.beltad") else {
        return false;
    };
    let dims = Dims {
        object: detector.object.cls.dim(),
        attribution: detector.attribution.mean_token.dim(),
        texture: detector.texture.bank.dim(),
    };
    if detector.check_dims("fuzz.beltad", &dims).is_err() {
        return false;
    }
    let tokens = |dim: usize, cls: bool| Tokens {
        cls: if cls { vec![0.25; dim] } else { Vec::new() },
        patches: (0..GRID.0 * GRID.1 * dim)
            .map(|i| (i % 7) as f32 * 0.5)
            .collect(),
        grid: GRID,
    };
    let features = ImageFeatures {
        object: tokens(dims.object, true),
        attribution: tokens(dims.attribution, true),
        texture: tokens(dims.texture, false),
    };
    let Ok(verdict) = detector.score(&features) else {
        return false;
    };
    let eval = detector.config.fusion.eval_size;
    assert_eq!(verdict.fused.map.data.len(), eval * eval);
    true
}

/// Mode 1: byte patches and a cut.
fn patched(edits: &[u8]) -> Vec<u8> {
    let mut bytes = small().1.clone();
    let mut chunks = edits.chunks_exact(3);
    for c in &mut chunks {
        let at = usize::from(u16::from_le_bytes([c[0], c[1]])) % bytes.len();
        bytes[at] ^= c[2];
    }
    if let [a, b] = chunks.remainder() {
        let keep = usize::from(u16::from_le_bytes([*a, *b])) % (bytes.len() + 1);
        bytes.truncate(keep);
    }
    bytes
}

/// Mode 2: edits of metadata and tensors, re-checksummed on write.
fn edited(ops: &[u8]) -> Vec<u8> {
    let mut file = small().0.clone();
    let mut i = 0;
    while i + 2 < ops.len() {
        let (op, a, b) = (ops[i], usize::from(ops[i + 1]), ops[i + 2]);
        i += 3;
        let keys: Vec<String> = file.metadata.keys().cloned().collect();
        let names: Vec<String> = file.tensors.keys().cloned().collect();
        match op % 7 {
            0 => {
                // Replace a metadata value with the next `b % 32` input bytes.
                let n = usize::from(b % 32).min(ops.len() - i);
                let value = String::from_utf8_lossy(&ops[i..i + n]).into_owned();
                i += n;
                file.metadata.insert(keys[a % keys.len()].clone(), value);
            }
            1 => {
                // Change one line of the stored config to `key = <number>`.
                let config = file.metadata.get("config").cloned().unwrap_or_default();
                let lines: Vec<&str> = config.lines().collect();
                let line = a % lines.len().max(1);
                let mut edited: Vec<String> = lines.iter().map(|l| l.to_string()).collect();
                if let Some(l) = edited.get_mut(line)
                    && let Some((key, _)) = l.split_once(" = ")
                {
                    *l = format!("{key} = {}", SPECIAL[usize::from(b) % SPECIAL.len()]);
                }
                file.metadata.insert("config".into(), edited.join("\n"));
            }
            2 => {
                // Change one dimension of a tensor's shape.
                let t = file
                    .tensors
                    .get_mut(&names[a % names.len()])
                    .expect("listed");
                if !t.shape.is_empty() {
                    let d = usize::from(b >> 4) % t.shape.len();
                    t.shape[d] = usize::from(b & 0x0f);
                }
            }
            3 => {
                // Cut or extend a tensor's bytes.
                let t = file
                    .tensors
                    .get_mut(&names[a % names.len()])
                    .expect("listed");
                let len = usize::from(b) % (t.bytes.len() + 9);
                t.bytes.resize(len, 0);
            }
            4 => {
                // Overwrite one value with a special one.
                let t = file
                    .tensors
                    .get_mut(&names[a % names.len()])
                    .expect("listed");
                let v = SPECIAL[usize::from(b) % SPECIAL.len()];
                let bytes = match t.dtype {
                    DType::F32 => (v as f32).to_le_bytes().to_vec(),
                    DType::F64 => v.to_le_bytes().to_vec(),
                };
                let slots = t.bytes.len() / bytes.len();
                if slots > 0 {
                    let at = usize::from(b >> 3) % slots * bytes.len();
                    t.bytes[at..at + bytes.len()].copy_from_slice(&bytes);
                }
            }
            5 => {
                // Remove a tensor or a metadata entry.
                if b % 2 == 0 {
                    file.tensors.remove(&names[a % names.len()]);
                } else {
                    file.metadata.remove(&keys[a % keys.len()]);
                }
            }
            _ => {
                // Flip a tensor's element type.
                let t = file
                    .tensors
                    .get_mut(&names[a % names.len()])
                    .expect("listed");
                t.dtype = if t.dtype == DType::F32 {
                    DType::F64
                } else {
                    DType::F32
                };
            }
        }
        if file.tensors.is_empty() || file.metadata.is_empty() {
            break;
        }
    }
    file.to_bytes()
}

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    let scored = match mode % 3 {
        0 => load_and_score(rest),
        1 => load_and_score(&patched(rest)),
        _ => load_and_score(&edited(rest)),
    };
    // The small model itself must load and score, or the harness tests nothing.
    assert!(
        scored || !rest.is_empty() || mode % 3 == 0,
        "the small model does not load"
    );
});
