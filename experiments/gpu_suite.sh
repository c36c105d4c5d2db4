#!/usr/bin/env bash
# The single-GPU benchmarks of BENCHMARKS.md in one device command: each piece under its own time limit, all of
# them under one deadline (DEADLINE seconds, default 550, inside a 600 s per-command limit), in this order:
#
#   OUT=/tmp/out bash experiments/gpu_suite.sh             # everything
#   ONLY=moe,train_27_remat bash experiments/gpu_suite.sh     # some pieces (names below)
#
# Each piece writes its stdout and stderr to $OUT/<piece>.txt as it runs, so a piece cut short keeps the rows
# it finished; $OUT/suite.txt holds the machine, the versions, and how each piece ended and how long it took.
# Compiled XLA programs are cached under build/jax-cache, so a second call on a still-warm machine skips most
# compiles.
#
# Pieces, with the wall time each takes on an H200 (compiles dominate: the tables' "first s" is the first step,
# compile included):
#   kernels      200-300 s   the expert kernels and the row-gather kernel against the reference, on the GPU
#                            (pytest; the interpreted tests are left to CI; cold, one call may not finish them all)
#   attention    90-104 s   the fused attention against the reference, values and gradients (pytest), on the GPU
#                            cuDNN given the segments (as lengths, or packed offsets) and jax.nn's with a window
#   attention_bench   34 s   attention alone at MLA widths, 8 x 2048, one document per row: reference, the model's
#                            fused path (built for 1 and for 8 segments per row), the mask as a bias, cuDNN
#                            causal without segments
#   attention_packed  15 s   the same with 4 packed documents per row (fused built for 4 and for 16)
#   train_8      154-203 s  8 layers, batch 8 x 2048, 8 experts/layer: torch, auto with reference
#                            attention, then auto (fused attention on the GPU), each JAX path with its
#                            forward/backward breakdown and device time by model part and kernel (--profile
#                            traces in a process of its own, one more compile per JAX path)
#   train_8_all_grads  67 s  the same, every routed expert's weight gradient computed (not only the trained ones')
#   train_27     68-113 s   the full 27 layers at batch 4 x 2048 without remat, auto
#   train_27_b8       99 s   the same at batch 8 x 2048 without remat
#   train_27_profile ~220 s  batch 8 x 2048 with --profile: device time by model part, the operations left in
#                            "other" and the idle stretches
#   infer         ~2.5 min   scoring vs forward (8 x 2048) and generation vs transformers (8 layers)
#   train_27_torch     23 s  the PyTorch step at 27 layers, batch 2 (out of memory on one H200)
#   moe             >150 s   expert FFN at 16k, 32k, 65k rows, even and skewed, tiled and torch (may end before
#                            the 65k skewed rows)
#   moe_profile      ~120 s  expert FFN at 65k rows, tiled only, with device time per call by kernel and operation
#   moe_tokens       202 s   expert FFN at 16k and 64k tokens (98,304 and 393,216 rows at top-6), tiled and torch
#   train_27_remat     96 s  27 layers at batch 8 x 2048 with --remat (layers recomputed), reference and
#                            fused attention
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
piece kernels 300 "$PY" -m pytest -q tests/test_kernels.py -k "gpu or grouped_matmul"
piece attention 120 "$PY" -m pytest -q tests/test_model.py -k "attention or spans"
attention_bench=("$PY" experiments/bench_attention.py --batch 8 --seq 2048)
piece attention_bench 120 bash -c '"$@" && "$@" --max-segments 8 --variants fused' - "${attention_bench[@]}"
piece attention_packed 90 bash -c '"$@" --segments 4 && "$@" --segments 4 --max-segments 16 --variants fused' - \
  "${attention_bench[@]}"
piece train_8 330 "${train[@]}" --layers 8 --batch 8 --iters 5 --paths torch,auto+reference,auto --breakdown \
  --profile /tmp/trace_8 --timeout 130
piece train_8_all_grads 150 "${train[@]}" --layers 8 --batch 8 --iters 5 --paths auto --all-expert-grads --timeout 140
piece train_27 240 "${train[@]}" --layers 27 --batch 4 --iters 3 --paths auto --timeout 230
piece train_27_b8 240 "${train[@]}" --layers 27 --batch 8 --iters 3 --paths auto --timeout 230
piece train_27_profile 300 "${train[@]}" --layers 27 --batch 8 --iters 3 --paths auto --profile /tmp/trace_27 \
  --timeout 290
piece infer 200 "$PY" experiments/bench_infer.py --layers 8 --batch 8 --seq 2048 --gen-batch 16 --prompt-len 128 \
  --new-tokens 64 --agree 16
piece train_27_torch 100 "${train[@]}" --layers 27 --batch 2 --iters 3 --paths torch --timeout 90
piece moe 150 "$PY" experiments/bench_moe.py --rows 16384,32768,65536 --paths tiled,torch --iters 5 --warmup 2
piece moe_profile 150 "$PY" experiments/bench_moe.py --rows 65536 --paths tiled --iters 5 --warmup 2 \
  --profile /tmp/trace_moe
piece moe_tokens 240 "$PY" experiments/bench_moe.py --rows 98304,393216 --paths tiled,torch --iters 5 --warmup 2
piece train_27_remat 300 "${train[@]}" --layers 27 --batch 8 --remat --iters 3 --paths auto+reference,auto --timeout 140
echo "suite: $SECONDS s in all" | tee -a "$OUT/suite.txt"
