//! Opens an evaluation report in headless Chromium (through chromedriver's
//! WebDriver endpoint on loopback) and checks that it renders: the title and
//! every table and plot are there, every image has loaded, and the browser
//! console holds no error. A screenshot is saved to
//! `target/report-screenshot.png` for a human to look at.
//!
//! Needs Debian's `chromium` and `chromium-driver` (`.ci/run` installs
//! them). Without them the test reports that it could not run and passes,
//! unless `BELTAD_REQUIRE_BROWSER` is set, as it is in CI.

mod util;

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use base64::Engine;
use serde_json::{Value, json};

use util::{beltad, fit_small, mini_dataset, temp_dir, text};

const CHROMEDRIVER: &str = "/usr/bin/chromedriver";
const CHROMIUM: &str = "/usr/bin/chromium";

/// Kills chromedriver when the test ends, however it ends.
struct Driver {
    child: Child,
    base: String,
}

impl Drop for Driver {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

fn start_driver() -> Driver {
    let port = free_port();
    let child = Command::new(CHROMEDRIVER)
        .arg(format!("--port={port}"))
        .arg("--allowed-ips=127.0.0.1")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("chromedriver starts");
    let base = format!("http://127.0.0.1:{port}");
    let started = Instant::now();
    while ureq::get(&format!("{base}/status")).call().is_err() {
        assert!(started.elapsed() < Duration::from_secs(30), "chromedriver did not come up");
        std::thread::sleep(Duration::from_millis(100));
    }
    Driver { child, base }
}

fn call(method: &str, url: &str, body: Option<Value>) -> Value {
    let response = match (method, body) {
        ("POST", Some(b)) => ureq::post(url).send_json(b),
        ("DELETE", _) => ureq::delete(url).call(),
        _ => ureq::get(url).call(),
    };
    let mut response = response.unwrap_or_else(|e| panic!("{method} {url}: {e}"));
    response.body_mut().read_json::<Value>().unwrap()["value"].clone()
}

fn make_report(dir: &Path) -> PathBuf {
    let data = mini_dataset(dir);
    let model = dir.join("m.beltad");
    fit_small(dir, &data, &model);
    let report = dir.join("report");
    let out = beltad(&[
        "-q",
        "eval",
        "--model",
        model.to_str().unwrap(),
        "--data",
        data.to_str().unwrap(),
        "--report",
        report.to_str().unwrap(),
    ]);
    assert!(out.status.success(), "eval --report failed: {}", text(&out));
    report.join("index.html")
}

#[test]
fn report_renders_in_headless_chromium() {
    if !Path::new(CHROMEDRIVER).exists() || !Path::new(CHROMIUM).exists() {
        assert!(
            std::env::var_os("BELTAD_REQUIRE_BROWSER").is_none(),
            "chromium and chromium-driver are required here but not installed"
        );
        eprintln!("report_renders_in_headless_chromium: not run (install chromium chromium-driver)");
        return;
    }
    let dir = temp_dir("report");
    let index = make_report(&dir);
    let driver = start_driver();
    let profile = dir.join("chromium-profile");
    let capabilities = json!({"capabilities": {"alwaysMatch": {
        "browserName": "chrome",
        "goog:loggingPrefs": {"browser": "ALL"},
        "goog:chromeOptions": {"binary": CHROMIUM, "args": [
            "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
            "--disable-background-networking", "--disable-component-update", "--disable-sync",
            "--window-size=1280,2400", format!("--user-data-dir={}", profile.display()),
        ]},
    }}});
    let session = call("POST", &format!("{}/session", driver.base), Some(capabilities));
    let id = session["sessionId"].as_str().expect("a session").to_string();
    let url = |path: &str| format!("{}/session/{id}/{path}", driver.base);

    call("POST", &url("url"), Some(json!({"url": format!("file://{}", index.display())})));
    let script = |s: &str| call("POST", &url("execute/sync"), Some(json!({"script": s, "args": []})));

    let title = script("return document.title;");
    assert!(title.as_str().unwrap_or("").starts_with("beltad report: mini_belt"), "{title}");
    assert!(script("return document.querySelectorAll('table').length;").as_u64() >= Some(4));
    assert_eq!(script("return document.querySelectorAll('figure svg').length;").as_u64(), Some(4));

    let images = script(
        "return Array.from(document.images).map(i => [i.getAttribute('src'), i.complete && i.naturalWidth > 0]);",
    );
    let images = images.as_array().expect("image list");
    assert!(images.len() >= 6, "too few gallery images: {images:?}");
    for image in images {
        assert_eq!(image[1], Value::Bool(true), "image did not load: {image}");
    }

    let logs = call("POST", &url("se/log"), Some(json!({"type": "browser"})));
    let errors: Vec<&Value> = logs
        .as_array()
        .map(|l| l.iter().filter(|e| e["level"] == "SEVERE").collect())
        .unwrap_or_default();
    assert!(errors.is_empty(), "console errors: {errors:?}");

    let png = call("GET", &url("screenshot"), None);
    let bytes = base64::engine::general_purpose::STANDARD.decode(png.as_str().unwrap()).unwrap();
    let shot = Path::new(env!("CARGO_MANIFEST_DIR")).join("target/report-screenshot.png");
    std::fs::write(&shot, &bytes).unwrap();
    let decoded = image::load_from_memory(&bytes).unwrap();
    assert!(decoded.width() >= 1000, "screenshot {}x{}", decoded.width(), decoded.height());
    call("DELETE", &format!("{}/session/{id}", driver.base), None);
}
