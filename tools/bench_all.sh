#!/usr/bin/env bash
# Runs every benchmark behind BENCHMARKS.md, beltad and PyTorch side by side,
# and writes the tables. By hand only (needs torch; never run in CI).
#
#   tools/bench_all.sh [RESULTS_DIR]        (default: $BENCH_WORK/results)
#
# Environment: PYTHON (a Python with torch, timm, torchvision, safetensors;
# default /work/pyenv/bin/python), THREADS (default: nproc), BENCH_WORK
# (scratch folder, default /tmp/beltad-bench), BENCH_WEIGHTS_DIR (random
# full-size ViT-B/14 and WRN50-2 weights for the paper preset, made there by
# tools/make_bench_weights.py when missing; default /tmp/beltad-bench-weights),
# FIT_IMAGES (default 24), PREDICT_IMAGES (default 8), BENCH_RUNS (timed runs
# per pipeline stage, default 5), BACKBONES=0 (skip the backbone benches).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-/work/pyenv/bin/python}
THREADS=${THREADS:-$(nproc)}
WORK=${BENCH_WORK:-/tmp/beltad-bench}
OUT=${1:-$WORK/results}
WEIGHTS=${BENCH_WEIGHTS_DIR:-/tmp/beltad-bench-weights}
mkdir -p "$OUT"
[ -f "$WEIGHTS/dinov2_vitb14.safetensors" ] || "$PY" tools/make_bench_weights.py "$WEIGHTS"
cargo build --release --quiet
cargo bench --no-run --quiet --bench backbones --bench pipeline
export RAYON_NUM_THREADS=$THREADS BELTAD_WEIGHTS=$WEIGHTS
load() { echo "$(date -u +%T) $1: $(cut -d' ' -f1-3 /proc/loadavg)" | tee -a "$OUT/load.txt"; }
: > "$OUT/load.txt"
{ lscpu | grep -E '^(Model name|CPU\(s\)|Thread|Core|Socket|Flags)' | cut -c1-200; echo "nproc: $(nproc)"; echo "threads: $THREADS"; rustc --version; "$PY" -c 'import torch, timm, torchvision; print("torch", torch.__version__, "timm", timm.__version__, "torchvision", torchvision.__version__)'; } > "$OUT/machine.txt"

load "process"
python3 tools/bench_process.py --threads "$THREADS" --weights "$WEIGHTS" --work "$WORK" \
    --fit-images "${FIT_IMAGES:-24}" --predict-images "${PREDICT_IMAGES:-8}" | tee "$OUT/process.txt"
M=$WORK/models
load "rust pipeline"
BENCH_MODEL_DEFAULT=$M/default.beltad BENCH_MODEL_SINGLE=$M/single.beltad BENCH_MODEL_PAPER=$M/paper.beltad \
    cargo bench --quiet --bench pipeline | tee "$OUT/rust_pipeline.txt"
load "torch pipeline"
"$PY" tools/bench_pipeline_torch.py --threads "$THREADS" --weights "$WEIGHTS" \
    --model default="$M/default.beltad" --model single="$M/single.beltad" --model paper="$M/paper.beltad" \
    | tee "$OUT/torch_pipeline.txt"
if [ "${BACKBONES:-1}" != 0 ]; then
    load "rust backbones"
    cargo bench --quiet --bench backbones -- backbones | tee "$OUT/rust_backbones.txt"
    load "torch backbones"
    "$PY" tools/bench_backbones_torch.py --threads "$THREADS" | tee "$OUT/torch_backbones.txt"
fi
load "end"
python3 tools/bench_compare.py --beltad "$OUT"/rust_*.txt --torch "$OUT"/torch_*.txt \
    --process "$OUT/process.txt" | tee "$OUT/tables.md"
