//! Progress reporting from long library work (feature extraction, coreset
//! selection, evaluation) without tying the library to a terminal.

/// Receives progress of long-running stages. The CLI draws bars; tests and
/// servers pass [`Silent`].
pub trait Progress: Sync {
    /// A stage of `total` steps begins.
    fn start(&self, stage: &str, total: u64);
    /// `n` more steps of the current stage are done.
    fn advance(&self, n: u64);
    /// The current stage is over.
    fn finish(&self);
}

/// Reports nothing.
pub struct Silent;

impl Progress for Silent {
    fn start(&self, _: &str, _: u64) {}
    fn advance(&self, _: u64) {}
    fn finish(&self) {}
}
