//! End-to-end runs of the `beltad` binary on real images from the shipped
//! data sets (../shared/data), with the shipped weights. Inputs are kept
//! small (a handful of images, reduced input sizes) so the suite stays quick.

mod util;

use util::{beltad, fit_small, mini_dataset, temp_dir, text};

#[test]
fn fit_predict_eval_on_real_images() {
    let dir = temp_dir("e2e");
    let data = mini_dataset(&dir);
    let model = dir.join("m.beltad");
    fit_small(&dir, &data, &model);
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
        let driver = line["driver"].as_str().unwrap_or("");
        assert!(
            ["object", "attribution", "texture"].contains(&driver),
            "{line}"
        );
        assert!(
            line["texture_z"].as_f64().is_some_and(f64::is_finite),
            "{line}"
        );
        let heat = image::open(preds.join(line["heatmap"].as_str().unwrap())).unwrap();
        let original = image::open(line["image"].as_str().unwrap()).unwrap();
        assert_eq!(
            (heat.width(), heat.height()),
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
        "--rules",
        "--ablation",
    ]);
    assert!(out.status.success(), "eval failed: {}", text(&out));
    let metrics: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    assert_eq!(metrics["n_test_images"], 6);
    assert_eq!(metrics["dataset"], "mini_belt");
    let unit = |v: &serde_json::Value, what: &str| {
        let x = v.as_f64().unwrap_or(-1.0);
        assert!((0.0..=1.0).contains(&x), "{what} = {x}");
    };
    for output in ["fused", "object", "attribution", "texture"] {
        for metric in ["image_auroc", "pixel_auroc", "aupro_0_3"] {
            unit(&metrics[output][metric], &format!("{output}.{metric}"));
        }
    }
    let rules = metrics["rules"].as_array().expect("rules");
    assert_eq!(rules.len(), 8);
    for r in rules {
        unit(&r["pixel_auroc"], "rule pixel AUROC");
        assert!(r["missed_but_seen_by_a_branch"].as_u64().is_some(), "{r}");
    }
    // The paper rule with the paper score is the model's own fused output.
    let paper = &rules[0];
    assert_eq!(
        (paper["rule"].as_str(), paper["image_score"].as_str()),
        (Some("paper"), Some("paper"))
    );
    assert_eq!(paper["image_auroc"], metrics["fused"]["image_auroc"]);
    let ablation = metrics["ablation"].as_array().expect("ablation");
    assert_eq!(ablation.len(), 7);
    assert_eq!(ablation[6]["branches"], "object+attribution+texture");
    assert_eq!(ablation[6]["pixel_auroc"], metrics["fused"]["pixel_auroc"]);
}

#[test]
fn the_same_fit_gives_the_same_model_file() {
    let dir = temp_dir("determinism");
    let data = mini_dataset(&dir);
    let (a, b) = (dir.join("a.beltad"), dir.join("b.beltad"));
    fit_small(&dir, &data, &a);
    fit_small(&dir, &data, &b);
    let (a, b) = (std::fs::read(a).unwrap(), std::fs::read(b).unwrap());
    assert!(
        a == b,
        "two fits with the same data, config and seed wrote different model files"
    );
}
