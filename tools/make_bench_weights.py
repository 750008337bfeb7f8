#!/usr/bin/env python3
"""Full-size random weights for timing the `paper` preset, which needs
DINOv2 ViT-B/14 and Wide-ResNet50-2 weights that do not ship.

Writes into OUT_DIR (a temporary folder, never the repository: the files
are about 350 MB and 275 MB):
- dinov2_vitb14.safetensors: every tensor of Hugging Face
  `facebook/dinov2-base` under its official name and shape (including the
  zero `embeddings.mask_token`), filled by the deterministic random rules of
  tools/make_random_fixtures.py;
- wide_resnet50_2.safetensors: the torchvision `wide_resnet50_2` state dict
  (all floating-point tensors, torchvision names, layer4 and fc included),
  filled by the same rules;
- symbolic links to the shipped dinov2_vits14 and mobilenet_v2 weights, so
  that the folder serves `--weights` for every preset.

Timing does not depend on weight values; these weights only make the
computation the right size. Run by hand:
    /work/pyenv/bin/python tools/make_bench_weights.py /tmp/beltad-bench-weights
"""

import argparse
import pathlib
import sys

import numpy as np
import torch
import torchvision
from safetensors.torch import save_file

TOOLS = pathlib.Path(__file__).resolve().parent
sys.path.insert(0, str(TOOLS))
from make_random_fixtures import (  # noqa: E402  (tools/ is not a package)
    CNN_WEIGHT_GAIN,
    VIT_WEIGHT_GAIN,
    dinov2_hf_keys,
    random_tensor,
    self_check,
)

SHARED_WEIGHTS = TOOLS.parent.parent / "shared" / "weights"
VIT_BASE = dict(d=768, layers=12, mlp=3072)
SHIPPED = ("dinov2_vits14.safetensors", "mobilenet_v2.safetensors")


def vit_base():
    keys = dinov2_hf_keys(VIT_BASE["d"], VIT_BASE["layers"], VIT_BASE["mlp"])
    tensors = {k: random_tensor(k, shape, VIT_WEIGHT_GAIN) for k, shape in keys.items()}
    tensors["embeddings.mask_token"] = torch.zeros(1, VIT_BASE["d"])
    return tensors


def wide_resnet():
    state = torchvision.models.wide_resnet50_2().state_dict()
    return {
        k: random_tensor(k, tuple(v.shape), CNN_WEIGHT_GAIN)
        for k, v in state.items()
        if v.dtype.is_floating_point
    }


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out_dir", type=pathlib.Path)
    args = parser.parse_args()
    out = args.out_dir.resolve()
    if TOOLS.parent in out.parents or out == TOOLS.parent:
        sys.exit(f"{out}: inside the repository; pick a temporary folder")
    self_check()
    out.mkdir(parents=True, exist_ok=True)
    meta = {"weights": "random (tools/make_bench_weights.py), for timing only"}
    for name, make in [("dinov2_vitb14", vit_base), ("wide_resnet50_2", wide_resnet)]:
        tensors = make()
        params = sum(int(np.prod(t.shape)) for t in tensors.values())
        save_file(tensors, str(out / f"{name}.safetensors"), metadata=meta)
        print(f"{out / name}.safetensors: {len(tensors)} tensors, {params:,} parameters")
    for name in SHIPPED:
        link = out / name
        if not link.exists():
            link.symlink_to(SHARED_WEIGHTS / name)
        print(f"{link} -> {SHARED_WEIGHTS / name}")


if __name__ == "__main__":
    main()
