#!/usr/bin/env python3
"""PyTorch reference timings for the backbone forwards, to compare with the
Rust `forward_times` test (tests/backbone_parity.rs).

Batch 1, float32, CPU, 2 threads; median and minimum of 7 runs after one warm-up.
Weights are random (timing does not depend on them).

Run by hand:  /work/pyenv/bin/python tools/bench_backbones_torch.py
"""

import time

import timm
import torch
import torchvision

THREADS = 2
RUNS = 7


def timings_ms(fn, x):
    """(median, min) in ms; the minimum is the steadier figure on a shared machine."""
    with torch.inference_mode():
        fn(x)
        times = []
        for _ in range(RUNS):
            start = time.perf_counter()
            fn(x)
            times.append(time.perf_counter() - start)
    times.sort()
    return f"median {times[RUNS // 2] * 1e3:.1f} ms, min {times[0] * 1e3:.1f} ms"


def wrn_to_layer3(model):
    def run(x):
        x = model.maxpool(model.relu(model.bn1(model.conv1(x))))
        return model.layer3(model.layer2(model.layer1(x)))

    return run


def main():
    torch.set_num_threads(THREADS)
    torch.manual_seed(0)
    for side in (350, 406):
        vit = timm.create_model(
            "vit_small_patch14_dinov2", img_size=side, dynamic_img_size=True, num_classes=0
        ).eval()
        x = torch.randn(1, 3, side, side)
        print(f"ViT-S@{side}: {timings_ms(vit.forward_features, x)}")

    x = torch.randn(1, 3, 238, 238)
    mobilenet = torchvision.models.mobilenet_v2().eval()
    print(f"MobileNetV2@238 (features[:14]): {timings_ms(mobilenet.features[:14], x)}")
    wrn = torchvision.models.wide_resnet50_2().eval()
    print(f"WRN50-2@238 (to layer3): {timings_ms(wrn_to_layer3(wrn), x)}")


if __name__ == "__main__":
    main()
