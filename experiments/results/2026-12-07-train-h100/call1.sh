# from .dev_memplan, OUT set
source probe/probe.sh
export DUMPS="A B"
SECONDS=0
(run A 27 1 2048 1 0 base & run B 27 1 2048 1 0 fix & wait)
for n in A B; do f=$(ls /tmp/hlo_$n/*jit_step*after_optimizations.txt | head -1); gzip -c $f > $OUT/$n.hlo.gz; done
cat /tmp/log_A.txt /tmp/log_B.txt | grep -v "^WARNING\|^I0000\|^W0000\|^E0000" > $OUT/probe.txt
echo "probes done at $SECONDS s" | tee -a $OUT/probe.txt
unset XLA_PYTHON_CLIENT_PREALLOCATE
if nvidia-smi --query-gpu=name --format=csv,noheader | grep -q H200; then export XLA_PYTHON_CLIENT_MEM_FRACTION=0.538; fi  # an H100 80 GB's 0.95 x 79.6 GiB
B="python3 experiments/bench_train.py --layers 27 --seq 4096 --experts-per-layer 8 --paths auto --iters 3 --timeout 200"
$B --batch 1 --grad-accum 32 2>&1 | grep -v "^WARNING\|^I0000\|^W0000" | tee $OUT/train27_b1.txt
echo "bench 1 done at $SECONDS s" | tee -a $OUT/train27_b1.txt
if [ $SECONDS -lt 250 ]; then $B --batch 2 --grad-accum 16 --remat 2>&1 | grep -v "^WARNING\|^I0000\|^W0000" | tee $OUT/train27_b2_remat.txt; fi
echo "all done at $SECONDS s"
