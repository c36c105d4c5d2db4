# run from .dev_memplan; $OUT set
export XLA_PYTHON_CLIENT_PREALLOCATE=false PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
python3 -c "import jax; print('jax', jax.__version__, jax.devices())"
run() { n=$1; shift; dump=""; if [ "$DUMP" = "$n" ] || [[ " $DUMPS " == *" $n "* ]]; then dump="--xla_dump_to=/tmp/hlo_$n --xla_dump_hlo_as_text --xla_dump_hlo_module_re=jit_step"; fi
  XLA_FLAGS="$dump" timeout 240 python3 probe/probe_gpu.py $n "$@" > /tmp/log_$n.txt 2>&1; echo "exit $? $n" >> /tmp/log_$n.txt
  if [ -n "$dump" ]; then f=$(ls /tmp/hlo_$n/*jit_step*after_optimizations.txt | head -1); (cd experiments && python3 hlo_live.py $f --top 14) >> /tmp/log_$n.txt 2>&1; fi; }
