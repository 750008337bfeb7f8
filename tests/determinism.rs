//! Determinism: the same data, config and seed give a byte-identical model
//! file and identical scores whatever the number of worker threads.

mod util;

use util::{beltad, mini_dataset, s, small_config, temp_dir, text};

#[test]
fn thread_count_changes_neither_the_model_nor_the_scores() {
    let dir = temp_dir("threads");
    let data = mini_dataset(&dir);
    let config = small_config(&dir);
    let mut models = Vec::new();
    let mut scores = Vec::new();
    for threads in ["1", "2", "3"] {
        let model = dir.join(format!("t{threads}.beltad"));
        let out = beltad(&[
            "-q",
            "--threads",
            threads,
            "fit",
            "--data",
            s(&data),
            "--model",
            s(&model),
            "--config",
            s(&config),
        ]);
        assert!(out.status.success(), "fit: {}", text(&out));
        models.push(std::fs::read(&model).unwrap());

        // Every prediction uses the first model, so that only the thread
        // count of predict differs.
        let preds = dir.join(format!("p{threads}"));
        let out = beltad(&[
            "-q",
            "--threads",
            threads,
            "predict",
            "--no-images",
            "--model",
            s(&dir.join("t1.beltad")),
            "--out",
            s(&preds),
            s(&data.join("test/good")),
            s(&data.join("test/hole")),
        ]);
        assert!(out.status.success(), "predict: {}", text(&out));
        scores.push(std::fs::read_to_string(preds.join("scores.csv")).unwrap());
    }
    assert_eq!(scores[0].lines().count(), 7, "{}", scores[0]);
    for (i, threads) in ["2", "3"].iter().enumerate() {
        assert!(
            models[i + 1] == models[0],
            "the model fitted with {threads} threads differs from the one with 1"
        );
        assert_eq!(
            scores[i + 1],
            scores[0],
            "scores with {threads} threads differ"
        );
    }
}
