//! DINOv2 ViT/14 (Oquab et al. 2023) without register tokens, as a frozen
//! feature extractor.
//!
//! Input `(B, 3, H, W)` ImageNet-normalised with `H` and `W` multiples of the
//! patch size 14; output `(B, 1 + N, D)` after the final layer norm, token 0
//! the CLS token and then the `N = (H/14)·(W/14)` patch tokens row-major.
//!
//! Weights use the Hugging Face `facebook/dinov2-*` names; struct fields and
//! `vb.pp` segments repeat those key paths. The pretrained 37×37 position
//! embeddings are resampled to the input's patch grid the way timm does for
//! `dynamic_img_size=True` models (antialiased bicubic, a = −0.5, see
//! [`crate::resample`]), once per input size, and cached.
//!
//! On the CPU with f32 weights the encoder runs on the packed kernels of
//! [`crate::kernels`] (see `vit_cpu`); elsewhere, and in
//! [`Dinov2::new_reference`], it is built from candle operations.

use std::collections::HashMap;
use std::sync::Mutex;

use candle_core::{DType, Module, Result, Tensor, bail};
use candle_nn::{LayerNorm, Linear, VarBuilder};

use super::vit_cpu::CpuEncoder;
use crate::kernels::gemm::Kernel;
use crate::resample::{self, Filter};

/// Side of the square patches, in pixels.
pub const PATCH_SIZE: usize = 14;
/// Patch grid side the position embeddings were trained at (518 / 14).
pub const NATIVE_GRID: usize = 37;
/// Epsilon of every LayerNorm in DINOv2.
pub const LAYER_NORM_EPS: f64 = 1e-6;
/// Input channels (RGB).
const IMAGE_CHANNELS: usize = 3;

/// Architecture hyper-parameters of a DINOv2 ViT.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Dinov2Config {
    pub hidden_size: usize,
    pub num_layers: usize,
    pub num_heads: usize,
    pub mlp_size: usize,
}

impl Dinov2Config {
    /// ViT-S/14: 384 wide, 12 layers, 6 heads, MLP 1536.
    pub fn vit_small() -> Self {
        Self {
            hidden_size: 384,
            num_layers: 12,
            num_heads: 6,
            mlp_size: 1536,
        }
    }

    /// ViT-B/14: 768 wide, 12 layers, 12 heads, MLP 3072.
    pub fn vit_base() -> Self {
        Self {
            hidden_size: 768,
            num_layers: 12,
            num_heads: 12,
            mlp_size: 3072,
        }
    }

    fn head_dim(&self) -> usize {
        self.hidden_size / self.num_heads
    }
}

/// Patch grid `(rows, cols)` of an input size, or an error naming the size.
pub fn patch_grid((h, w): (usize, usize)) -> Result<(usize, usize)> {
    if h == 0 || w == 0 || !h.is_multiple_of(PATCH_SIZE) || !w.is_multiple_of(PATCH_SIZE) {
        bail!("DINOv2 input must be a positive multiple of {PATCH_SIZE} per side, got {h}x{w}")
    }
    Ok((h / PATCH_SIZE, w / PATCH_SIZE))
}

/// `embeddings.patch_embeddings`: a 14×14 stride-14 convolution, computed as
/// one matrix product over flattened patches.
#[derive(Debug, Clone)]
struct PatchEmbeddings {
    /// `projection`, weight reshaped to `(D, 3·14·14)`.
    projection: Linear,
}

impl PatchEmbeddings {
    fn new(vb: VarBuilder, hidden: usize) -> Result<Self> {
        let vb = vb.pp("projection");
        let weight = vb.get((hidden, IMAGE_CHANNELS, PATCH_SIZE, PATCH_SIZE), "weight")?;
        let bias = vb.get(hidden, "bias")?;
        let weight = weight.reshape((hidden, IMAGE_CHANNELS * PATCH_SIZE * PATCH_SIZE))?;
        Ok(Self {
            projection: Linear::new(weight, Some(bias)),
        })
    }

    /// `(B, 3, H, W)` → `(B, N, D)`.
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let (b, c, h, w) = x.dims4()?;
        let (gh, gw) = (h / PATCH_SIZE, w / PATCH_SIZE);
        // (B, C, gh, p, gw, p) → (B, gh, gw, C, p, p): each row one flattened patch,
        // in the (channel, row, column) order of the convolution kernel.
        let patches = x
            .reshape((b, c, gh, PATCH_SIZE, gw, PATCH_SIZE))?
            .permute((0, 2, 4, 1, 3, 5))?
            .contiguous()?
            .reshape((b, gh * gw, c * PATCH_SIZE * PATCH_SIZE))?;
        self.projection.forward(&patches)
    }
}

/// `embeddings`: CLS token, patch embeddings and position embeddings.
#[derive(Debug)]
struct Embeddings {
    /// `cls_token` plus its position embedding, `(1, 1, D)`.
    cls_with_position: Tensor,
    /// The pretrained patch-position grid, `(37, 37, D)` interleaved, for resampling.
    native_grid: Vec<f32>,
    /// `cls_with_position` on the host, `(D,)`.
    cls_with_position_host: Vec<f32>,
    /// The CLS position embedding, `(1, 1, D)`.
    cls_position: Tensor,
    patch_embeddings: PatchEmbeddings,
    /// Position embeddings `(1, 1 + N, D)` per patch grid, filled on first use.
    position_cache: Mutex<HashMap<(usize, usize), Tensor>>,
    hidden: usize,
}

impl Embeddings {
    fn new(vb: VarBuilder, hidden: usize) -> Result<Self> {
        let cls_token = vb.get((1, 1, hidden), "cls_token")?;
        let native_tokens = NATIVE_GRID * NATIVE_GRID;
        let positions = vb.get((1, 1 + native_tokens, hidden), "position_embeddings")?;
        let cls_position = positions.narrow(1, 0, 1)?;
        let native_grid = positions
            .narrow(1, 1, native_tokens)?
            .to_dtype(DType::F32)?
            .flatten_all()?
            .to_vec1()?;
        let cls_with_position = (cls_token + &cls_position)?;
        Ok(Self {
            cls_with_position_host: cls_with_position
                .to_dtype(DType::F32)?
                .flatten_all()?
                .to_vec1()?,
            cls_with_position,
            native_grid,
            cls_position,
            patch_embeddings: PatchEmbeddings::new(vb.pp("patch_embeddings"), hidden)?,
            position_cache: Mutex::new(HashMap::new()),
            hidden,
        })
    }

    /// Position embeddings `(1, 1 + gh·gw, D)` for a patch grid (CLS first).
    fn positions(&self, grid: (usize, usize)) -> Result<Tensor> {
        let mut cache = self
            .position_cache
            .lock()
            .map_err(|_| candle_core::Error::msg("DINOv2 position cache lock poisoned"))?;
        if let Some(table) = cache.get(&grid) {
            return Ok(table.clone());
        }
        let table = self.resample_positions(grid)?;
        cache.insert(grid, table.clone());
        Ok(table)
    }

    fn resample_positions(&self, (gh, gw): (usize, usize)) -> Result<Tensor> {
        let grid = resample::resize(
            &self.native_grid,
            (NATIVE_GRID, NATIVE_GRID),
            self.hidden,
            (gh, gw),
            Filter::Bicubic,
        );
        let dev = self.cls_position.device();
        let grid = Tensor::from_vec(grid, (1, gh * gw, self.hidden), dev)?
            .to_dtype(self.cls_position.dtype())?;
        Tensor::cat(&[&self.cls_position, &grid], 1)
    }

    /// `(B, 3, H, W)` → `(B, 1 + N, D)`.
    fn forward(&self, x: &Tensor, grid: (usize, usize)) -> Result<Tensor> {
        let b = x.dim(0)?;
        let patches = self.patch_embeddings.forward(x)?;
        let positions = self.positions(grid)?;
        let patches = patches.broadcast_add(&positions.narrow(1, 1, grid.0 * grid.1)?)?;
        let cls = self.cls_with_position.broadcast_as((b, 1, self.hidden))?;
        Tensor::cat(&[&cls, &patches], 1)
    }
}

/// `attention`: multi-head self-attention with the query, key and value
/// projections fused into one matrix product.
#[derive(Debug, Clone)]
struct Attention {
    /// `attention.{query,key,value}` stacked: weight `(3D, D)`, bias `(3D,)`.
    qkv: Linear,
    /// `output.dense`.
    dense: Linear,
    num_heads: usize,
    head_dim: usize,
}

impl Attention {
    fn new(vb: VarBuilder, cfg: &Dinov2Config) -> Result<Self> {
        let d = cfg.hidden_size;
        let inner = vb.pp("attention");
        let parts = ["query", "key", "value"]
            .iter()
            .map(|name| candle_nn::linear(d, d, inner.pp(name)))
            .collect::<Result<Vec<_>>>()?;
        let weight = Tensor::cat(&parts.iter().map(|l| l.weight()).collect::<Vec<_>>(), 0)?;
        let biases = parts
            .iter()
            .map(|l| l.bias().cloned())
            .collect::<Option<Vec<_>>>();
        let bias = match biases {
            Some(b) => Some(Tensor::cat(&b, 0)?),
            None => None,
        };
        Ok(Self {
            qkv: Linear::new(weight, bias),
            dense: candle_nn::linear(d, d, vb.pp("output").pp("dense"))?,
            num_heads: cfg.num_heads,
            head_dim: cfg.head_dim(),
        })
    }
}

impl Module for Attention {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let (b, n, d) = x.dims3()?;
        let (heads, hd) = (self.num_heads, self.head_dim);
        // (B, N, 3D) → (3, B, heads, N, hd)
        let qkv = self
            .qkv
            .forward(x)?
            .reshape((b, n, 3, heads, hd))?
            .permute((2, 0, 3, 1, 4))?;
        let scale = 1.0 / (hd as f64).sqrt();
        let q = (qkv.get(0)? * scale)?.contiguous()?;
        let k = qkv.get(1)?.contiguous()?;
        let v = qkv.get(2)?.contiguous()?;
        let weights = candle_nn::ops::softmax_last_dim(&q.matmul(&k.t()?)?)?;
        let out = weights
            .matmul(&v)?
            .transpose(1, 2)?
            .contiguous()?
            .reshape((b, n, d))?;
        self.dense.forward(&out)
    }
}

/// `mlp`: fc1, exact (erf) GELU, fc2.
#[derive(Debug, Clone)]
struct Mlp {
    fc1: Linear,
    fc2: Linear,
}

impl Mlp {
    fn new(vb: VarBuilder, cfg: &Dinov2Config) -> Result<Self> {
        Ok(Self {
            fc1: candle_nn::linear(cfg.hidden_size, cfg.mlp_size, vb.pp("fc1"))?,
            fc2: candle_nn::linear(cfg.mlp_size, cfg.hidden_size, vb.pp("fc2"))?,
        })
    }
}

impl Module for Mlp {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        self.fc2.forward(&self.fc1.forward(x)?.gelu_erf()?)
    }
}

/// `encoder.layer.{i}`: pre-norm transformer block with LayerScale on both branches.
#[derive(Debug, Clone)]
struct Block {
    norm1: LayerNorm,
    attention: Attention,
    /// `layer_scale1.lambda1`, `(D,)`.
    layer_scale1: Tensor,
    norm2: LayerNorm,
    mlp: Mlp,
    /// `layer_scale2.lambda1`, `(D,)`.
    layer_scale2: Tensor,
}

impl Block {
    fn new(vb: VarBuilder, cfg: &Dinov2Config) -> Result<Self> {
        let d = cfg.hidden_size;
        Ok(Self {
            norm1: candle_nn::layer_norm(d, LAYER_NORM_EPS, vb.pp("norm1"))?,
            attention: Attention::new(vb.pp("attention"), cfg)?,
            layer_scale1: vb.pp("layer_scale1").get(d, "lambda1")?,
            norm2: candle_nn::layer_norm(d, LAYER_NORM_EPS, vb.pp("norm2"))?,
            mlp: Mlp::new(vb.pp("mlp"), cfg)?,
            layer_scale2: vb.pp("layer_scale2").get(d, "lambda1")?,
        })
    }
}

impl Module for Block {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let attended = self.attention.forward(&self.norm1.forward(x)?)?;
        let x = (x + attended.broadcast_mul(&self.layer_scale1)?)?;
        let mixed = self.mlp.forward(&self.norm2.forward(&x)?)?;
        x + mixed.broadcast_mul(&self.layer_scale2)?
    }
}

/// The transformer layers and final norm, in one of two implementations.
#[derive(Debug)]
enum Encoder {
    /// candle operations (any device).
    Reference {
        /// `encoder.layer`.
        layers: Vec<Block>,
        /// `layernorm`: the final norm.
        layernorm: LayerNorm,
    },
    /// Packed weights on the CPU kernels (also computes the patch projection).
    Cpu(Box<CpuEncoder>),
}

/// A frozen DINOv2 ViT/14 backbone.
///
/// The position-embedding table for the construction size is resampled up
/// front; a forward at another multiple-of-14 size resamples (once) for that
/// size and keeps it, so one model can serve several input sizes.
#[derive(Debug)]
pub struct Dinov2 {
    embeddings: Embeddings,
    encoder: Encoder,
    config: Dinov2Config,
    input_size: (usize, usize),
}

impl Dinov2 {
    /// Loads a DINOv2 from Hugging Face names (`vb` at the checkpoint root) for
    /// inputs of `input_size = (H, W)` pixels. `embeddings.mask_token` is not read.
    /// f32 weights on the CPU are packed for the CPU kernels.
    pub fn new(vb: VarBuilder, cfg: &Dinov2Config, input_size: (usize, usize)) -> Result<Self> {
        let cpu = vb.device().is_cpu() && vb.dtype() == DType::F32;
        Self::build(vb, cfg, input_size, cpu)
    }

    /// [`Self::new`] built from candle operations whatever the device: the
    /// reference the CPU kernels are tested and timed against.
    pub fn new_reference(
        vb: VarBuilder,
        cfg: &Dinov2Config,
        input_size: (usize, usize),
    ) -> Result<Self> {
        Self::build(vb, cfg, input_size, false)
    }

    fn build(
        vb: VarBuilder,
        cfg: &Dinov2Config,
        input_size: (usize, usize),
        cpu: bool,
    ) -> Result<Self> {
        assert!(
            cfg.num_heads > 0 && cfg.hidden_size.is_multiple_of(cfg.num_heads),
            "hidden size must split evenly over the heads: {cfg:?}"
        );
        let grid = patch_grid(input_size)?;
        let embeddings = Embeddings::new(vb.pp("embeddings"), cfg.hidden_size)?;
        let encoder = if cpu {
            Encoder::Cpu(Box::new(CpuEncoder::load(&vb, cfg, Kernel::best())?))
        } else {
            let layer_vb = vb.pp("encoder").pp("layer");
            let layers = (0..cfg.num_layers)
                .map(|i| Block::new(layer_vb.pp(i), cfg))
                .collect::<Result<Vec<_>>>()?;
            let layernorm =
                candle_nn::layer_norm(cfg.hidden_size, LAYER_NORM_EPS, vb.pp("layernorm"))?;
            Encoder::Reference { layers, layernorm }
        };
        embeddings.positions(grid)?;
        Ok(Self {
            embeddings,
            encoder,
            config: cfg.clone(),
            input_size,
        })
    }

    pub fn config(&self) -> &Dinov2Config {
        &self.config
    }

    /// The `(H, W)` input size the model was built for.
    pub fn input_size(&self) -> (usize, usize) {
        self.input_size
    }

    /// Width of every token.
    pub fn hidden_size(&self) -> usize {
        self.config.hidden_size
    }

    /// The resampled position embeddings `(1, 1 + N, D)` for an `(H, W)` input,
    /// CLS position first.
    pub fn position_embeddings(&self, input_size: (usize, usize)) -> Result<Tensor> {
        self.embeddings.positions(patch_grid(input_size)?)
    }

    /// `(B, 3, H, W)` → `(B, 1 + N, D)` after the final layer norm.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let (b, c, h, w) = x.dims4()?;
        if c != IMAGE_CHANNELS || b == 0 {
            bail!(
                "DINOv2 expects a (B>0, {IMAGE_CHANNELS}, H, W) batch, got {:?}",
                x.dims()
            )
        }
        let grid = patch_grid((h, w))?;
        match &self.encoder {
            Encoder::Reference { layers, layernorm } => {
                let mut tokens = self.embeddings.forward(x, grid)?;
                for layer in layers {
                    tokens = layer.forward(&tokens)?;
                }
                layernorm.forward(&tokens)
            }
            Encoder::Cpu(encoder) => {
                let n = grid.0 * grid.1;
                let pixels: Vec<f32> = x.to_dtype(DType::F32)?.flatten_all()?.to_vec1()?;
                let positions: Vec<f32> = self
                    .embeddings
                    .positions(grid)?
                    .narrow(1, 1, n)?
                    .to_dtype(DType::F32)?
                    .flatten_all()?
                    .to_vec1()?;
                let tokens = encoder.forward(
                    &pixels,
                    (b, h, w),
                    &self.embeddings.cls_with_position_host,
                    &positions,
                );
                Tensor::from_vec(tokens, (b, 1 + n, self.config.hidden_size), x.device())?
                    .to_dtype(x.dtype())
            }
        }
    }

    /// Floating-point operations of one image's forward at `(H, W)`, counting
    /// the matrix products (patch projection, linear layers, attention).
    pub fn forward_flops(cfg: &Dinov2Config, input_size: (usize, usize)) -> Result<f64> {
        let (gh, gw) = patch_grid(input_size)?;
        Ok(CpuEncoder::flops(cfg, gh * gw))
    }

    /// Splits a `forward` output into the CLS tokens `(B, D)` and the patch
    /// tokens `(B, N, D)`.
    pub fn split_cls(tokens: &Tensor) -> Result<(Tensor, Tensor)> {
        let n = tokens.dim(1)?;
        if n < 2 {
            bail!("expected a CLS token and at least one patch token, got {n} tokens")
        }
        Ok((tokens.get_on_dim(1, 0)?, tokens.narrow(1, 1, n - 1)?))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;
    use std::collections::HashMap;

    /// A 2-layer, 8-wide, 2-head DINOv2 with deterministic small weights.
    fn tiny() -> (Dinov2, Dinov2Config) {
        let (vb, cfg) = tiny_weights();
        (Dinov2::new(vb, &cfg, (28, 42)).unwrap(), cfg)
    }

    fn tiny_weights() -> (VarBuilder<'static>, Dinov2Config) {
        let cfg = Dinov2Config {
            hidden_size: 8,
            num_layers: 2,
            num_heads: 2,
            mlp_size: 16,
        };
        let dev = Device::Cpu;
        let mut ts: HashMap<String, Tensor> = HashMap::new();
        let mut counter = 0usize;
        let mut add = |name: String, shape: &[usize]| {
            let n: usize = shape.iter().product();
            let v: Vec<f32> = (0..n)
                .map(|i| (((i + counter) * 7919 % 113) as f32 / 113.0 - 0.5) * 0.2)
                .collect();
            counter += n;
            ts.insert(name, Tensor::from_vec(v, shape, &dev).unwrap());
        };
        let d = cfg.hidden_size;
        add("embeddings.cls_token".into(), &[1, 1, d]);
        add(
            "embeddings.position_embeddings".into(),
            &[1, 1 + NATIVE_GRID * NATIVE_GRID, d],
        );
        add(
            "embeddings.patch_embeddings.projection.weight".into(),
            &[d, 3, PATCH_SIZE, PATCH_SIZE],
        );
        add("embeddings.patch_embeddings.projection.bias".into(), &[d]);
        for i in 0..cfg.num_layers {
            let p = format!("encoder.layer.{i}");
            for lin in [
                "attention.attention.query",
                "attention.attention.key",
                "attention.attention.value",
                "attention.output.dense",
            ] {
                add(format!("{p}.{lin}.weight"), &[d, d]);
                add(format!("{p}.{lin}.bias"), &[d]);
            }
            for n in ["norm1", "norm2"] {
                add(format!("{p}.{n}.weight"), &[d]);
                add(format!("{p}.{n}.bias"), &[d]);
            }
            add(format!("{p}.layer_scale1.lambda1"), &[d]);
            add(format!("{p}.layer_scale2.lambda1"), &[d]);
            add(format!("{p}.mlp.fc1.weight"), &[cfg.mlp_size, d]);
            add(format!("{p}.mlp.fc1.bias"), &[cfg.mlp_size]);
            add(format!("{p}.mlp.fc2.weight"), &[d, cfg.mlp_size]);
            add(format!("{p}.mlp.fc2.bias"), &[d]);
        }
        add("layernorm.weight".into(), &[d]);
        add("layernorm.bias".into(), &[d]);
        (VarBuilder::from_tensors(ts, DType::F32, &dev), cfg)
    }

    #[test]
    fn cpu_kernels_match_the_candle_reference() {
        let (vb, cfg) = tiny_weights();
        let fast = Dinov2::new(vb.clone(), &cfg, (28, 42)).unwrap();
        assert!(matches!(fast.encoder, Encoder::Cpu(_)));
        let reference = Dinov2::new_reference(vb, &cfg, (28, 42)).unwrap();
        assert!(matches!(reference.encoder, Encoder::Reference { .. }));
        let n = 2 * 3 * 28 * 42;
        let x = Tensor::from_vec(
            (0..n)
                .map(|i| ((i * 31 % 97) as f32 / 97.0 - 0.5) * 2.0)
                .collect::<Vec<_>>(),
            (2, 3, 28, 42),
            &Device::Cpu,
        )
        .unwrap();
        let a = fast.forward(&x).unwrap();
        let b = reference.forward(&x).unwrap();
        assert_eq!(a.dims(), b.dims());
        let diff = (&a - &b)
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        assert!(diff < 1e-5, "{diff}");
        // Images of a batch are independent: the second image alone gives its rows.
        let single = fast.forward(&x.narrow(0, 1, 1).unwrap()).unwrap();
        let from_batch = a.narrow(0, 1, 1).unwrap();
        assert!(crate::backbone::synthetic::bitwise_equal(
            &single,
            &from_batch
        ));
        // The same bits whatever the number of threads.
        for threads in [1, 3] {
            let other =
                crate::backbone::synthetic::with_threads(threads, || fast.forward(&x).unwrap());
            assert!(
                crate::backbone::synthetic::bitwise_equal(&other, &a),
                "{threads} threads"
            );
        }
        assert!(Dinov2::forward_flops(&cfg, (28, 42)).unwrap() > 0.0);
    }

    #[test]
    fn output_has_cls_plus_patch_tokens() {
        let (model, cfg) = tiny();
        let x = Tensor::zeros((2, 3, 28, 42), DType::F32, &Device::Cpu).unwrap();
        let y = model.forward(&x).unwrap();
        assert_eq!(y.dims(), &[2, 1 + 2 * 3, cfg.hidden_size]);
        let (cls, patches) = Dinov2::split_cls(&y).unwrap();
        assert_eq!(cls.dims(), &[2, cfg.hidden_size]);
        assert_eq!(patches.dims(), &[2, 2 * 3, cfg.hidden_size]);
        let first: Vec<f32> = y.get(1).unwrap().get(0).unwrap().to_vec1().unwrap();
        assert_eq!(cls.get(1).unwrap().to_vec1::<f32>().unwrap(), first);
    }

    #[test]
    fn rejects_sizes_that_are_not_multiples_of_the_patch() {
        let (model, _) = tiny();
        let x = Tensor::zeros((1, 3, 28, 43), DType::F32, &Device::Cpu).unwrap();
        let err = model.forward(&x).unwrap_err().to_string();
        assert!(err.contains("28x43"), "{err}");
        assert!(patch_grid((0, 14)).is_err());
    }

    #[test]
    fn another_size_resamples_and_caches_its_table() {
        let (model, cfg) = tiny();
        let x = Tensor::zeros((1, 3, 14, 14), DType::F32, &Device::Cpu).unwrap();
        assert_eq!(model.forward(&x).unwrap().dims(), &[1, 2, cfg.hidden_size]);
        let cached = model.embeddings.position_cache.lock().unwrap();
        assert!(cached.contains_key(&(2, 3)) && cached.contains_key(&(1, 1)));
    }

    #[test]
    fn native_grid_keeps_the_pretrained_table() {
        let (model, _) = tiny();
        let side = NATIVE_GRID * PATCH_SIZE;
        let table = model.position_embeddings((side, side)).unwrap();
        let native = Tensor::from_vec(
            model.embeddings.native_grid.clone(),
            (1, NATIVE_GRID * NATIVE_GRID, 8),
            &Device::Cpu,
        )
        .unwrap();
        let diff = (table.narrow(1, 1, NATIVE_GRID * NATIVE_GRID).unwrap() - native)
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
    fn patch_embedding_matches_a_strided_convolution() {
        let (model, cfg) = tiny();
        let dev = Device::Cpu;
        let n = 3 * 28 * 42;
        let x = Tensor::from_vec(
            (0..n).map(|i| (i % 17) as f32 / 17.0).collect::<Vec<_>>(),
            (1, 3, 28, 42),
            &dev,
        )
        .unwrap();
        let got = model.embeddings.patch_embeddings.forward(&x).unwrap();
        let lin = &model.embeddings.patch_embeddings.projection;
        let w = lin
            .weight()
            .reshape((cfg.hidden_size, 3, PATCH_SIZE, PATCH_SIZE))
            .unwrap();
        let conv = x.conv2d(&w, 0, PATCH_SIZE, 1, 1).unwrap();
        let conv = conv
            .broadcast_add(
                &lin.bias()
                    .unwrap()
                    .reshape((1, cfg.hidden_size, 1, 1))
                    .unwrap(),
            )
            .unwrap()
            .flatten_from(2)
            .unwrap()
            .transpose(1, 2)
            .unwrap();
        let diff = (got - conv)
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        assert!(diff < 1e-5, "{diff}");
    }
}
