//! The DINOv2 encoder on the CPU kernels ([`crate::kernels`]): weights
//! packed once at load, activations in plain row-major buffers.
//!
//! Tokens are `(B·T, D)` row-major, `T = 1 + N` (CLS first). Per block:
//! `h = LN1(x)`, `qkv = h·Wqkvᵀ + b`, attention, `x += o·Wdᵀ + b`,
//! `h = LN2(x)`, `f = GELU(h·W1ᵀ + b1)`, `x += f·W2ᵀ + b2`.
//!
//! Everything but the attention is row-local, so it runs block by block of
//! [`FUSED_ROW_PANELS`] row panels, one rayon task per block: the output
//! projection, the MLP and the next block's LN1 and q|k|v projection of a
//! block's rows follow each other while those rows (and their MLP hidden
//! rows) are in the L2 cache. This changes no arithmetic.
//!
//! Folded at load (same function, different rounding): the query rows of
//! `Wqkv` and their bias are multiplied by `1/√Dh` (exact for power-of-two
//! head widths), and each LayerScale vector is multiplied into the rows of
//! the projection it scales (`output.dense`, `fc2`). Biases and residual
//! sums run in the GEMM epilogue.

use candle_core::{DType, Result, Tensor};
use candle_nn::VarBuilder;
use rayon::prelude::*;

use super::dinov2::{Dinov2Config, LAYER_NORM_EPS, PATCH_SIZE};
use crate::kernels::attention::{self, AttentionShape, AttentionWorkspace};
use crate::kernels::gemm::{
    self, Activation, Bias, Epilogue, Kernel, Lhs, MatMut, MatRef, PackedB, Rhs,
};
use crate::kernels::vector;

/// Rows per rayon task in the final layer norm.
const NORM_ROWS_PER_TASK: usize = 32;
/// Token rows per fused task, in micro-kernel row panels (84 rows for
/// AVX-512): the block's normed rows and MLP hidden rows stay in L2 between
/// the products that use them.
const FUSED_ROW_PANELS: usize = 6;
/// Input channels (RGB).
const IMAGE_CHANNELS: usize = 3;

fn host(t: &Tensor) -> Result<Vec<f32>> {
    t.to_dtype(DType::F32)?.flatten_all()?.to_vec1()
}

/// A linear layer `y = x·Wᵀ + b` with `Wᵀ` packed as the right operand.
#[derive(Debug)]
struct PackedLinear {
    weight: PackedB,
    bias: Vec<f32>,
}

impl PackedLinear {
    /// From `weight (out, in)` row-major and `bias (out,)`, each output row
    /// (and its bias) multiplied by `row_scale[o]` when given.
    fn new(
        kernel: Kernel,
        mut weight: Vec<f32>,
        mut bias: Vec<f32>,
        row_scale: Option<&[f32]>,
    ) -> Self {
        let out = bias.len();
        let inp = weight.len() / out.max(1);
        if let Some(scale) = row_scale {
            for ((row, b), &s) in weight.chunks_exact_mut(inp).zip(&mut bias).zip(scale) {
                row.iter_mut().for_each(|w| *w *= s);
                *b *= s;
            }
        }
        let view = MatRef::row_major(&weight, out, inp).t();
        Self {
            weight: PackedB::new(kernel, &view),
            bias,
        }
    }

    fn load(
        kernel: Kernel,
        vb: &VarBuilder,
        out: usize,
        inp: usize,
        row_scale: Option<&[f32]>,
    ) -> Result<Self> {
        let weight = host(&vb.get((out, inp), "weight")?)?;
        let bias = host(&vb.get(out, "bias")?)?;
        Ok(Self::new(kernel, weight, bias, row_scale))
    }

    /// `out (+)= act(x·Wᵀ + b)` for `x (rows, in)`, on the calling thread
    /// (the callers run one row block per rayon task).
    fn apply_serial(
        &self,
        kernel: Kernel,
        x: &[f32],
        rows: usize,
        out: &mut [f32],
        accumulate: bool,
        activation: Activation,
    ) {
        let (inp, width) = (self.weight.depth(), self.weight.cols());
        let epilogue = Epilogue {
            accumulate,
            bias: Bias::PerCol(&self.bias),
            activation,
        };
        gemm::gemm_serial(
            kernel,
            Lhs::Source(&MatRef::row_major(x, rows, inp)),
            Rhs::Packed(&self.weight),
            MatMut::row_major(out, rows, width),
            &epilogue,
        );
    }
}

/// LayerNorm parameters.
#[derive(Debug)]
struct Norm {
    gamma: Vec<f32>,
    beta: Vec<f32>,
}

impl Norm {
    fn load(vb: &VarBuilder, d: usize) -> Result<Self> {
        Ok(Self {
            gamma: host(&vb.get(d, "weight")?)?,
            beta: host(&vb.get(d, "bias")?)?,
        })
    }

    /// Normalises every row of `x` into `out` on the calling thread.
    fn apply_serial(&self, x: &[f32], out: &mut [f32]) {
        vector::layer_norm_rows(x, &self.gamma, &self.beta, LAYER_NORM_EPS as f32, out)
    }

    /// Normalises every row of `x` into `out`, rows spread over threads.
    fn apply(&self, x: &[f32], out: &mut [f32]) {
        let chunk = NORM_ROWS_PER_TASK * self.gamma.len();
        x.par_chunks(chunk)
            .zip(out.par_chunks_mut(chunk))
            .for_each(|(x, out)| {
                vector::layer_norm_rows(x, &self.gamma, &self.beta, LAYER_NORM_EPS as f32, out)
            });
    }
}

/// One transformer block, packed.
#[derive(Debug)]
struct Block {
    norm1: Norm,
    qkv: PackedLinear,
    dense: PackedLinear,
    norm2: Norm,
    fc1: PackedLinear,
    fc2: PackedLinear,
}

impl Block {
    /// `vb` at `encoder.layer.{i}`.
    fn load(kernel: Kernel, vb: &VarBuilder, cfg: &Dinov2Config) -> Result<Self> {
        let d = cfg.hidden_size;
        let head_dim = d / cfg.num_heads;
        let inner = vb.pp("attention").pp("attention");
        let mut weight = Vec::with_capacity(3 * d * d);
        let mut bias = Vec::with_capacity(3 * d);
        for name in ["query", "key", "value"] {
            let part = inner.pp(name);
            weight.extend(host(&part.get((d, d), "weight")?)?);
            bias.extend(host(&part.get(d, "bias")?)?);
        }
        let query_scale = 1.0 / (head_dim as f32).sqrt();
        let scale: Vec<f32> = (0..3 * d)
            .map(|o| if o < d { query_scale } else { 1.0 })
            .collect();
        let layer_scale1 = host(&vb.pp("layer_scale1").get(d, "lambda1")?)?;
        let layer_scale2 = host(&vb.pp("layer_scale2").get(d, "lambda1")?)?;
        let mlp = vb.pp("mlp");
        Ok(Self {
            norm1: Norm::load(&vb.pp("norm1"), d)?,
            qkv: PackedLinear::new(kernel, weight, bias, Some(&scale)),
            dense: PackedLinear::load(
                kernel,
                &vb.pp("attention").pp("output").pp("dense"),
                d,
                d,
                Some(&layer_scale1),
            )?,
            norm2: Norm::load(&vb.pp("norm2"), d)?,
            fc1: PackedLinear::load(kernel, &mlp.pp("fc1"), cfg.mlp_size, d, None)?,
            fc2: PackedLinear::load(kernel, &mlp.pp("fc2"), d, cfg.mlp_size, Some(&layer_scale2))?,
        })
    }
}

/// Activation buffers of one forward, sized for `rows = B·T` tokens.
struct Buffers {
    qkv: Vec<f32>,
    attended: Vec<f32>,
    attention: AttentionWorkspace,
}

/// Per-thread buffers of one fused row block.
#[derive(Default)]
struct RowScratch {
    normed: Vec<f32>,
    hidden: Vec<f32>,
}

thread_local! {
    static ROW_SCRATCH: std::cell::RefCell<RowScratch> = std::cell::RefCell::new(RowScratch::default());
}

impl Block {
    /// `qkv = LN1(x)·Wqkvᵀ + b`, block by block of rows.
    fn norm_qkv(&self, kernel: Kernel, x: &[f32], qkv: &mut [f32], block_rows: usize) {
        let d = self.norm1.gamma.len();
        let width = self.qkv.weight.cols();
        x.par_chunks(block_rows * d)
            .zip(qkv.par_chunks_mut(block_rows * width))
            .for_each(|(x, qkv)| {
                let rows = x.len() / d;
                ROW_SCRATCH.with(|s| {
                    let normed = &mut s.borrow_mut().normed;
                    normed.resize(rows * d, 0.0);
                    self.norm1.apply_serial(x, normed);
                    self.qkv
                        .apply_serial(kernel, normed, rows, qkv, false, Activation::Identity);
                })
            });
    }

    /// Everything after the attention, block by block of rows (all of it is
    /// row-local): `x += o·Wdᵀ + bd`, then `x += GELU(LN2(x)·W1ᵀ + b1)·W2ᵀ + b2`,
    /// then, when `next` is given, the next block's `qkv = LN1(x)·Wqkvᵀ + b`.
    fn finish_rows(
        &self,
        kernel: Kernel,
        attended: &[f32],
        x: &mut [f32],
        next: Option<(&Block, &mut [f32])>,
        block_rows: usize,
    ) {
        let d = self.norm2.gamma.len();
        let hidden_width = self.fc1.weight.cols();
        let row_blocks = x.len().div_ceil(block_rows * d);
        let (next, mut qkv_blocks): (Option<&Block>, Vec<&mut [f32]>) = match next {
            Some((block, qkv)) => (
                Some(block),
                qkv.chunks_mut(block_rows * block.qkv.weight.cols())
                    .collect(),
            ),
            None => (None, (0..row_blocks).map(|_| &mut [][..]).collect()),
        };
        x.par_chunks_mut(block_rows * d)
            .zip(attended.par_chunks(block_rows * d))
            .zip(qkv_blocks.par_iter_mut())
            .for_each(|((x, attended), qkv)| {
                let rows = x.len() / d;
                ROW_SCRATCH.with(|s| {
                    let s = &mut *s.borrow_mut();
                    s.normed.resize(rows * d, 0.0);
                    s.hidden.resize(rows * hidden_width, 0.0);
                    self.dense
                        .apply_serial(kernel, attended, rows, x, true, Activation::Identity);
                    self.norm2.apply_serial(x, &mut s.normed);
                    self.fc1.apply_serial(
                        kernel,
                        &s.normed,
                        rows,
                        &mut s.hidden,
                        false,
                        Activation::GeluErf,
                    );
                    self.fc2
                        .apply_serial(kernel, &s.hidden, rows, x, true, Activation::Identity);
                    if let Some(next) = next {
                        next.norm1.apply_serial(x, &mut s.normed);
                        next.qkv.apply_serial(
                            kernel,
                            &s.normed,
                            rows,
                            qkv,
                            false,
                            Activation::Identity,
                        );
                    }
                })
            });
    }
}

/// The DINOv2 patch embedding and encoder with packed weights.
#[derive(Debug)]
pub(super) struct CpuEncoder {
    kernel: Kernel,
    config: Dinov2Config,
    /// `embeddings.patch_embeddings.projection` as a `(3·14·14) → D` linear layer.
    patch: PackedLinear,
    blocks: Vec<Block>,
    /// The final `layernorm`.
    norm: Norm,
}

impl CpuEncoder {
    /// Loads and packs the weights; `vb` at the checkpoint root.
    pub(super) fn load(vb: &VarBuilder, cfg: &Dinov2Config, kernel: Kernel) -> Result<Self> {
        let d = cfg.hidden_size;
        let patch_len = IMAGE_CHANNELS * PATCH_SIZE * PATCH_SIZE;
        let projection = vb.pp("embeddings").pp("patch_embeddings").pp("projection");
        let weight = host(&projection.get((d, IMAGE_CHANNELS, PATCH_SIZE, PATCH_SIZE), "weight")?)?;
        let bias = host(&projection.get(d, "bias")?)?;
        debug_assert_eq!(weight.len(), d * patch_len);
        let layer_vb = vb.pp("encoder").pp("layer");
        let blocks = (0..cfg.num_layers)
            .map(|i| Block::load(kernel, &layer_vb.pp(i), cfg))
            .collect::<Result<Vec<_>>>()?;
        Ok(Self {
            kernel,
            config: cfg.clone(),
            patch: PackedLinear::new(kernel, weight, bias, None),
            blocks,
            norm: Norm::load(&vb.pp("layernorm"), d)?,
        })
    }

    /// `pixels (B, 3, H, W)` → tokens `(B, 1 + N, D)` after the final norm.
    /// `cls` is the CLS token plus its position embedding `(D,)`; `positions`
    /// the patch position embeddings `(N, D)`.
    pub(super) fn forward(
        &self,
        pixels: &[f32],
        (b, h, w): (usize, usize, usize),
        cls: &[f32],
        positions: &[f32],
    ) -> Vec<f32> {
        let kernel = self.kernel;
        let cfg = &self.config;
        let d = cfg.hidden_size;
        let (gh, gw) = (h / PATCH_SIZE, w / PATCH_SIZE);
        let n = gh * gw;
        let t = 1 + n;
        let rows = b * t;
        assert_eq!(
            pixels.len(),
            b * IMAGE_CHANNELS * h * w,
            "pixel buffer size"
        );
        assert_eq!((cls.len(), positions.len()), (d, n * d), "embedding sizes");

        // Embeddings: x = [cls + pos_cls; patches·Wᵀ + pos + b] per image.
        let patch_len = IMAGE_CHANNELS * PATCH_SIZE * PATCH_SIZE;
        let patches = patchify(pixels, (b, h, w));
        let mut x = vec![0.0f32; rows * d];
        for (img, tokens) in x.chunks_exact_mut(t * d).enumerate() {
            let (cls_row, patch_rows) = tokens.split_at_mut(d);
            cls_row.copy_from_slice(cls);
            patch_rows.copy_from_slice(positions);
            let epilogue = Epilogue {
                accumulate: true,
                bias: Bias::PerCol(&self.patch.bias),
                activation: Activation::Identity,
            };
            gemm::gemm(
                kernel,
                Lhs::Source(&MatRef::row_major(
                    &patches[img * n * patch_len..(img + 1) * n * patch_len],
                    n,
                    patch_len,
                )),
                Rhs::Packed(&self.patch.weight),
                MatMut::row_major(patch_rows, n, d),
                &epilogue,
            );
        }

        let mut buf = Buffers {
            qkv: vec![0.0; rows * 3 * d],
            attended: vec![0.0; rows * d],
            attention: AttentionWorkspace::default(),
        };
        let shape = AttentionShape {
            batch: b,
            tokens: t,
            heads: cfg.num_heads,
            head_dim: d / cfg.num_heads,
        };
        let block_rows = FUSED_ROW_PANELS * kernel.mr();
        if let Some(first) = self.blocks.first() {
            first.norm_qkv(kernel, &x, &mut buf.qkv, block_rows);
        }
        for (i, block) in self.blocks.iter().enumerate() {
            attention::multi_head_attention(
                kernel,
                shape,
                &buf.qkv,
                &mut buf.attended,
                &mut buf.attention,
            );
            let next = self.blocks.get(i + 1).map(|n| (n, &mut buf.qkv[..]));
            block.finish_rows(kernel, &buf.attended, &mut x, next, block_rows);
        }
        let mut out = vec![0.0; rows * d];
        self.norm.apply(&x, &mut out);
        out
    }

    /// Floating-point operations of one image's forward at a patch grid of
    /// `n` patches (matrix products only; norms, softmax and GELU excluded).
    pub(super) fn flops(cfg: &Dinov2Config, n: usize) -> f64 {
        let (d, t) = (cfg.hidden_size, 1 + n);
        let patch = gemm::flops(n, IMAGE_CHANNELS * PATCH_SIZE * PATCH_SIZE, d);
        let linear =
            gemm::flops(t, d, 3 * d) + gemm::flops(t, d, d) + 2.0 * gemm::flops(t, d, cfg.mlp_size);
        let attention = AttentionShape {
            batch: 1,
            tokens: t,
            heads: cfg.num_heads,
            head_dim: d / cfg.num_heads,
        }
        .flops();
        patch + cfg.num_layers as f64 * (linear + attention)
    }
}

/// `(B, 3, H, W)` → `(B·N, 3·14·14)`: each row one patch, in the (channel,
/// row, column) order of the convolution kernel.
fn patchify(pixels: &[f32], (b, h, w): (usize, usize, usize)) -> Vec<f32> {
    let (gh, gw) = (h / PATCH_SIZE, w / PATCH_SIZE);
    let patch_len = IMAGE_CHANNELS * PATCH_SIZE * PATCH_SIZE;
    let mut out = vec![0.0f32; b * gh * gw * patch_len];
    for (row, dst) in out.chunks_exact_mut(patch_len).enumerate() {
        let (img, p) = (row / (gh * gw), row % (gh * gw));
        let (py, px) = (p / gw, p % gw);
        for c in 0..IMAGE_CHANNELS {
            let plane = &pixels[(img * IMAGE_CHANNELS + c) * h * w..];
            for y in 0..PATCH_SIZE {
                let src = (py * PATCH_SIZE + y) * w + px * PATCH_SIZE;
                let at = (c * PATCH_SIZE + y) * PATCH_SIZE;
                dst[at..at + PATCH_SIZE].copy_from_slice(&plane[src..src + PATCH_SIZE]);
            }
        }
    }
    out
}
