//! Test-only brute-force versions of the metrics, written independently of
//! the sorted sweep: pairwise AUROC, union-find labelling, and PRO recomputed
//! from scratch at every threshold. Quadratic; for small random cases only.

use super::PixelGroundTruth;
use crate::rng::SplitMix64;

/// AUROC by counting every (anomalous, normal) pair; ties count half.
pub fn pairwise_auroc(scores: &[f32], anomalous: &[bool]) -> f64 {
    let (mut wins, mut pairs) = (0.0, 0.0);
    for (a, _) in scores.iter().zip(anomalous).filter(|(_, l)| **l) {
        for (n, _) in scores.iter().zip(anomalous).filter(|(_, l)| !**l) {
            wins += if a > n {
                1.0
            } else if a == n {
                0.5
            } else {
                0.0
            };
            pairs += 1.0;
        }
    }
    wins / pairs
}

/// 8-connected labels by union-find over every pair of adjacent defect
/// pixels, renumbered 1.. in raster order of each region's first pixel.
pub fn label_8_connected(mask: &[bool], height: usize, width: usize) -> Vec<u32> {
    let mut parent: Vec<usize> = (0..mask.len()).collect();
    fn root(parent: &mut [usize], mut i: usize) -> usize {
        while parent[i] != i {
            i = parent[i];
        }
        i
    }
    let defects: Vec<usize> = (0..mask.len()).filter(|i| mask[*i]).collect();
    for &p in &defects {
        for &q in &defects {
            let (pr, pc, qr, qc) = (p / width, p % width, q / width, q % width);
            if pr.abs_diff(qr) <= 1 && pc.abs_diff(qc) <= 1 {
                let (rp, rq) = (root(&mut parent, p), root(&mut parent, q));
                parent[rp.max(rq)] = rp.min(rq);
            }
        }
    }
    let mut ids = vec![0u32; mask.len()];
    let mut labels = vec![0u32; mask.len()];
    let mut next = 0;
    for &p in &defects {
        let r = root(&mut parent, p);
        if ids[r] == 0 {
            next += 1;
            ids[r] = next;
        }
        labels[p] = ids[r];
    }
    assert_eq!(labels.len(), height * width);
    labels
}

/// `(FPR, PRO)` at threshold `t` with the given comparison, from scratch.
fn rates_at(scores: &[f32], labels: &[u32], above: impl Fn(f32) -> bool) -> (f64, f64) {
    let n_regions = *labels.iter().max().unwrap_or(&0) as usize;
    // Index 0 counts normal pixels, index k region k.
    let (mut hit, mut size) = (vec![0usize; n_regions + 1], vec![0usize; n_regions + 1]);
    for (s, l) in scores.iter().zip(labels) {
        size[*l as usize] += 1;
        hit[*l as usize] += above(*s) as usize;
    }
    let overlaps: f64 = (1..=n_regions)
        .map(|k| hit[k] as f64 / size[k] as f64)
        .sum();
    (hit[0] as f64 / size[0] as f64, overlaps / n_regions as f64)
}

/// Exact AUPRO: a threshold at every distinct score, curve from (0, 0),
/// each segment clipped to FPR <= max_fpr.
pub fn aupro(scores: &[f32], labels: &[u32], max_fpr: f64) -> f64 {
    let mut thresholds = scores.to_vec();
    thresholds.sort_by(|a, b| b.total_cmp(a));
    thresholds.dedup();
    let mut curve = vec![(0.0, 0.0)];
    curve.extend(
        thresholds
            .iter()
            .map(|t| rates_at(scores, labels, |s| s >= *t)),
    );
    let mut area = 0.0;
    for w in curve.windows(2) {
        let ((x0, y0), (x1, y1)) = (w[0], w[1]);
        if x0 >= max_fpr {
            break;
        }
        let x_end = x1.min(max_fpr);
        let y_end = if x1 > x0 {
            y0 + (y1 - y0) * (x_end - x0) / (x1 - x0)
        } else {
            y1
        };
        area += (x_end - x0) * (y0 + y_end) / 2.0;
    }
    area / max_fpr
}

/// The reference script's loop: ascending thresholds `min + i·step`, strict
/// `>`, keep FPR < max_fpr, divide FPR by its largest kept value, trapezoid
/// in the order produced (descending FPR, so the sign is flipped).
/// `None` where the script would divide by zero.
pub fn aupro_reference(scores: &[f32], labels: &[u32], max_fpr: f64, n: usize) -> Option<f64> {
    let lo = scores.iter().copied().fold(f32::INFINITY, f32::min) as f64;
    let hi = scores.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64;
    let step = (hi - lo) / n as f64;
    let points: Vec<(f64, f64)> = (0..n)
        .map(|i| lo + i as f64 * step)
        .map(|t| rates_at(scores, labels, |s| s as f64 > t))
        .filter(|(fpr, _)| *fpr < max_fpr)
        .collect();
    let largest = points.iter().map(|p| p.0).fold(0.0, f64::max);
    if largest == 0.0 {
        return None;
    }
    let signed: f64 = points
        .windows(2)
        .map(|w| (w[1].0 - w[0].0) / largest * (w[0].1 + w[1].1) / 2.0)
        .sum();
    Some(-signed)
}

/// A random pixel test case: several images, many regions (diagonal
/// contacts included), scores on a coarse grid so ties are common, and
/// anomalous pixels shifted up so the metrics are not all near chance.
pub struct RandomCase {
    pub scores: Vec<f32>,
    /// Dense region labels from [`label_8_connected`], ids unique per image.
    pub labels: Vec<u32>,
    pub gt: PixelGroundTruth,
}

impl RandomCase {
    pub fn new(rng: &mut SplitMix64) -> Self {
        let n_images = 1 + rng.below(4);
        let mut masks: Vec<(Vec<bool>, usize, usize)> =
            (0..n_images).map(|_| random_mask(rng)).collect();
        // Both classes must be present.
        masks[0].0[0] = true;
        let last = masks.len() - 1;
        *masks[last].0.last_mut().unwrap() = false;
        masks.push((vec![false; 4], 2, 2));

        let (mut gt, mut labels) = (PixelGroundTruth::new(), Vec::new());
        for (mask, h, w) in &masks {
            gt.push_mask(mask, *h, *w).unwrap();
            let offset = *labels.iter().max().unwrap_or(&0);
            let local = label_8_connected(mask, *h, *w);
            labels.extend(local.iter().map(|l| if *l == 0 { 0 } else { l + offset }));
        }
        let levels = 2 + rng.below(20);
        let shift = rng.below(levels / 2 + 1);
        let scores = labels
            .iter()
            .map(|l| {
                let bump = if *l == 0 { 0 } else { shift };
                (rng.below(levels) + bump) as f32 / levels as f32
            })
            .collect();
        Self { scores, labels, gt }
    }
}

/// A mask of size up to 9x9: uniform noise of random density, or a lattice
/// of every other pixel on the diagonals (regions joined only diagonally).
fn random_mask(rng: &mut SplitMix64) -> (Vec<bool>, usize, usize) {
    let (h, w) = (1 + rng.below(9), 1 + rng.below(9));
    let density = rng.next_f64();
    let lattice = rng.below(3) == 0;
    let mask = (0..h * w)
        .map(|i| {
            let on_lattice = (i / w + i % w) % 2 == 0;
            rng.next_f64() < density && (!lattice || on_lattice)
        })
        .collect();
    (mask, h, w)
}

/// The fixed case of `tools/metrics_reference.py` (keep the two in step):
/// image scores and labels, pixel scores and ground truth of three images.
pub fn python_case() -> (Vec<f32>, Vec<bool>, Vec<f32>, PixelGroundTruth) {
    let image_scores = vec![
        0.9, 0.3, 0.55, 0.3, 0.8, 0.1, 0.55, 0.7, 0.2, 0.3, 0.65, 0.4,
    ];
    let image_labels = [1, 0, 1, 1, 0, 0, 0, 1, 0, 1, 1, 0]
        .map(|l| l == 1)
        .to_vec();
    let masks: [&[&str]; 3] = [
        &["##....", ".#....", "......", "....#.", "...#.#"],
        &["....", "....", "....", "...."],
        &[".....", ".###.", ".#.#.", ".###.", ".....", "#...."],
    ];
    let (mut gt, mut scores) = (PixelGroundTruth::new(), Vec::new());
    for (image, rows) in masks.iter().enumerate() {
        let (h, w) = (rows.len(), rows[0].len());
        let mask: Vec<bool> = rows
            .iter()
            .flat_map(|r| r.chars().map(|c| c == '#'))
            .collect();
        gt.push_mask(&mask, h, w).unwrap();
        for (i, defect) in mask.iter().enumerate() {
            let (r, c) = (i / w, i % w);
            let k = (7 * image + 5 * r + 3 * c + r * c) % 11;
            scores.push(k as f32 / 10.0 + if *defect { 0.35 } else { 0.0 });
        }
    }
    (image_scores, image_labels, scores, gt)
}

/// Image AUROC, pixel AUROC, AUPRO@0.3 and the 200-threshold reference
/// variant for [`python_case`], printed by `tools/metrics_reference.py`.
pub const PYTHON_EXPECTED: [f64; 4] = [
    0.7083333333333333,
    0.7890710382513662,
    0.5378529143897997,
    0.5118055555555555,
];
