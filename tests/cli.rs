//! End-to-end runs of the `beltad` binary on real images from the shipped
//! data sets (../shared/data), with the shipped weights. Inputs are kept
//! small (a handful of images, reduced input sizes) so the suite stays quick.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn shared() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../shared")
}

fn temp_dir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("beltad-cli-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn beltad(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_beltad"))
        .args(args)
        .env("BELTAD_WEIGHTS", shared().join("weights"))
        .output()
        .expect("beltad runs")
}

fn text(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// A small config: the default preset's backbones at reduced sizes.
const SMALL_CONFIG: &str = r#"
[object]
input_size = 112
[attribution]
input_size = 126
[texture]
input_size = 96
coreset_ratio = 0.1
[fusion]
eval_size = 128
[calibration]
holdout_fraction = 0.25
"#;

/// A miniature MVTec-layout copy of conveyor_belt_damage: 8 train images, 3
/// normal and 3 defective test images with masks.
fn mini_dataset(dir: &Path) -> PathBuf {
    let src = shared().join("data/conveyor_belt_damage");
    let root = dir.join("mini_belt");
    let copy_n = |from: &Path, to: &Path, n: usize| -> Vec<String> {
        std::fs::create_dir_all(to).unwrap();
        let mut names: Vec<_> = std::fs::read_dir(from)
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        names.sort();
        names.truncate(n);
        for name in &names {
            std::fs::copy(from.join(name), to.join(name)).unwrap();
        }
        names
            .iter()
            .map(|n| n.to_string_lossy().into_owned())
            .collect()
    };
    copy_n(&src.join("train/good"), &root.join("train/good"), 8);
    copy_n(&src.join("test/good"), &root.join("test/good"), 3);
    for name in copy_n(&src.join("test/hole"), &root.join("test/hole"), 3) {
        let mask = format!("{}_mask.png", name.trim_end_matches(".jpg"));
        std::fs::create_dir_all(root.join("ground_truth/hole")).unwrap();
        std::fs::copy(
            src.join("ground_truth/hole").join(&mask),
            root.join("ground_truth/hole").join(&mask),
        )
        .unwrap();
    }
    root
}

#[test]
fn fit_predict_eval_on_real_images() {
    let dir = temp_dir("e2e");
    let data = mini_dataset(&dir);
    let config = dir.join("small.toml");
    std::fs::write(&config, SMALL_CONFIG).unwrap();
    let model = dir.join("m.beltad");

    let out = beltad(&[
        "-q",
        "fit",
        "--data",
        data.to_str().unwrap(),
        "--model",
        model.to_str().unwrap(),
        "--config",
        config.to_str().unwrap(),
    ]);
    assert!(out.status.success(), "fit failed: {}", text(&out));
    assert!(model.is_file());

    let preds = dir.join("preds");
    let test_good = data.join("test/good");
    let out = beltad(&[
        "-q",
        "predict",
        "--model",
        model.to_str().unwrap(),
        "--out",
        preds.to_str().unwrap(),
        test_good.to_str().unwrap(),
    ]);
    assert!(out.status.success(), "predict failed: {}", text(&out));
    let jsonl = std::fs::read_to_string(preds.join("scores.jsonl")).unwrap();
    let lines: Vec<serde_json::Value> = jsonl
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 3);
    for line in &lines {
        let score = line["score"].as_f64().expect("a score");
        assert!(score.is_finite() && score >= 0.0, "{line}");
        assert!(line["anomalous"].is_boolean(), "{line}");
        let heat = preds.join(line["heatmap"].as_str().unwrap());
        let img = image::open(&heat).unwrap();
        let original = image::open(line["image"].as_str().unwrap()).unwrap();
        assert_eq!(
            (img.width(), img.height()),
            (original.width(), original.height())
        );
    }
    let csv = std::fs::read_to_string(preds.join("scores.csv")).unwrap();
    assert_eq!(csv.lines().count(), 4, "{csv}");

    let json = dir.join("metrics.json");
    let out = beltad(&[
        "-q",
        "eval",
        "--model",
        model.to_str().unwrap(),
        "--data",
        data.to_str().unwrap(),
        "--json",
        json.to_str().unwrap(),
    ]);
    assert!(out.status.success(), "eval failed: {}", text(&out));
    let metrics: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    assert_eq!(metrics["n_test_images"], 6);
    assert_eq!(metrics["dataset"], "mini_belt");
    for output in ["fused", "object", "attribution", "texture"] {
        for metric in ["image_auroc", "pixel_auroc", "aupro_0_3"] {
            let v = metrics[output][metric].as_f64().unwrap_or(-1.0);
            assert!((0.0..=1.0).contains(&v), "{output}.{metric} = {v}");
        }
    }
}
