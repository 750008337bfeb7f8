#!/usr/bin/env python3
"""Side-by-side tables (Markdown) from the outputs of the beltad and PyTorch
benchmarks, with the ratio beltad/PyTorch per stage and the issue's targets
marked met or not met.

Reads saved outputs of:
  cargo bench --bench backbones -- backbones      (--beltad)
  cargo bench --bench pipeline                     (--beltad)
  tools/bench_backbones_torch.py                   (--torch)
  tools/bench_pipeline_torch.py                    (--torch)
  tools/bench_process.py                           (--process)

  python3 tools/bench_compare.py --beltad rust_*.txt --torch torch_*.txt --process process.txt
"""

import argparse
import re
from collections import defaultdict

PIPELINE = re.compile(r"^pipeline (\S+) b(\d+) (\S+)\s+([\d.]+) ms/img")
BACKBONE = re.compile(r"^(\S+@\d+)\s+batch (\d+):\s+([\d.]+) ms/img")
PROCESS = re.compile(r"^process (\S+) (\S+) (.+)$")
STAGES = [
    "decode",
    "preprocess",
    "forward_object",
    "forward_attribution",
    "forward_texture",
    "tokens",
    "score_object",
    "score_attribution",
    "score_texture",
    "fusion",
    "stages_sum",
    "predict",
]
BATCHES = (1, 4)
FORWARD_TARGET = 1.1
PREDICT_TARGET = 1.0
SINGLE_TARGET = 0.6


def read(paths):
    pipeline, backbones = {}, {}
    for path in paths:
        for line in open(path):
            if m := PIPELINE.match(line):
                pipeline[(m[1], int(m[2]), m[3])] = float(m[4])
            elif m := BACKBONE.match(line):
                backbones[(m[1], int(m[2]))] = float(m[3])
    return pipeline, backbones


def fmt(v):
    return "–" if v is None else f"{v:.1f}"


def ratio(a, b):
    return None if a is None or b is None or b == 0 else a / b


def fmt_ratio(r):
    return "–" if r is None else f"{r:.2f}"


def verdict(r, target):
    if r is None:
        return "not measured"
    return ("met" if r <= target else "not met") + f" ({r:.2f}x)"


def backbone_table(rust, torch):
    print("| backbone | batch | beltad ms/img | PyTorch ms/img | beltad/PyTorch |")
    print("|---|---:|---:|---:|---:|")
    for name, batch in sorted(set(rust) | set(torch)):
        a, b = rust.get((name, batch)), torch.get((name, batch))
        print(f"| {name} | {batch} | {fmt(a)} | {fmt(b)} | {fmt_ratio(ratio(a, b))} |")
    print()


def pipeline_table(config, rust, torch):
    head = " | ".join(f"b{b} beltad | b{b} PyTorch | b{b} ratio" for b in BATCHES)
    print(f"| stage ({config}) | {head} |")
    print("|---|" + "---:|" * (3 * len(BATCHES)))
    for stage in STAGES:
        cells = []
        present = False
        for b in BATCHES:
            a, t = rust.get((config, b, stage)), torch.get((config, b, stage))
            present |= a is not None or t is not None
            cells += [fmt(a), fmt(t), fmt_ratio(ratio(a, t))]
        if present:
            print(f"| {stage} | " + " | ".join(cells) + " |")
    print()


def process_table(process):
    keys = [
        ("fit_images", "fit images"),
        ("fit_seconds", "fit s (reported by fit)"),
        ("fit_images_per_s", "fit images/s"),
        ("fit_process_wall_s", "fit process wall s"),
        ("fit_peak_rss_mib", "fit peak RSS MiB"),
        ("predict_images", "predict images"),
        ("predict_process_s_per_image", "predict process s/img (incl. start-up)"),
        ("predict_peak_rss_mib", "predict peak RSS MiB"),
        ("model_bytes", "model file bytes"),
    ]
    configs = list(process)
    print("| | " + " | ".join(configs) + " |")
    print("|---|" + "---:|" * len(configs))
    for key, label in keys:
        print(f"| {label} | " + " | ".join(str(process[c].get(key, "–")) for c in configs) + " |")
    print()


def targets(rust_p, torch_p, rust_b, torch_b):
    print("| target | beltad/PyTorch | verdict |")
    print("|---|---|---|")
    for name, batch in sorted(set(rust_b) & set(torch_b)):
        r = ratio(rust_b[(name, batch)], torch_b[(name, batch)])
        print(f"| {name} forward ≤ {FORWARD_TARGET}x PyTorch (batch {batch}) | {fmt_ratio(r)} | {verdict(r, FORWARD_TARGET)} |")
    for config in ("default", "paper", "single"):
        for b in BATCHES:
            r = ratio(rust_p.get((config, b, "predict")), torch_p.get((config, b, "predict")))
            if r is not None:
                print(f"| whole predict ({config}) ≤ {PREDICT_TARGET}x PyTorch (batch {b}) | {fmt_ratio(r)} | {verdict(r, PREDICT_TARGET)} |")
    for b in BATCHES:
        r = ratio(rust_p.get(("single", b, "predict")), torch_p.get(("default", b, "predict")))
        print(
            f"| single-forward predict ≤ {SINGLE_TARGET}x PyTorch's default pipeline (batch {b}) "
            f"| {fmt_ratio(r)} | {verdict(r, SINGLE_TARGET)} |"
        )
    print()


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--beltad", nargs="+", default=[])
    parser.add_argument("--torch", nargs="+", default=[])
    parser.add_argument("--process", nargs="*", default=[])
    args = parser.parse_args()
    rust_p, rust_b = read(args.beltad)
    torch_p, torch_b = read(args.torch)
    process = defaultdict(dict)
    for path in args.process:
        for line in open(path):
            if m := PROCESS.match(line.strip()):
                process[m[1]][m[2]] = m[3]

    if rust_b or torch_b:
        print("### Backbone forwards\n")
        backbone_table(rust_b, torch_b)
    for config in ("default", "single", "paper"):
        if any(k[0] == config for k in (*rust_p, *torch_p)):
            print(f"### Pipeline stages: {config}\n")
            pipeline_table(config, rust_p, torch_p)
    if process:
        print("### Fit and predict processes (beltad)\n")
        process_table(process)
    print("### Targets\n")
    targets(rust_p, torch_p, rust_b, torch_b)


if __name__ == "__main__":
    main()
