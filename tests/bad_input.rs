//! Bad input through the CLI: each case must end with exit code 1, one
//! `error:` line naming the file and the problem, no panic, and no partial
//! output (an existing model file stays intact).

mod util;

use std::path::Path;

use util::{
    assert_clean_error, beltad, beltad_with_weights, file_names, fit_args, fit_small, mini_dataset,
    s, shared, small_config, temp_dir, text,
};

#[test]
fn empty_folder() {
    let dir = temp_dir("empty");
    let data = dir.join("nothing");
    std::fs::create_dir_all(&data).unwrap();
    let model = dir.join("m.beltad");
    let out = beltad(&fit_args(&data, &model, &small_config(&dir)));
    assert_clean_error(&out, "no images found");
    assert!(!model.exists());
}

#[test]
fn truncated_zero_size_and_fake_images_are_named() {
    let dir = temp_dir("badimg");
    let data = mini_dataset(&dir);
    let config = small_config(&dir);
    let train = data.join("train/good");
    let first = file_names(&train)[0].clone();
    let bytes = std::fs::read(train.join(&first)).unwrap();

    let model = dir.join("m.beltad");
    fit_small(&dir, &data, &model);
    let good_model = std::fs::read(&model).unwrap();

    let cases: [(&str, Vec<u8>, &str); 3] = [
        (
            "cut.jpg",
            bytes[..bytes.len() / 3].to_vec(),
            "not a readable image",
        ),
        ("zero.png", Vec::new(), "empty file"),
        (
            "notes.jpg",
            b"these are not pixels".to_vec(),
            "not a readable image",
        ),
    ];
    for (name, content, problem) in cases {
        let bad = train.join(name);
        std::fs::write(&bad, &content).unwrap();
        let out = beltad(&fit_args(&data, &model, &config));
        assert_clean_error(&out, name);
        assert_clean_error(&out, problem);
        std::fs::remove_file(&bad).unwrap();
        assert_eq!(
            std::fs::read(&model).unwrap(),
            good_model,
            "model changed after a failed fit"
        );
        assert_eq!(
            file_names(&dir)
                .iter()
                .filter(|n| n.contains("tmp"))
                .count(),
            0
        );
    }
}

#[test]
fn predict_goes_on_past_an_unreadable_image() {
    let dir = temp_dir("predict-bad");
    let data = mini_dataset(&dir);
    let model = dir.join("m.beltad");
    fit_small(&dir, &data, &model);
    let inputs = dir.join("inputs");
    std::fs::create_dir_all(&inputs).unwrap();
    let good = data.join("test/good");
    let first = file_names(&good)[0].clone();
    std::fs::copy(good.join(&first), inputs.join(&first)).unwrap();
    std::fs::write(inputs.join("broken.png"), b"\x89PNG\r\n\x1a\n").unwrap();

    let preds = dir.join("preds");
    let out = beltad(&[
        "-q",
        "predict",
        "--model",
        s(&model),
        "--out",
        s(&preds),
        s(&inputs),
    ]);
    assert_eq!(out.status.code(), Some(3), "{}", text(&out));
    let lines = std::fs::read_to_string(preds.join("scores.jsonl")).unwrap();
    let rows: Vec<serde_json::Value> = lines
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(rows.len(), 2);
    assert!(rows.iter().any(|r| {
        r["error"]
            .as_str()
            .is_some_and(|e| e.contains("broken.png"))
    }));
    assert!(rows.iter().any(|r| r["score"].as_f64().is_some()));
}

#[test]
fn corrupted_truncated_and_foreign_model_files() {
    let dir = temp_dir("badmodel");
    let data = mini_dataset(&dir);
    let model = dir.join("m.beltad");
    fit_small(&dir, &data, &model);
    let bytes = std::fs::read(&model).unwrap();
    let image = data.join("test/good");
    let predict = |m: &Path| {
        beltad(&[
            "-q",
            "predict",
            "--model",
            s(m),
            "--out",
            s(&dir.join("p")),
            s(&image),
        ])
    };

    let flipped = dir.join("flipped.beltad");
    let mut b = bytes.clone();
    let last = b.len() - 10;
    b[last] ^= 0x55;
    std::fs::write(&flipped, &b).unwrap();
    assert_clean_error(&predict(&flipped), "checksum mismatch");

    let cut = dir.join("cut.beltad");
    std::fs::write(&cut, &bytes[..bytes.len() / 2]).unwrap();
    assert_clean_error(&predict(&cut), "truncated");

    let png = dir.join("picture.beltad");
    std::fs::copy(shared().join("weights/fixtures/input_224.png"), &png).unwrap();
    assert_clean_error(&predict(&png), "not a beltad model file");

    let old = dir.join("old.beltad");
    let key = b"\"format_version\":\"1\"";
    let at = bytes.windows(key.len()).position(|w| w == key).unwrap();
    let mut b = bytes.clone();
    b[at + key.len() - 2] = b'7';
    std::fs::write(&old, &b).unwrap();
    assert_clean_error(&predict(&old), "format version 7");

    assert_clean_error(&predict(&dir.join("missing.beltad")), "missing.beltad");
    assert!(
        !dir.join("p/scores.jsonl").exists(),
        "scores written for a failed run"
    );
}

#[test]
fn missing_and_misshapen_weights() {
    let dir = temp_dir("badweights");
    let data = mini_dataset(&dir);
    let config = small_config(&dir);
    let model = dir.join("m.beltad");
    let empty = dir.join("no-weights");
    std::fs::create_dir_all(&empty).unwrap();

    let args = [
        "-q",
        "fit",
        "--data",
        s(&data),
        "--model",
        s(&model),
        "--config",
        s(&config),
        "--weights",
        s(&empty),
    ];
    let out = beltad_with_weights(&args, &empty);
    assert_clean_error(&out, "dinov2_vits14.safetensors");

    // A DINOv2 file whose patch embedding has the wrong shape.
    let mut tensors = std::collections::HashMap::new();
    let wrong = vec![0u8; 4 * 10];
    tensors.insert(
        "embeddings.patch_embeddings.projection.weight".to_string(),
        safetensors::tensor::TensorView::new(safetensors::Dtype::F32, vec![2, 5], &wrong).unwrap(),
    );
    let bad = safetensors::serialize(&tensors, None).unwrap();
    std::fs::write(empty.join("dinov2_vits14.safetensors"), bad).unwrap();
    let out = beltad_with_weights(&args, &empty);
    assert_clean_error(&out, "dinov2_vits14.safetensors");
    assert!(!model.exists());
}

#[test]
fn a_model_refuses_other_backbone_weights() {
    let dir = temp_dir("otherweights");
    let data = mini_dataset(&dir);
    let model = dir.join("m.beltad");
    fit_small(&dir, &data, &model);

    // Same tensors, one value changed: another MobileNetV2 checkpoint.
    let weights = dir.join("weights");
    std::fs::create_dir_all(&weights).unwrap();
    std::fs::copy(
        shared().join("weights/dinov2_vits14.safetensors"),
        weights.join("dinov2_vits14.safetensors"),
    )
    .unwrap();
    let mut mobilenet = std::fs::read(shared().join("weights/mobilenet_v2.safetensors")).unwrap();
    let n = mobilenet.len();
    mobilenet[n - 1] ^= 1;
    std::fs::write(weights.join("mobilenet_v2.safetensors"), mobilenet).unwrap();

    let out = beltad_with_weights(
        &[
            "-q",
            "predict",
            "--model",
            s(&model),
            "--out",
            s(&dir.join("p")),
            s(&data.join("test/good")),
        ],
        &weights,
    );
    assert_clean_error(&out, "other mobilenet_v2 weights");
}

#[test]
fn mask_of_the_wrong_size() {
    let dir = temp_dir("badmask");
    let data = mini_dataset(&dir);
    let model = dir.join("m.beltad");
    fit_small(&dir, &data, &model);
    let masks = data.join("ground_truth/hole");
    let mask = masks.join(&file_names(&masks)[0]);
    image::GrayImage::new(7, 9).save(&mask).unwrap();
    let json = dir.join("metrics.json");
    let out = beltad(&[
        "-q",
        "eval",
        "--model",
        s(&model),
        "--data",
        s(&data),
        "--json",
        s(&json),
    ]);
    assert_clean_error(&out, "mask is 7x9");
    assert_clean_error(&out, mask.file_name().unwrap().to_str().unwrap());
    assert!(!json.exists());
}

#[test]
fn absurd_config_values() {
    let dir = temp_dir("badconfig");
    let data = mini_dataset(&dir);
    let model = dir.join("m.beltad");
    for (toml, problem) in [
        ("[object]\ntau = -1.0\n", "object.tau"),
        ("[texture]\ncoreset_ratio = 0.0\n", "coreset_ratio"),
        ("[texture]\ncoreset_ratio = 2.0\n", "coreset_ratio"),
        ("[object]\ninput_size = 100\n", "multiple of 14"),
        ("[texture]\ninput_size = -3\n", "invalid config"),
        ("[object]\ntau = \"high\"\n", "invalid config"),
    ] {
        let config = dir.join("bad.toml");
        std::fs::write(&config, toml).unwrap();
        let out = beltad(&fit_args(&data, &model, &config));
        assert_clean_error(&out, problem);
    }
    assert!(!model.exists());
}
