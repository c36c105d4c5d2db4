#!/usr/bin/env bash
# Issue #5's GPU preset on one H200, resumable across device calls: `esft-jax demo --preset small` under a
# deadline (DEADLINE seconds, default 540, inside the device tool's 600 s per command). The workspace and its
# cache live under runs/demo-small (git-ignored), which a still-warm machine keeps between calls, so a second
# call started within the machine's warm period resumes where the first stopped (finished stages are cached).
#
#   OUT=/tmp/out bash experiments/gpu_demo.sh      # then the same again until $OUT/demo.txt says "finished"
#
# Each call appends the demo's log to $OUT/demo.txt and packs REPORT.md, results.json, the figures and the
# per-run summaries (no weights) into $OUT/demo_small.tar.gz. grain and tensorboardX are not on the GPU image:
# their wheels, downloaded here into .whl/, travel with the call (`carry: [".whl"]`).
set -u -o pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-build/gpu_demo}
DEADLINE=${DEADLINE:-540}
WORK=runs/demo-small
mkdir -p "$OUT" "$WORK"
if [[ -d .whl ]]; then
  # --no-index --no-deps: the machine reaches no index, and the wheels' own needs are on the image already
  # (resolving them without --no-deps asks the index and fails: the first device call died on `import grain`)
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    >"$OUT/pip.txt" 2>&1 || { echo "installing .whl/ failed:"; tail -5 "$OUT/pip.txt"; } | tee -a "$OUT/demo.txt"
  export PYTHONPATH=/tmp/site:$PWD
fi
{
  date -u
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
  python3 -c "import sys, jax, flax, optax; print('python', sys.version.split()[0], '| jax', jax.__version__, '| flax', flax.__version__, '| optax', optax.__version__)"
} 2>&1 | tee -a "$OUT/demo.txt"
start=$SECONDS
timeout -k 10 "$DEADLINE" python3 -m esft_jax.cli demo --preset small --out "$WORK/out" --cache "$WORK/cache" \
  2>&1 | tee -a "$OUT/demo.txt"
rc=${PIPESTATUS[0]}
if ((rc == 0)); then how=finished; elif ((rc == 124 || rc == 137)); then how="stopped at the deadline"; else how="exit $rc"; fi
echo "demo call: $how after $((SECONDS - start)) s" | tee -a "$OUT/demo.txt"
(cd "$WORK/out" && tar czf "$OLDPWD/$OUT/demo_small.tar.gz" --ignore-failed-read REPORT.md results.json figures \
  runs/*/summary.json runs/*/eval.json runs/base_eval.json scores/*/summary.json scores/*/experts_*.json \
  2>/dev/null) || true
