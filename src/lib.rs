//! beltad: unsupervised anomaly detection and localisation for conveyor-belt
//! camera images.
//!
//! The detector implements semantic-deviation–anchored multi-branch fusion
//! (Jin, Tang, Zhu, arXiv 2602.07694): three branches on frozen backbones,
//! fitted on normal images only, fused into one anomaly map and one image score.
//!
//! - object branch: DINOv2 CLS Mahalanobis distance + foreground/background
//!   patch prototypes;
//! - attribution branch: Mahalanobis distance of the mean patch token with a
//!   closed-form leave-one-patch-out attribution map;
//! - texture branch: PatchCore on CNN patch features.
//!
//! Shape conventions, used throughout: images are `(B, 3, H, W)`; patch
//! features of one image are `(N, D)` row-major over the patch grid; a memory
//! bank is `(M, D)`; anomaly maps are `(H, W)` row-major.

pub mod anomaly_map;
pub mod atomic_write;
pub mod backbone;
pub mod branch;
pub mod calibration;
pub mod config;
pub mod dataset;
pub mod detector;
pub mod evaluate;
pub mod feature_cache;
pub mod features;
pub mod fit;
pub mod fusion;
pub mod heatmap;
pub mod image_io;
pub mod kernels;
pub mod linalg;
pub mod memory_bank;
pub mod metrics;
pub mod model_file;
pub mod preprocess;
pub mod progress;
pub mod report;
pub mod resample;
pub mod rng;
pub mod stats;
pub mod sweep;
pub mod weights;
