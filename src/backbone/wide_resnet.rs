//! Wide-ResNet50-2 (Zagoruyko & Komodakis 2016; torchvision `wide_resnet50_2`)
//! truncated after `layer3`, with every BatchNorm folded into its convolution.
//!
//! Input `(B, 3, H, W)` ImageNet-normalised; outputs are `layer2` (stride 8,
//! 512 channels) and `layer3` (stride 16, 1024 channels), the two maps
//! PatchCore uses. Bottlenecks are torchvision's "v1.5" (the stride sits on the
//! 3×3 convolution) with twice the usual inner width. `layer4` and `fc` are
//! neither computed nor read from the checkpoint.
//!
//! On the CPU with f32 weights the layers run on host maps
//! ([`ChannelMajor`]), each block's residual sum and final ReLU fused into
//! its last convolution.

use candle_core::{Module, Result, Tensor, bail};
use candle_nn::VarBuilder;
use rayon::prelude::*;

use super::conv::{Activation, ChannelMajor, ConvSpec, FoldedConv};

/// Channels of the 7×7 stem.
const STEM_CHANNELS: usize = 64;
/// Kernel side of the stem convolution.
const STEM_KERNEL: usize = 7;
/// Stride of the stem convolution and of the max pool after it.
const STEM_STRIDE: usize = 2;
/// Max-pool window after the stem (padding 1, stride 2).
const MAX_POOL_WINDOW: usize = 3;
/// Bottleneck output channels = planes × this expansion.
const BOTTLENECK_EXPANSION: usize = 4;
/// Inner width multiplier of the "wide" variant (torchvision `width_per_group = 128`).
const WIDTH_FACTOR: usize = 2;
/// Bottlenecks in `layer1`, `layer2`, `layer3`.
const BLOCKS_PER_LAYER: [usize; 3] = [3, 4, 6];
/// Planes of `layer1`, `layer2`, `layer3`.
const PLANES_PER_LAYER: [usize; 3] = [64, 128, 256];

/// Channels of `layer2`.
pub const LAYER2_CHANNELS: usize = 512;
/// Channels of `layer3`.
pub const LAYER3_CHANNELS: usize = 1024;

/// Input channels (RGB).
const IMAGE_CHANNELS: usize = 3;

/// torchvision Bottleneck: 1×1 reduce, 3×3 (strided), 1×1 expand, plus a
/// projected shortcut on the first block of a layer.
#[derive(Debug, Clone)]
struct Bottleneck {
    conv1: FoldedConv,
    conv2: FoldedConv,
    conv3: FoldedConv,
    downsample: Option<FoldedConv>,
}

impl Bottleneck {
    /// `vb` points at `layer{l}.{j}`.
    fn new(vb: VarBuilder, in_channels: usize, planes: usize, stride: usize) -> Result<Self> {
        let width = planes * WIDTH_FACTOR;
        let out_channels = planes * BOTTLENECK_EXPANSION;
        let conv1 = FoldedConv::new(
            vb.pp("conv1"),
            vb.pp("bn1"),
            ConvSpec::dense(in_channels, width, 1, 1),
            Activation::Relu,
        )?;
        let conv2 = FoldedConv::new(
            vb.pp("conv2"),
            vb.pp("bn2"),
            ConvSpec::dense(width, width, 3, stride),
            Activation::Relu,
        )?;
        // The ReLU comes after the residual sum.
        let conv3 = FoldedConv::new(
            vb.pp("conv3"),
            vb.pp("bn3"),
            ConvSpec::dense(width, out_channels, 1, 1),
            Activation::Identity,
        )?;
        let downsample = if stride != 1 || in_channels != out_channels {
            let ds = vb.pp("downsample");
            Some(FoldedConv::new(
                ds.pp(0),
                ds.pp(1),
                ConvSpec::dense(in_channels, out_channels, 1, stride),
                Activation::Identity,
            )?)
        } else {
            None
        };
        Ok(Self {
            conv1,
            conv2,
            conv3,
            downsample,
        })
    }
}

impl Bottleneck {
    /// The block on a host batch: `relu(conv3(conv2(conv1(x))) + shortcut)`.
    fn forward_host(&self, x: ChannelMajor) -> Result<ChannelMajor> {
        let y = self.conv1.forward_host(&x, None)?;
        let y = self.conv2.forward_host(&y, None)?;
        let shortcut = match &self.downsample {
            Some(ds) => ds.forward_host(&x, None)?,
            None => x,
        };
        self.conv3
            .forward_host(&y, Some((shortcut, Activation::Relu)))
    }

    /// FLOPs of one image at input `(h, w)`, and the output size.
    fn flops(&self, size: (usize, usize)) -> (f64, (usize, usize)) {
        let s2 = self.conv2.spec();
        let mid = (s2.out_len(size.0), s2.out_len(size.1));
        let mut total =
            self.conv1.spec().flops(size) + s2.flops(size) + self.conv3.spec().flops(mid);
        if let Some(ds) = &self.downsample {
            total += ds.spec().flops(size);
        }
        (total, mid)
    }
}

impl Module for Bottleneck {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let y = self.conv1.forward_generic(x)?;
        let y = self.conv2.forward_generic(&y)?;
        let y = self.conv3.forward_generic(&y)?;
        let shortcut = match &self.downsample {
            Some(ds) => ds.forward_generic(x)?,
            None => x.clone(),
        };
        (y + shortcut)?.relu()
    }
}

/// Wide-ResNet50-2 up to `layer3`.
#[derive(Debug, Clone)]
pub struct WideResNet50 {
    /// `conv1` + `bn1` + ReLU.
    conv1: FoldedConv,
    layer1: Vec<Bottleneck>,
    layer2: Vec<Bottleneck>,
    layer3: Vec<Bottleneck>,
}

impl WideResNet50 {
    /// Loads from torchvision names; `vb` points at the checkpoint root.
    pub fn new(vb: VarBuilder) -> Result<Self> {
        let conv1 = FoldedConv::new(
            vb.pp("conv1"),
            vb.pp("bn1"),
            ConvSpec::dense(IMAGE_CHANNELS, STEM_CHANNELS, STEM_KERNEL, STEM_STRIDE),
            Activation::Relu,
        )?;
        let mut in_channels = STEM_CHANNELS;
        let mut layers = Vec::with_capacity(BLOCKS_PER_LAYER.len());
        for (l, (&blocks, &planes)) in BLOCKS_PER_LAYER.iter().zip(&PLANES_PER_LAYER).enumerate() {
            let layer_vb = vb.pp(format!("layer{}", l + 1));
            // layer1 keeps the resolution of the max pool; the others halve it.
            let first_stride = if l == 0 { 1 } else { 2 };
            let mut layer = Vec::with_capacity(blocks);
            for j in 0..blocks {
                let stride = if j == 0 { first_stride } else { 1 };
                layer.push(Bottleneck::new(
                    layer_vb.pp(j),
                    in_channels,
                    planes,
                    stride,
                )?);
                in_channels = planes * BOTTLENECK_EXPANSION;
            }
            layers.push(layer);
        }
        let mut layers = layers.into_iter();
        let (Some(layer1), Some(layer2), Some(layer3)) =
            (layers.next(), layers.next(), layers.next())
        else {
            bail!("Wide-ResNet50-2 needs three layers")
        };
        Ok(Self {
            conv1,
            layer1,
            layer2,
            layer3,
        })
    }

    /// Returns (`layer2`, `layer3`): `(B, 512, ⌈H/8⌉, ⌈W/8⌉)` and
    /// `(B, 1024, ⌈H/16⌉, ⌈W/16⌉)` (approximately: each stride-2 step rounds up).
    pub fn forward(&self, x: &Tensor) -> Result<(Tensor, Tensor)> {
        let (_, c, h, w) = x.dims4()?;
        if c != IMAGE_CHANNELS {
            bail!(
                "Wide-ResNet50-2 expects {IMAGE_CHANNELS} input channels, got {c} (input {h}x{w})"
            )
        }
        if self.conv1.has_host_path() && x.device().is_cpu() {
            self.forward_host(x)
        } else {
            self.forward_reference(x)
        }
    }

    /// [`Self::forward`] through candle operations whatever the device: the
    /// path off the CPU, and the reference the CPU path is tested against.
    pub fn forward_reference(&self, x: &Tensor) -> Result<(Tensor, Tensor)> {
        let x = self.conv1.forward_generic(x)?;
        let x = max_pool_after_relu(&x)?;
        let x = run_layer(&self.layer1, x)?;
        let layer2 = run_layer(&self.layer2, x)?;
        let layer3 = run_layer(&self.layer3, layer2.clone())?;
        Ok((layer2, layer3))
    }

    fn forward_host(&self, input: &Tensor) -> Result<(Tensor, Tensor)> {
        let x = self
            .conv1
            .forward_host(&ChannelMajor::from_tensor(input)?, None)?;
        let mut x = max_pool_host(&x);
        for block in &self.layer1 {
            x = block.forward_host(x)?;
        }
        for block in &self.layer2 {
            x = block.forward_host(x)?;
        }
        let layer2 = x.to_tensor(input.device())?.to_dtype(input.dtype())?;
        for block in &self.layer3 {
            x = block.forward_host(x)?;
        }
        let layer3 = x.to_tensor(input.device())?.to_dtype(input.dtype())?;
        Ok((layer2, layer3))
    }

    /// Floating-point operations of one image's forward at `(H, W)`
    /// (convolutions only; the max pool and residual sums are not counted).
    pub fn forward_flops(&self, (h, w): (usize, usize)) -> f64 {
        let stem = self.conv1.spec();
        let mut total = stem.flops((h, w));
        let pool =
            |len: usize| (len + 2 * (MAX_POOL_WINDOW / 2) - MAX_POOL_WINDOW) / STEM_STRIDE + 1;
        let mut size = (pool(stem.out_len(h)), pool(stem.out_len(w)));
        for block in self.layer1.iter().chain(&self.layer2).chain(&self.layer3) {
            let (flops, next) = block.flops(size);
            total += flops;
            size = next;
        }
        total
    }
}

/// [`max_pool_after_relu`] on a host batch, parallel over planes.
fn max_pool_host(x: &ChannelMajor) -> ChannelMajor {
    let pad = MAX_POOL_WINDOW / 2;
    let out_len = |len: usize| (len + 2 * pad - MAX_POOL_WINDOW) / STEM_STRIDE + 1;
    let (h, w) = (x.height, x.width);
    let (oh, ow) = (out_len(h), out_len(w));
    let mut out = ChannelMajor::zeros(x.channels, x.batch, oh, ow);
    out.data
        .par_chunks_mut(oh * ow)
        .zip(x.data.par_chunks(h * w))
        .for_each(|(dst, src)| {
            for (oy, row) in dst.chunks_exact_mut(ow).enumerate() {
                let y0 = (oy * STEM_STRIDE).saturating_sub(pad);
                let y1 = (oy * STEM_STRIDE + MAX_POOL_WINDOW - pad).min(h);
                for (ox, o) in row.iter_mut().enumerate() {
                    let x0 = (ox * STEM_STRIDE).saturating_sub(pad);
                    let x1 = (ox * STEM_STRIDE + MAX_POOL_WINDOW - pad).min(w);
                    // Zero stands for the padding: the input is post-ReLU (≥ 0).
                    let mut m = 0.0f32;
                    for src_row in src[y0 * w..y1 * w].chunks_exact(w) {
                        m = src_row[x0..x1].iter().fold(m, |a, &v| a.max(v));
                    }
                    *o = m;
                }
            }
        });
    out
}

fn run_layer(blocks: &[Bottleneck], mut x: Tensor) -> Result<Tensor> {
    for block in blocks {
        x = block.forward(&x)?;
    }
    Ok(x)
}

/// 3×3 max pool, stride 2, padding 1, on a non-negative (post-ReLU) map.
///
/// PyTorch pads with −∞; every window still holds at least one real value,
/// and those are ≥ 0, so zero padding gives the same maxima.
fn max_pool_after_relu(x: &Tensor) -> Result<Tensor> {
    let pad = MAX_POOL_WINDOW / 2;
    x.pad_with_zeros(2, pad, pad)?
        .pad_with_zeros(3, pad, pad)?
        .max_pool2d_with_stride(MAX_POOL_WINDOW, STEM_STRIDE)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn max_pool_matches_padded_pytorch_semantics_on_relu_output() {
        // 1x1x3x3 non-negative map: PyTorch's padded pool gives a 2x2 output
        // holding the maxima of the clipped windows.
        let dev = Device::Cpu;
        let x = Tensor::new(
            &[[[[1.0f32, 0.0, 2.0], [0.0, 5.0, 0.0], [3.0, 0.0, 4.0]]]],
            &dev,
        )
        .unwrap();
        let y: Vec<f32> = max_pool_after_relu(&x)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        assert_eq!(y, vec![5.0, 5.0, 5.0, 5.0]);
        let x = Tensor::new(&[[[[1.0f32, 0.0, 2.0, 7.0]]]], &dev).unwrap();
        let y: Vec<f32> = max_pool_after_relu(&x)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        assert_eq!(y, vec![1.0, 7.0]);
    }

    #[test]
    fn host_path_matches_candle_and_batches_are_bitwise_per_image() {
        let model = WideResNet50::new(crate::backbone::synthetic::var_builder()).unwrap();
        let x = crate::backbone::synthetic::input((2, 3, 45, 38));
        let (l2, l3) = model.forward(&x).unwrap();
        let (r2, r3) = model.forward_reference(&x).unwrap();
        assert_eq!(l2.dims(), &[2, 512, 6, 5]);
        assert_eq!(l3.dims(), &[2, 1024, 3, 3]);
        assert!(crate::backbone::synthetic::relative_error(&l2, &r2) < 1e-5);
        assert!(crate::backbone::synthetic::relative_error(&l3, &r3) < 1e-5);
        let (s2, s3) = model.forward(&x.narrow(0, 1, 1).unwrap()).unwrap();
        assert!(crate::backbone::synthetic::bitwise_equal(
            &s2,
            &l2.narrow(0, 1, 1).unwrap()
        ));
        assert!(crate::backbone::synthetic::bitwise_equal(
            &s3,
            &l3.narrow(0, 1, 1).unwrap()
        ));
        for threads in [1, 3] {
            let (t2, t3) =
                crate::backbone::synthetic::with_threads(threads, || model.forward(&x).unwrap());
            assert!(
                crate::backbone::synthetic::bitwise_equal(&t2, &l2),
                "{threads} threads"
            );
            assert!(
                crate::backbone::synthetic::bitwise_equal(&t3, &l3),
                "{threads} threads"
            );
        }
        assert!(model.forward_flops((238, 238)) > 1e10);
    }

    #[test]
    fn host_max_pool_matches_the_tensor_version() {
        let dev = Device::Cpu;
        let (b, c, h, w) = (2, 3, 7, 6);
        let values: Vec<f32> = (0..b * c * h * w)
            .map(|i| ((i * 17 % 23) as f32 - 5.0).max(0.0))
            .collect();
        let x = Tensor::from_vec(values, (b, c, h, w), &dev).unwrap();
        let want = max_pool_after_relu(&x).unwrap();
        let got = max_pool_host(&ChannelMajor::from_tensor(&x).unwrap())
            .to_tensor(&dev)
            .unwrap();
        assert_eq!(got.dims(), want.dims());
        let diff = (got - want)
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        assert_eq!(diff, 0.0);
    }

    #[test]
    fn layer_channels_follow_the_bottleneck_expansion() {
        assert_eq!(PLANES_PER_LAYER[1] * BOTTLENECK_EXPANSION, LAYER2_CHANNELS);
        assert_eq!(PLANES_PER_LAYER[2] * BOTTLENECK_EXPANSION, LAYER3_CHANNELS);
    }
}
