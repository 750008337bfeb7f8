//! Wide-ResNet50-2 (Zagoruyko & Komodakis 2016; torchvision `wide_resnet50_2`)
//! truncated after `layer3`, with every BatchNorm folded into its convolution.
//!
//! Input `(B, 3, H, W)` ImageNet-normalised; outputs are `layer2` (stride 8,
//! 512 channels) and `layer3` (stride 16, 1024 channels), the two maps
//! PatchCore uses. Bottlenecks are torchvision's "v1.5" (the stride sits on the
//! 3×3 convolution) with twice the usual inner width. `layer4` and `fc` are
//! neither computed nor read from the checkpoint.

use candle_core::{Module, Result, Tensor, bail};
use candle_nn::VarBuilder;

use super::conv::{Activation, ConvSpec, FoldedConv};

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

impl Module for Bottleneck {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let y = self.conv1.forward(x)?;
        let y = self.conv2.forward(&y)?;
        let y = self.conv3.forward(&y)?;
        let shortcut = match &self.downsample {
            Some(ds) => ds.forward(x)?,
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
        let x = self.conv1.forward(x)?;
        let x = max_pool_after_relu(&x)?;
        let x = run_layer(&self.layer1, x)?;
        let layer2 = run_layer(&self.layer2, x)?;
        let layer3 = run_layer(&self.layer3, layer2.clone())?;
        Ok((layer2, layer3))
    }
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
    fn layer_channels_follow_the_bottleneck_expansion() {
        assert_eq!(PLANES_PER_LAYER[1] * BOTTLENECK_EXPANSION, LAYER2_CHANNELS);
        assert_eq!(PLANES_PER_LAYER[2] * BOTTLENECK_EXPANSION, LAYER3_CHANNELS);
    }
}
