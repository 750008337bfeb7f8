//! Crash safety of the files beltad writes: a `fit` killed with SIGKILL at
//! random points never damages the model already at its output path, and
//! Ctrl-C (SIGINT) stops `fit` and `predict` with exit code 130, leaving no
//! half-written file behind.
//!
//! After SIGKILL, beltad's own temporary file (`.<name>.tmp-<pid>`) may
//! remain beside the target; the next write to that target removes it.

mod util;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use beltad::detector::Detector;
use beltad::model_file::ModelFile;
use beltad::rng::SplitMix64;
use util::{
    beltad, file_names, fit_args, fit_small, mini_dataset, s, shared, small_config, temp_dir, text,
};

/// Longest wait for a stopped process to exit.
const EXIT_TIMEOUT: Duration = Duration::from_secs(120);
/// Exit code after Ctrl-C.
const EXIT_INTERRUPTED: i32 = 130;

/// Starts `beltad` with the shipped weights, output captured.
fn spawn(args: &[&str]) -> Child {
    Command::new(env!("CARGO_BIN_EXE_beltad"))
        .args(args)
        .env("BELTAD_WEIGHTS", shared().join("weights"))
        .env_remove("BELTAD_LOG")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("beltad starts")
}

/// Waits for `child` to exit, failing the test if it hangs.
fn wait(mut child: Child) -> Output {
    let started = Instant::now();
    while child.try_wait().unwrap().is_none() {
        if started.elapsed() > EXIT_TIMEOUT {
            let _ = child.kill();
            panic!("beltad did not exit within {EXIT_TIMEOUT:?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    child.wait_with_output().unwrap()
}

fn send_sigint(child: &Child) {
    let status = Command::new("kill")
        .args(["-INT", &child.id().to_string()])
        .status()
        .expect("kill runs");
    assert!(status.success());
}

/// Loads a model file as `predict` does (format, checksum, consistency).
fn assert_loadable(path: &Path) {
    let file = ModelFile::load(path).unwrap_or_else(|e| panic!("model damaged: {e}"));
    Detector::from_model_file(&file, "m").unwrap_or_else(|e| panic!("model damaged: {e}"));
}

fn seeded_fit_args<'a>(
    data: &'a Path,
    model: &'a Path,
    config: &'a Path,
    seed: &'a str,
) -> Vec<&'a str> {
    [fit_args(data, model, config), vec!["--seed", seed]].concat()
}

/// A data set of every training image of the shipped conveyor-belt data, so
/// that a fit runs long enough to be interrupted.
fn longer_dataset(dir: &Path) -> PathBuf {
    let src = shared().join("data/conveyor_belt_damage/train/good");
    let data = dir.join("belt");
    std::fs::create_dir_all(&data).unwrap();
    for name in file_names(&src) {
        std::fs::copy(src.join(&name), data.join(&name)).unwrap();
    }
    data
}

#[test]
fn sigkill_during_fit_never_damages_the_existing_model() {
    let dir = temp_dir("sigkill");
    let data = mini_dataset(&dir);
    let config = small_config(&dir);
    let models = dir.join("models");
    std::fs::create_dir_all(&models).unwrap();
    let model = models.join("m.beltad");
    let started = Instant::now();
    fit_small(&dir, &data, &model);
    let fit_time = started.elapsed();
    let mut current = std::fs::read(&model).unwrap();

    // Kills at seeded random points over the whole length of a fit; every
    // fit uses another seed, so a completed one is told apart by its bytes.
    let mut rng = SplitMix64::new(4);
    const KILLS: usize = 7;
    let mut stale = Vec::new();
    for k in 0..KILLS {
        let delay = fit_time.mul_f64(0.05 + 1.1 * rng.next_f64());
        let seed = (100 + k).to_string();
        let mut child = spawn(&seeded_fit_args(&data, &model, &config, &seed));
        std::thread::sleep(delay);
        let pid = child.id();
        let _ = child.kill();
        let _ = child.wait();

        let after = std::fs::read(&model).unwrap();
        assert_loadable(&model);
        if after != current {
            current = after; // the fit finished and renamed its file before the kill
        }
        let temp = format!(".m.beltad.tmp-{pid}");
        for name in file_names(&models) {
            assert!(
                name == "m.beltad" || name == temp,
                "kill {k}: unexpected file {name}"
            );
            if name == temp {
                stale.push(name);
            }
        }
    }

    // The next fit clears temporary files of dead processes (one is planted
    // in case no kill landed mid-write: no pid exceeds 2^22); the model is
    // usable by `predict`.
    std::fs::write(models.join(".m.beltad.tmp-4999999"), b"half a model").unwrap();
    let out = beltad(&seeded_fit_args(&data, &model, &config, "7"));
    assert!(out.status.success(), "{}", text(&out));
    assert_eq!(
        file_names(&models),
        vec!["m.beltad"],
        "left over: {stale:?}"
    );
    let preds = dir.join("preds");
    let out = beltad(&[
        "-q",
        "predict",
        "--model",
        s(&model),
        "--out",
        s(&preds),
        s(&data.join("test/good")),
    ]);
    assert!(out.status.success(), "{}", text(&out));
}

#[test]
fn ctrl_c_stops_a_fit_cleanly() {
    let dir = temp_dir("sigint-fit");
    let data = longer_dataset(&dir);
    let config = small_config(&dir);
    let models = dir.join("models");
    std::fs::create_dir_all(&models).unwrap();
    let model = models.join("m.beltad");
    std::fs::write(&model, b"the model of yesterday").unwrap();

    for delay_ms in [500, 2500] {
        let child = spawn(&seeded_fit_args(&data, &model, &config, "0"));
        std::thread::sleep(Duration::from_millis(delay_ms));
        send_sigint(&child);
        let out = wait(child);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(EXIT_INTERRUPTED), "{}", text(&out));
        assert!(!stderr.contains("panicked"), "{stderr}");
        assert_eq!(
            stderr
                .lines()
                .filter(|l| l.starts_with("error: "))
                .collect::<Vec<_>>(),
            vec!["error: interrupted"]
        );
        assert_eq!(std::fs::read(&model).unwrap(), b"the model of yesterday");
        assert_eq!(file_names(&models), vec!["m.beltad"]);
    }
}

#[test]
fn ctrl_c_stops_a_predict_cleanly() {
    let dir = temp_dir("sigint-predict");
    let data = mini_dataset(&dir);
    let model = dir.join("m.beltad");
    fit_small(&dir, &data, &model);
    let images = longer_dataset(&dir);
    let preds = dir.join("preds");
    std::fs::create_dir_all(&preds).unwrap();
    std::fs::write(preds.join("scores.jsonl"), b"an earlier run\n").unwrap();

    let child = spawn(&[
        "-q",
        "predict",
        "--model",
        s(&model),
        "--out",
        s(&preds),
        s(&images),
    ]);
    std::thread::sleep(Duration::from_millis(2500));
    send_sigint(&child);
    let out = wait(child);
    assert_eq!(out.status.code(), Some(EXIT_INTERRUPTED), "{}", text(&out));
    assert!(String::from_utf8_lossy(&out.stderr).contains("error: interrupted"));
    // The earlier score file is kept and no temporary file is left; the
    // pictures already drawn are complete files.
    assert_eq!(
        std::fs::read(preds.join("scores.jsonl")).unwrap(),
        b"an earlier run\n"
    );
    assert_eq!(
        file_names(&preds),
        vec!["heatmaps", "overlays", "scores.jsonl"]
    );
    for sub in ["heatmaps", "overlays"] {
        for name in file_names(&preds.join(sub)) {
            assert!(!name.starts_with('.'), "temporary file {sub}/{name} left");
            image::open(preds.join(sub).join(&name)).expect("a complete picture");
        }
    }
}
