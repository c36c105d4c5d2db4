#!/usr/bin/env bash
# The GPU benchmarks of issue #6 in one call on one H200: each piece under its own time limit, all of them
# under one deadline (DEADLINE seconds, default 550, inside the device tool's 600 s per command), in order of
# what is least known:
#
#   OUT=/tmp/out bash experiments/gpu_suite.sh             # everything
#   ONLY=moe,train_27_remat bash experiments/gpu_suite.sh     # some pieces (names below)
#
# Each piece writes its stdout and stderr to $OUT/<piece>.txt as it runs, so a piece cut short keeps the rows
# it finished; $OUT/suite.txt holds the machine, the versions, and how each piece ended and how long it took.
# Compiled XLA programs are cached under build/jax-cache, so a second call on a still-warm machine skips most
# compiles.
#
# Guessed times on an H200 (compiles dominate and were never timed: the pieces print "first s", the first
# step including its compile):
#   train_8        ~2 min   8 layers, batch 8 x 2048, 8 experts/layer: torch then auto (with the forward /
#                           backward / optimizer breakdown)
#   train_8_all_grads ~1.5 min the same, every routed expert's weight gradient computed (before ESFT skipped
#                           the frozen experts')
#   train_27       ~3 min   the full 27 layers at batch 2 x 2048, auto (batch 4 needs ~150 GiB by estimate)
#   infer          ~2.5 min scoring vs forward (8 x 2048) and generation vs transformers (8 layers)
#   train_27_torch ~1 min   the PyTorch step at 27 layers, batch 2 (out of memory at batch 4 in the baseline)
#   moe            ~2 min   expert FFN at 16k, 32k, 65k rows, even and skewed, tiled and torch
#   train_27_remat    ~3 min   27 layers at batch 8 x 2048 with --remat (layers recomputed), auto; runs only if
#                           the deadline leaves room (batch 2 without remat measured 111 GiB)
set -u -o pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-build/gpu_suite}
DEADLINE=${DEADLINE:-550}
ONLY=${ONLY:-}
PY=${PY:-python3}
export JAX_COMPILATION_CACHE_DIR=${JAX_COMPILATION_CACHE_DIR:-$PWD/build/jax-cache}
mkdir -p "$OUT"

source experiments/pieces.sh

{
  date -u
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
  timeout 60 $PY -c "import sys, jax, torch, transformers; print('python', sys.version.split()[0], '| jax',
jax.__version__, '| torch', torch.__version__, '| transformers', transformers.__version__)"
} 2>&1 | tee "$OUT/suite.txt"

train=("$PY" experiments/bench_train.py --seq 2048 --experts-per-layer 8)
piece train_8 200 "${train[@]}" --layers 8 --batch 8 --iters 5 --paths torch,auto --breakdown --timeout 180
piece train_8_all_grads 150 "${train[@]}" --layers 8 --batch 8 --iters 5 --paths auto --all-expert-grads --timeout 140
piece train_27 240 "${train[@]}" --layers 27 --batch 2 --iters 3 --paths auto --timeout 230
piece infer 200 "$PY" experiments/bench_infer.py --layers 8 --batch 8 --seq 2048 --gen-batch 16 --prompt-len 128 \
  --new-tokens 64 --agree 16
piece train_27_torch 100 "${train[@]}" --layers 27 --batch 2 --iters 3 --paths torch --timeout 90
piece moe 150 "$PY" experiments/bench_moe.py --rows 16384,32768,65536 --paths tiled,torch --iters 5 --warmup 2
piece train_27_remat 240 "${train[@]}" --layers 27 --batch 8 --remat --iters 3 --paths auto --timeout 230
echo "suite: $SECONDS s in all" | tee -a "$OUT/suite.txt"
