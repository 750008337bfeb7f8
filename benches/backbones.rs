//! Backbone and matrix-product timings (warm medians), for BENCHMARKS.md.
//!
//! `cargo bench --bench backbones [-- gemm | backbones | reference]`
//! - `gemm`: GFLOP/s of our packed GEMM (AVX-512 and AVX2 kernels) and of the
//!   `gemm` crate on ViT-shaped products and a 2048³ square problem;
//! - `backbones`: per backbone and batch size, the median time per image,
//!   the FLOP count, the achieved GFLOP/s, and the time the FLOPs would take
//!   at the machine's measured matmul rate (our GEMM, 2048³);
//! - `reference`: the same for the candle-operation reference paths.
//!
//! Threads: the rayon default (all cores) unless `RAYON_NUM_THREADS` is set.
//! `BENCH_MATMUL_GFLOPS=<rate>` replaces the square-product measurement.
//! Real weights are read from `../shared/weights` when present (ViT-S,
//! MobileNetV2); otherwise, and for ViT-B/14 and Wide-ResNet50-2, synthetic
//! weights are used (timing does not depend on the values).

use std::path::PathBuf;
use std::time::Instant;

use beltad::backbone::{
    self, CnnBackbone, Dinov2, Dinov2Config, MobileNetV2, WideResNet50, synthetic,
};
use beltad::kernels::gemm::{self, Epilogue, Kernel, Lhs, MatMut, MatRef, PackedB, Rhs};
use candle_core::{Device, Tensor};

/// Timed repetitions after one warm-up run.
const RUNS: usize = 9;

struct Timing {
    median_s: f64,
    min_s: f64,
    /// Process CPU time per run, all threads (when /proc is readable).
    cpu_s: Option<f64>,
}

/// CPU time of this process so far, summed over its threads, from
/// `/proc/self/task/*/schedstat` (first field: nanoseconds on a CPU).
fn process_cpu_s() -> Option<f64> {
    let mut total = 0u64;
    for task in std::fs::read_dir("/proc/self/task").ok()? {
        let stat = std::fs::read_to_string(task.ok()?.path().join("schedstat")).ok()?;
        total += stat.split_whitespace().next()?.parse::<u64>().ok()?;
    }
    Some(total as f64 * 1e-9)
}

fn time(runs: usize, mut f: impl FnMut()) -> Timing {
    f();
    let cpu_start = process_cpu_s();
    let mut t: Vec<f64> = (0..runs)
        .map(|_| {
            let start = Instant::now();
            f();
            start.elapsed().as_secs_f64()
        })
        .collect();
    let cpu_s = cpu_start
        .zip(process_cpu_s())
        .map(|(a, b)| (b - a) / runs as f64);
    t.sort_by(f64::total_cmp);
    Timing {
        median_s: t[runs / 2],
        min_s: t[0],
        cpu_s,
    }
}

fn ramp(len: usize, seed: usize) -> Vec<f32> {
    (0..len)
        .map(|i| (((i + seed) * 7919 % 1009) as f32 / 1009.0) - 0.5)
        .collect()
}

/// Side of the square product that measures the machine's matmul rate.
const SQUARE: usize = 2048;

/// Median GFLOP/s of our GEMM (best kernel, B packed ahead) on a square product.
fn machine_rate() -> f64 {
    let (m, k, n) = (SQUARE, SQUARE, SQUARE);
    let a = ramp(m * k, 1);
    let b = ramp(k * n, 2);
    let mut c = vec![0.0f32; m * n];
    let kernel = Kernel::best();
    let am = MatRef::row_major(&a, m, k);
    let packed = PackedB::new(kernel, &MatRef::row_major(&b, k, n));
    let t = time(RUNS, || {
        gemm::gemm(
            kernel,
            Lhs::Source(&am),
            Rhs::Packed(&packed),
            MatMut::row_major(&mut c, m, n),
            &Epilogue::default(),
        )
    });
    gemm::flops(m, k, n) / t.median_s * 1e-9
}

fn weights_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../shared/weights")
}

fn input(batch: usize, side: usize) -> Tensor {
    let n = batch * 3 * side * side;
    let v: Vec<f32> = (0..n)
        .map(|i| ((i * 7919 % 2003) as f32 / 2003.0 - 0.5) * 4.0)
        .collect();
    Tensor::from_vec(v, (batch, 3, side, side), &Device::Cpu).expect("input")
}

/// Backbone-name filters from the command line (empty: all).
static FILTERS: std::sync::OnceLock<Vec<String>> = std::sync::OnceLock::new();

fn selected(name: &str) -> bool {
    FILTERS
        .get()
        .is_none_or(|f| f.is_empty() || f.iter().any(|p| name.contains(p.as_str())))
}

/// One backbone line per batch size.
fn report(
    name: &str,
    flops: f64,
    rate: f64,
    batches: &[usize],
    side: usize,
    forward: &dyn Fn(&Tensor),
) {
    if !selected(name) {
        return;
    }
    for &batch in batches {
        let x = input(batch, side);
        let t = time(RUNS, || forward(&x));
        let per_image = t.median_s / batch as f64;
        let bound = flops / (rate * 1e9);
        let cpu = t.cpu_s.map_or("n/a".to_string(), |c| {
            format!("{:.1}", c / batch as f64 * 1e3)
        });
        println!(
            "{name:<16} batch {batch}: {:>7.1} ms/img (best {:>7.1}, cpu {cpu:>7}), {:>6.2} GFLOP/img, {:>4.0} GFLOP/s, at machine rate {:>6.1} ms -> x{:.2}",
            per_image * 1e3,
            t.min_s / batch as f64 * 1e3,
            flops * 1e-9,
            flops / per_image * 1e-9,
            bound * 1e3,
            per_image / bound,
        );
    }
}

fn vit_small(side: usize, reference: bool) -> Dinov2 {
    let cfg = Dinov2Config::vit_small();
    let path = weights_dir().join("dinov2_vits14.safetensors");
    let vb = if path.exists() {
        // SAFETY: read-only mapping of a file nobody rewrites meanwhile.
        unsafe {
            candle_nn::VarBuilder::from_mmaped_safetensors(
                &[path],
                candle_core::DType::F32,
                &Device::Cpu,
            )
        }
        .expect("weights")
    } else {
        synthetic::var_builder()
    };
    if reference {
        Dinov2::new_reference(vb, &cfg, (side, side)).expect("ViT-S")
    } else {
        Dinov2::new(vb, &cfg, (side, side)).expect("ViT-S")
    }
}

fn bench_backbones(reference: bool) {
    let threads = rayon::current_num_threads();
    // BENCH_MATMUL_GFLOPS skips the square-product measurement (for profiling).
    let rate = std::env::var("BENCH_MATMUL_GFLOPS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(machine_rate);
    let which = if reference {
        "candle reference paths"
    } else {
        "CPU kernels"
    };
    println!(
        "# Backbones ({which}), {threads} threads; machine matmul rate (our GEMM, {SQUARE}^3) {rate:.0} GFLOP/s"
    );
    let batches = [1, 4];
    for side in [350, 406] {
        if !selected(&format!("ViT-S@{side}")) {
            continue;
        }
        let model = vit_small(side, reference);
        let flops = Dinov2::forward_flops(&Dinov2Config::vit_small(), (side, side)).expect("size");
        report(
            &format!("ViT-S@{side}"),
            flops,
            rate,
            &batches,
            side,
            &|x| {
                model.forward(x).expect("forward");
            },
        );
    }
    // The paper's attribution backbone; synthetic weights (none ship).
    let base_side = 406;
    let name = format!("ViT-B@{base_side}");
    if selected(&name) {
        let cfg = Dinov2Config::vit_base();
        let vb = synthetic::var_builder();
        let size = (base_side, base_side);
        let model = if reference {
            Dinov2::new_reference(vb, &cfg, size)
        } else {
            Dinov2::new(vb, &cfg, size)
        }
        .expect("ViT-B");
        let flops = Dinov2::forward_flops(&cfg, (base_side, base_side)).expect("size");
        report(&name, flops, rate, &batches, base_side, &|x| {
            model.forward(x).expect("forward");
        });
    }
    let cnn_side = 238;
    let path = weights_dir().join("mobilenet_v2.safetensors");
    let mobilenet = if path.exists() {
        backbone::load_mobilenet_v2(&path, &Device::Cpu).expect("MobileNetV2")
    } else {
        MobileNetV2::new(synthetic::var_builder()).expect("MobileNetV2")
    };
    let wrn = WideResNet50::new(synthetic::var_builder()).expect("WRN50-2");
    for (name, cnn) in [
        ("MobileNetV2@238", CnnBackbone::MobileNetV2(mobilenet)),
        ("WRN50-2@238", CnnBackbone::WideResNet50(wrn)),
    ] {
        let flops = cnn.forward_flops((cnn_side, cnn_side));
        report(name, flops, rate, &batches, cnn_side, &|x| {
            match &cnn {
                _ if !reference => cnn.forward(x).map(|_| ()),
                CnnBackbone::MobileNetV2(m) => m.forward_reference(x).map(|_| ()),
                CnnBackbone::WideResNet50(m) => m.forward_reference(x).map(|_| ()),
            }
            .expect("forward");
        });
    }
}

/// GFLOP/s of our kernels and of the `gemm` crate on ViT-shaped products.
fn bench_gemm() {
    let shapes = [
        ("ViT-S qkv", 626, 384, 1152),
        ("ViT-S fc2", 626, 1536, 384),
        ("ViT-S fc1", 626, 384, 1536),
        ("ViT-B qkv", 841, 768, 2304),
        ("square", SQUARE, SQUARE, SQUARE),
    ];
    let threads = rayon::current_num_threads();
    println!("# GEMM, {threads} threads: GFLOP/s (median / best of {RUNS})");
    for (name, m, k, n) in shapes {
        let a = ramp(m * k, 1);
        let b = ramp(k * n, 2);
        let flops = gemm::flops(m, k, n);
        let mut c = vec![0.0f32; m * n];
        let rate = |t: &Timing| (flops / t.median_s * 1e-9, flops / t.min_s * 1e-9);
        let mut line = format!("{name:<10} {m}x{k}x{n}:");
        for kernel in Kernel::available() {
            if kernel == Kernel::Portable {
                continue;
            }
            let (am, bm) = (MatRef::row_major(&a, m, k), MatRef::row_major(&b, k, n));
            let packed = PackedB::new(kernel, &bm);
            let t = time(RUNS, || {
                gemm::gemm(
                    kernel,
                    Lhs::Source(&am),
                    Rhs::Packed(&packed),
                    MatMut::row_major(&mut c, m, n),
                    &Epilogue::default(),
                )
            });
            let (med, best) = rate(&t);
            line += &format!("  ours-{kernel:?}(packed B) {med:.0}/{best:.0}");
            if kernel == Kernel::best() {
                let t = time(RUNS, || {
                    gemm::gemm(
                        kernel,
                        Lhs::Source(&am),
                        Rhs::Source(&bm),
                        MatMut::row_major(&mut c, m, n),
                        &Epilogue::default(),
                    )
                });
                let (med, best) = rate(&t);
                line += &format!("  ours-{kernel:?}(dyn B) {med:.0}/{best:.0}");
            }
        }
        let t = time(RUNS, || {
            // SAFETY: row-major m×k, k×n and m×n buffers of the right sizes.
            unsafe {
                ::gemm::gemm(
                    m,
                    n,
                    k,
                    c.as_mut_ptr(),
                    1,
                    n as isize,
                    false,
                    a.as_ptr(),
                    1,
                    k as isize,
                    b.as_ptr(),
                    1,
                    n as isize,
                    0.0f32,
                    1.0f32,
                    false,
                    false,
                    false,
                    ::gemm::Parallelism::Rayon(threads),
                )
            }
        });
        let (med, best) = rate(&t);
        line += &format!("  gemm-crate {med:.0}/{best:.0}");
        println!("{line}");
    }
}

fn main() {
    let args: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| !a.starts_with('-'))
        .collect();
    // Section names select sections; any other argument filters backbones by name.
    let (sections, filters): (Vec<String>, Vec<String>) = args
        .into_iter()
        .partition(|a| ["gemm", "backbones", "reference"].contains(&a.as_str()));
    FILTERS.get_or_init(|| filters);
    let want = |s: &str| sections.is_empty() || sections.iter().any(|x| x == s);
    if want("gemm") {
        bench_gemm();
    }
    if want("backbones") {
        bench_backbones(false);
    }
    if sections.iter().any(|x| x == "reference") {
        bench_backbones(true);
    }
}
