//! Finding images on disk: MVTec AD layout data sets and plain folders.
//!
//! MVTec layout: `train/good/*` normal training images, `test/good/*` normal
//! test images, `test/<defect>/*` anomalous test images with masks at
//! `ground_truth/<defect>/<stem>_mask.png`. A plain folder of images can be
//! fitted on (its images are the training set) and predicted on. File lists
//! are sorted so that every run sees the same order.

use std::path::{Path, PathBuf};

use thiserror::Error;

use crate::image_io::has_image_extension;

/// Folder name of normal images in the MVTec layout.
pub const GOOD: &str = "good";

/// A test image with its label.
#[derive(Debug, Clone, PartialEq)]
pub struct TestSample {
    pub image: PathBuf,
    /// Defect class (the folder name); `None` for a normal image.
    pub defect: Option<String>,
    /// Ground-truth mask; `None` for a normal image (all pixels normal).
    pub mask: Option<PathBuf>,
}

impl TestSample {
    pub fn is_anomalous(&self) -> bool {
        self.defect.is_some()
    }
}

/// A data set folder could not be used.
#[derive(Debug, Error)]
pub enum DatasetError {
    #[error("{path}: cannot list folder: {source}")]
    List {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{0}: no such folder")]
    Missing(PathBuf),
    #[error("{0}: no images found (looked for .png, .jpg, .jpeg, .bmp, .tif, .tiff)")]
    NoImages(PathBuf),
    #[error("{path}: not an MVTec-layout data set (expected {expected})")]
    NotMvtec {
        path: PathBuf,
        expected: &'static str,
    },
    #[error("{image}: no ground-truth mask (expected {expected})")]
    MissingMask { image: PathBuf, expected: PathBuf },
    #[error("{0}: test folder has no anomalous images, so no metric can be computed")]
    NoAnomalies(PathBuf),
    #[error("{0}: test folder has no normal images (test/good), so no metric can be computed")]
    NoNormals(PathBuf),
}

/// Whether `dir` holds an MVTec-layout data set.
pub fn is_mvtec(dir: &Path) -> bool {
    dir.join("train").join(GOOD).is_dir()
}

/// The data set's name: the folder's own name.
pub fn name(dir: &Path) -> String {
    let canonical = dir.canonicalize().unwrap_or_else(|_| dir.to_path_buf());
    canonical
        .file_name()
        .map_or_else(|| "dataset".into(), |n| n.to_string_lossy().into_owned())
}

/// Training images: `train/good` of an MVTec folder, else the folder's images.
pub fn training_images(dir: &Path) -> Result<Vec<PathBuf>, DatasetError> {
    if is_mvtec(dir) {
        images_in(&dir.join("train").join(GOOD))
    } else {
        images_in(dir)
    }
}

/// Sorted image files directly inside `dir`; an error when there are none.
pub fn images_in(dir: &Path) -> Result<Vec<PathBuf>, DatasetError> {
    if !dir.is_dir() {
        return Err(DatasetError::Missing(dir.to_path_buf()));
    }
    let list_err = |source| DatasetError::List {
        path: dir.to_path_buf(),
        source,
    };
    let mut images = Vec::new();
    for entry in std::fs::read_dir(dir).map_err(list_err)? {
        let path = entry.map_err(list_err)?.path();
        let hidden = path
            .file_name()
            .is_some_and(|n| n.to_string_lossy().starts_with('.'));
        if path.is_file() && !hidden && has_image_extension(&path) {
            images.push(path);
        }
    }
    if images.is_empty() {
        return Err(DatasetError::NoImages(dir.to_path_buf()));
    }
    images.sort();
    Ok(images)
}

/// Test images of an MVTec folder with labels and masks. Every anomalous image
/// must have its mask; both classes must be present.
pub fn test_samples(dir: &Path) -> Result<Vec<TestSample>, DatasetError> {
    let test = dir.join("test");
    if !test.is_dir() {
        let expected = "a test/ folder with good/ and one folder per defect class";
        return Err(DatasetError::NotMvtec {
            path: dir.to_path_buf(),
            expected,
        });
    }
    let mut samples = Vec::new();
    for class in class_folders(&test)? {
        let defect = (class != GOOD).then(|| class.clone());
        for image in images_in(&test.join(&class))? {
            let mask = match &defect {
                Some(d) => Some(mask_path(dir, d, &image)?),
                None => None,
            };
            samples.push(TestSample {
                image,
                defect: defect.clone(),
                mask,
            });
        }
    }
    if !samples.iter().any(TestSample::is_anomalous) {
        return Err(DatasetError::NoAnomalies(test));
    }
    if samples.iter().all(TestSample::is_anomalous) {
        return Err(DatasetError::NoNormals(test));
    }
    Ok(samples)
}

fn class_folders(test: &Path) -> Result<Vec<String>, DatasetError> {
    let list_err = |source| DatasetError::List {
        path: test.to_path_buf(),
        source,
    };
    let mut classes = Vec::new();
    for entry in std::fs::read_dir(test).map_err(list_err)? {
        let path = entry.map_err(list_err)?.path();
        if path.is_dir() {
            classes.push(
                path.file_name()
                    .unwrap_or_default()
                    .to_string_lossy()
                    .into_owned(),
            );
        }
    }
    classes.sort();
    Ok(classes)
}

/// `ground_truth/<defect>/<stem>_mask.png`, or `<stem>.png` as some exports name it.
fn mask_path(root: &Path, defect: &str, image: &Path) -> Result<PathBuf, DatasetError> {
    let stem = image.file_stem().unwrap_or_default().to_string_lossy();
    let folder = root.join("ground_truth").join(defect);
    let expected = folder.join(format!("{stem}_mask.png"));
    let alternative = folder.join(format!("{stem}.png"));
    if expected.is_file() {
        Ok(expected)
    } else if alternative.is_file() {
        Ok(alternative)
    } else {
        Err(DatasetError::MissingMask {
            image: image.to_path_buf(),
            expected,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn touch(path: &Path) {
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(path, b"x").unwrap();
    }

    fn temp_dir(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("beltad-ds-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        dir
    }

    #[test]
    fn mvtec_layout_is_read_with_labels_and_masks() {
        let root = temp_dir("mvtec");
        touch(&root.join("train/good/a.jpg"));
        touch(&root.join("train/good/notes.txt"));
        touch(&root.join("test/good/b.png"));
        touch(&root.join("test/crack/c.jpg"));
        touch(&root.join("ground_truth/crack/c_mask.png"));
        assert!(is_mvtec(&root));
        assert_eq!(
            training_images(&root).unwrap(),
            vec![root.join("train/good/a.jpg")]
        );
        let samples = test_samples(&root).unwrap();
        assert_eq!(samples.len(), 2);
        assert_eq!(samples[0].defect.as_deref(), Some("crack"));
        assert_eq!(
            samples[0].mask,
            Some(root.join("ground_truth/crack/c_mask.png"))
        );
        assert_eq!(samples[1].defect, None);
    }

    #[test]
    fn missing_mask_names_the_image_and_the_expected_file() {
        let root = temp_dir("nomask");
        touch(&root.join("train/good/a.jpg"));
        touch(&root.join("test/good/b.png"));
        touch(&root.join("test/hole/c.jpg"));
        let err = test_samples(&root).unwrap_err();
        let text = err.to_string();
        assert!(
            text.contains("c.jpg") && text.contains("c_mask.png"),
            "{text}"
        );
    }

    #[test]
    fn empty_folder_is_an_error() {
        let root = temp_dir("empty");
        std::fs::create_dir_all(&root).unwrap();
        assert!(matches!(
            training_images(&root),
            Err(DatasetError::NoImages(_))
        ));
        assert!(matches!(
            images_in(&root.join("nope")),
            Err(DatasetError::Missing(_))
        ));
    }

    #[test]
    fn test_set_needs_both_classes() {
        let root = temp_dir("onlygood");
        touch(&root.join("train/good/a.jpg"));
        touch(&root.join("test/good/b.png"));
        assert!(matches!(
            test_samples(&root),
            Err(DatasetError::NoAnomalies(_))
        ));
    }
}
