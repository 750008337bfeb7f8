//! Convolution + eval-mode BatchNorm, folded into one biased convolution.
//!
//! The CNN backbones are frozen, so every `Conv2d → BatchNorm2d` pair is
//! replaced at load time by a single convolution with
//! `w' = w · γ/√(σ² + ε)` (per output channel) and `b' = β − μ · γ/√(σ² + ε)`.
//! The activation that follows (ReLU or ReLU6) is kept with the layer.
//!
//! Tensors are `(B, C, H, W)`. On the CPU two paths replace candle's generic
//! convolution, which is slow for these layers:
//! - depthwise 3×3 convolutions run through a direct kernel
//!   ([`Depthwise3x3`]); candle's grouped convolution runs one convolution per
//!   channel, 7–60× slower on MobileNetV2's layers;
//! - dense convolutions are one matrix product of the pre-flattened kernel
//!   `(C_out, C_in·k·k)` with an im2col matrix `(C_in·k·k, h·w)` ([`Im2Col`];
//!   a 1×1 stride-1 convolution uses the input itself). candle's tiled im2col
//!   re-packs the kernel and scatters its columns at every call.

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
    /// `(C_out, C_in·k·k)`, the kernel flattened for the im2col path (dense only).
    weight_matrix: Option<Tensor>,
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
        let weight_matrix = if spec.groups == 1 {
            let k_size = spec.in_channels * spec.kernel * spec.kernel;
            Some(weight.reshape((spec.out_channels, k_size))?)
        } else {
            None
        };
        Ok(Self {
            spec,
            weight,
            bias,
            activation,
            weight_matrix,
            depthwise,
        })
    }

    /// Dense convolution as `W (C_out, C_in·k·k) × im2col (C_in·k·k, h·w)` per image.
    fn forward_im2col(&self, x: &Tensor, weight_matrix: &Tensor) -> Result<Tensor> {
        let s = &self.spec;
        let (b, c, h, w) = x.dims4()?;
        let x = x.contiguous()?;
        let (cols, oh, ow) = if s.kernel == 1 && s.stride == 1 && s.padding == 0 {
            (x.reshape((b, c, h * w))?, h, w)
        } else {
            let op = Im2Col {
                kernel: s.kernel,
                stride: s.stride,
                padding: s.padding,
            };
            let (oh, ow) = (op.out_len(h), op.out_len(w));
            (x.apply_op1_no_bwd(&op)?, oh, ow)
        };
        let y = if b == 1 {
            weight_matrix.matmul(&cols.squeeze(0)?)?.unsqueeze(0)?
        } else {
            weight_matrix.broadcast_left(b)?.matmul(&cols)?
        };
        let y = y
            .broadcast_add(&self.bias.reshape((1, s.out_channels, 1))?)?
            .reshape((b, s.out_channels, oh, ow))?;
        self.activation.apply(&y)
    }

    /// Same computation through candle's own convolution: the path off the
    /// CPU, and the reference the CPU paths are tested and timed against.
    pub fn forward_generic(&self, x: &Tensor) -> Result<Tensor> {
        let s = &self.spec;
        let y = x.conv2d(&self.weight, s.padding, s.stride, 1, s.groups)?;
        let y = y.broadcast_add(&self.bias.reshape((1, s.out_channels, 1, 1))?)?;
        self.activation.apply(&y)
    }
}

impl Module for FoldedConv {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        if !(x.device().is_cpu() && x.dtype() == DType::F32) {
            return self.forward_generic(x);
        }
        match (&self.depthwise, &self.weight_matrix) {
            (Some(kernel), _) => x.contiguous()?.apply_op1_no_bwd(kernel),
            (None, Some(matrix)) => self.forward_im2col(x, matrix),
            (None, None) => self.forward_generic(x),
        }
    }
}

/// im2col for a dense `k × k` convolution: `(B, C, H, W)` →
/// `(B, C·k·k, oh·ow)`, row `(c, ky, kx)` holding the input sample each output
/// position reads through that tap (zero in the padding).
#[derive(Debug, Clone, Copy)]
struct Im2Col {
    kernel: usize,
    stride: usize,
    padding: usize,
}

impl Im2Col {
    /// Output length along an axis of input length `len`.
    fn out_len(&self, len: usize) -> usize {
        (len + 2 * self.padding - self.kernel) / self.stride + 1
    }

    /// Fills one im2col row: tap `(ky, kx)` of one input plane `(h, w)`.
    fn row(
        &self,
        plane: &[f32],
        (h, w): (usize, usize),
        (ky, kx): (usize, usize),
        dst: &mut [f32],
    ) {
        let ow = self.out_len(w);
        for (oy, out) in dst.chunks_exact_mut(ow).enumerate() {
            // Input coordinates are shifted by the padding; out of range reads zero.
            let iy = (oy * self.stride + ky)
                .checked_sub(self.padding)
                .filter(|&y| y < h);
            let Some(iy) = iy else {
                out.fill(0.0);
                continue;
            };
            let src = &plane[iy * w..(iy + 1) * w];
            for (ox, o) in out.iter_mut().enumerate() {
                let ix = (ox * self.stride + kx).checked_sub(self.padding);
                *o = match ix {
                    Some(ix) if ix < w => src[ix],
                    _ => 0.0,
                };
            }
        }
    }
}

impl CustomOp1 for Im2Col {
    fn name(&self) -> &'static str {
        "im2col"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let CpuStorage::F32(data) = storage else {
            bail!("im2col: expected f32 input")
        };
        let Some((start, end)) = layout.contiguous_offsets() else {
            bail!("im2col: input must be contiguous")
        };
        let (b, c, h, w) = layout.shape().dims4()?;
        if h + 2 * self.padding < self.kernel || w + 2 * self.padding < self.kernel {
            bail!(
                "im2col: {h}x{w} input is smaller than the {0}x{0} kernel",
                self.kernel
            )
        }
        let taps = self.kernel * self.kernel;
        let row_len = self.out_len(h) * self.out_len(w);
        let src = &data[start..end];
        let mut out = vec![0.0f32; b * c * taps * row_len];
        out.par_chunks_mut(row_len)
            .enumerate()
            .for_each(|(row, dst)| {
                let (plane, tap) = (row / taps, row % taps);
                let plane = &src[plane * h * w..(plane + 1) * h * w];
                self.row(plane, (h, w), (tap / self.kernel, tap % self.kernel), dst);
            });
        Ok((CpuStorage::F32(out), Shape::from((b, c * taps, row_len))))
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
    fn im2col_path_matches_candle_conv() {
        let dev = Device::Cpu;
        let cases = [
            (ConvSpec::dense(3, 4, 7, 2), (2, 11, 9)),
            (ConvSpec::dense(5, 6, 3, 1), (1, 6, 7)),
            (ConvSpec::dense(5, 6, 3, 2), (2, 7, 8)),
            (ConvSpec::dense(5, 6, 1, 2), (1, 7, 8)),
            (ConvSpec::dense(5, 6, 1, 1), (2, 4, 3)),
        ];
        for (spec, (b, h, w)) in cases {
            let conv = folded(spec, Activation::Relu);
            assert!(conv.weight_matrix.is_some() && conv.depthwise.is_none());
            let c = spec.in_channels;
            let x = Tensor::from_vec(ramp(&[b, c, h, w], 6.0), (b, c, h, w), &dev).unwrap();
            let fast = conv.forward(&x).unwrap();
            let slow = conv.forward_generic(&x).unwrap();
            assert_eq!(fast.dims(), slow.dims(), "{spec:?}");
            let diff = (fast - slow).unwrap().abs().unwrap().max_all().unwrap();
            assert!(diff.to_scalar::<f32>().unwrap() < 1e-5, "{spec:?}");
        }
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

    /// Times the CPU paths against candle's convolution on layers MobileNetV2
    /// and Wide-ResNet50-2 run at 238 px (best of 5, printed, not asserted).
    #[test]
    #[ignore = "timing only; run with --ignored --nocapture"]
    fn cpu_conv_paths_speed() {
        let dev = Device::Cpu;
        let best_ms = |f: &dyn Fn()| {
            f();
            (0..5)
                .map(|_| {
                    let start = std::time::Instant::now();
                    f();
                    start.elapsed().as_secs_f64() * 1e3
                })
                .fold(f64::MAX, f64::min)
        };
        let layers = [
            ("depthwise", ConvSpec::depthwise(96, 3, 2), 119),
            ("depthwise", ConvSpec::depthwise(144, 3, 1), 60),
            ("depthwise", ConvSpec::depthwise(576, 3, 1), 15),
            ("dense", ConvSpec::dense(3, 64, 7, 2), 238),
            ("dense", ConvSpec::dense(128, 128, 3, 1), 60),
            ("dense", ConvSpec::dense(512, 512, 3, 1), 15),
            ("dense", ConvSpec::dense(1024, 256, 1, 1), 15),
            ("dense", ConvSpec::dense(256, 512, 1, 2), 60),
        ];
        for (kind, spec, side) in layers {
            let conv = folded(spec, Activation::Relu);
            let x = Tensor::randn(0f32, 1f32, (1, spec.in_channels, side, side), &dev).unwrap();
            let ours = best_ms(&|| {
                conv.forward(&x).unwrap();
            });
            let candle = best_ms(&|| {
                conv.forward_generic(&x).unwrap();
            });
            println!(
                "{kind} {}->{} k{} s{} at {side}x{side}: ours {ours:.2} ms, candle conv2d {candle:.2} ms",
                spec.in_channels, spec.out_channels, spec.kernel, spec.stride
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
