//! Backbone and matrix-product timings (warm medians), for BENCHMARKS.md.
//!
//! `cargo bench --bench backbones [-- gemm | backbones]`
//! Threads: the rayon default (all cores) unless `RAYON_NUM_THREADS` is set.

use std::time::Instant;

use beltad::kernels::gemm::{self, Epilogue, Kernel, Lhs, MatMut, MatRef, PackedB, Rhs};

/// Timed repetitions after one warm-up run.
const RUNS: usize = 9;

struct Timing {
    median_s: f64,
    min_s: f64,
}

fn time(runs: usize, mut f: impl FnMut()) -> Timing {
    f();
    let mut t: Vec<f64> = (0..runs)
        .map(|_| {
            let start = Instant::now();
            f();
            start.elapsed().as_secs_f64()
        })
        .collect();
    t.sort_by(f64::total_cmp);
    Timing {
        median_s: t[runs / 2],
        min_s: t[0],
    }
}

fn ramp(len: usize, seed: usize) -> Vec<f32> {
    (0..len)
        .map(|i| (((i + seed) * 7919 % 1009) as f32 / 1009.0) - 0.5)
        .collect()
}

/// GFLOP/s of our kernels and of the `gemm` crate on ViT-shaped products.
fn bench_gemm() {
    let shapes = [
        ("ViT-S qkv", 626, 384, 1152),
        ("ViT-S fc2", 626, 1536, 384),
        ("ViT-S fc1", 626, 384, 1536),
        ("ViT-B qkv", 841, 768, 2304),
        ("square", 2048, 2048, 2048),
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
    let sections: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| !a.starts_with('-'))
        .collect();
    let want = |s: &str| sections.is_empty() || sections.iter().any(|x| x == s);
    if want("gemm") {
        bench_gemm();
    }
}
