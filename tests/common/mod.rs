//! Shared helpers for the backbone tests: fixture paths, the parity
//! criterion, and the deterministic random weights that
//! `tools/make_random_fixtures.py` also generates.
//!
//! Random weights: every tensor is filled from its own SplitMix64 stream,
//! seeded with the FNV-1a 64 hash of its UTF-8 key; element `i` is
//! `offset + scale · u` (or `offset + scale · |u|`) with `u = 2·next_f64() − 1`,
//! computed in f64 and rounded to f32. The Python script applies the same
//! rules to the same keys, so both sides hold bit-identical weights.

#![allow(dead_code)]

use std::collections::HashMap;
use std::path::PathBuf;

use beltad::backbone::Dinov2Config;
use beltad::backbone::dinov2::{NATIVE_GRID, PATCH_SIZE};
use beltad::rng::SplitMix64;
use candle_core::{Device, Tensor};

/// Parity criterion: max|a − b| / max|b|.
pub const MAX_RELATIVE_ERROR: f32 = 1e-4;

/// `shared/weights` beside the checkout.
pub fn weights_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../shared/weights")
}

/// The committed fixtures of this crate.
pub fn local_fixtures_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures")
}

/// Loads every tensor of a safetensors file, naming the file on failure.
pub fn load_tensors(path: &std::path::Path) -> HashMap<String, Tensor> {
    candle_core::safetensors::load(path, &Device::Cpu)
        .unwrap_or_else(|e| panic!("cannot read fixture {}: {e}", path.display()))
}

/// Takes a named tensor out of a fixture map.
pub fn take(tensors: &HashMap<String, Tensor>, key: &str) -> Tensor {
    tensors
        .get(key)
        .unwrap_or_else(|| panic!("fixture has no tensor `{key}`"))
        .clone()
}

/// Asserts `got` matches `want` within [`MAX_RELATIVE_ERROR`], printing the errors.
pub fn assert_close(label: &str, got: &Tensor, want: &Tensor) {
    assert_eq!(got.dims(), want.dims(), "{label}: shape");
    let got: Vec<f32> = got.flatten_all().unwrap().to_vec1().unwrap();
    let want: Vec<f32> = want.flatten_all().unwrap().to_vec1().unwrap();
    let max_abs_err = got
        .iter()
        .zip(&want)
        .map(|(a, b)| (a - b).abs())
        .fold(0.0f32, f32::max);
    let max_ref = want.iter().map(|b| b.abs()).fold(0.0f32, f32::max);
    let relative = max_abs_err / max_ref;
    println!(
        "{label}: max abs err {max_abs_err:.3e}, max |ref| {max_ref:.3}, relative {relative:.3e}"
    );
    assert!(max_ref > 0.0, "{label}: reference is all zeros");
    assert!(
        relative <= MAX_RELATIVE_ERROR,
        "{label}: relative error {relative:.3e} > {MAX_RELATIVE_ERROR:e}"
    );
}

/// FNV-1a 64 of the UTF-8 key: the per-tensor seed.
pub fn fnv1a64(key: &str) -> u64 {
    const OFFSET: u64 = 0xCBF2_9CE4_8422_2325;
    const PRIME: u64 = 0x0000_0100_0000_01B3;
    key.bytes()
        .fold(OFFSET, |h, b| (h ^ b as u64).wrapping_mul(PRIME))
}

/// How a tensor's values are drawn from `u` uniform in [-1, 1).
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Fill {
    /// `offset + scale · u`.
    Uniform { offset: f64, scale: f64 },
    /// `offset + scale · |u|`.
    AbsUniform { offset: f64, scale: f64 },
}

/// Fan-in gain of the ViT's linear layers (variance preserving: bound √(3/fan_in)).
pub const VIT_WEIGHT_GAIN: f64 = 3.0;
/// Fan-in gain of the CNN's convolutions (He: bound √(6/fan_in)).
pub const CNN_WEIGHT_GAIN: f64 = 6.0;

/// The fill rule for a key and shape; must match `fill_rule` in the Python script.
pub fn fill_rule(key: &str, shape: &[usize], weight_gain: f64) -> Fill {
    let uniform = |offset, scale| Fill::Uniform { offset, scale };
    if key.ends_with("running_var") {
        Fill::AbsUniform {
            offset: 1.0,
            scale: 0.5,
        }
    } else if key.ends_with("running_mean") || key.ends_with(".bias") {
        uniform(0.0, 0.1)
    } else if key.ends_with("lambda1") {
        uniform(0.1, 0.05)
    } else if key.ends_with(".weight") && shape.len() == 1 {
        // LayerNorm / BatchNorm scale.
        uniform(1.0, 0.1)
    } else if key.ends_with(".weight") {
        let fan_in: usize = shape[1..].iter().product();
        uniform(0.0, (weight_gain / fan_in as f64).sqrt())
    } else {
        // Tokens and position embeddings.
        uniform(0.0, 0.5)
    }
}

/// A deterministic pseudo-random f32 tensor for `key`.
pub fn random_tensor(key: &str, shape: &[usize], weight_gain: f64) -> Tensor {
    let rule = fill_rule(key, shape, weight_gain);
    let mut rng = SplitMix64::new(fnv1a64(key));
    let n: usize = shape.iter().product();
    let values: Vec<f32> = (0..n)
        .map(|_| {
            let u = 2.0 * rng.next_f64() - 1.0;
            let v = match rule {
                Fill::Uniform { offset, scale } => offset + scale * u,
                Fill::AbsUniform { offset, scale } => offset + scale * u.abs(),
            };
            v as f32
        })
        .collect();
    Tensor::from_vec(values, shape, &Device::Cpu).unwrap()
}

fn fill(keys: Vec<(String, Vec<usize>)>, gain: f64) -> HashMap<String, Tensor> {
    keys.into_iter()
        .map(|(k, s)| {
            let t = random_tensor(&k, &s, gain);
            (k, t)
        })
        .collect()
}

/// Hugging Face keys and shapes of a DINOv2 checkpoint (without `mask_token`).
pub fn dinov2_keys(cfg: &Dinov2Config) -> Vec<(String, Vec<usize>)> {
    let d = cfg.hidden_size;
    let mut keys = vec![
        ("embeddings.cls_token".to_string(), vec![1, 1, d]),
        (
            "embeddings.position_embeddings".to_string(),
            vec![1, 1 + NATIVE_GRID * NATIVE_GRID, d],
        ),
        (
            "embeddings.patch_embeddings.projection.weight".to_string(),
            vec![d, 3, PATCH_SIZE, PATCH_SIZE],
        ),
        (
            "embeddings.patch_embeddings.projection.bias".to_string(),
            vec![d],
        ),
        ("layernorm.weight".to_string(), vec![d]),
        ("layernorm.bias".to_string(), vec![d]),
    ];
    for i in 0..cfg.num_layers {
        let p = format!("encoder.layer.{i}");
        let linears = [
            ("attention.attention.query", d, d),
            ("attention.attention.key", d, d),
            ("attention.attention.value", d, d),
            ("attention.output.dense", d, d),
            ("mlp.fc1", cfg.mlp_size, d),
            ("mlp.fc2", d, cfg.mlp_size),
        ];
        for (name, out, inp) in linears {
            keys.push((format!("{p}.{name}.weight"), vec![out, inp]));
            keys.push((format!("{p}.{name}.bias"), vec![out]));
        }
        for norm in ["norm1", "norm2"] {
            keys.push((format!("{p}.{norm}.weight"), vec![d]));
            keys.push((format!("{p}.{norm}.bias"), vec![d]));
        }
        keys.push((format!("{p}.layer_scale1.lambda1"), vec![d]));
        keys.push((format!("{p}.layer_scale2.lambda1"), vec![d]));
    }
    keys
}

/// Random DINOv2 weights under Hugging Face names.
pub fn random_dinov2_weights(cfg: &Dinov2Config) -> HashMap<String, Tensor> {
    fill(dinov2_keys(cfg), VIT_WEIGHT_GAIN)
}

fn conv_bn_keys(keys: &mut Vec<(String, Vec<usize>)>, conv: &str, bn: &str, shape: [usize; 4]) {
    keys.push((format!("{conv}.weight"), shape.to_vec()));
    for field in ["weight", "bias", "running_mean", "running_var"] {
        keys.push((format!("{bn}.{field}"), vec![shape[0]]));
    }
}

/// torchvision keys and shapes of Wide-ResNet50-2 up to `layer3`.
pub fn wide_resnet50_2_keys() -> Vec<(String, Vec<usize>)> {
    let mut keys = Vec::new();
    conv_bn_keys(&mut keys, "conv1", "bn1", [64, 3, 7, 7]);
    let mut in_ch = 64;
    for (l, (blocks, planes)) in [(3usize, 64usize), (4, 128), (6, 256)]
        .into_iter()
        .enumerate()
    {
        let width = planes * 2;
        let out = planes * 4;
        for j in 0..blocks {
            let p = format!("layer{}.{j}", l + 1);
            conv_bn_keys(
                &mut keys,
                &format!("{p}.conv1"),
                &format!("{p}.bn1"),
                [width, in_ch, 1, 1],
            );
            conv_bn_keys(
                &mut keys,
                &format!("{p}.conv2"),
                &format!("{p}.bn2"),
                [width, width, 3, 3],
            );
            conv_bn_keys(
                &mut keys,
                &format!("{p}.conv3"),
                &format!("{p}.bn3"),
                [out, width, 1, 1],
            );
            if j == 0 {
                let ds = format!("{p}.downsample");
                conv_bn_keys(
                    &mut keys,
                    &format!("{ds}.0"),
                    &format!("{ds}.1"),
                    [out, in_ch, 1, 1],
                );
            }
            in_ch = out;
        }
    }
    keys
}

/// Random Wide-ResNet50-2 weights (up to `layer3`) under torchvision names.
pub fn random_wide_resnet50_2_weights() -> HashMap<String, Tensor> {
    fill(wide_resnet50_2_keys(), CNN_WEIGHT_GAIN)
}
