//! Parity of the backbones with their PyTorch references.
//!
//! - DINOv2 ViT-S/14 at 350 against timm's `forward_features` and the
//!   resampled position table (`shared/weights/fixtures`, real weights);
//! - MobileNetV2 at 224 against torchvision `features[6]` and `features[13]`;
//! - DINOv2 ViT-B/14 at 98x126 and Wide-ResNet50-2 at 70x84 with the
//!   deterministic random weights of `tools/make_random_fixtures.py`
//!   (`tests/fixtures`).
//!
//! Criterion: max|a − b| / max|b| ≤ 1e-4. `forward_times` (ignored by
//! default) prints forward timings (median and minimum): `cargo test --test backbone_parity --
//! --ignored --nocapture forward_times`.

mod common;

use std::time::{Duration, Instant};

use beltad::backbone::{
    self, CnnBackbone, CnnKind, Dinov2, Dinov2Config, MobileNetV2, WideResNet50,
};
use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;
use common::{assert_close, load_tensors, take};

const VIT_S_SIZE: (usize, usize) = (350, 350);
const VIT_B_SIZE: (usize, usize) = (98, 126);

fn vit_small(input_size: (usize, usize)) -> Dinov2 {
    let path = common::weights_dir().join("dinov2_vits14.safetensors");
    backbone::load_dinov2(&path, &Dinov2Config::vit_small(), input_size, &Device::Cpu)
        .unwrap_or_else(|e| panic!("{e}"))
}

fn mobilenet_v2() -> MobileNetV2 {
    let path = common::weights_dir().join("mobilenet_v2.safetensors");
    backbone::load_mobilenet_v2(&path, &Device::Cpu).unwrap_or_else(|e| panic!("{e}"))
}

fn random_wide_resnet() -> WideResNet50 {
    let vb = VarBuilder::from_tensors(
        common::random_wide_resnet50_2_weights(),
        DType::F32,
        &Device::Cpu,
    );
    WideResNet50::new(vb).unwrap()
}

#[test]
fn vit_small_350_matches_timm_forward_features() {
    let fixture =
        load_tensors(&common::weights_dir().join("fixtures/dinov2_vits14_350.safetensors"));
    let model = vit_small(VIT_S_SIZE);
    let got = model.forward(&take(&fixture, "input")).unwrap();
    assert_close(
        "ViT-S@350 last_hidden_state (timm)",
        &got,
        &take(&fixture, "timm_last_hidden_state"),
    );
}

#[test]
fn vit_small_350_position_table_matches_timm_resampling() {
    let fixture = load_tensors(
        &common::weights_dir().join("fixtures/dinov2_vits14_350_posembed.safetensors"),
    );
    let model = vit_small(VIT_S_SIZE);
    let got = model.position_embeddings(VIT_S_SIZE).unwrap();
    let want = take(&fixture, "pos_embed_timm");
    assert_close("ViT-S@350 pos_embed (timm)", &got, &want);
    // The HF convention differs by far more than the tolerance: the test can tell them apart.
    let hf = take(&fixture, "pos_embed_hf");
    let gap = (&got - &hf)
        .unwrap()
        .abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap();
    assert!(
        gap > 1e-3,
        "resampled table is indistinguishable from HF's ({gap})"
    );
}

#[test]
fn mobilenet_v2_224_matches_torchvision_features() {
    let fixture =
        load_tensors(&common::weights_dir().join("fixtures/mobilenet_v2_224.safetensors"));
    let model = CnnBackbone::MobileNetV2(mobilenet_v2());
    assert_eq!(model.kind(), CnnKind::MobileNetV2);
    let features = model.forward(&take(&fixture, "input")).unwrap();
    assert_close(
        "MobileNetV2@224 features[6]",
        &features.stride8,
        &take(&fixture, "features_6"),
    );
    assert_close(
        "MobileNetV2@224 features[13]",
        &features.stride16,
        &take(&fixture, "features_13"),
    );
}

#[test]
fn vit_base_random_weights_match_timm() {
    let fixture =
        load_tensors(&common::local_fixtures_dir().join("dinov2_vitb14_random_98x126.safetensors"));
    let cfg = Dinov2Config::vit_base();
    let vb = VarBuilder::from_tensors(
        common::random_dinov2_weights(&cfg),
        DType::F32,
        &Device::Cpu,
    );
    let model = Dinov2::new(vb, &cfg, VIT_B_SIZE).unwrap();
    let got = model.forward(&take(&fixture, "input")).unwrap();
    assert_close(
        "ViT-B@98x126 random weights",
        &got,
        &take(&fixture, "last_hidden_state"),
    );
}

#[test]
fn wide_resnet50_2_random_weights_match_torchvision() {
    let fixture = load_tensors(
        &common::local_fixtures_dir().join("wide_resnet50_2_random_70x84.safetensors"),
    );
    let model = CnnBackbone::WideResNet50(random_wide_resnet());
    let features = model.forward(&take(&fixture, "input")).unwrap();
    assert_close(
        "WRN50-2@70x84 layer2",
        &features.stride8,
        &take(&fixture, "layer2"),
    );
    assert_close(
        "WRN50-2@70x84 layer3",
        &features.stride16,
        &take(&fixture, "layer3"),
    );
}

#[test]
fn random_weight_generator_is_seeded_by_key() {
    let a = common::random_tensor(
        "layer1.0.conv1.weight",
        &[4, 3, 1, 1],
        common::CNN_WEIGHT_GAIN,
    );
    let b = common::random_tensor(
        "layer1.0.conv1.weight",
        &[4, 3, 1, 1],
        common::CNN_WEIGHT_GAIN,
    );
    let c = common::random_tensor(
        "layer1.0.conv2.weight",
        &[4, 3, 1, 1],
        common::CNN_WEIGHT_GAIN,
    );
    let (a, b, c): (Vec<f32>, Vec<f32>, Vec<f32>) = (
        a.flatten_all().unwrap().to_vec1().unwrap(),
        b.flatten_all().unwrap().to_vec1().unwrap(),
        c.flatten_all().unwrap().to_vec1().unwrap(),
    );
    assert_eq!(a, b);
    assert_ne!(a, c);
    let bound = (common::CNN_WEIGHT_GAIN / 3.0).sqrt() as f32;
    assert!(a.iter().all(|v| v.abs() <= bound));
    assert_eq!(common::fnv1a64("a"), 0xAF63_DC4C_8601_EC8C);
}

/// Median and minimum of a few timed runs after one warm-up (the minimum is
/// the steadier figure on a shared machine).
fn time_forward(label: &str, runs: usize, mut f: impl FnMut()) -> Duration {
    f();
    let mut times: Vec<Duration> = (0..runs)
        .map(|_| {
            let start = Instant::now();
            f();
            start.elapsed()
        })
        .collect();
    times.sort();
    let ms = |d: Duration| d.as_secs_f64() * 1e3;
    println!(
        "{label}: median {:.1} ms, min {:.1} ms over {runs} runs",
        ms(times[runs / 2]),
        ms(times[0])
    );
    times[0]
}

fn random_input(side: usize) -> Tensor {
    Tensor::randn(0f32, 1f32, (1, 3, side, side), &Device::Cpu).unwrap()
}

#[test]
#[ignore = "timing only; run with --ignored --nocapture"]
fn forward_times() {
    const RUNS: usize = 7;
    for side in [350, 406] {
        let model = vit_small((side, side));
        let x = random_input(side);
        time_forward(&format!("ViT-S@{side}"), RUNS, || {
            model.forward(&x).unwrap();
        });
    }
    let x = random_input(238);
    let mobilenet = mobilenet_v2();
    time_forward("MobileNetV2@238", RUNS, || {
        mobilenet.forward(&x).unwrap();
    });
    let wrn = random_wide_resnet();
    time_forward("WRN50-2@238 (random weights)", RUNS, || {
        wrn.forward(&x).unwrap();
    });
}
