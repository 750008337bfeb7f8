//! The three branches of the detector. Each is fitted on features of normal
//! images and scores one image into an image score and an anomaly map on the
//! evaluation grid; the backbones that produce the features live in
//! [`crate::backbone`].

pub mod attribution;
pub mod object;
pub mod texture;

use thiserror::Error;

use crate::anomaly_map::AnomalyMap;

/// What a branch says about one image.
#[derive(Debug, Clone, PartialEq)]
pub struct BranchOutput {
    /// Image score, higher = more anomalous.
    pub score: f64,
    /// Anomaly map on the `(eval_size, eval_size)` grid.
    pub map: AnomalyMap,
}

/// A branch could not be fitted.
#[derive(Debug, Error)]
pub enum BranchError {
    #[error("{branch} branch: {source}")]
    Stats {
        branch: &'static str,
        #[source]
        source: crate::stats::StatsError,
    },
    #[error("{branch} branch: {source}")]
    Bank {
        branch: &'static str,
        #[source]
        source: crate::memory_bank::BankError,
    },
    #[error("{branch} branch: {message}")]
    Invalid {
        branch: &'static str,
        message: String,
    },
}
