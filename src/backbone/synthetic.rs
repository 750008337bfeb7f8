//! Deterministic synthetic weights for tests and benchmarks (Wide-ResNet
//! weights are not shipped): a candle var-builder backend that makes any
//! requested tensor from a hash of its name, so a whole network can be built
//! without a checkpoint or a key list.
//!
//! Values: BatchNorm running variances in [0.5, 1.5], norm scales around 1,
//! biases, means and shifts in ±0.1, kernels uniform with a He bound
//! `√(6 / fan_in)`.

use candle_core::{DType, Device, Result, Shape, Tensor};
use candle_nn::VarBuilder;
use candle_nn::var_builder::SimpleBackend;

use crate::rng::SplitMix64;

/// He gain: uniform bound `√(GAIN / fan_in)`.
const GAIN: f64 = 6.0;

struct Synthetic;

fn seed(name: &str) -> u64 {
    name.bytes().fold(0xCBF2_9CE4_8422_2325u64, |h, b| {
        (h ^ b as u64).wrapping_mul(0x100_0000_01B3)
    })
}

impl SimpleBackend for Synthetic {
    fn get(
        &self,
        s: Shape,
        name: &str,
        _: candle_nn::Init,
        dtype: DType,
        dev: &Device,
    ) -> Result<Tensor> {
        let dims = s.dims();
        let (offset, scale, abs) = if name.ends_with("running_var") {
            (1.0, 0.5, true)
        } else if name.ends_with("running_mean") || name.ends_with("bias") {
            (0.0, 0.1, false)
        } else if dims.len() == 1 {
            (1.0, 0.1, false)
        } else {
            let fan_in: usize = dims[1..].iter().product();
            (0.0, (GAIN / fan_in as f64).sqrt(), false)
        };
        let mut rng = SplitMix64::new(seed(name));
        let values: Vec<f32> = (0..s.elem_count())
            .map(|_| {
                let u = 2.0 * rng.next_f64() - 1.0;
                (offset + scale * if abs { u.abs() } else { u }) as f32
            })
            .collect();
        Tensor::from_vec(values, s, dev)?.to_dtype(dtype)
    }

    fn get_unchecked(&self, name: &str, _: DType, _: &Device) -> Result<Tensor> {
        candle_core::bail!("synthetic weights need a shape for `{name}`")
    }

    fn contains_tensor(&self, _: &str) -> bool {
        true
    }
}

/// A var builder whose every tensor is synthetic (f32, CPU).
pub fn var_builder() -> VarBuilder<'static> {
    VarBuilder::from_backend(Box::new(Synthetic), DType::F32, Device::Cpu)
}

/// A deterministic `(B, 3, H, W)` input in [-2, 2].
#[cfg(test)]
pub fn input(shape: (usize, usize, usize, usize)) -> Tensor {
    let n = shape.0 * shape.1 * shape.2 * shape.3;
    let mut rng = SplitMix64::new(7);
    let v: Vec<f32> = (0..n)
        .map(|_| (4.0 * rng.next_f64() - 2.0) as f32)
        .collect();
    Tensor::from_vec(v, shape, &Device::Cpu).expect("sizes match")
}

/// max |a − b| / max |b|.
#[cfg(test)]
pub fn relative_error(a: &Tensor, b: &Tensor) -> f32 {
    assert_eq!(a.dims(), b.dims());
    let diff = (a - b)
        .and_then(|d| d.abs())
        .and_then(|d| d.max_all())
        .and_then(|d| d.to_scalar::<f32>());
    let scale = b
        .abs()
        .and_then(|d| d.max_all())
        .and_then(|d| d.to_scalar::<f32>());
    diff.expect("f32 tensors") / scale.expect("f32 tensors")
}

/// Whether two tensors are bitwise equal.
#[cfg(test)]
pub fn bitwise_equal(a: &Tensor, b: &Tensor) -> bool {
    let bits = |t: &Tensor| -> Vec<u32> {
        t.flatten_all()
            .and_then(|t| t.to_vec1::<f32>())
            .expect("f32 tensor")
            .iter()
            .map(|v| v.to_bits())
            .collect()
    };
    a.dims() == b.dims() && bits(a) == bits(b)
}

/// Runs `f` on a fresh rayon pool of `threads` threads.
#[cfg(test)]
pub fn with_threads<T: Send>(threads: usize, f: impl FnOnce() -> T + Send) -> T {
    rayon::ThreadPoolBuilder::new()
        .num_threads(threads)
        .build()
        .expect("thread pool")
        .install(f)
}
