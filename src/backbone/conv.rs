//! Convolution + eval-mode BatchNorm, folded into one biased convolution.
//!
//! The CNN backbones are frozen, so every `Conv2d → BatchNorm2d` pair is
//! replaced at load time by a single convolution with
//! `w' = w · γ/√(σ² + ε)` (per output channel) and `b' = β − μ · γ/√(σ² + ε)`.
//! The activation that follows (ReLU or ReLU6) is kept with the layer.
//!
//! Tensors at the module boundary are `(B, C, H, W)`. On the CPU with f32
//! weights the layers run on host maps in channel-major layout
//! `(C, B, H, W)` ([`ChannelMajor`]), so that one convolution over the whole
//! batch is one packed matrix product
//! `W (C_out × C_in·k·k) · cols (C_in·k·k × B·oh·ow)` ([`crate::kernels::gemm`]):
//! the folded kernel is packed once at load as the left operand, and the
//! im2col matrix is never stored; its panels are gathered straight from the
//! input ([`ConvColumns`]; a 1×1 stride-1 convolution reads the input
//! itself). Bias, activation and a residual sum run in the product's
//! epilogue. Depthwise 3×3 convolutions use a direct kernel
//! ([`Depthwise3x3`]). Off the CPU, candle's convolution is used.

use std::mem::MaybeUninit;

use candle_core::{DType, Device, Module, Result, Tensor, bail};
use candle_nn::VarBuilder;
use rayon::prelude::*;

use crate::kernels::gemm::{
    self, Bias, Epilogue, Kernel, Lhs, MatMut, MatRef, PackedA, Rhs, RhsSource,
};

/// BatchNorm epsilon of torchvision's `BatchNorm2d` (the CNN checkpoints use the default).
pub const BATCH_NORM_EPS: f64 = 1e-5;

/// Upper clip of ReLU6 (MobileNetV2).
const RELU6_MAX: f32 = 6.0;

/// Side of the depthwise kernel handled by the direct CPU kernel.
const DEPTHWISE_KERNEL: usize = 3;

/// Most columns a [`ConvColumns`] panel can have (≥ every GEMM kernel's NR).
const MAX_PANEL_COLS: usize = 32;

/// Activation applied after a folded convolution.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Activation {
    Identity,
    Relu,
    Relu6,
}

impl Activation {
    #[inline(always)]
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

    /// The same activation in a GEMM epilogue.
    fn for_gemm(self) -> gemm::Activation {
        match self {
            Activation::Identity => gemm::Activation::Identity,
            Activation::Relu => gemm::Activation::Relu,
            Activation::Relu6 => gemm::Activation::Relu6,
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

    /// Output length along an axis of input length `len` (0 if the kernel
    /// does not fit).
    pub fn out_len(&self, len: usize) -> usize {
        (len + 2 * self.padding)
            .checked_sub(self.kernel)
            .map_or(0, |span| span / self.stride + 1)
    }

    /// Floating-point operations (2 per multiply-add) of one image at `(h, w)`.
    pub fn flops(&self, (h, w): (usize, usize)) -> f64 {
        let macs = self.out_channels * (self.in_channels / self.groups) * self.kernel * self.kernel;
        2.0 * macs as f64 * (self.out_len(h) * self.out_len(w)) as f64
    }
}

/// Most spare activation buffers kept per thread for reuse.
const SPARE_BUFFERS: usize = 8;

thread_local! {
    /// Activation buffers of dropped maps, reused by later layers and
    /// forwards: a fresh multi-megabyte allocation costs a page fault per
    /// 4 KiB page on first touch.
    static SPARE: std::cell::RefCell<Vec<Vec<f32>>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// An empty buffer with room for `len` floats: the smallest spare one that
/// fits, or a new one.
fn take_buffer(len: usize) -> Vec<f32> {
    SPARE
        .with(|spare| {
            let mut spare = spare.borrow_mut();
            let best = (0..spare.len())
                .filter(|&i| spare[i].capacity() >= len)
                .min_by_key(|&i| spare[i].capacity())?;
            let mut buf = spare.swap_remove(best);
            buf.clear();
            Some(buf)
        })
        .unwrap_or_else(|| Vec::with_capacity(len))
}

/// Keeps `buf` for [`take_buffer`], dropping the smallest spare when full.
fn recycle(buf: Vec<f32>) {
    if buf.capacity() == 0 {
        return;
    }
    SPARE.with(|spare| {
        let mut spare = spare.borrow_mut();
        spare.push(buf);
        if spare.len() > SPARE_BUFFERS
            && let Some(smallest) = (0..spare.len()).min_by_key(|&i| spare[i].capacity())
        {
            spare.swap_remove(smallest);
        }
    });
}

/// A batch of feature maps on the host in channel-major layout
/// `(C, B, H, W)`: channel `c` of image `b` is the plane at `(c·B + b)·H·W`.
/// For a single image this is the usual `(C, H, W)`.
#[derive(Debug, Clone, PartialEq)]
pub struct ChannelMajor {
    pub data: Vec<f32>,
    pub channels: usize,
    pub batch: usize,
    pub height: usize,
    pub width: usize,
}

impl Drop for ChannelMajor {
    fn drop(&mut self) {
        recycle(std::mem::take(&mut self.data));
    }
}

impl ChannelMajor {
    /// Zeros of the given size.
    pub fn zeros(channels: usize, batch: usize, height: usize, width: usize) -> Self {
        let mut data = take_buffer(channels * batch * height * width);
        data.resize(channels * batch * height * width, 0.0);
        Self {
            data,
            channels,
            batch,
            height,
            width,
        }
    }

    /// From a `(B, C, H, W)` tensor.
    pub fn from_tensor(x: &Tensor) -> Result<Self> {
        let (b, c, h, w) = x.dims4()?;
        let data = if b == 1 {
            x.to_dtype(DType::F32)?.flatten_all()?.to_vec1()?
        } else {
            x.to_dtype(DType::F32)?
                .transpose(0, 1)?
                .flatten_all()?
                .to_vec1()?
        };
        Ok(Self {
            data,
            channels: c,
            batch: b,
            height: h,
            width: w,
        })
    }

    /// Back to a `(B, C, H, W)` tensor.
    pub fn to_tensor(&self, device: &Device) -> Result<Tensor> {
        let (c, b, h, w) = (self.channels, self.batch, self.height, self.width);
        let t = Tensor::from_slice(&self.data, (c, b, h, w), device)?;
        if b == 1 {
            t.reshape((1, c, h, w))
        } else {
            t.transpose(0, 1)?.contiguous()
        }
    }

    fn plane_len(&self) -> usize {
        self.height * self.width
    }

    /// Columns of the channel-major matrix `(C, B·H·W)`.
    fn columns(&self) -> usize {
        self.batch * self.plane_len()
    }
}

/// The im2col matrix of a convolution over a [`ChannelMajor`] batch, as a
/// GEMM right operand that is never stored: row `(c, ky, kx)`, column
/// `(b, oy, ox)` holds the input sample that output position reads through
/// that tap (zero in the padding).
///
/// The input is copied once with its zero border, so that a panel row is a
/// few plain copies (one per output row the panel's columns cross).
pub struct ConvColumns<'a> {
    /// The input with `padding` zeros on every side, `(C, B, ph, pw)`.
    padded: std::borrow::Cow<'a, [f32]>,
    channels: usize,
    batch: usize,
    padded_h: usize,
    padded_w: usize,
    kernel: usize,
    stride: usize,
    out_h: usize,
    out_w: usize,
}

impl Drop for ConvColumns<'_> {
    fn drop(&mut self) {
        if let std::borrow::Cow::Owned(data) = &mut self.padded {
            recycle(std::mem::take(data));
        }
    }
}

/// A run of panel columns on one output row: `len` columns from panel
/// column `at`, image `image`, output row `oy`, first output column `ox`.
#[derive(Debug, Clone, Copy, Default)]
struct RowRun {
    at: usize,
    len: usize,
    image: usize,
    oy: usize,
    ox: usize,
}

impl<'a> ConvColumns<'a> {
    pub fn new(input: &'a ChannelMajor, spec: &ConvSpec) -> Self {
        let p = spec.padding;
        let (ph, pw) = (input.height + 2 * p, input.width + 2 * p);
        let padded = if p == 0 {
            std::borrow::Cow::Borrowed(&input.data[..])
        } else {
            let len = input.channels * input.batch * ph * pw;
            let mut data = take_buffer(len);
            data.resize(len, 0.0);
            data.par_chunks_mut(ph * pw)
                .zip(input.data.par_chunks(input.plane_len()))
                .for_each(|(dst, src)| {
                    for (y, row) in src.chunks_exact(input.width).enumerate() {
                        let at = (y + p) * pw + p;
                        dst[at..at + input.width].copy_from_slice(row);
                    }
                });
            std::borrow::Cow::Owned(data)
        };
        Self {
            padded,
            channels: input.channels,
            batch: input.batch,
            padded_h: ph,
            padded_w: pw,
            kernel: spec.kernel,
            stride: spec.stride,
            out_h: spec.out_len(input.height),
            out_w: spec.out_len(input.width),
        }
    }

    /// Splits panel columns `j0 .. j0 + count` into runs along output rows.
    fn runs(&self, j0: usize, count: usize, runs: &mut [RowRun; MAX_PANEL_COLS]) -> usize {
        let plane = self.out_h * self.out_w;
        let mut n = 0;
        let mut at = 0;
        while at < count {
            let col = j0 + at;
            let (image, rest) = (col / plane, col % plane);
            let (oy, ox) = (rest / self.out_w, rest % self.out_w);
            let len = (self.out_w - ox).min(count - at);
            runs[n] = RowRun {
                at,
                len,
                image,
                oy,
                ox,
            };
            n += 1;
            at += len;
        }
        n
    }

    /// The packing loop, with the copy of one stride-1 run supplied.
    #[inline(always)]
    fn pack_with(
        &self,
        (j0, nr, k0, kc): (usize, usize, usize, usize),
        dst: &mut [f32],
        copy: impl Fn(&[f32], &mut [f32]),
    ) {
        assert!(nr <= MAX_PANEL_COLS, "panel wider than {MAX_PANEL_COLS}");
        let valid = nr.min(self.cols().saturating_sub(j0));
        let mut runs = [RowRun::default(); MAX_PANEL_COLS];
        let run_count = self.runs(j0, valid, &mut runs);
        let runs = &runs[..run_count];
        let taps = self.kernel * self.kernel;
        let (s, pw) = (self.stride, self.padded_w);
        let data = &self.padded[..];
        for (k, out) in dst[..kc * nr].chunks_exact_mut(nr).enumerate() {
            let row = k0 + k;
            let (c, tap) = (row / taps, row % taps);
            let (ky, kx) = (tap / self.kernel, tap % self.kernel);
            for run in runs {
                let plane = (c * self.batch + run.image) * self.padded_h * pw;
                let start = plane + (run.oy * s + ky) * pw + run.ox * s + kx;
                let dst = &mut out[run.at..run.at + run.len];
                if s == 1 {
                    copy(&data[start..start + run.len], dst);
                } else {
                    for (d, &v) in dst.iter_mut().zip(data[start..].iter().step_by(s)) {
                        *d = v;
                    }
                }
            }
            out[valid..].fill(0.0);
        }
    }

    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx512f")]
    fn pack_avx512(&self, panel: (usize, usize, usize, usize), dst: &mut [f32]) {
        self.pack_with(panel, dst, |src, dst| {
            crate::kernels::vector::copy_avx512(src, dst)
        })
    }
}

impl RhsSource for ConvColumns<'_> {
    fn cols(&self) -> usize {
        self.batch * self.out_h * self.out_w
    }

    fn depth(&self) -> usize {
        self.channels * self.kernel * self.kernel
    }

    fn pack(&self, j0: usize, nr: usize, k0: usize, kc: usize, dst: &mut [f32]) {
        #[cfg(target_arch = "x86_64")]
        if std::arch::is_x86_feature_detected!("avx512f") {
            // SAFETY: the CPU supports AVX-512F (checked just above).
            return unsafe { self.pack_avx512((j0, nr, k0, kc), dst) };
        }
        self.pack_with((j0, nr, k0, kc), dst, |src, dst| dst.copy_from_slice(src))
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
    /// The CPU implementation, when the weights are f32 on the CPU.
    host: Option<HostConv>,
}

/// The CPU forms of a folded convolution.
#[derive(Debug, Clone)]
enum HostConv {
    /// `(C_out, C_in·k·k)` packed as the left GEMM operand, and the bias.
    Dense {
        weight: PackedA,
        bias: Vec<f32>,
    },
    Depthwise(Depthwise3x3),
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

        let host = if !(weight.device().is_cpu() && weight.dtype() == DType::F32) {
            None
        } else if spec.groups == 1 {
            let k_size = spec.in_channels * spec.kernel * spec.kernel;
            let matrix: Vec<f32> = weight.flatten_all()?.to_vec1()?;
            let view = MatRef::row_major(&matrix, spec.out_channels, k_size);
            Some(HostConv::Dense {
                weight: PackedA::new(Kernel::best(), &view),
                bias: bias.to_vec1()?,
            })
        } else if spec.groups == spec.in_channels
            && spec.in_channels == spec.out_channels
            && spec.kernel == DEPTHWISE_KERNEL
            && spec.padding == DEPTHWISE_KERNEL / 2
            && (spec.stride == 1 || spec.stride == 2)
        {
            Some(HostConv::Depthwise(Depthwise3x3 {
                weight: weight.flatten_all()?.to_vec1()?,
                bias: bias.to_vec1()?,
                stride: spec.stride,
                activation,
            }))
        } else {
            None
        };
        Ok(Self {
            spec,
            weight,
            bias,
            activation,
            host,
        })
    }

    pub fn spec(&self) -> &ConvSpec {
        &self.spec
    }

    /// Whether [`Self::forward_host`] is available (f32 weights on the CPU).
    pub fn has_host_path(&self) -> bool {
        self.host.is_some()
    }

    /// The convolution on a host batch. With `residual = Some((r, act))`
    /// the result is `act(conv(x) + bias + r)`, computed in place in `r`'s
    /// buffer; the layer's own activation must then be the identity.
    pub fn forward_host(
        &self,
        x: &ChannelMajor,
        residual: Option<(ChannelMajor, Activation)>,
    ) -> Result<ChannelMajor> {
        let s = &self.spec;
        if x.channels != s.in_channels {
            bail!(
                "convolution expects {} input channels, got {}",
                s.in_channels,
                x.channels
            )
        }
        let (oh, ow) = (s.out_len(x.height), s.out_len(x.width));
        if oh == 0 || ow == 0 {
            bail!(
                "{}x{} input is smaller than the {}x{} kernel",
                x.height,
                x.width,
                s.kernel,
                s.kernel
            )
        }
        let Some(host) = &self.host else {
            bail!("this convolution has no CPU kernel (weights not f32 on the CPU)")
        };
        match host {
            HostConv::Depthwise(kernel) => {
                if residual.is_some() {
                    bail!("residual sums are not fused into depthwise convolutions")
                }
                Ok(kernel.forward(x))
            }
            HostConv::Dense { weight, bias } => {
                let (out, accumulate, activation) = match residual {
                    Some((r, act)) => {
                        assert_eq!(
                            self.activation,
                            Activation::Identity,
                            "activation before a residual sum"
                        );
                        if (r.channels, r.batch, r.height, r.width)
                            != (s.out_channels, x.batch, oh, ow)
                        {
                            bail!("residual map does not match the convolution output")
                        }
                        (Some(r), true, act)
                    }
                    None => (None, false, self.activation),
                };
                let epilogue = Epilogue {
                    accumulate,
                    bias: Bias::PerRow(bias),
                    activation: activation.for_gemm(),
                };
                let kernel = weight.kernel();
                let run = |dst: MatMut| {
                    if s.kernel == 1 && s.stride == 1 && s.padding == 0 {
                        let src = MatRef::row_major(&x.data, x.channels, x.columns());
                        gemm::gemm(
                            kernel,
                            Lhs::Packed(weight),
                            Rhs::Source(&src),
                            dst,
                            &epilogue,
                        );
                    } else {
                        let src = ConvColumns::new(x, s);
                        gemm::gemm(
                            kernel,
                            Lhs::Packed(weight),
                            Rhs::Source(&src),
                            dst,
                            &epilogue,
                        );
                    }
                };
                let cols = x.batch * oh * ow;
                match out {
                    Some(mut r) => {
                        run(MatMut::row_major(&mut r.data, s.out_channels, cols));
                        Ok(r)
                    }
                    None => {
                        let len = s.out_channels * cols;
                        let mut data = take_buffer(len);
                        // SAFETY: `data` has room for the `C_out × cols`
                        // output, and a product without `accumulate` writes
                        // every element before reading any (later depth
                        // blocks read what the first one wrote).
                        unsafe {
                            run(MatMut::from_raw_parts(
                                data.as_mut_ptr(),
                                s.out_channels,
                                cols,
                                cols,
                            ));
                            data.set_len(len);
                        }
                        Ok(ChannelMajor {
                            data,
                            channels: s.out_channels,
                            batch: x.batch,
                            height: oh,
                            width: ow,
                        })
                    }
                }
            }
        }
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
        if self.host.is_some() && x.device().is_cpu() {
            let y = self.forward_host(&ChannelMajor::from_tensor(x)?, None)?;
            return y.to_tensor(x.device())?.to_dtype(x.dtype());
        }
        self.forward_generic(x)
    }
}

/// Direct depthwise 3×3 convolution (padding 1, stride 1 or 2) with bias
/// and activation, parallel over planes.
///
/// Each plane is copied into a zero-bordered per-thread buffer, so the
/// inner loops are plain contiguous multiply-adds the compiler vectorises
/// (built for AVX-512 or AVX2 when the CPU has them; no fused multiply-add,
/// so every build gives the same bits). For stride 2 the buffer holds the
/// even and the odd padded columns of each row apart, so output column
/// `ox` reads `even[ox]`, `odd[ox]`, `even[ox + 1]`.
#[derive(Debug, Clone)]
pub struct Depthwise3x3 {
    /// `(C, 3, 3)` row-major.
    weight: Vec<f32>,
    /// `(C,)`.
    bias: Vec<f32>,
    stride: usize,
    activation: Activation,
}

/// `odd[j] = row[2j]` and `even[j] = row[2j + 1]` (the caller passes
/// the even part from its second element).
fn split_even_odd(row: &[f32], even: &mut [f32], odd: &mut [f32]) {
    for (e, &v) in even.iter_mut().zip(row.iter().skip(1).step_by(2)) {
        *e = v;
    }
    for (o, &v) in odd.iter_mut().zip(row.iter().step_by(2)) {
        *o = v;
    }
}

/// [`split_even_odd`] with two-source lane permutes, 32 inputs at a time.
#[cfg(target_arch = "x86_64")]
#[inline]
#[target_feature(enable = "avx512f")]
fn split_even_odd_avx512(row: &[f32], even: &mut [f32], odd: &mut [f32]) {
    use std::arch::x86_64::*;
    const LANES: usize = 16;
    assert!(odd.len() >= row.len().div_ceil(2) && even.len() >= row.len() / 2);
    let mask = |n: usize| -> __mmask16 { if n >= LANES { !0 } else { (1u16 << n) - 1 } };
    let pick_even = _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30);
    let pick_odd = _mm512_setr_epi32(1, 3, 5, 7, 9, 11, 13, 15, 17, 19, 21, 23, 25, 27, 29, 31);
    for (c, chunk) in row.chunks(2 * LANES).enumerate() {
        let n = chunk.len();
        let (n_lo, n_hi) = (n.min(LANES), n.saturating_sub(LANES));
        // SAFETY: masked loads of the chunk's n elements; masked stores of
        // ⌈n/2⌉ and ⌊n/2⌋ elements at c·16, inside odd and even (asserted).
        unsafe {
            let lo = _mm512_maskz_loadu_ps(mask(n_lo), chunk.as_ptr());
            let hi = _mm512_maskz_loadu_ps(mask(n_hi), chunk.as_ptr().add(n_lo));
            let xe = _mm512_permutex2var_ps(lo, pick_even, hi);
            let xo = _mm512_permutex2var_ps(lo, pick_odd, hi);
            _mm512_mask_storeu_ps(odd.as_mut_ptr().add(c * LANES), mask(n.div_ceil(2)), xe);
            _mm512_mask_storeu_ps(even.as_mut_ptr().add(c * LANES), mask(n / 2), xo);
        }
    }
}

/// Row layout of a padded plane (see [`Depthwise3x3::pad`]).
#[derive(Debug, Clone, Copy)]
struct PaddedRows {
    row_len: usize,
    /// Length of the even part of a split (stride-2) row.
    half: usize,
    out_w: usize,
}

/// The input columns the three taps of a kernel row read, for `ow` outputs,
/// from one padded row (stride 1: shifted by 0, 1, 2; stride 2: `even[ox]`,
/// `odd[ox]`, `even[ox + 1]` of the split row).
#[inline(always)]
fn tap_columns(row: &[f32], stride: usize, half: usize, ow: usize) -> (&[f32], &[f32], &[f32]) {
    if stride == 1 {
        (&row[..ow], &row[1..=ow], &row[2..ow + 2])
    } else {
        let (even, odd) = row.split_at(half);
        (&even[..ow], &odd[..ow], &even[1..=ow])
    }
}

/// Output length of a padded, strided 3×3 convolution along one axis.
fn depthwise_out_len(len: usize, stride: usize) -> usize {
    let pad = DEPTHWISE_KERNEL / 2;
    (len + 2 * pad - DEPTHWISE_KERNEL) / stride + 1
}

thread_local! {
    /// Zero-bordered copy of the plane being convolved.
    static PADDED_PLANE: std::cell::RefCell<Vec<f32>> = const { std::cell::RefCell::new(Vec::new()) };
}

impl Depthwise3x3 {
    /// Convolves one `(h, w)` plane into `out` (`(oh, ow)`), on the widest
    /// vector unit available.
    fn plane(
        &self,
        channel: usize,
        src: &[f32],
        size: (usize, usize),
        out: &mut [MaybeUninit<f32>],
    ) {
        PADDED_PLANE.with(|buf| {
            let buf = &mut buf.borrow_mut();
            #[cfg(target_arch = "x86_64")]
            {
                if std::arch::is_x86_feature_detected!("avx512f") {
                    // SAFETY: the CPU supports AVX-512F (checked just above).
                    return unsafe { self.plane_avx512(channel, src, size, out, buf) };
                }
                if std::arch::is_x86_feature_detected!("avx2") {
                    // SAFETY: the CPU supports AVX2 (checked just above).
                    return unsafe { self.plane_avx2(channel, src, size, out, buf) };
                }
            }
            let layout = self.pad(src, size, buf, |s, d| d.copy_from_slice(s), split_even_odd);
            self.rows_portable(channel, buf, layout, out)
        })
    }

    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx512f")]
    fn plane_avx512(
        &self,
        channel: usize,
        src: &[f32],
        size: (usize, usize),
        out: &mut [MaybeUninit<f32>],
        buf: &mut Vec<f32>,
    ) {
        let layout = self.pad(
            src,
            size,
            buf,
            |s, d| crate::kernels::vector::copy_avx512(s, d),
            |row, even, odd| split_even_odd_avx512(row, even, odd),
        );
        self.rows_avx512(channel, buf, layout, out)
    }

    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2")]
    fn plane_avx2(
        &self,
        channel: usize,
        src: &[f32],
        size: (usize, usize),
        out: &mut [MaybeUninit<f32>],
        buf: &mut Vec<f32>,
    ) {
        let layout = self.pad(src, size, buf, |s, d| d.copy_from_slice(s), split_even_odd);
        self.rows_portable(channel, buf, layout, out)
    }

    /// Copies the plane into `padded` with its zero border: stride 1, rows
    /// of `w + 2`; stride 2, each row split into its even and odd padded
    /// columns. Returns the row layout.
    #[inline(always)]
    fn pad(
        &self,
        src: &[f32],
        (h, w): (usize, usize),
        padded: &mut Vec<f32>,
        copy: impl Fn(&[f32], &mut [f32]),
        split: impl Fn(&[f32], &mut [f32], &mut [f32]),
    ) -> PaddedRows {
        let s = self.stride;
        let pw = w + 2;
        let half = pw.div_ceil(2);
        let row_len = if s == 1 { pw } else { 2 * half };
        padded.resize((h + 2) * row_len, 0.0);
        padded[..row_len].fill(0.0);
        padded[(h + 1) * row_len..].fill(0.0);
        for (y, row) in src.chunks_exact(w).enumerate() {
            let dst = &mut padded[(y + 1) * row_len..(y + 2) * row_len];
            if s == 1 {
                dst[0] = 0.0;
                copy(row, &mut dst[1..=w]);
                dst[w + 1] = 0.0;
            } else {
                // Padded column p = x + 1: even[j] = x[2j − 1], odd[j] = x[2j].
                let (even, odd) = dst.split_at_mut(half);
                even.fill(0.0);
                odd.fill(0.0);
                split(row, &mut even[1..], odd);
            }
        }
        PaddedRows {
            row_len,
            half,
            out_w: depthwise_out_len(w, s),
        }
    }

    #[inline(always)]
    fn rows_portable(
        &self,
        channel: usize,
        padded: &[f32],
        layout: PaddedRows,
        out: &mut [MaybeUninit<f32>],
    ) {
        let k = DEPTHWISE_KERNEL;
        let (s, ow, row_len) = (self.stride, layout.out_w, layout.row_len);
        let taps = &self.weight[channel * k * k..(channel + 1) * k * k];
        let bias = self.bias[channel];
        let act = self.activation;
        for (oy, out_row) in out.chunks_exact_mut(ow).enumerate() {
            let row = |ky: usize| &padded[(oy * s + ky) * row_len..(oy * s + ky + 1) * row_len];
            let tap_cols = |ky| tap_columns(row(ky), s, layout.half, ow);
            let ((a0, b0, c0), (a1, b1, c1), (a2, b2, c2)) =
                (tap_cols(0), tap_cols(1), tap_cols(2));
            for (i, o) in out_row.iter_mut().enumerate() {
                let top = taps[0] * a0[i] + taps[1] * b0[i] + taps[2] * c0[i];
                let mid = taps[3] * a1[i] + taps[4] * b1[i] + taps[5] * c1[i];
                let bottom = taps[6] * a2[i] + taps[7] * b2[i] + taps[8] * c2[i];
                o.write(act.apply_scalar(bias + top + mid + bottom));
            }
        }
    }

    /// The output rows with 16-lane fused multiply-adds and masked tails.
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx512f")]
    fn rows_avx512(
        &self,
        channel: usize,
        padded: &[f32],
        layout: PaddedRows,
        out: &mut [MaybeUninit<f32>],
    ) {
        use std::arch::x86_64::*;
        const LANES: usize = 16;
        let k = DEPTHWISE_KERNEL;
        let (s, ow, row_len) = (self.stride, layout.out_w, layout.row_len);
        let taps: Vec<__m512> = self.weight[channel * k * k..(channel + 1) * k * k]
            .iter()
            .map(|&t| _mm512_set1_ps(t))
            .collect();
        let bias = _mm512_set1_ps(self.bias[channel]);
        let (zero, six) = (_mm512_setzero_ps(), _mm512_set1_ps(RELU6_MAX));
        for (oy, out_row) in out.chunks_exact_mut(ow).enumerate() {
            let row = |ky: usize| &padded[(oy * s + ky) * row_len..(oy * s + ky + 1) * row_len];
            let cols = [
                tap_columns(row(0), s, layout.half, ow),
                tap_columns(row(1), s, layout.half, ow),
                tap_columns(row(2), s, layout.half, ow),
            ];
            for start in (0..ow).step_by(LANES) {
                let n = (ow - start).min(LANES);
                let m: __mmask16 = if n == LANES { !0 } else { (1 << n) - 1 };
                let mut acc = bias;
                for (ky, (a, b, c)) in cols.iter().enumerate() {
                    // SAFETY: the masked lanes lie inside the ow-long column slices.
                    unsafe {
                        let load = |v: &[f32]| _mm512_maskz_loadu_ps(m, v.as_ptr().add(start));
                        acc = _mm512_fmadd_ps(taps[3 * ky], load(a), acc);
                        acc = _mm512_fmadd_ps(taps[3 * ky + 1], load(b), acc);
                        acc = _mm512_fmadd_ps(taps[3 * ky + 2], load(c), acc);
                    }
                }
                acc = match self.activation {
                    Activation::Identity => acc,
                    Activation::Relu => _mm512_max_ps(acc, zero),
                    Activation::Relu6 => _mm512_min_ps(_mm512_max_ps(acc, zero), six),
                };
                // SAFETY: n lanes at `start` lie inside the ow-long output row.
                unsafe {
                    _mm512_mask_storeu_ps(out_row.as_mut_ptr().add(start).cast::<f32>(), m, acc)
                };
            }
        }
    }

    /// The convolution of every plane of a host batch.
    fn forward(&self, x: &ChannelMajor) -> ChannelMajor {
        let (oh, ow) = (
            depthwise_out_len(x.height, self.stride),
            depthwise_out_len(x.width, self.stride),
        );
        let len = x.channels * x.batch * oh * ow;
        let mut data = take_buffer(len);
        let batch = x.batch;
        data.spare_capacity_mut()[..len]
            .par_chunks_mut(oh * ow)
            .zip(x.data.par_chunks(x.plane_len()))
            .enumerate()
            .for_each(|(plane, (dst, src))| {
                self.plane(plane / batch, src, (x.height, x.width), dst)
            });
        // SAFETY: every plane wrote all of its oh·ow outputs above.
        unsafe { data.set_len(len) };
        ChannelMajor {
            data,
            channels: x.channels,
            batch,
            height: oh,
            width: ow,
        }
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
            assert!(matches!(conv.host, Some(HostConv::Dense { .. })));
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
    fn conv_columns_match_a_stored_im2col_across_images_and_edges() {
        // 2 images of 3 channels, 5x7, kernel 3, stride 2: the 32-column
        // panels cross output rows and images.
        for (spec, (h, w)) in [
            (ConvSpec::dense(3, 1, 3, 2), (5, 7)),
            (ConvSpec::dense(3, 1, 3, 1), (4, 9)),
            (ConvSpec::dense(3, 1, 7, 2), (9, 6)),
            (ConvSpec::dense(3, 1, 1, 2), (5, 5)),
        ] {
            let x = ChannelMajor {
                data: ramp(&[3, 2, h, w], 5.0),
                channels: 3,
                batch: 2,
                height: h,
                width: w,
            };
            let cols = ConvColumns::new(&x, &spec);
            let (oh, ow) = (spec.out_len(h), spec.out_len(w));
            assert_eq!(cols.cols(), 2 * oh * ow);
            let k = spec.kernel;
            let want = |row: usize, col: usize| {
                let (c, tap) = (row / (k * k), row % (k * k));
                let (ky, kx) = (tap / k, tap % k);
                let (b, rest) = (col / (oh * ow), col % (oh * ow));
                let (oy, ox) = (rest / ow, rest % ow);
                let iy = (oy * spec.stride + ky) as isize - spec.padding as isize;
                let ix = (ox * spec.stride + kx) as isize - spec.padding as isize;
                if iy < 0 || ix < 0 || iy >= h as isize || ix >= w as isize {
                    0.0
                } else {
                    x.data[((c * 2 + b) * h + iy as usize) * w + ix as usize]
                }
            };
            let nr = 32;
            let depth = cols.depth();
            for j0 in (0..cols.cols()).step_by(nr) {
                let mut panel = vec![f32::NAN; depth * nr];
                cols.pack(j0, nr, 0, depth, &mut panel);
                for row in 0..depth {
                    for j in 0..nr {
                        let expected = if j0 + j < cols.cols() {
                            want(row, j0 + j)
                        } else {
                            0.0
                        };
                        assert_eq!(
                            panel[row * nr + j],
                            expected,
                            "{spec:?} row {row} col {}",
                            j0 + j
                        );
                    }
                }
            }
        }
    }

    #[test]
    fn batched_host_path_with_fused_residual_matches_candle() {
        let dev = Device::Cpu;
        let spec = ConvSpec::dense(4, 6, 3, 1);
        let conv = folded(spec, Activation::Identity);
        let x = Tensor::from_vec(ramp(&[3, 4, 6, 5], 6.0), (3, 4, 6, 5), &dev).unwrap();
        let r = Tensor::from_vec(ramp(&[3, 6, 6, 5], 3.0), (3, 6, 6, 5), &dev).unwrap();
        let want = (conv.forward_generic(&x).unwrap() + &r)
            .unwrap()
            .relu()
            .unwrap();
        let host_x = ChannelMajor::from_tensor(&x).unwrap();
        let back = host_x.to_tensor(&dev).unwrap();
        assert_eq!(
            (back - &x)
                .unwrap()
                .abs()
                .unwrap()
                .max_all()
                .unwrap()
                .to_scalar::<f32>()
                .unwrap(),
            0.0
        );
        let got = conv
            .forward_host(
                &host_x,
                Some((ChannelMajor::from_tensor(&r).unwrap(), Activation::Relu)),
            )
            .unwrap()
            .to_tensor(&dev)
            .unwrap();
        let diff = (got - want).unwrap().abs().unwrap().max_all().unwrap();
        assert!(diff.to_scalar::<f32>().unwrap() < 1e-5);
        let wrong = ChannelMajor::zeros(6, 3, 5, 5);
        assert!(
            conv.forward_host(&host_x, Some((wrong, Activation::Relu)))
                .is_err()
        );
    }

    #[test]
    fn output_sizes_and_flops_follow_the_geometry() {
        let spec = ConvSpec::dense(64, 128, 3, 2);
        assert_eq!(spec.out_len(238), 119);
        assert_eq!(spec.out_len(7), 4);
        assert_eq!(ConvSpec::dense(3, 8, 7, 2).out_len(2), 1);
        assert_eq!(spec.flops((8, 8)), 2.0 * (128 * 64 * 9 * 16) as f64);
        let dw = ConvSpec::depthwise(32, 3, 1);
        assert_eq!(dw.flops((4, 4)), 2.0 * (32 * 9 * 16) as f64);
    }

    #[test]
    fn dropped_maps_lend_their_buffers_to_later_ones() {
        let map = ChannelMajor::zeros(4, 2, 8, 8);
        let ptr = map.data.as_ptr();
        drop(map);
        // A smaller map reuses the spare buffer, zeroed.
        let again = ChannelMajor::zeros(2, 2, 8, 8);
        assert_eq!(again.data.as_ptr(), ptr);
        assert!(again.data.iter().all(|&v| v == 0.0) && again.data.len() == 256);
        let bigger = take_buffer(10_000);
        assert!(bigger.capacity() >= 10_000 && bigger.is_empty());
        for _ in 0..2 * SPARE_BUFFERS {
            recycle(vec![0.0; 16]);
        }
        SPARE.with(|s| assert!(s.borrow().len() <= SPARE_BUFFERS));
    }

    #[test]
    fn even_odd_split_paths_agree() {
        for len in [1usize, 2, 15, 16, 17, 31, 32, 33, 60, 119] {
            let row: Vec<f32> = (0..len).map(|i| i as f32 + 0.5).collect();
            let (ne, no) = (len / 2 + 1, len.div_ceil(2) + 1);
            let (mut even, mut odd) = (vec![-1.0; ne], vec![-1.0; no]);
            split_even_odd(&row, &mut even, &mut odd);
            assert!(
                odd[..len.div_ceil(2)]
                    .iter()
                    .enumerate()
                    .all(|(j, &v)| v == row[2 * j])
            );
            assert!(
                even[..len / 2]
                    .iter()
                    .enumerate()
                    .all(|(j, &v)| v == row[2 * j + 1])
            );
            #[cfg(target_arch = "x86_64")]
            if std::arch::is_x86_feature_detected!("avx512f") {
                let (mut e2, mut o2) = (vec![-1.0; ne], vec![-1.0; no]);
                // SAFETY: AVX-512F is available (checked just above).
                unsafe { split_even_odd_avx512(&row, &mut e2, &mut o2) };
                assert_eq!((e2, o2), (even, odd), "length {len}");
            }
        }
    }

    #[test]
    fn direct_depthwise_matches_grouped_conv() {
        let dev = Device::Cpu;
        for (stride, (h, w)) in [
            (1, (9, 7)),
            (2, (9, 7)),
            (2, (8, 10)),
            (1, (1, 1)),
            (2, (1, 1)),
            (2, (2, 3)),
            (2, (5, 4)),
        ] {
            let conv = folded(ConvSpec::depthwise(5, 3, stride), Activation::Relu6);
            assert!(matches!(conv.host, Some(HostConv::Depthwise(_))));
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
