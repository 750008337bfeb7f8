//! Shared harness for the end-to-end tests: runs the `beltad` binary with the
//! shipped weights, builds miniature data sets from ../shared/data, and
//! fits small models.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

pub fn shared() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../shared")
}

/// A fresh, empty temporary folder for one test.
pub fn temp_dir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("beltad-test-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// Runs `beltad` with the shipped weights.
pub fn beltad(args: &[&str]) -> Output {
    beltad_with_weights(args, &shared().join("weights"))
}

/// Runs `beltad` with `BELTAD_WEIGHTS` set to `weights`.
pub fn beltad_with_weights(args: &[&str], weights: &Path) -> Output {
    Command::new(env!("CARGO_BIN_EXE_beltad"))
        .args(args)
        .env("BELTAD_WEIGHTS", weights)
        .env_remove("BELTAD_LOG")
        .output()
        .expect("beltad runs")
}

/// stdout and stderr together.
pub fn text(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// Asserts a clean failure: exit code 1, one `error:` line naming `needle`, no panic.
pub fn assert_clean_error(out: &Output, needle: &str) {
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "expected exit 1: {}", text(out));
    assert!(!stderr.contains("panicked"), "panic: {stderr}");
    let errors: Vec<&str> = stderr
        .lines()
        .filter(|l| l.starts_with("error: "))
        .collect();
    assert_eq!(errors.len(), 1, "expected one error line: {stderr}");
    assert!(
        errors[0].contains(needle),
        "error does not mention {needle:?}: {}",
        errors[0]
    );
}

/// A small config: the default preset's backbones at reduced sizes.
pub const SMALL_CONFIG: &str = r#"
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

/// Writes [`SMALL_CONFIG`] into `dir` and returns its path.
pub fn small_config(dir: &Path) -> PathBuf {
    let path = dir.join("small.toml");
    std::fs::write(&path, SMALL_CONFIG).unwrap();
    path
}

fn copy_first(from: &Path, to: &Path, n: usize) -> Vec<String> {
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
}

/// A miniature MVTec-layout copy of conveyor_belt_damage: 8 train images,
/// 3 normal and 3 defective test images with masks.
pub fn mini_dataset(dir: &Path) -> PathBuf {
    let src = shared().join("data/conveyor_belt_damage");
    let root = dir.join("mini_belt");
    copy_first(&src.join("train/good"), &root.join("train/good"), 8);
    copy_first(&src.join("test/good"), &root.join("test/good"), 3);
    std::fs::create_dir_all(root.join("ground_truth/hole")).unwrap();
    for name in copy_first(&src.join("test/hole"), &root.join("test/hole"), 3) {
        let mask = format!("{}_mask.png", name.trim_end_matches(".jpg"));
        let gt = |r: &Path| r.join("ground_truth/hole").join(&mask);
        std::fs::copy(gt(&src), gt(&root)).unwrap();
    }
    root
}

/// Fits a small model on `data` into `model`, asserting success.
pub fn fit_small(dir: &Path, data: &Path, model: &Path) {
    let config = small_config(dir);
    let out = beltad(&fit_args(data, model, &config));
    assert!(out.status.success(), "fit failed: {}", text(&out));
}

/// A path as a command-line argument.
pub fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// `beltad -q fit` on `data` into `model` with `config`.
pub fn fit_args<'a>(data: &'a Path, model: &'a Path, config: &'a Path) -> Vec<&'a str> {
    vec![
        "-q",
        "fit",
        "--data",
        s(data),
        "--model",
        s(model),
        "--config",
        s(config),
    ]
}

/// Names of the files in `dir` (sorted).
pub fn file_names(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .map(|rd| {
            rd.map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    names.sort();
    names
}
