#!/usr/bin/env bash
# The demo's GPU preset (and the ablations at that preset) on one H100 or H200, resumable across device calls:
# `esft-jax demo --preset small`, or `esft-jax ablate configs/ablations/NAME.json --preset small`, under a
# deadline (DEADLINE seconds, default 540, inside a 600 s per-command limit). Workspaces live under
# runs/ (git-ignored), which a still-warm machine keeps between calls, so a second call started within the
# machine's warm period resumes where the first stopped (finished stages are cached).
#
#   OUT=/tmp/out bash experiments/gpu_demo.sh                   # the demo; again until $OUT/demo.txt says "finished"
#   OUT=/tmp/out bash experiments/gpu_demo.sh demo --setting mixed   # further arguments go to the command
#   OUT=/tmp/out bash experiments/gpu_demo.sh random_experts    # an ablation on the demo's cached base
#   (NAME is a config in configs/ablations/; granularity_groups_small fits the small preset's top-6)
#   OUT=/tmp/out bash experiments/gpu_demo.sh threshold --seed 0 1   # these seeds (default: the preset's 0 1 2)
#   OUT=/tmp/out bash experiments/gpu_demo.sh threshold \
#     --lr-search experiments/results/2026-12-08-demo-small-h100/lr_search.json   # the committed search's rates
#
# The demo and the ablations share one pretrained base (runs/demo-small/cache): whichever asks first pretrains it
# and the others wait for it (a lock file beside it), so several can start together, on one GPU or on two:
#   CUDA_VISIBLE_DEVICES=0 bash experiments/gpu_demo.sh & CUDA_VISIBLE_DEVICES=1 bash experiments/gpu_demo.sh NAME
#   bash experiments/gpu_demo.sh threshold & bash experiments/gpu_demo.sh granularity_groups_small
#
# Each call appends the command's log to $OUT/NAME.txt and packs REPORT.md, results.json, the figures and the
# per-run summaries (no weights) into $OUT/NAME_small.tar.gz. grain and tensorboardX are not on the GPU image:
# their wheels, downloaded into .whl/, are copied to the GPU machine beside the checkout.
set -u -o pipefail
cd "$(dirname "$0")/.."
NAME=${1:-demo}
shift || true
OUT=$(realpath -m "${OUT:-build/gpu_demo}")
DEADLINE=${DEADLINE:-540}
CACHE=runs/demo-small/cache
mkdir -p "$OUT" "$CACHE"
log="$OUT/$NAME.txt"
if [[ -d .whl ]]; then
  # --no-index --no-deps: the machine reaches no index, and the wheels' own needs are on the image already
  # (resolving them without --no-deps would ask the index, fail, and leave `import grain` failing).
  # One target per NAME: a demo and an ablation started together do not install into one folder at once.
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "/tmp/site-$NAME" \
    .whl/*.whl >"/tmp/pip_$NAME.txt" 2>&1 || { echo "installing .whl/ failed:"; tail -5 "/tmp/pip_$NAME.txt"; } | tee -a "$log"
  export PYTHONPATH=/tmp/site-$NAME:$PWD
fi
{
  date -u
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
  python3 -c "import sys, jax, flax, optax; print('python', sys.version.split()[0], '| jax', jax.__version__, '| flax', flax.__version__, '| optax', optax.__version__)"
} 2>&1 | tee -a "$log"
start=$SECONDS
if [[ $NAME == demo ]]; then
  work=runs/demo-small/out
  command=(demo)
  report=$work
else
  work=runs/ablations-small/$NAME
  command=(ablate "configs/ablations/$NAME.json")
  report=$work/ablations/$NAME
fi
left=$((DEADLINE - SECONDS))  # the wheels' install counts too
((left > 0)) || { echo "no time left before the deadline" | tee -a "$log"; exit 1; }
timeout -k 10 "$left" python3 -m esft_jax.cli "${command[@]}" --preset small --out "$work" --cache "$CACHE" \
  ${WORKERS:+--workers "$WORKERS"} "$@" 2>&1 \
  | tee -a "$log"
rc=${PIPESTATUS[0]}
if ((rc == 0)); then how=finished; elif ((rc == 124 || rc == 137)); then how="stopped at the deadline"; else how="exit $rc"; fi
echo "$NAME call: $how after $((SECONDS - start)) s" | tee -a "$log"
(cd "$report" && tar czf "$OUT/${NAME}_small.tar.gz" --ignore-failed-read REPORT.md results.json lr_search.json \
  figures *.png seed-*/figures seed-*/runs/*/summary.json seed-*/runs/*/eval.json seed-*/runs/*/metrics.jsonl \
  seed-*/runs/*_eval.json seed-*/runs/*_eval-*.json seed-*/scores/*/summary.json seed-*/scores/*/experts_*.json \
  seed-*/scores/*/*/summary.json seed-*/expert_configs seed-*/cooccurrence.json ../granularity.png 2>/dev/null) || true
