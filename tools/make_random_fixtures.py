#!/usr/bin/env python3
"""Parity fixtures for the backbones that ship without weights.

ViT-B/14 (DINOv2) and Wide-ResNet50-2 are filled with deterministic
pseudo-random weights that the Rust tests regenerate bit for bit
(tests/common/mod.rs), run in timm / torchvision, and only the inputs and
outputs are written to tests/fixtures/ (the weights never are).

Weight generator, per tensor: SplitMix64 (beltad::rng::SplitMix64) seeded
with the FNV-1a 64 hash of the tensor's UTF-8 key; element i is
offset + scale * u (or offset + scale * |u|), u = 2 * next_f64() - 1, in
float64, then rounded to float32. Keys are the names the Rust side reads:
Hugging Face names for DINOv2, torchvision names for the ResNet.

Run by hand:  /work/pyenv/bin/python tools/make_random_fixtures.py
"""

import math
import pathlib

import numpy as np
import torch
import timm
import torchvision
from safetensors.numpy import load_file, save_file
from timm.models.vision_transformer import checkpoint_filter_fn

ROOT = pathlib.Path(__file__).resolve().parent.parent
OUT = ROOT / "tests" / "fixtures"
SHARED_INPUT = ROOT.parent / "shared" / "weights" / "fixtures" / "dinov2_vits14_350.safetensors"

MASK64 = (1 << 64) - 1
SPLITMIX_GAMMA = 0x9E3779B97F4A7C15
SPLITMIX_MUL1 = 0xBF58476D1CE4E5B9
SPLITMIX_MUL2 = 0x94D049BB133111EB
FNV_OFFSET = 0xCBF29CE484222325
FNV_PRIME = 0x100000001B3

VIT_WEIGHT_GAIN = 3.0  # bound sqrt(3 / fan_in): variance preserving
CNN_WEIGHT_GAIN = 6.0  # bound sqrt(6 / fan_in): He, for ReLU networks

NATIVE_GRID = 37
PATCH = 14
VIT_SIZE = (98, 126)  # 7 x 9 patches: the 37x37 table really is resampled, non-square
WRN_SIZE = (70, 84)  # odd intermediate sizes: 35 -> 18 -> 9 -> 5


def fnv1a64(key: str) -> int:
    h = FNV_OFFSET
    for b in key.encode("utf-8"):
        h = ((h ^ b) * FNV_PRIME) & MASK64
    return h


def splitmix_uniform(seed: int, n: int) -> np.ndarray:
    """First n outputs of SplitMix64(seed).next_f64(), as float64 in [0, 1)."""
    k = np.arange(1, n + 1, dtype=np.uint64)
    with np.errstate(over="ignore"):
        z = np.uint64(seed) + k * np.uint64(SPLITMIX_GAMMA)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(SPLITMIX_MUL1)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(SPLITMIX_MUL2)
        z = z ^ (z >> np.uint64(31))
    return (z >> np.uint64(11)).astype(np.float64) * (1.0 / float(1 << 53))


def fill_rule(key: str, shape, gain: float):
    """(offset, scale, use_abs); mirrors fill_rule in tests/common/mod.rs."""
    if key.endswith("running_var"):
        return 1.0, 0.5, True
    if key.endswith("running_mean") or key.endswith(".bias"):
        return 0.0, 0.1, False
    if key.endswith("lambda1"):
        return 0.1, 0.05, False
    if key.endswith(".weight") and len(shape) == 1:
        return 1.0, 0.1, False
    if key.endswith(".weight"):
        fan_in = int(np.prod(shape[1:]))
        return 0.0, math.sqrt(gain / fan_in), False
    return 0.0, 0.5, False


def random_tensor(key: str, shape, gain: float) -> torch.Tensor:
    offset, scale, use_abs = fill_rule(key, shape, gain)
    n = int(np.prod(shape))
    u = 2.0 * splitmix_uniform(fnv1a64(key), n) - 1.0
    if use_abs:
        u = np.abs(u)
    values = offset + scale * u
    return torch.from_numpy(values.astype(np.float32).reshape(shape))


def self_check():
    """Known SplitMix64 outputs (same as the Rust unit test)."""
    k = np.arange(1, 4, dtype=np.uint64)
    with np.errstate(over="ignore"):
        z = np.uint64(1234567) + k * np.uint64(SPLITMIX_GAMMA)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(SPLITMIX_MUL1)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(SPLITMIX_MUL2)
        z = z ^ (z >> np.uint64(31))
    assert [int(v) for v in z] == [6457827717110365317, 3203168211198807973, 9817491932198370423]
    assert fnv1a64("") == FNV_OFFSET and fnv1a64("a") == 0xAF63DC4C8601EC8C


def dinov2_hf_keys(d: int, layers: int, mlp: int):
    keys = {
        "embeddings.cls_token": (1, 1, d),
        "embeddings.position_embeddings": (1, 1 + NATIVE_GRID * NATIVE_GRID, d),
        "embeddings.patch_embeddings.projection.weight": (d, 3, PATCH, PATCH),
        "embeddings.patch_embeddings.projection.bias": (d,),
        "layernorm.weight": (d,),
        "layernorm.bias": (d,),
    }
    for i in range(layers):
        p = f"encoder.layer.{i}"
        for name, out, inp in [
            ("attention.attention.query", d, d),
            ("attention.attention.key", d, d),
            ("attention.attention.value", d, d),
            ("attention.output.dense", d, d),
            ("mlp.fc1", mlp, d),
            ("mlp.fc2", d, mlp),
        ]:
            keys[f"{p}.{name}.weight"] = (out, inp)
            keys[f"{p}.{name}.bias"] = (out,)
        for norm in ("norm1", "norm2"):
            keys[f"{p}.{norm}.weight"] = (d,)
            keys[f"{p}.{norm}.bias"] = (d,)
        keys[f"{p}.layer_scale1.lambda1"] = (d,)
        keys[f"{p}.layer_scale2.lambda1"] = (d,)
    return keys


def hf_to_timm(hf: dict, layers: int) -> dict:
    """Hugging Face DINOv2 names -> timm names (weights/README.md, hub_to_timm)."""
    t = {
        "cls_token": hf["embeddings.cls_token"],
        "pos_embed": hf["embeddings.position_embeddings"],
        "patch_embed.proj.weight": hf["embeddings.patch_embeddings.projection.weight"],
        "patch_embed.proj.bias": hf["embeddings.patch_embeddings.projection.bias"],
        "norm.weight": hf["layernorm.weight"],
        "norm.bias": hf["layernorm.bias"],
    }
    for i in range(layers):
        h, b = f"encoder.layer.{i}", f"blocks.{i}"
        att = f"{h}.attention.attention"
        for kind in ("weight", "bias"):
            t[f"{b}.attn.qkv.{kind}"] = torch.cat(
                [hf[f"{att}.{q}.{kind}"] for q in ("query", "key", "value")], dim=0
            )
            t[f"{b}.attn.proj.{kind}"] = hf[f"{h}.attention.output.dense.{kind}"]
            for norm in ("norm1", "norm2"):
                t[f"{b}.{norm}.{kind}"] = hf[f"{h}.{norm}.{kind}"]
            for fc in ("fc1", "fc2"):
                t[f"{b}.mlp.{fc}.{kind}"] = hf[f"{h}.mlp.{fc}.{kind}"]
        t[f"{b}.ls1.gamma"] = hf[f"{h}.layer_scale1.lambda1"]
        t[f"{b}.ls2.gamma"] = hf[f"{h}.layer_scale2.lambda1"]
    return t


def fixture_input(size) -> np.ndarray:
    """A crop of the shared 350x350 normalised test image (realistic statistics)."""
    full = load_file(str(SHARED_INPUT))["input"]
    h, w = size
    top, left = (350 - h) // 3, (350 - w) // 5
    return np.ascontiguousarray(full[:, :, top : top + h, left : left + w])


def describe(name: str, t: torch.Tensor):
    a = t.detach().numpy()
    print(f"{name}: shape {a.shape}, mean {a.mean():.4f}, std {a.std():.4f}, max|.| {np.abs(a).max():.4f}")


def make_vit_base():
    d, layers, heads, mlp = 768, 12, 12, 3072
    hf = {k: random_tensor(k, s, VIT_WEIGHT_GAIN) for k, s in dinov2_hf_keys(d, layers, mlp).items()}
    model = timm.create_model(
        "vit_base_patch14_dinov2",
        pretrained=False,
        img_size=VIT_SIZE,
        dynamic_img_size=True,
        num_classes=0,
    )
    assert model.embed_dim == d and len(model.blocks) == layers and model.blocks[0].attn.num_heads == heads
    # timm's own pretrained-loading filter resamples pos_embed 37x37 -> 7x9 here.
    state = checkpoint_filter_fn(hf_to_timm(hf, layers), model)
    model.load_state_dict(state, strict=True)
    model.eval()
    x = fixture_input(VIT_SIZE)
    with torch.no_grad():
        y = model.forward_features(torch.from_numpy(x))
    describe("vit-b last_hidden_state", y)
    save_file(
        {"input": x, "last_hidden_state": y.numpy()},
        str(OUT / "dinov2_vitb14_random_98x126.safetensors"),
        metadata={
            "model": "timm vit_base_patch14_dinov2, img_size=(98,126), dynamic_img_size=True",
            "weights": "SplitMix64 per HF key (FNV-1a 64 seed), see tools/make_random_fixtures.py",
            "versions": f"torch {torch.__version__}, timm {timm.__version__}",
        },
    )


def make_wide_resnet():
    model = torchvision.models.wide_resnet50_2()
    state = model.state_dict()
    filled = {}
    for k, v in state.items():
        if v.dtype.is_floating_point:
            filled[k] = random_tensor(k, tuple(v.shape), CNN_WEIGHT_GAIN)
        else:
            filled[k] = v  # num_batches_tracked: unused in eval mode
    model.load_state_dict(filled, strict=True)
    model.eval()
    x = fixture_input(WRN_SIZE)
    with torch.no_grad():
        h = model.maxpool(model.relu(model.bn1(model.conv1(torch.from_numpy(x)))))
        layer2 = model.layer2(model.layer1(h))
        layer3 = model.layer3(layer2)
    describe("wrn layer2", layer2)
    describe("wrn layer3", layer3)
    save_file(
        {"input": x, "layer2": layer2.numpy(), "layer3": layer3.numpy()},
        str(OUT / "wide_resnet50_2_random_70x84.safetensors"),
        metadata={
            "model": "torchvision wide_resnet50_2, eval mode",
            "weights": "SplitMix64 per torchvision key (FNV-1a 64 seed), see tools/make_random_fixtures.py",
            "versions": f"torch {torch.__version__}, torchvision {torchvision.__version__}",
        },
    )


def main():
    torch.set_num_threads(2)
    self_check()
    OUT.mkdir(parents=True, exist_ok=True)
    make_vit_base()
    make_wide_resnet()


if __name__ == "__main__":
    main()
