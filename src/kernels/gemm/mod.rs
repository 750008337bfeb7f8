//! Packed single-precision matrix product `C (m×n) (+)= A (m×k) · B (k×n)`
//! with a fused epilogue (bias, activation), in the Goto/BLIS scheme.
//!
//! - The depth k is cut into blocks of at most [`DEPTH_BLOCK_MAX`] (equal
//!   sizes, a function of k alone). For each depth block, A is packed into
//!   row panels of `MR` rows (`kc × MR`, k-major) and B into column panels of
//!   `NR` columns (`kc × NR`); a register-blocked micro-kernel multiplies one
//!   A panel by one B panel into an `MR × NR` tile of C.
//! - Either operand can be packed once up front ([`PackedA`], [`PackedB`]:
//!   frozen weights) or packed on the fly from any [`LhsSource`] /
//!   [`RhsSource`] ([`MatRef`] for strided matrices; a convolution supplies
//!   its own im2col source).
//! - Threads (rayon) split C into blocks of row and column panels. The depth
//!   is never split across threads: every element of C is summed in the same
//!   order whatever the thread count and tiling, so results are bitwise
//!   independent of the number of threads.
//!
//! Micro-kernels ([`Kernel`]): AVX-512F 14×32 and AVX2+FMA 6×16 on x86-64
//! (chosen at run time), a portable 4×8 elsewhere. Different kernels round
//! differently (fused or unfused multiply-add), so results are reproducible
//! per kernel, not across kernels.

mod interleave;
mod microkernel;

use std::cell::RefCell;
use std::marker::PhantomData;
use std::sync::OnceLock;

use rayon::prelude::*;

use super::aligned::AlignedBuf;
use super::vector;
use microkernel::KernelFn;

/// Largest depth block; `kc × NR` B panels then stay in the L1 cache.
pub const DEPTH_BLOCK_MAX: usize = 256;
/// Most row panels per thread task when tasks split rows (14 × 8 = 112
/// rows for AVX-512: an A block of 112 × 256 floats stays in L2).
const TASK_ROW_PANELS: usize = 8;
/// Most column panels per thread task when tasks split columns.
const TASK_COL_PANELS: usize = 8;
/// Most rows a panel packer gathers at once (≥ every kernel's MR).
const MAX_PACK_ROWS: usize = 16;
/// Most columns a panel packer gathers at once (≥ every kernel's NR).
const MAX_PACK_COLS: usize = 32;
/// A parallel product is cut into at least this many tasks per thread, when
/// the matrix allows, so that work stealing can even out the load.
const TASKS_PER_THREAD: usize = 3;

/// A micro-kernel and its tile shape.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kernel {
    /// AVX-512F, 14 × 32 tiles.
    Avx512,
    /// AVX2 + FMA, 6 × 16 tiles.
    Avx2,
    /// Plain Rust, 4 × 8 tiles.
    Portable,
}

impl Kernel {
    /// The fastest kernel this CPU supports (detected once).
    pub fn best() -> Self {
        static BEST: OnceLock<Kernel> = OnceLock::new();
        *BEST.get_or_init(|| Self::available()[0])
    }

    /// Every kernel this CPU supports, fastest first.
    pub fn available() -> Vec<Self> {
        let mut kernels = Vec::new();
        #[cfg(target_arch = "x86_64")]
        {
            if std::arch::is_x86_feature_detected!("avx512f") {
                kernels.push(Kernel::Avx512);
            }
            if std::arch::is_x86_feature_detected!("avx2")
                && std::arch::is_x86_feature_detected!("fma")
            {
                kernels.push(Kernel::Avx2);
            }
        }
        kernels.push(Kernel::Portable);
        kernels
    }

    /// Rows of a tile.
    pub fn mr(self) -> usize {
        match self {
            #[cfg(target_arch = "x86_64")]
            Kernel::Avx512 => microkernel::avx512::MR,
            #[cfg(target_arch = "x86_64")]
            Kernel::Avx2 => microkernel::avx2::MR,
            _ => microkernel::portable::MR,
        }
    }

    /// Columns of a tile.
    pub fn nr(self) -> usize {
        match self {
            #[cfg(target_arch = "x86_64")]
            Kernel::Avx512 => microkernel::avx512::NR,
            #[cfg(target_arch = "x86_64")]
            Kernel::Avx2 => microkernel::avx2::NR,
            _ => microkernel::portable::NR,
        }
    }

    fn function(self) -> KernelFn {
        match self {
            #[cfg(target_arch = "x86_64")]
            Kernel::Avx512 => microkernel::avx512::kernel,
            #[cfg(target_arch = "x86_64")]
            Kernel::Avx2 => microkernel::avx2::kernel,
            _ => microkernel::portable::kernel,
        }
    }

    fn assert_supported(self) {
        assert!(
            Self::available().contains(&self),
            "GEMM kernel {self:?} is not supported by this CPU"
        );
    }
}

/// The depth blocks of a product of depth `k`: `count` blocks of `size`
/// (the last one possibly shorter).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct DepthBlocks {
    count: usize,
    size: usize,
    depth: usize,
}

impl DepthBlocks {
    fn new(depth: usize) -> Self {
        let count = depth.div_ceil(DEPTH_BLOCK_MAX).max(1);
        Self {
            count,
            size: depth.div_ceil(count).max(1),
            depth,
        }
    }

    /// `(k0, kc)` of block `b`.
    fn get(&self, b: usize) -> (usize, usize) {
        let k0 = b * self.size;
        (k0, self.size.min(self.depth - k0))
    }
}

/// A left operand that can pack its row panels.
pub trait LhsSource: Sync {
    fn rows(&self) -> usize;
    fn depth(&self) -> usize;
    /// Writes rows `i0 .. i0 + mr` over depths `k0 .. k0 + kc` to
    /// `dst[k·mr + r]`, with zeros for rows past the end.
    fn pack(&self, i0: usize, mr: usize, k0: usize, kc: usize, dst: &mut [f32]);
}

/// A right operand that can pack its column panels.
pub trait RhsSource: Sync {
    fn cols(&self) -> usize;
    fn depth(&self) -> usize;
    /// Writes columns `j0 .. j0 + nr` over depths `k0 .. k0 + kc` to
    /// `dst[k·nr + j]`, with zeros for columns past the end.
    fn pack(&self, j0: usize, nr: usize, k0: usize, kc: usize, dst: &mut [f32]);
}

/// A read-only strided matrix view: element `(i, j)` at
/// `data[i·row_stride + j·col_stride]`.
#[derive(Debug, Clone, Copy)]
pub struct MatRef<'a> {
    data: &'a [f32],
    rows: usize,
    cols: usize,
    row_stride: usize,
    col_stride: usize,
}

impl<'a> MatRef<'a> {
    /// A strided view; panics if an element lies outside `data`.
    pub fn new(
        data: &'a [f32],
        rows: usize,
        cols: usize,
        row_stride: usize,
        col_stride: usize,
    ) -> Self {
        if rows > 0 && cols > 0 {
            let last = (rows - 1) * row_stride + (cols - 1) * col_stride;
            assert!(
                last < data.len(),
                "{rows}x{cols} view (strides {row_stride}, {col_stride}) exceeds {} elements",
                data.len()
            );
        }
        Self {
            data,
            rows,
            cols,
            row_stride,
            col_stride,
        }
    }

    /// A contiguous row-major `rows × cols` matrix.
    pub fn row_major(data: &'a [f32], rows: usize, cols: usize) -> Self {
        Self::new(data, rows, cols, cols, 1)
    }

    /// The transposed view (no copy).
    pub fn t(self) -> Self {
        Self {
            data: self.data,
            rows: self.cols,
            cols: self.rows,
            row_stride: self.col_stride,
            col_stride: self.row_stride,
        }
    }

    pub fn rows(&self) -> usize {
        self.rows
    }

    pub fn cols(&self) -> usize {
        self.cols
    }

    fn at(&self, i: usize, j: usize) -> f32 {
        self.data[i * self.row_stride + j * self.col_stride]
    }
}

impl LhsSource for MatRef<'_> {
    fn rows(&self) -> usize {
        self.rows
    }

    fn depth(&self) -> usize {
        self.cols
    }

    fn pack(&self, i0: usize, mr: usize, k0: usize, kc: usize, dst: &mut [f32]) {
        #[cfg(target_arch = "x86_64")]
        if std::arch::is_x86_feature_detected!("avx512f") {
            // SAFETY: the CPU supports AVX-512F (checked just above).
            return unsafe { self.pack_rows_avx512((i0, mr, k0, kc), dst) };
        }
        self.pack_rows((i0, mr, k0, kc), dst)
    }
}

impl MatRef<'_> {
    /// [`LhsSource::pack`] compiled for AVX-512 (short fixed-size copies
    /// become vector moves instead of `memcpy` calls).
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx512f")]
    fn pack_rows_avx512(&self, panel: (usize, usize, usize, usize), dst: &mut [f32]) {
        self.pack_rows(panel, dst)
    }

    /// [`RhsSource::pack`] compiled for AVX-512.
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx512f")]
    fn pack_cols_avx512(&self, panel: (usize, usize, usize, usize), dst: &mut [f32]) {
        self.pack_cols(panel, dst, |src, dst| vector::copy_avx512(src, dst))
    }

    #[inline(always)]
    fn pack_rows(&self, (i0, mr, k0, kc): (usize, usize, usize, usize), dst: &mut [f32]) {
        let dst = &mut dst[..kc * mr];
        let valid = mr.min(self.rows.saturating_sub(i0));
        if self.col_stride == 1 && mr <= MAX_PACK_ROWS {
            let mut rows = [&[][..]; MAX_PACK_ROWS];
            for (r, row) in rows[..valid].iter_mut().enumerate() {
                let start = (i0 + r) * self.row_stride + k0;
                *row = &self.data[start..start + kc];
            }
            interleave::interleave(&rows[..valid], kc, mr, dst);
            return;
        }
        if self.row_stride == 1 {
            // Column-major: each k holds the panel's rows contiguously.
            for (k, out) in dst.chunks_exact_mut(mr).enumerate() {
                let start = (k0 + k) * self.col_stride + i0;
                out[..valid].copy_from_slice(&self.data[start..start + valid]);
                out[valid..].fill(0.0);
            }
            return;
        }
        for r in 0..mr {
            for k in 0..kc {
                dst[k * mr + r] = if r < valid {
                    self.at(i0 + r, k0 + k)
                } else {
                    0.0
                };
            }
        }
    }
}

impl RhsSource for MatRef<'_> {
    fn cols(&self) -> usize {
        self.cols
    }

    fn depth(&self) -> usize {
        self.rows
    }

    fn pack(&self, j0: usize, nr: usize, k0: usize, kc: usize, dst: &mut [f32]) {
        #[cfg(target_arch = "x86_64")]
        if std::arch::is_x86_feature_detected!("avx512f") {
            // SAFETY: the CPU supports AVX-512F (checked just above).
            return unsafe { self.pack_cols_avx512((j0, nr, k0, kc), dst) };
        }
        self.pack_cols((j0, nr, k0, kc), dst, |src, dst| dst.copy_from_slice(src))
    }
}

impl MatRef<'_> {
    /// The column-panel packer, with the copy of one contiguous row supplied.
    #[inline(always)]
    fn pack_cols(
        &self,
        (j0, nr, k0, kc): (usize, usize, usize, usize),
        dst: &mut [f32],
        copy: impl Fn(&[f32], &mut [f32]),
    ) {
        let valid = nr.min(self.cols.saturating_sub(j0));
        if self.row_stride == 1 && self.col_stride != 1 && nr <= MAX_PACK_COLS {
            // B stored transposed: each column is contiguous along k.
            let mut cols = [&[][..]; MAX_PACK_COLS];
            for (j, col) in cols[..valid].iter_mut().enumerate() {
                let start = (j0 + j) * self.col_stride + k0;
                *col = &self.data[start..start + kc];
            }
            interleave::interleave(&cols[..valid], kc, nr, dst);
            return;
        }
        for (k, out) in dst[..kc * nr].chunks_exact_mut(nr).enumerate() {
            let row = k0 + k;
            if self.col_stride == 1 {
                let start = row * self.row_stride + j0;
                copy(&self.data[start..start + valid], &mut out[..valid]);
            } else {
                for (j, o) in out[..valid].iter_mut().enumerate() {
                    *o = self.at(row, j0 + j);
                }
            }
            out[valid..].fill(0.0);
        }
    }
}

/// Layout shared by the packed operands: for each depth block, the panels
/// (`kc × width` each) one after another.
fn panel_offset(
    blocks: &DepthBlocks,
    panels: usize,
    width: usize,
    block: usize,
    panel: usize,
) -> usize {
    let (k0, kc) = blocks.get(block);
    (k0 * panels + panel * kc) * width
}

/// A left operand packed once for a kernel (frozen weights).
#[derive(Debug, Clone)]
pub struct PackedA {
    kernel: Kernel,
    rows: usize,
    depth: usize,
    data: AlignedBuf,
}

impl PackedA {
    /// Packs `src` for `kernel`.
    pub fn new(kernel: Kernel, src: &dyn LhsSource) -> Self {
        let mut packed = Self::with_size(kernel, src.rows(), src.depth());
        packed.repack(src);
        packed
    }

    /// An all-zero packed operand of the given size, to be filled by [`Self::repack`].
    pub fn with_size(kernel: Kernel, rows: usize, depth: usize) -> Self {
        let mr = kernel.mr();
        Self {
            kernel,
            rows,
            depth,
            data: AlignedBuf::zeros(rows.div_ceil(mr) * mr * depth),
        }
    }

    /// Packs `src` (of the same size) into this buffer, reusing its memory.
    pub fn repack(&mut self, src: &dyn LhsSource) {
        assert_eq!(
            (src.rows(), src.depth()),
            (self.rows, self.depth),
            "repack with a differently sized operand"
        );
        let mr = self.kernel.mr();
        let panels = self.rows.div_ceil(mr);
        let blocks = DepthBlocks::new(self.depth);
        for b in 0..blocks.count {
            let (k0, kc) = blocks.get(b);
            for p in 0..panels {
                let off = panel_offset(&blocks, panels, mr, b, p);
                src.pack(
                    p * mr,
                    mr,
                    k0,
                    kc,
                    &mut self.data.as_mut_slice()[off..off + kc * mr],
                );
            }
        }
    }

    pub fn rows(&self) -> usize {
        self.rows
    }

    pub fn depth(&self) -> usize {
        self.depth
    }

    pub fn kernel(&self) -> Kernel {
        self.kernel
    }
}

/// A right operand packed once for a kernel (frozen weights, or a matrix
/// reused by many products).
#[derive(Debug, Clone)]
pub struct PackedB {
    kernel: Kernel,
    cols: usize,
    depth: usize,
    data: AlignedBuf,
}

impl PackedB {
    /// Packs `src` for `kernel`.
    pub fn new(kernel: Kernel, src: &dyn RhsSource) -> Self {
        let mut packed = Self::with_size(kernel, src.depth(), src.cols());
        packed.repack(src);
        packed
    }

    /// An all-zero packed operand of the given size, to be filled by [`Self::repack`].
    pub fn with_size(kernel: Kernel, depth: usize, cols: usize) -> Self {
        let nr = kernel.nr();
        Self {
            kernel,
            cols,
            depth,
            data: AlignedBuf::zeros(cols.div_ceil(nr) * nr * depth),
        }
    }

    /// Packs `src` (of the same size) into this buffer, reusing its memory.
    pub fn repack(&mut self, src: &dyn RhsSource) {
        assert_eq!(
            (src.depth(), src.cols()),
            (self.depth, self.cols),
            "repack with a differently sized operand"
        );
        let nr = self.kernel.nr();
        let panels = self.cols.div_ceil(nr);
        let blocks = DepthBlocks::new(self.depth);
        for b in 0..blocks.count {
            let (k0, kc) = blocks.get(b);
            for p in 0..panels {
                let off = panel_offset(&blocks, panels, nr, b, p);
                src.pack(
                    p * nr,
                    nr,
                    k0,
                    kc,
                    &mut self.data.as_mut_slice()[off..off + kc * nr],
                );
            }
        }
    }

    pub fn cols(&self) -> usize {
        self.cols
    }

    pub fn depth(&self) -> usize {
        self.depth
    }

    pub fn kernel(&self) -> Kernel {
        self.kernel
    }

    /// For an operand of one panel (`cols ≤ NR`), its storage as a
    /// row-major `depth × NR` matrix that can be written directly (a single
    /// panel is stored row by row across the depth blocks). Columns past
    /// `cols` take part in the products, so only columns of the result past
    /// `cols` depend on them. `None` for wider operands.
    pub fn single_panel_mut(&mut self) -> Option<&mut [f32]> {
        (self.cols <= self.kernel.nr()).then(|| self.data.as_mut_slice())
    }
}

/// The left operand of a product.
#[derive(Clone, Copy)]
pub enum Lhs<'a> {
    Packed(&'a PackedA),
    Source(&'a dyn LhsSource),
}

impl Lhs<'_> {
    fn rows(&self) -> usize {
        match self {
            Lhs::Packed(p) => p.rows,
            Lhs::Source(s) => s.rows(),
        }
    }

    fn depth(&self) -> usize {
        match self {
            Lhs::Packed(p) => p.depth,
            Lhs::Source(s) => s.depth(),
        }
    }
}

/// The right operand of a product.
#[derive(Clone, Copy)]
pub enum Rhs<'a> {
    Packed(&'a PackedB),
    Source(&'a dyn RhsSource),
}

impl Rhs<'_> {
    fn cols(&self) -> usize {
        match self {
            Rhs::Packed(p) => p.cols,
            Rhs::Source(s) => s.cols(),
        }
    }

    fn depth(&self) -> usize {
        match self {
            Rhs::Packed(p) => p.depth,
            Rhs::Source(s) => s.depth(),
        }
    }
}

/// The output matrix: `rows × cols`, row-major with a row stride, columns
/// contiguous.
pub struct MatMut<'a> {
    ptr: *mut f32,
    rows: usize,
    cols: usize,
    row_stride: usize,
    _data: PhantomData<&'a mut [f32]>,
}

// SAFETY: `MatMut` is a `&mut [f32]` in disguise; the driver hands disjoint
// tiles to different threads.
unsafe impl Send for MatMut<'_> {}
// SAFETY: as above; shared references only reach disjoint tiles.
unsafe impl Sync for MatMut<'_> {}

impl<'a> MatMut<'a> {
    /// A view of `data`; panics if a row runs past its end.
    pub fn new(data: &'a mut [f32], rows: usize, cols: usize, row_stride: usize) -> Self {
        assert!(cols <= row_stride || rows <= 1, "rows overlap");
        if rows > 0 && cols > 0 {
            assert!(
                (rows - 1) * row_stride + cols <= data.len(),
                "{rows}x{cols} output (row stride {row_stride}) exceeds {} elements",
                data.len()
            );
        }
        Self {
            ptr: data.as_mut_ptr(),
            rows,
            cols,
            row_stride,
            _data: PhantomData,
        }
    }

    /// A view from a raw pointer, for writing disjoint parts of one matrix
    /// from several threads.
    ///
    /// # Safety
    /// The `rows × cols` elements at `ptr + i·row_stride + j` must be valid
    /// for writes for `'a`, and nothing else may access them meanwhile.
    pub unsafe fn from_raw_parts(
        ptr: *mut f32,
        rows: usize,
        cols: usize,
        row_stride: usize,
    ) -> Self {
        Self {
            ptr,
            rows,
            cols,
            row_stride,
            _data: PhantomData,
        }
    }

    /// A contiguous row-major `rows × cols` output.
    pub fn row_major(data: &'a mut [f32], rows: usize, cols: usize) -> Self {
        Self::new(data, rows, cols, cols)
    }

    /// Pointer to element `(i, j)`; in bounds for `i < rows`, `j ≤ cols`.
    fn at(&self, i: usize, j: usize) -> *mut f32 {
        // SAFETY: within the allocation checked in `new`.
        unsafe { self.ptr.add(i * self.row_stride + j) }
    }
}

/// Bias added to the product.
#[derive(Debug, Clone, Copy)]
pub enum Bias<'a> {
    None,
    /// One value per row of C (`m` values): a convolution's output channels.
    PerRow(&'a [f32]),
    /// One value per column of C (`n` values): a linear layer's outputs.
    PerCol(&'a [f32]),
}

/// Element-wise activation applied last.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Activation {
    Identity,
    Relu,
    /// `min(max(x, 0), 6)`.
    Relu6,
    /// `x · Φ(x)` with the exact (erf) normal CDF.
    GeluErf,
}

/// What happens to each element after the sum: `C = act((C_old if
/// accumulate) + A·B + bias)`, evaluated as `act((Σ + C_old) + bias)`.
#[derive(Debug, Clone, Copy)]
pub struct Epilogue<'a> {
    /// Add the product to C's previous contents (a residual connection).
    pub accumulate: bool,
    pub bias: Bias<'a>,
    pub activation: Activation,
}

impl Default for Epilogue<'_> {
    fn default() -> Self {
        Self {
            accumulate: false,
            bias: Bias::None,
            activation: Activation::Identity,
        }
    }
}

/// Upper bound of ReLU6.
const RELU6_MAX: f32 = 6.0;

impl Epilogue<'_> {
    fn is_trivial(&self) -> bool {
        matches!(self.bias, Bias::None) && self.activation == Activation::Identity
    }

    /// Applies bias and activation to the `row`-th row of C over columns `j0 ..`.
    #[inline(always)]
    fn finish_row(&self, row: usize, j0: usize, values: &mut [f32]) {
        match self.bias {
            Bias::None => {}
            Bias::PerRow(b) => {
                let b = b[row];
                values.iter_mut().for_each(|v| *v += b);
            }
            Bias::PerCol(b) => {
                for (v, &b) in values.iter_mut().zip(&b[j0..]) {
                    *v += b;
                }
            }
        }
        match self.activation {
            Activation::Identity => {}
            Activation::Relu => values.iter_mut().for_each(|v| *v = v.max(0.0)),
            Activation::Relu6 => values.iter_mut().for_each(|v| *v = v.clamp(0.0, RELU6_MAX)),
            Activation::GeluErf => vector::gelu_erf_in_place(values),
        }
    }
}

/// `(row panels, column panels)` per task. Tasks span the whole width of
/// the pre-packed side, so that the operand packed on the fly is packed only
/// once: rows are split (each task packs its rows of A once), or columns
/// when only B is packed on the fly. The other side is split as well only
/// when there are too few tasks for the threads. The shape never changes
/// any result.
fn task_shape(
    row_panels: usize,
    col_panels: usize,
    split_cols: bool,
    threads: usize,
) -> (usize, usize) {
    let wanted = if threads > 1 {
        threads * TASKS_PER_THREAD
    } else {
        1
    };
    let split = |panels: usize, most: usize, tasks: usize| panels.div_ceil(tasks).clamp(1, most);
    let (outer, inner, most) = if split_cols {
        (col_panels, row_panels, TASK_COL_PANELS)
    } else {
        (row_panels, col_panels, TASK_ROW_PANELS)
    };
    let per_outer = split(outer, most, wanted);
    let outer_tasks = outer.div_ceil(per_outer);
    let per_inner = if outer_tasks >= wanted {
        inner.max(1)
    } else {
        split(inner, inner.max(1), wanted.div_ceil(outer_tasks))
    };
    if split_cols {
        (per_inner, per_outer)
    } else {
        (per_outer, per_inner)
    }
}

/// Per-thread packing buffers, reused across calls.
#[derive(Default)]
struct Scratch {
    a: AlignedBuf,
    b: AlignedBuf,
    tile: AlignedBuf,
}

thread_local! {
    static SCRATCH: RefCell<Scratch> = RefCell::new(Scratch::default());
}

/// A validated product, cut into tasks of row × column panel blocks.
struct Plan<'a> {
    kernel: Kernel,
    lhs: Lhs<'a>,
    rhs: Rhs<'a>,
    out: MatMut<'a>,
    epilogue: &'a Epilogue<'a>,
    blocks: DepthBlocks,
    row_panels: usize,
    col_panels: usize,
    task_row_panels: usize,
    task_col_panels: usize,
}

impl<'a> Plan<'a> {
    fn new(
        kernel: Kernel,
        lhs: Lhs<'a>,
        rhs: Rhs<'a>,
        out: MatMut<'a>,
        epilogue: &'a Epilogue<'a>,
        threads: usize,
    ) -> Self {
        kernel.assert_supported();
        let (m, k, n) = (lhs.rows(), lhs.depth(), rhs.cols());
        assert_eq!(
            k,
            rhs.depth(),
            "inner dimensions differ: {m}x{k} · {}x{n}",
            rhs.depth()
        );
        assert_eq!((out.rows, out.cols), (m, n), "output is not {m}x{n}");
        if let Lhs::Packed(p) = lhs {
            assert_eq!(p.kernel, kernel, "A was packed for another kernel");
        }
        if let Rhs::Packed(p) = rhs {
            assert_eq!(p.kernel, kernel, "B was packed for another kernel");
        }
        match epilogue.bias {
            Bias::PerRow(b) => assert_eq!(b.len(), m, "row bias length"),
            Bias::PerCol(b) => assert_eq!(b.len(), n, "column bias length"),
            Bias::None => {}
        }
        let row_panels = m.div_ceil(kernel.mr());
        let col_panels = n.div_ceil(kernel.nr());
        let (task_row_panels, task_col_panels) = task_shape(
            row_panels,
            col_panels,
            matches!(rhs, Rhs::Source(_)) && matches!(lhs, Lhs::Packed(_)),
            threads,
        );
        Self {
            kernel,
            lhs,
            rhs,
            out,
            epilogue,
            blocks: DepthBlocks::new(k),
            row_panels,
            col_panels,
            task_row_panels,
            task_col_panels,
        }
    }

    fn task_count(&self) -> usize {
        self.row_panels.div_ceil(self.task_row_panels)
            * self.col_panels.div_ceil(self.task_col_panels)
    }

    fn run_task(&self, task: usize, scratch: &mut Scratch) {
        let row_tasks = self.row_panels.div_ceil(self.task_row_panels);
        let (rt, ct) = (task % row_tasks, task / row_tasks);
        let p0 = rt * self.task_row_panels;
        let p1 = (p0 + self.task_row_panels).min(self.row_panels);
        let q0 = ct * self.task_col_panels;
        let q1 = (q0 + self.task_col_panels).min(self.col_panels);
        let (mr, nr) = (self.kernel.mr(), self.kernel.nr());
        let (m, n) = (self.out.rows, self.out.cols);
        let kernel = self.kernel.function();
        let Scratch { a, b, tile } = scratch;
        tile.ensure(mr * nr);

        for block in 0..self.blocks.count {
            let (k0, kc) = self.blocks.get(block);
            let a_block: &[f32] = match self.lhs {
                Lhs::Packed(p) => {
                    let start = panel_offset(&self.blocks, self.row_panels, mr, block, p0);
                    &p.data.as_slice()[start..start + (p1 - p0) * kc * mr]
                }
                Lhs::Source(s) => {
                    a.ensure((p1 - p0) * kc * mr);
                    let buf = a.as_mut_slice();
                    for p in p0..p1 {
                        let off = (p - p0) * kc * mr;
                        s.pack(p * mr, mr, k0, kc, &mut buf[off..off + kc * mr]);
                    }
                    &a.as_slice()[..(p1 - p0) * kc * mr]
                }
            };
            let b_block: &[f32] = match self.rhs {
                Rhs::Packed(p) => {
                    let start = panel_offset(&self.blocks, self.col_panels, nr, block, q0);
                    &p.data.as_slice()[start..start + (q1 - q0) * kc * nr]
                }
                Rhs::Source(s) => {
                    b.ensure((q1 - q0) * kc * nr);
                    let buf = b.as_mut_slice();
                    for q in q0..q1 {
                        let off = (q - q0) * kc * nr;
                        s.pack(q * nr, nr, k0, kc, &mut buf[off..off + kc * nr]);
                    }
                    &b.as_slice()[..(q1 - q0) * kc * nr]
                }
            };
            let load_c = block > 0 || self.epilogue.accumulate;
            let last = block + 1 == self.blocks.count;
            for q in q0..q1 {
                let b_panel = &b_block[(q - q0) * kc * nr..(q - q0 + 1) * kc * nr];
                let j0 = q * nr;
                let nv = nr.min(n - j0);
                for p in p0..p1 {
                    let a_panel = &a_block[(p - p0) * kc * mr..(p - p0 + 1) * kc * mr];
                    let i0 = p * mr;
                    let mv = mr.min(m - i0);
                    if mv == mr && nv == nr {
                        // SAFETY: the panels hold kc·mr and kc·nr floats; the
                        // full tile lies inside C (checked by MatMut::new), and
                        // no other task writes it.
                        unsafe {
                            kernel(
                                kc,
                                a_panel.as_ptr(),
                                b_panel.as_ptr(),
                                self.out.at(i0, j0),
                                self.out.row_stride,
                                load_c,
                            )
                        };
                    } else {
                        self.edge_tile(
                            kernel,
                            kc,
                            a_panel,
                            b_panel,
                            (i0, j0),
                            (mv, nv),
                            load_c,
                            tile,
                        );
                    }
                    if last && !self.epilogue.is_trivial() {
                        self.finish_tile((i0, j0), (mv, nv));
                    }
                }
            }
        }
    }

    /// Bias and activation on the `mv × nv` tile at `(i0, j0)`, on the
    /// widest vector unit available.
    fn finish_tile(&self, at: (usize, usize), size: (usize, usize)) {
        #[cfg(target_arch = "x86_64")]
        if std::arch::is_x86_feature_detected!("avx512f") {
            // SAFETY: the CPU supports AVX-512F (checked just above).
            return unsafe { self.finish_tile_avx512(at, size) };
        }
        self.finish_tile_portable(at, size)
    }

    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx512f")]
    fn finish_tile_avx512(&self, at: (usize, usize), size: (usize, usize)) {
        self.finish_tile_portable(at, size)
    }

    #[inline(always)]
    fn finish_tile_portable(&self, (i0, j0): (usize, usize), (mv, nv): (usize, usize)) {
        for r in 0..mv {
            // SAFETY: row r of this tile, nv ≤ cols − j0 elements, owned by
            // the calling task.
            let row = unsafe { std::slice::from_raw_parts_mut(self.out.at(i0 + r, j0), nv) };
            self.epilogue.finish_row(i0 + r, j0, row);
        }
    }

    /// A tile cut by the matrix edge: computed in a full-size scratch tile.
    #[allow(clippy::too_many_arguments)]
    fn edge_tile(
        &self,
        kernel: KernelFn,
        kc: usize,
        a_panel: &[f32],
        b_panel: &[f32],
        (i0, j0): (usize, usize),
        (mv, nv): (usize, usize),
        load_c: bool,
        tile: &mut AlignedBuf,
    ) {
        let nr = self.kernel.nr();
        let tile = tile.as_mut_slice();
        for r in 0..mv {
            // SAFETY: row r of the valid region, inside C, owned by this task.
            let src = unsafe { std::slice::from_raw_parts(self.out.at(i0 + r, j0), nv) };
            if load_c {
                tile[r * nr..r * nr + nv].copy_from_slice(src);
            }
        }
        // SAFETY: the scratch tile holds mr·nr floats with row stride nr.
        unsafe {
            kernel(
                kc,
                a_panel.as_ptr(),
                b_panel.as_ptr(),
                tile.as_mut_ptr(),
                nr,
                load_c,
            )
        };
        for r in 0..mv {
            // SAFETY: as above.
            let dst = unsafe { std::slice::from_raw_parts_mut(self.out.at(i0 + r, j0), nv) };
            dst.copy_from_slice(&tile[r * nr..r * nr + nv]);
        }
    }
}

/// `out = act((out if accumulate) + lhs · rhs + bias)`, parallel over the
/// current rayon pool. Panics on mismatched sizes or an unsupported kernel.
pub fn gemm(kernel: Kernel, lhs: Lhs, rhs: Rhs, out: MatMut, epilogue: &Epilogue) {
    let plan = Plan::new(
        kernel,
        lhs,
        rhs,
        out,
        epilogue,
        rayon::current_num_threads(),
    );
    if plan.out.rows == 0 || plan.out.cols == 0 {
        return;
    }
    (0..plan.task_count()).into_par_iter().for_each(|task| {
        SCRATCH.with(|s| plan.run_task(task, &mut s.borrow_mut()));
    });
}

/// [`gemm`] on the calling thread only (for use inside a parallel task).
/// Gives bitwise the same result as [`gemm`].
pub fn gemm_serial(kernel: Kernel, lhs: Lhs, rhs: Rhs, out: MatMut, epilogue: &Epilogue) {
    let plan = Plan::new(kernel, lhs, rhs, out, epilogue, 1);
    if plan.out.rows == 0 || plan.out.cols == 0 {
        return;
    }
    SCRATCH.with(|s| {
        let mut s = s.borrow_mut();
        for task in 0..plan.task_count() {
            plan.run_task(task, &mut s);
        }
    });
}

/// `dst = srcᵀ` over the first `cols` columns of `src` (`rows` rows of
/// stride `stride`): `dst[j·rows + i] = src[i·stride + j]` for `j < cols`.
pub fn transpose_into(src: &[f32], rows: usize, stride: usize, cols: usize, dst: &mut [f32]) {
    assert!(cols <= stride, "more columns than the row stride");
    let row_refs: Vec<&[f32]> = (0..rows)
        .map(|i| &src[i * stride..i * stride + cols])
        .collect();
    interleave::interleave(&row_refs, cols, rows, dst);
}

/// Floating-point operations of an `m × k · k × n` product (2·m·k·n).
pub fn flops(m: usize, k: usize, n: usize) -> f64 {
    2.0 * m as f64 * k as f64 * n as f64
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rng::SplitMix64;

    fn random(len: usize, seed: u64) -> Vec<f32> {
        let mut rng = SplitMix64::new(seed);
        (0..len)
            .map(|_| (2.0 * rng.next_f64() - 1.0) as f32)
            .collect()
    }

    /// `C = A·B` in f64 by the triple loop, A and B as strided views.
    fn naive(a: &MatRef, b: &MatRef) -> Vec<f64> {
        let (m, k, n) = (a.rows(), a.cols(), b.cols());
        let mut c = vec![0.0; m * n];
        for i in 0..m {
            for j in 0..n {
                c[i * n + j] = (0..k).map(|p| a.at(i, p) as f64 * b.at(p, j) as f64).sum();
            }
        }
        c
    }

    fn assert_close(got: &[f32], want: &[f64], k: usize, label: &str) {
        // Rounding bound: k products of |values| ≤ 1, each sum step ≤ 1 ulp of the partial sum.
        let tol = 1e-6 * (k as f64 + 1.0);
        for (idx, (g, w)) in got.iter().zip(want).enumerate() {
            assert!(
                (*g as f64 - w).abs() <= tol,
                "{label}: element {idx}: {g} vs {w}"
            );
        }
    }

    /// Shapes that cut tiles, panels and depth blocks at every edge.
    const SHAPES: [(usize, usize, usize); 7] = [
        (1, 1, 1),
        (13, 7, 31),
        (15, 33, 17),
        (29, 300, 65),
        (45, 513, 40),
        (3, 64, 200),
        (100, 0, 9),
    ];

    #[test]
    fn every_kernel_matches_the_triple_loop_on_edge_shapes() {
        for kernel in Kernel::available() {
            for (s, &(m, k, n)) in SHAPES.iter().enumerate() {
                let a = random(m * k, 1 + s as u64);
                let b = random(k * n, 100 + s as u64);
                let (a, b) = (MatRef::row_major(&a, m, k), MatRef::row_major(&b, k, n));
                let want = naive(&a, &b);
                let mut got = vec![f32::NAN; m * n];
                gemm(
                    kernel,
                    Lhs::Source(&a),
                    Rhs::Source(&b),
                    MatMut::row_major(&mut got, m, n),
                    &Epilogue::default(),
                );
                assert_close(&got, &want, k, &format!("{kernel:?} {m}x{k}x{n}"));
            }
        }
    }

    #[test]
    fn transposed_strided_and_packed_operands_agree() {
        let (m, k, n) = (37, 290, 70);
        for kernel in Kernel::available() {
            // A stored transposed (k × m), B stored transposed (n × k).
            let at = random(k * m, 7);
            let bt = random(n * k, 8);
            let a = MatRef::row_major(&at, k, m).t();
            let b = MatRef::row_major(&bt, n, k).t();
            let want = naive(&a, &b);
            let mut strided = vec![0.0; m * n];
            gemm(
                kernel,
                Lhs::Source(&a),
                Rhs::Source(&b),
                MatMut::row_major(&mut strided, m, n),
                &Epilogue::default(),
            );
            assert_close(&strided, &want, k, &format!("{kernel:?} transposed"));
            let pa = PackedA::new(kernel, &a);
            let pb = PackedB::new(kernel, &b);
            let mut packed = vec![0.0; m * n];
            gemm(
                kernel,
                Lhs::Packed(&pa),
                Rhs::Packed(&pb),
                MatMut::row_major(&mut packed, m, n),
                &Epilogue::default(),
            );
            assert_eq!(
                packed, strided,
                "{kernel:?}: packing up front changed the result"
            );
            let mut mixed = vec![0.0; m * n];
            gemm(
                kernel,
                Lhs::Source(&a),
                Rhs::Packed(&pb),
                MatMut::row_major(&mut mixed, m, n),
                &Epilogue::default(),
            );
            assert_eq!(mixed, strided);
        }
    }

    #[test]
    fn output_with_row_stride_leaves_other_columns_alone() {
        let (m, k, n, stride) = (20, 33, 35, 50);
        let a = random(m * k, 3);
        let b = random(k * n, 4);
        let (a, b) = (MatRef::row_major(&a, m, k), MatRef::row_major(&b, k, n));
        let want = naive(&a, &b);
        for kernel in Kernel::available() {
            let mut c = vec![-7.0; m * stride];
            gemm(
                kernel,
                Lhs::Source(&a),
                Rhs::Source(&b),
                MatMut::new(&mut c, m, n, stride),
                &Epilogue::default(),
            );
            for i in 0..m {
                assert_close(
                    &c[i * stride..i * stride + n],
                    &want[i * n..(i + 1) * n],
                    k,
                    "strided out",
                );
                assert!(
                    c[i * stride + n..(i + 1) * stride]
                        .iter()
                        .all(|&v| v == -7.0)
                );
            }
        }
    }

    #[test]
    fn epilogue_accumulates_adds_bias_and_activates() {
        let (m, k, n) = (17, 600, 33);
        let a = random(m * k, 5);
        let b = random(k * n, 6);
        let (a, b) = (MatRef::row_major(&a, m, k), MatRef::row_major(&b, k, n));
        let prod = naive(&a, &b);
        let residual = random(m * n, 9);
        let row_bias = random(m, 10);
        let col_bias = random(n, 11);
        for kernel in Kernel::available() {
            let mut c = residual.clone();
            let epi = Epilogue {
                accumulate: true,
                bias: Bias::PerCol(&col_bias),
                activation: Activation::GeluErf,
            };
            gemm(
                kernel,
                Lhs::Source(&a),
                Rhs::Source(&b),
                MatMut::row_major(&mut c, m, n),
                &epi,
            );
            let want: Vec<f64> = (0..m * n)
                .map(|i| {
                    vector::gelu_erf((prod[i] + residual[i] as f64 + col_bias[i % n] as f64) as f32)
                        as f64
                })
                .collect();
            assert_close(&c, &want, k, "accumulate + column bias + gelu");

            let mut c = vec![0.0; m * n];
            let epi = Epilogue {
                accumulate: false,
                bias: Bias::PerRow(&row_bias),
                activation: Activation::Relu6,
            };
            gemm(
                kernel,
                Lhs::Source(&a),
                Rhs::Source(&b),
                MatMut::row_major(&mut c, m, n),
                &epi,
            );
            let want: Vec<f64> = (0..m * n)
                .map(|i| (prod[i] + row_bias[i / n] as f64).clamp(0.0, 6.0))
                .collect();
            assert_close(&c, &want, k, "row bias + relu6");
            assert!(c.contains(&0.0) && c.iter().any(|&v| v > 0.0));
        }
    }

    #[test]
    fn result_is_bitwise_independent_of_thread_count() {
        let (m, k, n) = (150, 700, 300);
        let a = random(m * k, 12);
        let b = random(k * n, 13);
        let (a, b) = (MatRef::row_major(&a, m, k), MatRef::row_major(&b, k, n));
        let bias = random(n, 14);
        let epi = Epilogue {
            accumulate: false,
            bias: Bias::PerCol(&bias),
            activation: Activation::GeluErf,
        };
        for kernel in Kernel::available() {
            let run = |threads: usize| {
                let pool = rayon::ThreadPoolBuilder::new()
                    .num_threads(threads)
                    .build()
                    .unwrap();
                let mut c = vec![0.0; m * n];
                pool.install(|| {
                    gemm(
                        kernel,
                        Lhs::Source(&a),
                        Rhs::Source(&b),
                        MatMut::row_major(&mut c, m, n),
                        &epi,
                    )
                });
                c
            };
            let one = run(1);
            for threads in [2, 3, 7] {
                assert!(
                    one.iter()
                        .zip(&run(threads))
                        .all(|(x, y)| x.to_bits() == y.to_bits()),
                    "{kernel:?} with {threads} threads"
                );
            }
            let mut serial = vec![0.0; m * n];
            gemm_serial(
                kernel,
                Lhs::Source(&a),
                Rhs::Source(&b),
                MatMut::row_major(&mut serial, m, n),
                &epi,
            );
            assert!(
                one.iter()
                    .zip(&serial)
                    .all(|(x, y)| x.to_bits() == y.to_bits())
            );
        }
    }

    #[test]
    fn transpose_and_single_panel_writes_agree_with_plain_loops() {
        let (rows, stride, cols) = (37, 40, 33);
        let src = random(rows * stride, 21);
        let mut dst = vec![f32::NAN; cols * rows];
        transpose_into(&src, rows, stride, cols, &mut dst);
        for j in 0..cols {
            for i in 0..rows {
                assert_eq!(dst[j * rows + i], src[i * stride + j]);
            }
        }
        // A one-panel B written in place equals the same matrix packed.
        for kernel in Kernel::available() {
            let (k, n) = (300, kernel.nr());
            let b = random(k * n, 22);
            let packed = PackedB::new(kernel, &MatRef::row_major(&b, k, n));
            let mut direct = PackedB::with_size(kernel, k, n);
            direct.single_panel_mut().unwrap()[..k * n].copy_from_slice(&b);
            assert_eq!(packed.data.as_slice(), direct.data.as_slice());
            assert!(
                PackedB::with_size(kernel, k, n + 1)
                    .single_panel_mut()
                    .is_none()
            );
        }
    }

    #[test]
    fn depth_blocks_cover_the_depth_evenly() {
        for k in [1usize, 255, 256, 257, 384, 1536, 3000] {
            let blocks = DepthBlocks::new(k);
            let total: usize = (0..blocks.count).map(|b| blocks.get(b).1).sum();
            assert_eq!(total, k);
            assert!(blocks.size <= DEPTH_BLOCK_MAX);
            assert!((0..blocks.count).all(|b| blocks.get(b).1 > 0));
        }
    }

    #[test]
    #[should_panic(expected = "inner dimensions differ")]
    fn mismatched_depth_is_a_programmer_error() {
        let a = vec![0.0; 6];
        let b = vec![0.0; 6];
        let mut c = vec![0.0; 6];
        let (a, b) = (MatRef::row_major(&a, 2, 3), MatRef::row_major(&b, 2, 3));
        gemm(
            Kernel::Portable,
            Lhs::Source(&a),
            Rhs::Source(&b),
            MatMut::row_major(&mut c, 2, 3),
            &Epilogue::default(),
        );
    }
}
