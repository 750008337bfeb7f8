//! CPU compute kernels for the frozen backbones: a packed f32 matrix product
//! with AVX-512 / AVX2 micro-kernels ([`gemm`]), and the row-wise vector
//! operations of a transformer block ([`vector`]: layer norm, softmax, erf
//! GELU).
//!
//! Matrices are row-major `f32` slices (or strided views of them). The
//! kernels never split a sum across threads, so their results are bitwise
//! the same for any rayon thread count on a given CPU.

mod aligned;
pub mod attention;
pub mod gemm;
pub mod vector;

pub use aligned::AlignedBuf;
