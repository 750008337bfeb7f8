"""Expected metric values for the fixed case in src/metrics/naive.rs.

Run by hand:  /work/pyenv/bin/python tools/metrics_reference.py
and copy the printed numbers into `PYTHON_EXPECTED` there. The case below
must stay in step with `python_case()` in that file.

Independent of the Rust code: AUROC from scikit-learn, regions from
scipy.ndimage.label with a 3x3 structure (8-connectivity), PRO with numpy.
"""

import numpy as np
from scipy import ndimage
from sklearn.metrics import auc, roc_auc_score

IMAGE_SCORES = np.array(
    [0.9, 0.3, 0.55, 0.3, 0.8, 0.1, 0.55, 0.7, 0.2, 0.3, 0.65, 0.4], dtype=np.float32
)
IMAGE_LABELS = np.array([1, 0, 1, 1, 0, 0, 0, 1, 0, 1, 1, 0])
MASKS = [
    ["##....", ".#....", "......", "....#.", "...#.#"],
    ["....", "....", "....", "...."],
    [".....", ".###.", ".#.#.", ".###.", ".....", "#...."],
]
DEFECT_BUMP = np.float32(0.35)
MAX_FPR = 0.3
REFERENCE_THRESHOLDS = 200


def pixel_case():
    """Flattened scores (float32 -> float64), region labels (0 = normal)."""
    scores, labels, offset = [], [], 0
    for image, rows in enumerate(MASKS):
        mask = np.array([[c == "#" for c in row] for row in rows])
        r, c = np.indices(mask.shape)
        k = (7 * image + 5 * r + 3 * c + r * c) % 11
        s = k.astype(np.float32) / np.float32(10) + np.where(mask, DEFECT_BUMP, np.float32(0))
        lab, n = ndimage.label(mask, structure=np.ones((3, 3), dtype=int))
        lab = np.where(lab > 0, lab + offset, 0)
        offset += n
        scores.append(s.astype(np.float32).ravel())
        labels.append(lab.ravel())
    return np.concatenate(scores).astype(np.float64), np.concatenate(labels)


def exact_aupro(scores, labels, max_fpr):
    """Every distinct score a threshold (>=), curve from (0, 0), cut at max_fpr."""
    n_regions = labels.max()
    sizes = np.bincount(labels, minlength=n_regions + 1)
    weight = np.where(labels > 0, 1.0 / sizes[labels], 0.0)
    order = np.argsort(-scores, kind="stable")
    s = scores[order]
    fp = np.cumsum(labels[order] == 0) / np.sum(labels == 0)
    pro = np.cumsum(weight[order]) / n_regions
    last_of_tie = np.append(s[1:] != s[:-1], True)
    fpr = np.concatenate([[0.0], fp[last_of_tie]])
    pro = np.concatenate([[0.0], pro[last_of_tie]])
    i = int(np.argmax(fpr >= max_fpr))
    x0, y0 = fpr[i - 1], pro[i - 1]
    y_cut = y0 + (pro[i] - y0) * (max_fpr - x0) / (fpr[i] - x0)
    head = np.sum((fpr[1:i] - fpr[: i - 1]) * (pro[1:i] + pro[: i - 1]) / 2)
    return (head + (max_fpr - x0) * (y0 + y_cut) / 2) / max_fpr


def reference_aupro(scores, labels, max_fpr, n_thresholds):
    """The widely used script: strict >, FPR < max_fpr, divide by largest FPR."""
    lo, hi = scores.min(), scores.max()
    step = (hi - lo) / n_thresholds
    n_regions = labels.max()
    fprs, pros = [], []
    for i in range(n_thresholds):
        above = scores > lo + i * step
        overlaps = [above[labels == k].mean() for k in range(1, n_regions + 1)]
        pros.append(np.mean(overlaps))
        fprs.append(above[labels == 0].mean())
    fprs, pros = np.array(fprs), np.array(pros)
    keep = fprs < max_fpr
    return auc(fprs[keep] / fprs[keep].max(), pros[keep])


def main():
    scores, labels = pixel_case()
    values = [
        roc_auc_score(IMAGE_LABELS, IMAGE_SCORES.astype(np.float64)),
        roc_auc_score(labels > 0, scores),
        exact_aupro(scores, labels, MAX_FPR),
        reference_aupro(scores, labels, MAX_FPR, REFERENCE_THRESHOLDS),
    ]
    print("image AUROC, pixel AUROC, AUPRO@0.3, reference AUPRO@0.3 (200 thresholds):")
    print("[" + ", ".join(repr(float(v)) for v in values) + "]")


if __name__ == "__main__":
    main()
