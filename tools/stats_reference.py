"""Reference numbers for the unit tests in src/stats/gaussian.rs and
src/memory_bank.rs, computed with numpy / scipy / scikit-learn.

Run: /work/pyenv/bin/python tools/stats_reference.py
The printed values are pasted into the Rust tests; the product never runs this.
Inputs are rounded to float32 first, because the Rust API takes f32 samples.
"""

import numpy as np
from scipy.spatial.distance import mahalanobis
from sklearn.covariance import LedoitWolf, ledoit_wolf
from sklearn.random_projection import johnson_lindenstrauss_min_dim

RIDGE = 1e-6

# Full-rank case: 7 samples x 4 dimensions.
FULL = [
    [0.5, -1.25, 2.0, 0.75],
    [1.5, -0.5, 1.0, 0.25],
    [-0.25, 0.75, 2.5, -1.0],
    [2.0, 1.0, -0.5, 0.5],
    [0.0, -2.0, 1.5, 1.25],
    [1.0, 0.5, 0.25, -0.75],
    [-1.5, 0.25, 3.0, 0.0],
]
FULL_QUERY = [0.3, -0.7, 1.1, 2.2]

# Rank-deficient case: 3 samples x 5 dimensions (K < D).
SMALL = [
    [0.1, 0.2, -0.3, 0.4, 0.5],
    [-0.6, 0.7, 0.8, -0.9, 1.0],
    [1.1, -1.2, 1.3, 1.4, -1.5],
]
SMALL_QUERY = [0.2, 0.1, 0.0, -0.1, 0.3]


def f32(rows):
    return np.array(rows, dtype=np.float32).astype(np.float64)


def report(name, rows, query):
    x = f32(rows)
    q = f32([query])[0]
    mean = x.mean(axis=0)
    sample_cov = np.cov(x, rowvar=False) + RIDGE * np.eye(x.shape[1])
    d_sample = mahalanobis(q, mean, np.linalg.inv(sample_cov))
    lw = LedoitWolf().fit(x)
    _, shrinkage = ledoit_wolf(x)
    d_lw = mahalanobis(q, mean, np.linalg.inv(lw.covariance_))
    print(f"== {name}: n={x.shape[0]} dim={x.shape[1]}")
    print(f"mean            = {mean.tolist()!r}")
    print(f"sample d(query) = {d_sample!r}")
    print(f"lw shrinkage    = {lw.shrinkage_!r} (function: {shrinkage!r})")
    print(f"lw cov diag     = {np.diag(lw.covariance_).tolist()!r}")
    print(f"lw cov[0,1]     = {lw.covariance_[0, 1]!r}")
    print(f"lw d(query)     = {d_lw!r}")


report("full rank", FULL, FULL_QUERY)
report("rank deficient", SMALL, SMALL_QUERY)

print("== johnson_lindenstrauss_min_dim")
for n, eps in [(256_500, 0.9), (100_000, 0.9), (1_000, 0.5), (10, 0.1)]:
    print(f"n={n} eps={eps}: {int(johnson_lindenstrauss_min_dim(n, eps=eps))}")
