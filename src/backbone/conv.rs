//! Convolution + eval-mode BatchNorm, folded into one biased convolution.
//!
//! The CNN backbones are frozen, so every `Conv2d → BatchNorm2d` pair is
//! replaced at load time by a single convolution with
//! `w' = w · γ/√(σ² + ε)` (per output channel) and `b' = β − μ · γ/√(σ² + ε)`.
//! The activation that follows (ReLU or ReLU6) is kept with the layer.
//!
//! Tensors are `(B, C, H, W)`. Depthwise 3×3 convolutions run on the CPU
//! through a direct kernel ([`Depthwise3x3`]): candle's grouped convolution
//! splits the input into one convolution per channel, which is far slower for
//! the hundreds of channels of a MobileNetV2 block.

use candle_core::{CpuStorage, CustomOp1, DType, Layout, Module, Result, Shape, Tensor, bail};
use candle_nn::VarBuilder;
use rayon::prelude::*;

/// BatchNorm epsilon of torchvision's `BatchNorm2d` (the CNN checkpoints use the default).
pub const BATCH_NORM_EPS: f64 = 1e-5;

/// Upper clip of ReLU6 (MobileNetV2).
const RELU6_MAX: f32 = 6.0;

/// Side of the depthwise kernel handled by the direct CPU kernel.
const DEPTHWISE_KERNEL: usize = 3;

/// Activation applied after a folded convolution.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Activation {
    Identity,
    Relu,
    Relu6,
}

impl Activation {
    fn apply_scalar(self, v: f32) -> f32 {
        match self {
            Activation::Identity => v,
            Activation::Relu => v.max(0.0),
            Activation::Relu6 => v.clamp(0.0, RELU6_MAX),
        }
    }

    /// Applies the activation to a tensor.
    pub fn apply(self, x: &Tensor) -> Result<Tensor> {
        match self {
            Activation::Identity => Ok(x.clone()),
            Activation::Relu => x.relu(),
            Activation::Relu6 => x.clamp(0f32, RELU6_MAX),
        }
    }
}

/// Geometry of one convolution, as in the checkpoint.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ConvSpec {
    pub in_channels: usize,
    pub out_channels: usize,
    pub kernel: usize,
    pub stride: usize,
    pub padding: usize,
    pub groups: usize,
}

impl ConvSpec {
    /// A dense `k × k` convolution with "same" padding (`k / 2`).
    pub fn dense(in_channels: usize, out_channels: usize, kernel: usize, stride: usize) -> Self {
        Self {
            in_channels,
            out_channels,
            kernel,
            stride,
            padding: kernel / 2,
            groups: 1,
        }
    }

    /// A depthwise `k × k` convolution (one filter per channel), "same" padding.
    pub fn depthwise(channels: usize, kernel: usize, stride: usize) -> Self {
        Self {
            in_channels: channels,
            out_channels: channels,
            kernel,
            stride,
            padding: kernel / 2,
            groups: channels,
        }
    }

    fn weight_shape(&self) -> (usize, usize, usize, usize) {
        (
            self.out_channels,
            self.in_channels / self.groups,
            self.kernel,
            self.kernel,
        )
    }
}

/// A bias-free convolution followed by eval-mode BatchNorm and an activation,
/// folded into one biased convolution.
#[derive(Debug, Clone)]
pub struct FoldedConv {
    spec: ConvSpec,
    /// `(C_out, C_in / groups, k, k)`, BatchNorm scale folded in.
    weight: Tensor,
    /// `(C_out,)`, BatchNorm shift folded in.
    bias: Tensor,
    activation: Activation,
    /// Host copy of the kernel for the direct depthwise path (CPU only).
    depthwise: Option<Depthwise3x3>,
}

impl FoldedConv {
    /// Loads `conv.weight` from `conv_vb` and `weight`, `bias`, `running_mean`,
    /// `running_var` from `bn_vb`, and folds them.
    pub fn new(
        conv_vb: VarBuilder,
        bn_vb: VarBuilder,
        spec: ConvSpec,
        activation: Activation,
    ) -> Result<Self> {
        assert!(
            spec.groups > 0 && spec.in_channels.is_multiple_of(spec.groups),
            "invalid convolution groups: {spec:?}"
        );
        let weight = conv_vb.get(spec.weight_shape(), "weight")?;
        let c = spec.out_channels;
        let gamma = bn_vb.get(c, "weight")?;
        let beta = bn_vb.get(c, "bias")?;
        let mean = bn_vb.get(c, "running_mean")?;
        let var = bn_vb.get(c, "running_var")?;

        let scale = gamma.broadcast_div(&(var + BATCH_NORM_EPS)?.sqrt()?)?;
        let weight = weight.broadcast_mul(&scale.reshape((c, 1, 1, 1))?)?;
        let bias = (beta - mean.mul(&scale)?)?;

        let depthwise = if weight.device().is_cpu()
            && spec.groups == spec.in_channels
            && spec.in_channels == spec.out_channels
            && spec.kernel == DEPTHWISE_KERNEL
            && spec.padding == DEPTHWISE_KERNEL / 2
        {
            Some(Depthwise3x3 {
                weight: weight.to_dtype(DType::F32)?.flatten_all()?.to_vec1()?,
                bias: bias.to_dtype(DType::F32)?.to_vec1()?,
                stride: spec.stride,
                activation,
            })
        } else {
            None
        };
        Ok(Self {
            spec,
            weight,
            bias,
            activation,
            depthwise,
        })
    }

    /// Same computation through candle's generic convolution, skipping the
    /// direct depthwise kernel (kept for comparison in tests and benchmarks).
    pub fn forward_generic(&self, x: &Tensor) -> Result<Tensor> {
        let s = &self.spec;
        let y = x.conv2d(&self.weight, s.padding, s.stride, 1, s.groups)?;
        let y = y.broadcast_add(&self.bias.reshape((1, s.out_channels, 1, 1))?)?;
        self.activation.apply(&y)
    }
}

impl Module for FoldedConv {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        match &self.depthwise {
            Some(kernel) if x.device().is_cpu() && x.dtype() == DType::F32 => {
                x.contiguous()?.apply_op1_no_bwd(kernel)
            }
            _ => self.forward_generic(x),
        }
    }
}

/// Direct depthwise 3×3 convolution (padding 1, any stride) with bias and
/// activation, parallel over `(batch, channel)` planes.
#[derive(Debug, Clone)]
pub struct Depthwise3x3 {
    /// `(C, 3, 3)` row-major.
    weight: Vec<f32>,
    /// `(C,)`.
    bias: Vec<f32>,
    stride: usize,
    activation: Activation,
}

/// Output length of a padded, strided 3×3 convolution along one axis.
fn depthwise_out_len(len: usize, stride: usize) -> usize {
    let pad = DEPTHWISE_KERNEL / 2;
    (len + 2 * pad - DEPTHWISE_KERNEL) / stride + 1
}

impl Depthwise3x3 {
    /// Convolves one `(h, w)` plane into `out` (`(oh, ow)`).
    fn plane(&self, channel: usize, src: &[f32], (h, w): (usize, usize), out: &mut [f32]) {
        let k = DEPTHWISE_KERNEL;
        let pad = k / 2;
        let s = self.stride;
        let ow = depthwise_out_len(w, s);
        let taps = &self.weight[channel * k * k..(channel + 1) * k * k];
        let bias = self.bias[channel];

        // Copy into a zero-bordered buffer so the inner loops need no bounds tests.
        let pw = w + 2 * pad;
        let mut padded = vec![0.0f32; (h + 2 * pad) * pw];
        for (y, row) in src.chunks_exact(w).enumerate() {
            padded[(y + pad) * pw + pad..(y + pad) * pw + pad + w].copy_from_slice(row);
        }

        for (oy, out_row) in out.chunks_exact_mut(ow).enumerate() {
            out_row.fill(bias);
            for ky in 0..k {
                let in_row = &padded[(oy * s + ky) * pw..(oy * s + ky + 1) * pw];
                for kx in 0..k {
                    let t = taps[ky * k + kx];
                    if s == 1 {
                        for (o, &v) in out_row.iter_mut().zip(&in_row[kx..kx + ow]) {
                            *o += t * v;
                        }
                    } else {
                        for (o, v) in out_row.iter_mut().zip(in_row[kx..].iter().step_by(s)) {
                            *o += t * v;
                        }
                    }
                }
            }
            for o in out_row.iter_mut() {
                *o = self.activation.apply_scalar(*o);
            }
        }
    }
}

impl CustomOp1 for Depthwise3x3 {
    fn name(&self) -> &'static str {
        "depthwise3x3"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let CpuStorage::F32(data) = storage else {
            bail!("depthwise3x3: expected f32 input")
        };
        let Some((start, end)) = layout.contiguous_offsets() else {
            bail!("depthwise3x3: input must be contiguous")
        };
        let (b, c, h, w) = layout.shape().dims4()?;
        if c != self.bias.len() {
            bail!(
                "depthwise3x3: input has {c} channels, the kernel has {}",
                self.bias.len()
            )
        }
        let (oh, ow) = (
            depthwise_out_len(h, self.stride),
            depthwise_out_len(w, self.stride),
        );
        let src = &data[start..end];
        let mut out = vec![0.0f32; b * c * oh * ow];
        out.par_chunks_mut(oh * ow)
            .zip(src.par_chunks(h * w))
            .enumerate()
            .for_each(|(plane, (dst, src))| self.plane(plane % c, src, (h, w), dst));
        Ok((CpuStorage::F32(out), Shape::from((b, c, oh, ow))))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;
    use std::collections::HashMap;

    fn ramp(shape: &[usize], scale: f32) -> Vec<f32> {
        let n: usize = shape.iter().product();
        (0..n)
            .map(|i| ((i * 37 % 101) as f32 / 101.0 - 0.5) * scale)
            .collect()
    }

    fn folded(spec: ConvSpec, activation: Activation) -> FoldedConv {
        let dev = Device::Cpu;
        let (o, i, k, _) = spec.weight_shape();
        let mut ts = HashMap::new();
        let t = |v: Vec<f32>, s: &[usize]| Tensor::from_vec(v, s, &dev).unwrap();
        ts.insert(
            "c.weight".into(),
            t(ramp(&[o, i, k, k], 1.0), &[o, i, k, k]),
        );
        ts.insert(
            "b.weight".into(),
            t(ramp(&[o], 0.5).iter().map(|v| 1.0 + v).collect(), &[o]),
        );
        ts.insert("b.bias".into(), t(ramp(&[o], 0.3), &[o]));
        ts.insert("b.running_mean".into(), t(ramp(&[o], 0.2), &[o]));
        ts.insert(
            "b.running_var".into(),
            t(
                ramp(&[o], 0.4).iter().map(|v| 1.0 + v.abs()).collect(),
                &[o],
            ),
        );
        let vb = VarBuilder::from_tensors(ts, DType::F32, &dev);
        FoldedConv::new(vb.pp("c"), vb.pp("b"), spec, activation).unwrap()
    }

    #[test]
    fn folding_matches_conv_then_batch_norm() {
        let spec = ConvSpec::dense(3, 4, 3, 2);
        let conv = folded(spec, Activation::Identity);
        let dev = Device::Cpu;
        let x = Tensor::from_vec(ramp(&[1, 3, 7, 6], 4.0), (1, 3, 7, 6), &dev).unwrap();
        let got = conv.forward(&x).unwrap();

        let w = Tensor::from_vec(ramp(&[4, 3, 3, 3], 1.0), (4, 3, 3, 3), &dev).unwrap();
        let raw = x.conv2d(&w, 1, 2, 1, 1).unwrap();
        let col = |v: Vec<f32>| Tensor::from_vec(v, (1, 4, 1, 1), &dev).unwrap();
        let gamma = col(ramp(&[4], 0.5).iter().map(|v| 1.0 + v).collect());
        let beta = col(ramp(&[4], 0.3));
        let mean = col(ramp(&[4], 0.2));
        let var = col(ramp(&[4], 0.4).iter().map(|v| 1.0 + v.abs()).collect());
        let want = raw
            .broadcast_sub(&mean)
            .unwrap()
            .broadcast_div(&(var + BATCH_NORM_EPS).unwrap().sqrt().unwrap())
            .unwrap()
            .broadcast_mul(&gamma)
            .unwrap()
            .broadcast_add(&beta)
            .unwrap();
        assert_eq!(got.dims(), &[1, 4, 4, 3]);
        let diff = (got - want).unwrap().abs().unwrap().max_all().unwrap();
        assert!(diff.to_scalar::<f32>().unwrap() < 1e-5);
    }

    #[test]
    fn direct_depthwise_matches_grouped_conv() {
        let dev = Device::Cpu;
        for (stride, (h, w)) in [(1, (9, 7)), (2, (9, 7)), (2, (8, 10)), (1, (1, 1))] {
            let conv = folded(ConvSpec::depthwise(5, 3, stride), Activation::Relu6);
            assert!(conv.depthwise.is_some());
            let x = Tensor::from_vec(ramp(&[2, 5, h, w], 20.0), (2, 5, h, w), &dev).unwrap();
            let fast = conv.forward(&x).unwrap();
            let slow = conv.forward_generic(&x).unwrap();
            assert_eq!(fast.dims(), slow.dims());
            let diff = (fast - slow).unwrap().abs().unwrap().max_all().unwrap();
            assert!(
                diff.to_scalar::<f32>().unwrap() < 1e-5,
                "stride {stride}, {h}x{w}"
            );
        }
    }

    /// Times the direct kernel against candle's grouped convolution on the
    /// depthwise layers MobileNetV2 runs at 238 px (printed, not asserted).
    #[test]
    #[ignore = "timing only; run with --ignored --nocapture"]
    fn depthwise_kernel_speed() {
        let dev = Device::Cpu;
        let time = |f: &dyn Fn()| {
            f();
            let start = std::time::Instant::now();
            for _ in 0..5 {
                f();
            }
            start.elapsed().as_secs_f64() * 1e3 / 5.0
        };
        for (c, side, stride) in [(96, 119, 2), (144, 60, 1), (192, 30, 1), (576, 15, 1)] {
            let conv = folded(ConvSpec::depthwise(c, 3, stride), Activation::Relu6);
            let x = Tensor::randn(0f32, 1f32, (1, c, side, side), &dev).unwrap();
            let direct = time(&|| {
                conv.forward(&x).unwrap();
            });
            let grouped = time(&|| {
                conv.forward_generic(&x).unwrap();
            });
            println!(
                "depthwise {c}ch {side}x{side} s{stride}: direct {direct:.2} ms, candle grouped {grouped:.2} ms"
            );
        }
    }

    #[test]
    fn relu6_clips_both_ends() {
        let dev = Device::Cpu;
        let x = Tensor::new(&[-1.0f32, 3.0, 7.5], &dev).unwrap();
        let y: Vec<f32> = Activation::Relu6.apply(&x).unwrap().to_vec1().unwrap();
        assert_eq!(y, vec![0.0, 3.0, 6.0]);
        assert_eq!(Activation::Relu6.apply_scalar(-2.0), 0.0);
        assert_eq!(Activation::Relu6.apply_scalar(9.0), 6.0);
    }
}
