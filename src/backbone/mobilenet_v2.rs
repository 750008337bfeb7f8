//! MobileNetV2 (Sandler et al. 2018) as in torchvision, truncated after
//! `features[13]`, with every BatchNorm folded into its convolution.
//!
//! Input `(B, 3, H, W)` ImageNet-normalised; outputs are `features[6]`
//! (stride 8, 32 channels) and `features[13]` (stride 16, 96 channels). The
//! weights use torchvision's names: `features.0.{0,1}` is the stem, and
//! `features.{i}.conv.…` are the inverted residual blocks.

use candle_core::{Module, Result, Tensor, bail};
use candle_nn::VarBuilder;

use super::conv::{Activation, ChannelMajor, ConvSpec, FoldedConv};

/// Channels of the stem convolution (`features.0`).
const STEM_CHANNELS: usize = 32;
/// Stride of the stem convolution.
const STEM_STRIDE: usize = 2;

/// torchvision's inverted-residual table up to the 96-channel stage:
/// (expansion t, output channels c, repeats n, first stride s).
const INVERTED_RESIDUAL_SETTING: [(usize, usize, usize, usize); 5] = [
    (1, 16, 1, 1),
    (6, 24, 2, 2),
    (6, 32, 3, 2),
    (6, 64, 4, 2),
    (6, 96, 3, 1),
];

/// Index in `features` of the last stride-8 block.
pub const STRIDE8_FEATURE: usize = 6;
/// Index in `features` of the last stride-16 block (the last one computed).
pub const STRIDE16_FEATURE: usize = 13;
/// Channels of `features[6]`.
pub const STRIDE8_CHANNELS: usize = 32;
/// Channels of `features[13]`.
pub const STRIDE16_CHANNELS: usize = 96;

/// Input channels (RGB).
const IMAGE_CHANNELS: usize = 3;

/// One inverted residual block: optional 1×1 expansion, depthwise 3×3, 1×1
/// linear projection, and a skip connection when the shape is unchanged.
#[derive(Debug, Clone)]
struct InvertedResidual {
    expand: Option<FoldedConv>,
    depthwise: FoldedConv,
    project: FoldedConv,
    use_residual: bool,
}

impl InvertedResidual {
    /// `vb` points at `features.{i}`.
    fn new(
        vb: VarBuilder,
        in_channels: usize,
        out_channels: usize,
        stride: usize,
        expansion: usize,
    ) -> Result<Self> {
        let hidden = in_channels * expansion;
        let conv = vb.pp("conv");
        // torchvision numbers the sequence from 0 and skips the expansion when t = 1.
        let mut slot = 0;
        let expand = if expansion == 1 {
            None
        } else {
            let layer = conv.pp(slot);
            slot += 1;
            Some(FoldedConv::new(
                layer.pp(0),
                layer.pp(1),
                ConvSpec::dense(in_channels, hidden, 1, 1),
                Activation::Relu6,
            )?)
        };
        let layer = conv.pp(slot);
        let depthwise = FoldedConv::new(
            layer.pp(0),
            layer.pp(1),
            ConvSpec::depthwise(hidden, 3, stride),
            Activation::Relu6,
        )?;
        let project = FoldedConv::new(
            conv.pp(slot + 1),
            conv.pp(slot + 2),
            ConvSpec::dense(hidden, out_channels, 1, 1),
            Activation::Identity,
        )?;
        Ok(Self {
            expand,
            depthwise,
            project,
            use_residual: stride == 1 && in_channels == out_channels,
        })
    }
}

impl InvertedResidual {
    /// The block on a host batch, the skip sum fused into the projection.
    fn forward_host(&self, x: ChannelMajor) -> Result<ChannelMajor> {
        let expanded;
        let h = match &self.expand {
            Some(expand) => {
                expanded = expand.forward_host(&x, None)?;
                &expanded
            }
            None => &x,
        };
        let y = self.depthwise.forward_host(h, None)?;
        if self.use_residual {
            self.project
                .forward_host(&y, Some((x, Activation::Identity)))
        } else {
            self.project.forward_host(&y, None)
        }
    }

    /// FLOPs of one image at input `(h, w)`, and the output size.
    fn flops(&self, size: (usize, usize)) -> (f64, (usize, usize)) {
        let dw = self.depthwise.spec();
        let out = (dw.out_len(size.0), dw.out_len(size.1));
        let expand = self.expand.as_ref().map_or(0.0, |e| e.spec().flops(size));
        (
            expand + dw.flops(size) + self.project.spec().flops(out),
            out,
        )
    }
}

impl Module for InvertedResidual {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let h = match &self.expand {
            Some(expand) => expand.forward_generic(x)?,
            None => x.clone(),
        };
        let y = self
            .project
            .forward_generic(&self.depthwise.forward_generic(&h)?)?;
        if self.use_residual { y + x } else { Ok(y) }
    }
}

/// MobileNetV2 features up to stride 16.
#[derive(Debug, Clone)]
pub struct MobileNetV2 {
    /// `features.0`: 3×3 stride-2 convolution, BN, ReLU6.
    stem: FoldedConv,
    /// `features.1` … `features.13`.
    blocks: Vec<InvertedResidual>,
}

impl MobileNetV2 {
    /// Loads from torchvision names; `vb` points at the checkpoint root.
    pub fn new(vb: VarBuilder) -> Result<Self> {
        let features = vb.pp("features");
        let stem_vb = features.pp(0);
        let stem = FoldedConv::new(
            stem_vb.pp(0),
            stem_vb.pp(1),
            ConvSpec::dense(IMAGE_CHANNELS, STEM_CHANNELS, 3, STEM_STRIDE),
            Activation::Relu6,
        )?;

        let mut blocks = Vec::with_capacity(STRIDE16_FEATURE);
        let mut in_channels = STEM_CHANNELS;
        for &(expansion, out_channels, repeats, first_stride) in &INVERTED_RESIDUAL_SETTING {
            for r in 0..repeats {
                let stride = if r == 0 { first_stride } else { 1 };
                let index = blocks.len() + 1;
                blocks.push(InvertedResidual::new(
                    features.pp(index),
                    in_channels,
                    out_channels,
                    stride,
                    expansion,
                )?);
                in_channels = out_channels;
            }
        }
        debug_assert_eq!(blocks.len(), STRIDE16_FEATURE);
        Ok(Self { stem, blocks })
    }

    /// Returns (`features[6]`, `features[13]`): `(B, 32, H/8, W/8)` and
    /// `(B, 96, H/16, W/16)` (sizes rounded up at each stride-2 step).
    pub fn forward(&self, x: &Tensor) -> Result<(Tensor, Tensor)> {
        let (_, c, h, w) = x.dims4()?;
        if c != IMAGE_CHANNELS {
            bail!("MobileNetV2 expects {IMAGE_CHANNELS} input channels, got {c} (input {h}x{w})")
        }
        if self.stem.has_host_path() && x.device().is_cpu() {
            self.forward_host(x)
        } else {
            self.forward_reference(x)
        }
    }

    /// [`Self::forward`] through candle operations whatever the device: the
    /// path off the CPU, and the reference the CPU path is tested against.
    pub fn forward_reference(&self, x: &Tensor) -> Result<(Tensor, Tensor)> {
        let mut x = self.stem.forward_generic(x)?;
        let mut stride8 = None;
        for (i, block) in self.blocks.iter().enumerate() {
            x = block.forward(&x)?;
            if i + 1 == STRIDE8_FEATURE {
                stride8 = Some(x.clone());
            }
        }
        match stride8 {
            Some(s8) => Ok((s8, x)),
            None => bail!("MobileNetV2 has fewer than {STRIDE8_FEATURE} blocks"),
        }
    }

    fn forward_host(&self, input: &Tensor) -> Result<(Tensor, Tensor)> {
        let mut x = self
            .stem
            .forward_host(&ChannelMajor::from_tensor(input)?, None)?;
        let mut stride8 = None;
        for (i, block) in self.blocks.iter().enumerate() {
            x = block.forward_host(x)?;
            if i + 1 == STRIDE8_FEATURE {
                stride8 = Some(x.to_tensor(input.device())?.to_dtype(input.dtype())?);
            }
        }
        match stride8 {
            Some(s8) => Ok((s8, x.to_tensor(input.device())?.to_dtype(input.dtype())?)),
            None => bail!("MobileNetV2 has fewer than {STRIDE8_FEATURE} blocks"),
        }
    }

    /// Floating-point operations of one image's forward at `(H, W)`
    /// (convolutions only; residual sums are not counted).
    pub fn forward_flops(&self, (h, w): (usize, usize)) -> f64 {
        let stem = self.stem.spec();
        let mut total = stem.flops((h, w));
        let mut size = (stem.out_len(h), stem.out_len(w));
        for block in &self.blocks {
            let (flops, next) = block.flops(size);
            total += flops;
            size = next;
        }
        total
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backbone::synthetic;

    #[test]
    fn host_path_matches_candle_and_batches_are_bitwise_per_image() {
        let model = MobileNetV2::new(synthetic::var_builder()).unwrap();
        let x = synthetic::input((3, 3, 50, 41));
        let (a8, a16) = model.forward(&x).unwrap();
        let (r8, r16) = model.forward_reference(&x).unwrap();
        assert_eq!(a8.dims(), &[3, STRIDE8_CHANNELS, 7, 6]);
        assert_eq!(a16.dims(), &[3, STRIDE16_CHANNELS, 4, 3]);
        assert!(synthetic::relative_error(&a8, &r8) < 1e-5);
        assert!(synthetic::relative_error(&a16, &r16) < 1e-5);
        let (s8, s16) = model.forward(&x.narrow(0, 2, 1).unwrap()).unwrap();
        assert!(synthetic::bitwise_equal(&s8, &a8.narrow(0, 2, 1).unwrap()));
        assert!(synthetic::bitwise_equal(
            &s16,
            &a16.narrow(0, 2, 1).unwrap()
        ));
        for threads in [1, 3] {
            let (t8, t16) = synthetic::with_threads(threads, || model.forward(&x).unwrap());
            assert!(synthetic::bitwise_equal(&t8, &a8), "{threads} threads");
            assert!(synthetic::bitwise_equal(&t16, &a16), "{threads} threads");
        }
        assert!(model.forward_flops((238, 238)) > 1e8);
    }

    #[test]
    fn block_table_reaches_feature_13_with_96_channels() {
        let blocks: usize = INVERTED_RESIDUAL_SETTING.iter().map(|s| s.2).sum();
        assert_eq!(blocks, STRIDE16_FEATURE);
        assert_eq!(
            INVERTED_RESIDUAL_SETTING.last().map(|s| s.1),
            Some(STRIDE16_CHANNELS)
        );
        // Blocks 1..=6 end in the 32-channel stage, after three stride-2 steps.
        let mut seen = 0;
        let mut stride = STEM_STRIDE;
        for &(_, c, n, s) in &INVERTED_RESIDUAL_SETTING {
            stride *= s;
            seen += n;
            if seen == STRIDE8_FEATURE {
                assert_eq!((c, stride), (STRIDE8_CHANNELS, 8));
            }
        }
        assert_eq!(stride, 16);
    }
}
