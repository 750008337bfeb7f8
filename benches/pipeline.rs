//! Whole-pipeline timings per image (warm medians), for BENCHMARKS.md.
//!
//! `cargo bench --bench pipeline [-- default | single | paper]`
//!
//! For each selected configuration and for batch sizes 1 and 4, on real
//! images of a data set, the median time per image of every stage of
//! `beltad predict` (no picture writing):
//! - `decode`: reading and decoding the image files (in parallel over a batch,
//!   as the extractor does);
//! - `preprocess`: resize to the evaluation grid, each branch input resized
//!   from it and normalised, the input batches;
//! - `forward_object`, `forward_attribution`, `forward_texture`: each backbone
//!   forward (the attribution forward is absent when the object branch's
//!   forward is shared);
//! - `tokens`: copying tokens out of the outputs and PatchCore's local
//!   aggregation (3×3 average pool, adaptive pool, concatenation);
//! - `score_object`, `score_attribution`, `score_texture`: each branch's
//!   scoring, map included;
//! - `fusion`: map product, maximum, final blur, image score, decision;
//! - `stages_sum`: the sum of the stages above;
//! - `predict`: the whole path as `predict` runs it (the feature extractor
//!   on the image files, then the detector), decode to scores and fused map.
//!
//! Configurations: `default` (ViT-S@350, ViT-S@406, MobileNetV2@238),
//! `single` (the default with the attribution input at the object input size,
//! 350, so both semantic branches share one ViT forward) and `paper`
//! (ViT-S@350, ViT-B/14@406, Wide-ResNet50-2@238; skipped unless its weights
//! are found, e.g. through `BELTAD_WEIGHTS`).
//!
//! Every line that carries a number reads
//! `pipeline <config> b<batch> <stage> <ms> ms/img`, the format that
//! `tools/bench_pipeline_torch.py` also prints and `tools/bench_compare.py`
//! reads.
//!
//! Environment:
//! - `BENCH_DATA`: data set (MVTec layout; default `../shared/data/kolektorsdd`);
//! - `BENCH_MODEL_<CONFIG>` (e.g. `BENCH_MODEL_PAPER`): a model file to time
//!   instead of fitting one here; otherwise a model is fitted on the first
//!   `BENCH_FIT_IMAGES` (default 12) training images;
//! - `BENCH_RUNS`: timed runs after one warm-up (default 5);
//! - `RAYON_NUM_THREADS`: worker threads (default: all cores);
//! - `BELTAD_WEIGHTS`: an extra weights folder, searched first.

use std::path::{Path, PathBuf};
use std::time::Instant;

use beltad::backbone::{self, CnnBackbone, CnnKind, Dinov2, Dinov2Config};
use beltad::config::{BackboneKind, Config, Preset};
use beltad::dataset;
use beltad::detector::Detector;
use beltad::features::{FeatureExtractor, ImageFeatures, cnn_tokens, split_vit_tokens};
use beltad::fusion::{BranchOutputs, BranchSet};
use beltad::image_io::{DecodeLimits, decode_rgb, read_limited};
use beltad::model_file::ModelFile;
use beltad::preprocess::GridImage;
use beltad::progress::Silent;
use beltad::weights::WeightsSearch;
use candle_core::{Device, Tensor};
use image::RgbImage;
use rayon::prelude::*;

/// Timed runs after one warm-up, unless `BENCH_RUNS` says otherwise.
const DEFAULT_RUNS: usize = 5;
/// Training images of a model fitted by the bench itself.
const DEFAULT_FIT_IMAGES: usize = 12;
/// Batch sizes timed.
const BATCHES: [usize; 2] = [1, 4];
/// Largest features difference tolerated between the staged path and the
/// extractor (both run the same code; only a mismatch in the bench's copy of
/// the staging would show here).
const STAGING_TOLERANCE: f32 = 1e-4;

/// Median seconds of `runs` calls after one warm-up.
fn median_s(runs: usize, mut f: impl FnMut()) -> f64 {
    f();
    let mut t: Vec<f64> = (0..runs)
        .map(|_| {
            let start = Instant::now();
            f();
            start.elapsed().as_secs_f64()
        })
        .collect();
    t.sort_by(f64::total_cmp);
    t[runs / 2]
}

fn env_usize(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .filter(|&v| v > 0)
        .unwrap_or(default)
}

/// The configurations this bench knows, by name.
fn configs() -> Vec<(&'static str, Config)> {
    let default = Config::preset(Preset::Default);
    let mut single = default.clone();
    single.attribution.input_size = single.object.input_size;
    vec![
        ("default", default),
        ("single", single),
        ("paper", Config::preset(Preset::Paper)),
    ]
}

/// The backbones of a config, loaded as [`FeatureExtractor::load`] does.
struct Backbones {
    object: Dinov2,
    /// `None` when the attribution branch uses the object branch's ViT.
    attribution: Option<Dinov2>,
    cnn: CnnBackbone,
    eval: usize,
    sizes: [usize; 3],
}

fn vit_config(kind: BackboneKind) -> Dinov2Config {
    match kind {
        BackboneKind::Dinov2Vitb14 => Dinov2Config::vit_base(),
        _ => Dinov2Config::vit_small(),
    }
}

impl Backbones {
    fn load(config: &Config, search: &WeightsSearch) -> Self {
        let device = Device::Cpu;
        let find = |kind| search.find(kind).expect("weights");
        let (o, a, t) = (&config.object, &config.attribution, &config.texture);
        let object = backbone::load_dinov2(
            &find(o.backbone),
            &vit_config(o.backbone),
            (o.input_size, o.input_size),
            &device,
        )
        .expect("object ViT");
        let attribution = (a.backbone != o.backbone).then(|| {
            backbone::load_dinov2(
                &find(a.backbone),
                &vit_config(a.backbone),
                (a.input_size, a.input_size),
                &device,
            )
            .expect("attribution ViT")
        });
        let kind = match t.backbone {
            BackboneKind::WideResnet50_2 => CnnKind::WideResNet50,
            _ => CnnKind::MobileNetV2,
        };
        let cnn = backbone::load_cnn(kind, &find(t.backbone), &device).expect("CNN");
        Self {
            object,
            attribution,
            cnn,
            eval: config.fusion.eval_size,
            sizes: [o.input_size, a.input_size, t.input_size],
        }
    }

    /// Whether the attribution branch reuses the object forward.
    fn shared(&self) -> bool {
        self.attribution.is_none() && self.sizes[0] == self.sizes[1]
    }

    fn attribution_vit(&self) -> &Dinov2 {
        self.attribution.as_ref().unwrap_or(&self.object)
    }
}

/// `(B, 3, size, size)` normalised inputs, as the extractor builds them.
fn input_batch(grids: &[GridImage], size: usize) -> Tensor {
    let data: Vec<f32> = grids
        .par_iter()
        .flat_map_iter(|g| g.branch_input(size))
        .collect();
    Tensor::from_vec(data, (grids.len(), 3, size, size), &Device::Cpu).expect("batch")
}

fn decode_all(paths: &[PathBuf]) -> Vec<RgbImage> {
    let limits = DecodeLimits::default();
    paths
        .par_iter()
        .map(|p| {
            let bytes = read_limited(p, &limits).expect("read");
            decode_rgb(&bytes, p, &limits).expect("decode")
        })
        .collect()
}

/// Largest absolute difference between two feature sets.
fn max_difference(a: &ImageFeatures, b: &ImageFeatures) -> f32 {
    let pairs = [
        (&a.object, &b.object),
        (&a.attribution, &b.attribution),
        (&a.texture, &b.texture),
    ];
    pairs
        .iter()
        .flat_map(|(x, y)| {
            assert_eq!(x.patches.len(), y.patches.len(), "feature shapes differ");
            x.cls
                .iter()
                .zip(&y.cls)
                .chain(x.patches.iter().zip(&y.patches))
                .map(|(u, v)| (u - v).abs())
        })
        .fold(0.0, f32::max)
}

/// Prints one result line.
fn line(config: &str, batch: usize, stage: &str, seconds: f64) {
    println!(
        "pipeline {config} b{batch} {stage:<20} {:>9.2} ms/img",
        seconds * 1e3
    );
}

/// Times the stages and the whole predict of one configuration at one batch size.
fn bench_batch(
    name: &str,
    detector: &Detector,
    backbones: &Backbones,
    extractor: &FeatureExtractor,
    paths: &[PathBuf],
    runs: usize,
) {
    let batch = paths.len();
    let per = |s: f64| s / batch as f64;
    let mut total = 0.0;
    let mut report = |stage: &str, seconds: f64| {
        total += seconds;
        line(name, batch, stage, seconds);
    };

    let rgb = decode_all(paths);
    report("decode", per(median_s(runs, || drop(decode_all(paths)))));

    let [object_size, attribution_size, texture_size] = backbones.sizes;
    let mut sizes = vec![object_size, texture_size];
    if !backbones.shared() {
        sizes.insert(1, attribution_size);
    }
    let preprocess = || {
        let grids: Vec<GridImage> = rgb
            .par_iter()
            .map(|im| GridImage::from_rgb(im, backbones.eval))
            .collect();
        sizes
            .iter()
            .map(|&s| input_batch(&grids, s))
            .collect::<Vec<_>>()
    };
    let inputs = preprocess();
    report("preprocess", per(median_s(runs, || drop(preprocess()))));

    let (object_in, texture_in) = (&inputs[0], &inputs[inputs.len() - 1]);
    let forward_vit = |vit: &Dinov2, x: &Tensor| vit.forward(x).expect("ViT forward");
    let object_out = forward_vit(&backbones.object, object_in);
    report(
        "forward_object",
        per(median_s(runs, || {
            drop(forward_vit(&backbones.object, object_in))
        })),
    );
    let attribution_out = if backbones.shared() {
        object_out.clone()
    } else {
        let vit = backbones.attribution_vit();
        let out = forward_vit(vit, &inputs[1]);
        report(
            "forward_attribution",
            per(median_s(runs, || drop(forward_vit(vit, &inputs[1])))),
        );
        out
    };
    let forward_cnn = || backbones.cnn.forward(texture_in).expect("CNN forward");
    let cnn_out = forward_cnn();
    report(
        "forward_texture",
        per(median_s(runs, || drop(forward_cnn()))),
    );

    let tokens = || -> Vec<ImageFeatures> {
        let object = split_vit_tokens(&object_out, object_size).expect("ViT output");
        let attribution = if backbones.shared() {
            object.clone()
        } else {
            split_vit_tokens(&attribution_out, attribution_size).expect("ViT output")
        };
        object
            .into_iter()
            .zip(attribution)
            .zip(cnn_tokens(&cnn_out).expect("CNN output"))
            .map(|((object, attribution), texture)| ImageFeatures {
                object,
                attribution,
                texture,
            })
            .collect()
    };
    let features = tokens();
    report("tokens", per(median_s(runs, || drop(tokens()))));

    // The staged path must give the extractor's features.
    let reference = extractor
        .extract(&rgb.iter().collect::<Vec<_>>())
        .expect("extractor");
    let diff = features
        .iter()
        .zip(&reference)
        .map(|(a, b)| max_difference(a, b))
        .fold(0.0, f32::max);
    assert!(
        diff <= STAGING_TOLERANCE,
        "staged features differ from the extractor's by {diff}"
    );

    let eval = detector.config.fusion.eval_size;
    let score_all = |f: &dyn Fn(&ImageFeatures)| features.iter().for_each(f);
    report(
        "score_object",
        per(median_s(runs, || {
            score_all(&|f| drop(detector.object.score(&f.object, eval)))
        })),
    );
    report(
        "score_attribution",
        per(median_s(runs, || {
            score_all(&|f| drop(detector.attribution.score(&f.attribution, eval)))
        })),
    );
    report(
        "score_texture",
        per(median_s(runs, || {
            score_all(&|f| drop(detector.texture.score(&f.texture, eval).expect("texture")))
        })),
    );
    let outputs: Vec<BranchOutputs> = features
        .iter()
        .map(|f| detector.score(f).expect("score").branches)
        .collect();
    let rule = detector.config.fusion.rule;
    report(
        "fusion",
        per(median_s(runs, || {
            for b in &outputs {
                let fused = detector.fuse(b, BranchSet::ALL, rule);
                let anomalous = detector.calibration.threshold.map(|t| fused.score > t);
                drop((fused, anomalous));
            }
        })),
    );
    line(name, batch, "stages_sum", total);

    let mut scores = Vec::with_capacity(batch);
    let mut predict = |keep: bool| {
        extractor
            .for_each_image::<anyhow::Error>(paths, "predict", &Silent, |_, item| {
                let verdict = detector.score(&item?.features)?;
                if keep {
                    scores.push(verdict.fused.score);
                }
                Ok(())
            })
            .expect("predict");
    };
    predict(true);
    line(
        name,
        batch,
        "predict",
        per(median_s(runs, || predict(false))),
    );
    if batch == 1 {
        println!(
            "# {name}: fused score of {} = {:.6}",
            paths[0].display(),
            scores[0]
        );
    }
}

/// A model for `config`: loaded from `BENCH_MODEL_<NAME>` or fitted here.
fn model(name: &str, config: &Config, extractor: &FeatureExtractor, train: &[PathBuf]) -> Detector {
    let var = format!("BENCH_MODEL_{}", name.to_uppercase());
    if let Ok(path) = std::env::var(&var) {
        let shown = path.clone();
        let file = ModelFile::load(Path::new(&path)).expect("model file");
        let detector = Detector::from_model_file(&file, &shown).expect("model");
        detector
            .check_weights(&shown, extractor.fingerprints())
            .expect("model fitted with other weights");
        assert_eq!(
            detector.config.attribution.input_size, config.attribution.input_size,
            "{var}: the model's attribution input size is not this configuration's"
        );
        assert_eq!(
            detector.config.texture.backbone, config.texture.backbone,
            "{var}: the model's texture backbone is not this configuration's"
        );
        println!("# {name}: model {shown}");
        return detector;
    }
    let n = env_usize("BENCH_FIT_IMAGES", DEFAULT_FIT_IMAGES).min(train.len());
    let start = Instant::now();
    let detector = beltad::fit::fit(config, extractor, &train[..n], "bench", &Silent).expect("fit");
    println!(
        "# {name}: fitted on {n} training images in {:.1} s",
        start.elapsed().as_secs_f64()
    );
    detector
}

fn bench_config(name: &str, config: &Config, data: &Path, runs: usize) {
    let search = WeightsSearch::new(None);
    if let Some(missing) = config
        .backbones()
        .into_iter()
        .find(|&k| search.find(k).is_err())
    {
        println!(
            "# {name}: skipped, no {} weights found",
            missing.weights_file()
        );
        return;
    }
    let train = dataset::training_images(data).expect("training images");
    let test: Vec<PathBuf> = dataset::test_samples(data)
        .expect("test images")
        .into_iter()
        .map(|s| s.image)
        .collect();
    // A spread over the test set (normal and defective images).
    let step = (test.len() / BATCHES[BATCHES.len() - 1]).max(1);
    let images: Vec<PathBuf> = test.iter().step_by(step).cloned().collect();

    let fit_extractor = FeatureExtractor::load(config, &search).expect("backbones");
    let detector = model(name, config, &fit_extractor, &train);
    drop(fit_extractor);
    let bank = &detector.texture.bank;
    let (o, a, t) = (
        &detector.config.object,
        &detector.config.attribution,
        &detector.config.texture,
    );
    println!(
        "# {name}: {}@{} / {}@{} / {}@{}, eval {}, memory bank {} x {}, shared ViT forward: {}",
        o.backbone,
        o.input_size,
        a.backbone,
        a.input_size,
        t.backbone,
        t.input_size,
        detector.config.fusion.eval_size,
        bank.len(),
        bank.dim(),
        a.backbone == o.backbone && a.input_size == o.input_size,
    );
    let backbones = Backbones::load(&detector.config, &search);
    for batch in BATCHES {
        let extractor = FeatureExtractor::load(&detector.config, &search)
            .expect("backbones")
            .with_batch_size(batch);
        bench_batch(
            name,
            &detector,
            &backbones,
            &extractor,
            &images[..batch.min(images.len())],
            runs,
        );
    }
}

fn main() {
    let wanted: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| !a.starts_with('-'))
        .collect();
    let runs = env_usize("BENCH_RUNS", DEFAULT_RUNS);
    let data = std::env::var_os("BENCH_DATA").map_or_else(
        || PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../shared/data/kolektorsdd"),
        PathBuf::from,
    );
    println!(
        "# Pipeline, {} threads, data {}, median of {runs} warm runs",
        rayon::current_num_threads(),
        data.display()
    );
    for (name, config) in configs() {
        if wanted.is_empty() || wanted.iter().any(|w| w == name) {
            bench_config(name, &config, &data, runs);
        }
    }
}
