#!/usr/bin/env python3
"""Process-level numbers for BENCHMARKS.md: runs the release binary's `fit`
and `predict --no-images` as child processes and reports, per configuration,
fit throughput, wall times, peak resident memory (the child's ru_maxrss from
wait4) and the model file size.

Configurations: `default`, `single` (the default with the attribution input
at 350 so that both semantic branches share one ViT forward) and `paper`
(needs ViT-B/14 and WRN50-2 weights in --weights; see
tools/make_bench_weights.py).

Fit: on the first --fit-images training images of --data (sorted; linked
into a folder under --work). `fit images/s` is the number of training
images (fit + held out) over the fit time `beltad fit` reports (feature
extraction, branch fits and calibration; backbone loading excluded); the
process wall time is printed too. Predict: --predict-images test images
spread over the test set, default batch size, wall time per image including
start-up and backbone loading.

The model files stay in --work/models (<config>.beltad), for
`BENCH_MODEL_<CONFIG>` of `cargo bench --bench pipeline` and `--model` of
tools/bench_pipeline_torch.py. Lines read `process <config> <key> <value>`.

Run by hand (after `cargo build --release`):
  python3 tools/bench_process.py [--threads N] [--weights DIR] [default single paper]
"""

import argparse
import os
import pathlib
import re
import subprocess
import sys
import time

ROOT = pathlib.Path(__file__).resolve().parent.parent
BINARY = ROOT / "target" / "release" / "beltad"
DATA = ROOT.parent / "shared" / "data" / "kolektorsdd"
CONFIGS = ("default", "single", "paper")
SINGLE_TOML = "[attribution]\ninput_size = 350\n"
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff"}


def images(folder):
    return sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)


def run(cmd, log):
    """(wall s, peak RSS in MiB, CPU s, stdout) of a child process."""
    with open(log, "w") as out:
        start = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT)
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - start
    proc.returncode = os.waitstatus_to_exitcode(status)
    text = pathlib.Path(log).read_text()
    if proc.returncode != 0:
        sys.exit(f"{' '.join(map(str, cmd))} failed ({proc.returncode}):\n{text}")
    # Linux reports ru_maxrss in KiB.
    return wall, usage.ru_maxrss / 1024.0, usage.ru_utime + usage.ru_stime, text


def report(config, key, value):
    print(f"process {config} {key} {value}", flush=True)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--data", type=pathlib.Path, default=DATA)
    parser.add_argument("--weights", type=pathlib.Path, default=None)
    parser.add_argument("--work", type=pathlib.Path, default=pathlib.Path("/tmp/beltad-bench"))
    parser.add_argument("--fit-images", type=int, default=24)
    parser.add_argument("--predict-images", type=int, default=8)
    parser.add_argument("configs", nargs="*", metavar="CONFIG", help=f"any of {', '.join(CONFIGS)} (default: all)")
    args = parser.parse_args()
    unknown = [c for c in args.configs if c not in CONFIGS]
    if unknown:
        parser.error(f"unknown configuration {', '.join(unknown)}; known: {', '.join(CONFIGS)}")
    if not BINARY.is_file():
        sys.exit(f"{BINARY}: not built; run cargo build --release")

    work = args.work.resolve()
    train = work / f"train_{args.fit_images}"
    train.mkdir(parents=True, exist_ok=True)
    for old in train.iterdir():
        old.unlink()
    for src in images(args.data / "train" / "good")[: args.fit_images]:
        (train / src.name).symlink_to(src.resolve())
    test = [p for d in sorted((args.data / "test").iterdir()) if d.is_dir() for p in images(d)]
    step = max(len(test) // args.predict_images, 1)
    predict_images = test[::step][: args.predict_images]
    (work / "models").mkdir(exist_ok=True)
    single_toml = work / "single.toml"
    single_toml.write_text(SINGLE_TOML)

    common = [str(BINARY), "--quiet", "--threads", str(args.threads)]
    weights = ["--weights", str(args.weights)] if args.weights else []
    print(f"# beltad processes, {args.threads} threads, data {args.data}, work folder {work}", flush=True)
    for config in args.configs or CONFIGS:
        preset = ["--preset", "paper"] if config == "paper" else []
        extra = ["--config", str(single_toml)] if config == "single" else []
        model = work / "models" / f"{config}.beltad"
        fit_cmd = common + ["fit", "--data", str(train), "--model", str(model)] + preset + extra + weights
        wall, rss, cpu, text = run(fit_cmd, work / f"fit_{config}.log")
        found = re.search(r"on (\d+) images .*?(\d+) held out\) in ([\d.]+) s", text)
        if not found:
            sys.exit(f"cannot read the fit summary:\n{text}")
        n_fit, n_held, fit_s = int(found[1]), int(found[2]), float(found[3])
        n = n_fit + n_held
        report(config, "fit_images", n)
        report(config, "fit_seconds", f"{fit_s:.2f}")
        report(config, "fit_images_per_s", f"{n / fit_s:.3f}")
        report(config, "fit_process_wall_s", f"{wall:.2f}")
        report(config, "fit_process_cpu_s", f"{cpu:.2f}")
        report(config, "fit_peak_rss_mib", f"{rss:.0f}")
        report(config, "model_bytes", model.stat().st_size)
        report(config, "model_path", model)

        out = work / f"predict_{config}"
        predict_cmd = common + ["predict", "--model", str(model), "--out", str(out), "--no-images"]
        predict_cmd += weights + [str(p) for p in predict_images]
        wall, rss, cpu, _ = run(predict_cmd, work / f"predict_{config}.log")
        report(config, "predict_images", len(predict_images))
        report(config, "predict_process_wall_s", f"{wall:.2f}")
        report(config, "predict_process_s_per_image", f"{wall / len(predict_images):.3f}")
        report(config, "predict_peak_rss_mib", f"{rss:.0f}")


if __name__ == "__main__":
    main()
