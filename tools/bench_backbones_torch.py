#!/usr/bin/env python3
"""PyTorch reference timings for the backbone forwards, the counterpart of
`cargo bench --bench backbones` (benches/backbones.rs) for BENCHMARKS.md.

float32, CPU, torch.set_num_threads(THREADS) (default 2; `--threads N`).
Per backbone and batch size (1 and 4): the warm median time per image over
RUNS runs after one warm-up, the best run, the process CPU time per image,
the FLOP count (matrix products / convolutions, counted as in the Rust
bench: 2 per multiply-add), the achieved GFLOP/s, and the time the FLOPs
take at the machine's fp32 matmul rate as PyTorch measures it (a 2048^3
torch.mm). Weights are random (timing does not depend on them).

Run by hand:  /work/pyenv/bin/python tools/bench_backbones_torch.py [--threads N] [name filters...]
"""

import argparse
import time

import timm
import torch
import torchvision

RUNS = 9
BATCHES = (1, 4)
SQUARE = 2048
PATCH = 14


def timed(fn, x, runs=RUNS):
    """(median s, min s, CPU s per run) of fn(x) after one warm-up."""
    with torch.inference_mode():
        fn(x)
        cpu0 = time.process_time()
        times = []
        for _ in range(runs):
            start = time.perf_counter()
            fn(x)
            times.append(time.perf_counter() - start)
        cpu = (time.process_time() - cpu0) / runs
    times.sort()
    return times[runs // 2], times[0], cpu


def matmul_rate():
    """Median GFLOP/s of a SQUARE^3 float32 torch.mm."""
    a = torch.randn(SQUARE, SQUARE)
    b = torch.randn(SQUARE, SQUARE)
    median, _, _ = timed(lambda _: torch.mm(a, b), None)
    return 2.0 * SQUARE**3 / median * 1e-9


def vit_flops(side, dim=384, depth=12, heads=6, mlp=1536):
    """Matrix-product FLOPs of one DINOv2 forward (patch projection, linear
    layers, attention), as Dinov2::forward_flops counts them."""
    n = (side // PATCH) ** 2
    t = n + 1
    patch = 2 * n * 3 * PATCH * PATCH * dim
    linear = 2 * t * dim * (3 * dim + dim + 2 * mlp)
    attention = 2 * 2 * t * t * dim
    return patch + depth * (linear + attention)


def conv_flops(module, x):
    """2 x multiply-adds of every Conv2d in a forward of `module` on x (batch 1)."""
    total = 0

    def hook(conv, _inputs, output):
        nonlocal total
        k = conv.kernel_size[0] * conv.kernel_size[1] * conv.in_channels // conv.groups
        total += 2 * k * output.shape[1] * output.shape[2] * output.shape[3]

    handles = [m.register_forward_hook(hook) for m in module_modules(module) if isinstance(m, torch.nn.Conv2d)]
    with torch.inference_mode():
        module(x[:1])
    for h in handles:
        h.remove()
    return total


def module_modules(module):
    return module.modules() if isinstance(module, torch.nn.Module) else module.__self__.modules()


def wrn_to_layer3(model):
    class ToLayer3(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.m = model

        def forward(self, x):
            m = self.m
            x = m.maxpool(m.relu(m.bn1(m.conv1(x))))
            l2 = m.layer2(m.layer1(x))
            return l2, m.layer3(l2)

    return ToLayer3().eval()


def report(name, fn, side, flops, rate):
    for batch in BATCHES:
        x = torch.randn(batch, 3, side, side)
        median, best, cpu = timed(fn, x)
        per_image = median / batch
        bound = flops / (rate * 1e9)
        print(
            f"{name:<16} batch {batch}: {per_image * 1e3:7.1f} ms/img (best {best / batch * 1e3:7.1f}, "
            f"cpu {cpu / batch * 1e3:7.1f}), {flops * 1e-9:6.2f} GFLOP/img, {flops / per_image * 1e-9:4.0f} GFLOP/s, "
            f"at machine rate {bound * 1e3:6.1f} ms -> x{per_image / bound:.2f}",
            flush=True,
        )


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("filters", nargs="*")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    rate = matmul_rate()
    print(f"# PyTorch {torch.__version__}, {args.threads} threads; machine matmul rate (torch.mm {SQUARE}^3) {rate:.0f} GFLOP/s")

    def wanted(name):
        return not args.filters or any(f in name for f in args.filters)

    for side in (350, 406):
        name = f"ViT-S@{side}"
        if wanted(name):
            vit = timm.create_model(
                "vit_small_patch14_dinov2", img_size=side, dynamic_img_size=True, num_classes=0
            ).eval()
            report(name, vit.forward_features, side, vit_flops(side), rate)

    side = 406
    name = f"ViT-B@{side}"
    if wanted(name):
        vit = timm.create_model(
            "vit_base_patch14_dinov2", img_size=side, dynamic_img_size=True, num_classes=0
        ).eval()
        report(name, vit.forward_features, side, vit_flops(side, dim=768, heads=12, mlp=3072), rate)

    side = 238
    x = torch.randn(1, 3, side, side)
    if wanted("MobileNetV2@238"):
        features = torchvision.models.mobilenet_v2().features[:14].eval()
        report("MobileNetV2@238", features, side, conv_flops(features, x), rate)
    if wanted("WRN50-2@238"):
        wrn = wrn_to_layer3(torchvision.models.wide_resnet50_2().eval())
        report("WRN50-2@238", wrn, side, conv_flops(wrn, x), rate)


if __name__ == "__main__":
    main()
