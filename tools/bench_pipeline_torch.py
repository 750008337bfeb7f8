#!/usr/bin/env python3
"""PyTorch counterpart of `cargo bench --bench pipeline` (benches/pipeline.rs):
the same prediction pipeline written with torch operations, timed stage by
stage, for the side-by-side tables in BENCHMARKS.md.

Per configuration (default, single, paper) and batch size (1 and 4), on the
same images, the warm median time per image of:
  decode               PIL decode to RGB (one image after another)
  preprocess           bicubic antialiased resize to the 406 evaluation grid,
                       each branch input resized from it, ImageNet normalisation
  forward_object       timm DINOv2 forward_features at the object input size
  forward_attribution  the same at the attribution input size (absent when
                       the object forward is shared, as in `single`)
  forward_texture      torchvision MobileNetV2 features[0..13] or WRN50-2 to layer3
  tokens               CLS/patch split; PatchCore 3x3 average pool, adaptive
                       pool to the stride-8 grid, concatenation
  score_object         CLS Mahalanobis (float64 whitening), prototype ratio
                       with mean replacement, min-max, bilinear upsampling,
                       Gaussian blur (sigma 4), resize to the evaluation grid
  score_attribution    float64 whitening of the patches, closed-form
                       leave-one-patch-out contributions, upsampling, blur
  score_texture        nearest memory-bank entry of every patch (torch.cdist),
                       PatchCore re-weighting, min-max, upsampling, blur
  fusion               map product, max, 5x5 sigma-1 blur, image score, decision
  stages_sum           the sum of the above
  predict              the whole path per batch, decode to score and fused map
printed as `pipeline <config> b<batch> <stage> <ms> ms/img`.

Weights: the shipped ViT-S/14 and MobileNetV2 (../shared/weights), and for
`paper` the ViT-B/14 and WRN50-2 files of --weights (see
tools/make_bench_weights.py). Branch statistics (Gaussian means and
whitening matrices, prototypes, memory bank) are read from a beltad model
file given with --model CONFIG=PATH, so both sides score with the same
numbers; without one they are random with the same shapes and a bank of
--bank rows (timing does not depend on the values).

float32 (float64 for the whitening, as beltad), CPU, torch.set_num_threads
(--threads, default 2), torch.inference_mode. Run by hand where torch is
installed (never in CI):
  /work/pyenv/bin/python tools/bench_pipeline_torch.py [--threads N]
      [--weights DIR] [--model default=M.beltad ...] [default single paper]
"""

import argparse
import math
import os
import pathlib
import sys
import time

import numpy as np
import timm
import torch
import torch.nn.functional as F
import torchvision
from PIL import Image
from safetensors import safe_open
from safetensors.numpy import load_file as load_numpy
from safetensors.torch import load_file as load_torch
from timm.models.vision_transformer import checkpoint_filter_fn

TOOLS = pathlib.Path(__file__).resolve().parent
sys.path.insert(0, str(TOOLS))
from make_random_fixtures import hf_to_timm  # noqa: E402  (tools/ is not a package)

ROOT = TOOLS.parent
SHARED = ROOT.parent / "shared"
RUNS = 5
BATCHES = (1, 4)
EVAL = 406
MEAN = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
STD = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
TAU = 1.14
RATIO_EPS = 1e-6
SIGMA = 4.0
TRUNCATE = 4.0
FINAL_KERNEL, FINAL_SIGMA = 5, 1.0
LAMBDA_OBJ, LAMBDA_MAP = 0.01, 1.0
REWEIGHT_K = 3
FLAT_RANGE, FLAT_VALUE = 1e-5, 0.5

CONFIGS = {
    "default": dict(object=("dinov2_vits14", 350), attribution=("dinov2_vits14", 406), texture=("mobilenet_v2", 238)),
    "single": dict(object=("dinov2_vits14", 350), attribution=("dinov2_vits14", 350), texture=("mobilenet_v2", 238)),
    "paper": dict(object=("dinov2_vits14", 350), attribution=("dinov2_vitb14", 406), texture=("wide_resnet50_2", 238)),
}
VIT = {
    "dinov2_vits14": ("vit_small_patch14_dinov2", 384, 12),
    "dinov2_vitb14": ("vit_base_patch14_dinov2", 768, 12),
}
CNN_CHANNELS = {"mobilenet_v2": 32 + 96, "wide_resnet50_2": 512 + 1024}


def median_s(fn, runs):
    fn()
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    times.sort()
    return times[runs // 2]


def weights_file(dirs, name):
    for d in dirs:
        path = pathlib.Path(d) / f"{name}.safetensors"
        if path.is_file():
            return path
    return None


def load_vit(path, name, size):
    arch, _, layers = VIT[name]
    model = timm.create_model(arch, pretrained=False, img_size=size, dynamic_img_size=True, num_classes=0)
    hf = load_torch(str(path))
    # timm's own loading filter resamples the 37x37 position table to the input grid.
    model.load_state_dict(checkpoint_filter_fn(hf_to_timm(hf, layers), model), strict=True)
    return model.eval()


class MobileNetV2Features(torch.nn.Module):
    """features[6] (stride 8) and features[13] (stride 16) of torchvision MobileNetV2."""

    def __init__(self, path):
        super().__init__()
        model = torchvision.models.mobilenet_v2()
        model.load_state_dict(load_torch(str(path)), strict=False)
        self.to8 = model.features[:7]
        self.to16 = model.features[7:14]

    def forward(self, x):
        s8 = self.to8(x)
        return s8, self.to16(s8)


class WideResNetFeatures(torch.nn.Module):
    """layer2 (stride 8) and layer3 (stride 16) of torchvision Wide-ResNet50-2."""

    def __init__(self, path):
        super().__init__()
        model = torchvision.models.wide_resnet50_2()
        model.load_state_dict(load_torch(str(path)), strict=False)
        self.m = model

    def forward(self, x):
        m = self.m
        x = m.maxpool(m.relu(m.bn1(m.conv1(x))))
        s8 = m.layer2(m.layer1(x))
        return s8, m.layer3(s8)


def gaussian_kernel(radius, sigma):
    x = torch.arange(-radius, radius + 1, dtype=torch.float64)
    k = torch.exp(-0.5 * x * x / (sigma * sigma))
    return (k / k.sum()).float()


KERNELS = {}


def blur(m, sigma, radius=None):
    """Separable Gaussian of a (1, 1, H, W) map, borders mirrored."""
    if radius is None:
        radius = int(TRUNCATE * sigma + 0.5)
    key = (radius, sigma)
    if key not in KERNELS:
        KERNELS[key] = gaussian_kernel(radius, sigma)
    k = KERNELS[key]
    m = F.conv2d(F.pad(m, (radius, radius, 0, 0), mode="reflect"), k.view(1, 1, 1, -1))
    return F.conv2d(F.pad(m, (0, 0, radius, radius), mode="reflect"), k.view(1, 1, -1, 1))


def resize_map(m, size):
    return F.interpolate(m, size=(size, size), mode="bilinear", align_corners=False)


def min_max(m):
    lo, hi = m.min(), m.max()
    span = hi - lo
    if not torch.isfinite(span) or span <= FLAT_RANGE * max(abs(hi), abs(lo)):
        return torch.full_like(m, FLAT_VALUE)
    return (m - lo) / span


def grid_map(values, side):
    return values.view(1, 1, side, side)


class Stats:
    """Fitted branch statistics, from a beltad model file or random of the same shapes."""

    def __init__(self, dims, model=None, bank=None, seed=0):
        if model is not None:
            t = load_numpy(str(model))
            self.cls_mean = torch.from_numpy(t["object.cls.mean"])
            self.cls_w = torch.from_numpy(t["object.cls.whitening"])
            self.fg = torch.from_numpy(t["object.foreground"])
            self.bg = torch.from_numpy(t["object.background"])
            self.attr_mean = torch.from_numpy(t["attribution.mean_token.mean"])
            self.attr_w = torch.from_numpy(t["attribution.mean_token.whitening"])
            self.bank = torch.from_numpy(t["texture.memory_bank"])
            found = (self.cls_mean.numel(), self.attr_mean.numel(), self.bank.shape[1])
            if found != dims:
                sys.exit(f"{model}: feature widths {found} do not match this configuration's {dims}")
            with safe_open(str(model), "np") as f:
                threshold = (f.metadata() or {}).get("threshold", "none")
            self.threshold = None if threshold == "none" else float(threshold)
            self.source = f"model {model}"
        else:
            g = torch.Generator().manual_seed(seed)
            d_obj, d_attr, d_tex = dims
            self.cls_mean = torch.randn(d_obj, generator=g, dtype=torch.float64)
            self.cls_w = torch.randn(d_obj, d_obj, generator=g, dtype=torch.float64).tril() / d_obj
            self.fg = torch.randn(d_obj, generator=g)
            self.bg = torch.randn(d_obj, generator=g)
            self.attr_mean = torch.randn(d_attr, generator=g, dtype=torch.float64)
            self.attr_w = torch.randn(d_attr, d_attr, generator=g, dtype=torch.float64).tril() / d_attr
            self.bank = torch.randn(bank, d_tex, generator=g)
            self.threshold = None
            self.source = f"random statistics, bank {bank}"


class Pipeline:
    def __init__(self, name, weights_dirs, stats_model, bank):
        spec = CONFIGS[name]
        self.name = name
        (self.obj_kind, self.obj_size) = spec["object"]
        (self.attr_kind, self.attr_size) = spec["attribution"]
        (self.tex_kind, self.tex_size) = spec["texture"]
        find = lambda kind: weights_file(weights_dirs, kind)  # noqa: E731
        missing = [k for k in (self.obj_kind, self.attr_kind, self.tex_kind) if find(k) is None]
        self.missing = missing
        if missing:
            return
        self.object_vit = load_vit(find(self.obj_kind), self.obj_kind, self.obj_size)
        self.shared = self.attr_kind == self.obj_kind and self.attr_size == self.obj_size
        if self.attr_kind == self.obj_kind:
            self.attribution_vit = self.object_vit
        else:
            self.attribution_vit = load_vit(find(self.attr_kind), self.attr_kind, self.attr_size)
        cnn = MobileNetV2Features if self.tex_kind == "mobilenet_v2" else WideResNetFeatures
        self.cnn = cnn(find(self.tex_kind)).eval()
        dims = (VIT[self.obj_kind][1], VIT[self.attr_kind][1], CNN_CHANNELS[self.tex_kind])
        self.stats = Stats(dims, stats_model, bank)
        self.threshold = self.stats.threshold

    # -- stages -----------------------------------------------------------
    @staticmethod
    def decode(paths):
        return [np.asarray(Image.open(p).convert("RGB")) for p in paths]

    def input_sizes(self):
        sizes = [self.obj_size, self.tex_size]
        if not self.shared:
            sizes.insert(1, self.attr_size)
        return sizes

    def preprocess(self, images):
        grids = torch.cat(
            [
                F.interpolate(
                    torch.from_numpy(im).permute(2, 0, 1)[None].float() / 255.0,
                    size=(EVAL, EVAL),
                    mode="bicubic",
                    antialias=True,
                    align_corners=False,
                )
                for im in images
            ]
        )
        inputs = []
        for size in self.input_sizes():
            x = grids if size == EVAL else F.interpolate(grids, size=(size, size), mode="bicubic", antialias=True, align_corners=False)
            inputs.append((x - MEAN) / STD)
        return inputs

    def forward_object(self, inputs):
        return self.object_vit.forward_features(inputs[0])

    def forward_attribution(self, inputs):
        return self.attribution_vit.forward_features(inputs[1])

    def forward_texture(self, inputs):
        return self.cnn(inputs[-1])

    @staticmethod
    def tokens(object_out, attribution_out, cnn_out):
        s8, s16 = cnn_out
        grid = s8.shape[-2:]
        a = F.avg_pool2d(s8, 3, 1, 1)
        b = F.adaptive_avg_pool2d(F.avg_pool2d(s16, 3, 1, 1), grid)
        texture = torch.cat([a, b], dim=1).flatten(2).transpose(1, 2).contiguous()
        return [
            (object_out[i, 0], object_out[i, 1:], attribution_out[i, 1:], texture[i])
            for i in range(object_out.shape[0])
        ]

    def score_object(self, cls, patches):
        s = self.stats
        score = torch.linalg.vector_norm(s.cls_w @ (cls.double() - s.cls_mean)).item()
        d_fg = torch.linalg.vector_norm(patches - s.fg, dim=1)
        d_bg = torch.linalg.vector_norm(patches - s.bg, dim=1)
        r = d_bg / (d_fg + RATIO_EPS)
        background = d_bg <= d_fg
        replacement = r[background].double().mean() if background.any() else r.double().mean()
        r = torch.where(r > TAU, replacement.float(), r)
        side = math.isqrt(r.numel())
        m = resize_map(min_max(grid_map(r, side)), self.obj_size)
        return score, resize_map(blur(m, SIGMA), EVAL)

    def score_attribution(self, patches):
        s = self.stats
        z = (patches.double() - s.attr_mean) @ s.attr_w.T
        n = z.shape[0]
        u = z.mean(0)
        d_g = torch.linalg.vector_norm(u)
        m = float(n - 1)
        e = u - z
        diff_sq = 2.0 * (e @ u) / m + (e * e).sum(1) / (m * m)
        d_without = (d_g * d_g + diff_sq).clamp_min(0).sqrt()
        c = (diff_sq / (d_without + d_g)).abs().float()
        side = math.isqrt(n)
        return d_g.item(), blur(resize_map(grid_map(c, side), EVAL), SIGMA)

    def score_texture(self, features):
        bank = self.stats.bank
        d, idx = torch.cdist(features, bank).min(dim=1)
        star = int(d.argmax())
        entry, d_star = int(idx[star]), d[star].double()
        around = torch.linalg.vector_norm(bank - bank[entry], dim=1)
        around[entry] = -1.0  # the entry itself comes first; drop it
        neighbours = around.topk(min(REWEIGHT_K, bank.shape[0]), largest=False).indices[1:]
        d_j = torch.linalg.vector_norm(features[star] - bank[neighbours], dim=1).double()
        total = torch.exp((d_j - d_star) / math.sqrt(bank.shape[1])).sum()
        weight = 1.0 - 1.0 / total if total > 0 else 1.0
        score = float(weight * d_star)
        side = math.isqrt(d.numel())
        return score, blur(resize_map(min_max(grid_map(d, side)), EVAL), SIGMA)

    def fuse(self, obj, attr, tex):
        raw = obj[1] * attr[1] * tex[1]
        map_max = raw.max().item()
        score = tex[0] + LAMBDA_OBJ * obj[0] + LAMBDA_MAP * map_max
        fused = blur(raw, FINAL_SIGMA, FINAL_KERNEL // 2)
        anomalous = None if self.threshold is None else score > self.threshold
        return score, fused, anomalous

    def score(self, token):
        cls, obj_patches, attr_patches, texture = token
        obj = self.score_object(cls, obj_patches)
        attr = self.score_attribution(attr_patches)
        tex = self.score_texture(texture)
        return self.fuse(obj, attr, tex)

    def forwards(self, inputs):
        o = self.forward_object(inputs)
        a = o if self.shared else self.forward_attribution(inputs)
        return o, a, self.forward_texture(inputs)

    def predict(self, paths, batch):
        results = []
        for i in range(0, len(paths), batch):
            inputs = self.preprocess(self.decode(paths[i : i + batch]))
            for token in self.tokens(*self.forwards(inputs)):
                results.append(self.score(token))
        return results


def line(config, batch, stage, seconds):
    print(f"pipeline {config} b{batch} {stage:<20} {seconds * 1e3:9.2f} ms/img", flush=True)


def bench_batch(p, paths, runs):
    batch = len(paths)
    total = 0.0

    def report(stage, fn):
        nonlocal total
        per_image = median_s(fn, runs) / batch
        total += per_image
        line(p.name, batch, stage, per_image)

    images = p.decode(paths)
    report("decode", lambda: p.decode(paths))
    inputs = p.preprocess(images)
    report("preprocess", lambda: p.preprocess(images))
    o = p.forward_object(inputs)
    report("forward_object", lambda: p.forward_object(inputs))
    if p.shared:
        a = o
    else:
        a = p.forward_attribution(inputs)
        report("forward_attribution", lambda: p.forward_attribution(inputs))
    t = p.forward_texture(inputs)
    report("forward_texture", lambda: p.forward_texture(inputs))
    tokens = p.tokens(o, a, t)
    report("tokens", lambda: p.tokens(o, a, t))
    report("score_object", lambda: [p.score_object(k[0], k[1]) for k in tokens])
    report("score_attribution", lambda: [p.score_attribution(k[2]) for k in tokens])
    report("score_texture", lambda: [p.score_texture(k[3]) for k in tokens])
    outputs = [(p.score_object(k[0], k[1]), p.score_attribution(k[2]), p.score_texture(k[3])) for k in tokens]
    report("fusion", lambda: [p.fuse(*x) for x in outputs])
    line(p.name, batch, "stages_sum", total)
    results = p.predict(paths, batch)
    line(p.name, batch, "predict", median_s(lambda: p.predict(paths, batch), runs) / batch)
    if batch == 1:
        print(f"# {p.name}: fused score of {paths[0]} = {results[0][0]:.6f}")


def test_images(data, count):
    """A spread over the test set, in beltad's order (defect folders, then good)."""
    test = data / "test"
    paths = []
    for folder in sorted(d for d in test.iterdir() if d.is_dir()):
        files = sorted(f for f in folder.iterdir() if f.suffix.lower() in {".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff"})
        paths.extend(files)
    step = max(len(paths) // count, 1)
    return paths[::step][:count]


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--runs", type=int, default=int(os.environ.get("BENCH_RUNS", RUNS)))
    parser.add_argument("--data", type=pathlib.Path, default=SHARED / "data" / "kolektorsdd")
    parser.add_argument("--weights", type=pathlib.Path, default=os.environ.get("BELTAD_WEIGHTS"))
    parser.add_argument("--model", action="append", default=[], metavar="CONFIG=PATH")
    parser.add_argument("--bank", type=int, default=1000, help="memory bank rows without --model")
    parser.add_argument("configs", nargs="*", metavar="CONFIG", help=f"any of {', '.join(CONFIGS)} (default: all)")
    args = parser.parse_args()
    unknown = [c for c in args.configs if c not in CONFIGS]
    if unknown:
        parser.error(f"unknown configuration {', '.join(unknown)}; known: {', '.join(CONFIGS)}")
    torch.set_num_threads(args.threads)
    models = dict(m.split("=", 1) for m in args.model)
    dirs = [d for d in (args.weights, SHARED / "weights") if d]
    paths = test_images(args.data, max(BATCHES))
    print(
        f"# PyTorch pipeline {torch.__version__}, {torch.get_num_threads()} threads, data {args.data}, "
        f"median of {args.runs} warm runs"
    )
    with torch.inference_mode():
        for name in args.configs or list(CONFIGS):
            p = Pipeline(name, dirs, models.get(name), args.bank)
            if p.missing:
                print(f"# {name}: skipped, no {', '.join(p.missing)} weights found")
                continue
            print(
                f"# {name}: {p.obj_kind}@{p.obj_size} / {p.attr_kind}@{p.attr_size} / {p.tex_kind}@{p.tex_size}, "
                f"{p.stats.source}, memory bank {p.stats.bank.shape[0]} x {p.stats.bank.shape[1]}, shared ViT forward: {p.shared}"
            )
            for batch in BATCHES:
                bench_batch(p, paths[:batch], args.runs)


if __name__ == "__main__":
    main()
