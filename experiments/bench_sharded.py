"""Sharded training-step throughput and memory: one row per (method, mesh), each measured in its own process.

    python experiments/bench_sharded.py --meshes data=1 data=2 expert=2 --layers 8 --batch 8 --seq 2048
    python experiments/bench_sharded.py --methods esft fft --meshes fsdp=2 --layers 27 --batch 1 --seq 2048
    python experiments/bench_sharded.py --tiny          # tiny-deepseek on 8 simulated CPU devices, seconds

The model has DeepSeek-V2-Lite's widths (or tiny-deepseek's with --tiny) at `--layers` depth, random bf16 weights
created directly in their shardings, so a model larger than one device is never whole on one. ESFT trains
`--experts-per-layer` routed experts of every MoE layer, FFT every parameter; both with the project's own
`make_train_step` and `step_shardings`, fp32 master copies and AdamW state (`--master-dtype bfloat16` for both in
bf16, to see what fits: a time and memory measurement, not a training recipe, since bf16 weights round away
updates as small as fine-tuning's). A mesh that names fewer devices than the machine has runs on the first ones.
`--batch` is per batch shard (per device unless the mesh has a tensor axis), so the global batch grows with the
mesh and rows of one invocation are a weak-scaling series. Columns:

- ms/step: the mean of `--iters` steps run back to back after one warm-up step (experiments/timing.py).
- scaling: tokens/s over the one-device row of the same method (2.0 is perfect on two devices).
- peak GiB/dev: the largest `peak_bytes_in_use` over the mesh's devices, for the whole process (n/a on CPU).
- XLA GiB/dev, XLA TFLOP/dev: XLA's analysis of the compiled per-device step (its planned peak, as the trainer
  reports it; FLOPs). Kernels XLA cannot see into (the Pallas expert kernels on Hopper) count no FLOPs, and on
  GPUs the rest varied between invocations of one program (0.55 to 2.81 TFLOP for the same 8-layer step, 2026-11-30):
  compare it only within one invocation. At a fixed per-device batch TFLOP/dev should not grow with the mesh: where
  it does, work is replicated, not split.
- first loss: the loss of the warm-up step, before any update; rows with the same global batch must agree.

A row that runs out of device memory says so (and where: init, compile or step); the other rows go on. A row
running past `--row-timeout` seconds is stopped and marked; on SIGTERM the running row is stopped and the table
of the rows so far printed. One process sees every device; multi-host runs are not covered here.
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import os
import signal
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from esft_jax import sharding  # noqa: E402
from esft_jax.config import config_from_hf, read_hf_config  # noqa: E402
from esft_jax.esft.trainable import TrainPlan, count_parameters, init_trainable, plan_from_expert_config  # noqa: E402
from esft_jax.model.transformer import Transformer, init_params  # noqa: E402
from esft_jax.train.optimizer import DEFAULT_LR, learning_rate_schedule, make_optimizer  # noqa: E402
from esft_jax.train.trainer import TrainState, make_train_step, planned_peak_bytes, step_shardings  # noqa: E402
from timing import step_ms  # noqa: E402

GIB = 2**30
FULL = dict(layers=8, batch=8, seq=2048, experts_per_layer=8, iters=5)
TINY = dict(layers=3, batch=2, seq=64, experts_per_layer=2, iters=2)
TINY_DEVICES = 8
ROW_PREFIX = "ROW "


def parse_args() -> argparse.Namespace:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--meshes", nargs="+", default=["data=1", "data=2", "expert=2", "fsdp=2"],
                      help="one row per mesh (--mesh syntax, e.g. data=2,fsdp=2); the device count is the mesh's")
  parser.add_argument("--methods", nargs="+", default=["esft"], choices=["esft", "fft"])
  parser.add_argument("--layers", type=int, help="decoder layers (layer 0 dense, the rest MoE); 8, tiny 3")
  parser.add_argument("--batch", type=int, help="sequences per batch shard; 8, tiny 2")
  parser.add_argument("--seq", type=int, help="tokens per sequence; 2048, tiny 64")
  parser.add_argument("--experts-per-layer", type=int, help="ESFT: trainable experts per MoE layer; 8, tiny 2")
  parser.add_argument("--iters", type=int, help="timed steps; 5, tiny 2")
  parser.add_argument("--master-dtype", default="float32", choices=["float32", "bfloat16"],
                      help="trainable copies and AdamW state (the trainer keeps fp32)")
  parser.add_argument("--expert-impl", default="auto", help="routed-expert path (esft_jax.model.experts)")
  parser.add_argument("--remat", action="store_true", help="recompute each decoder layer in the backward pass")
  parser.add_argument("--row-timeout", type=float, default=None, help="seconds before a row is stopped")
  parser.add_argument("--tiny", action="store_true",
                      help=f"tiny-deepseek in fp32 on {TINY_DEVICES} simulated CPU devices, to keep this working")
  parser.add_argument("--row", nargs=2, metavar=("METHOD", "MESH"), help=argparse.SUPPRESS)  # one child row
  args = parser.parse_args()
  for name, default in (TINY if args.tiny else FULL).items():
    if getattr(args, name) is None:
      setattr(args, name, default)
  return args


def _mesh(spec: str):
  """The mesh of `spec` over the first devices it needs (every device where an axis is -1)."""
  axes = sharding.parse_mesh(spec)
  devices = jax.devices()
  if -1 not in axes.values():
    wanted = math.prod(axes.values())
    if wanted > len(devices):
      raise ValueError(f"mesh {spec} needs {wanted} devices; this machine has {len(devices)}")
    devices = devices[:wanted]
  return sharding.make_mesh(axes, devices)


def _plan(method: str, config, experts_per_layer: int) -> TrainPlan:
  if method == "fft":
    return TrainPlan("fft")
  return plan_from_expert_config({"experts": {str(layer): list(range(experts_per_layer))
                                              for layer in config.moe_layer_ids}})


def _batch(global_batch: int, seq: int, vocab: int) -> dict[str, np.ndarray]:
  """One micro-batch [1, B, L] of random tokens; the same for every mesh with the same global batch."""
  tokens = np.random.default_rng(0).integers(3, vocab, size=(1, global_batch, seq + 1)).astype(np.int32)
  shape = (1, global_batch, seq)
  return {"inputs": tokens[..., :-1], "targets": tokens[..., 1:], "loss_mask": np.ones(shape, np.float32),
          "segment_ids": np.ones(shape, np.int32),
          "positions": np.broadcast_to(np.arange(seq, dtype=np.int32), shape).copy()}


def _peak_gib(mesh) -> float | None:
  stats = [d.memory_stats() for d in mesh.devices.flat]
  if not all(stats):
    return None
  return max(s["peak_bytes_in_use"] for s in stats) / GIB


def _is_oom(error: Exception) -> bool:
  text = str(error)
  return "RESOURCE_EXHAUSTED" in text or "out of memory" in text.lower()


def measure(args: argparse.Namespace, method: str, spec: str) -> dict:
  """One configuration, in this process: build, compile, warm up, time."""
  hf = read_hf_config("tiny-deepseek" if args.tiny else "deepseek-v2-lite")
  config = config_from_hf(dict(hf, num_hidden_layers=args.layers))
  mesh = _mesh(spec)
  dtype = jnp.float32 if args.tiny else jnp.bfloat16
  master = jnp.dtype(args.master_dtype)
  plan = _plan(method, config, args.experts_per_layer)
  global_batch = args.batch * sharding.batch_parallelism(mesh)
  row = {"mesh": spec, "method": method, "devices": mesh.size, "global_batch": global_batch,
         "device_kind": mesh.devices.flat[0].device_kind, "jax": jax.__version__, "status": "ok"}
  stage = "init"
  try:
    # Created in their shardings: a model larger than one device is never whole on one.
    params = jax.jit(functools.partial(init_params, config, param_dtype=dtype),
                     out_shardings=sharding.param_shardings(config, mesh))(jax.random.key(0))
    schedule = learning_rate_schedule(DEFAULT_LR[method], steps=1)
    optimizer = make_optimizer(jax.eval_shape(lambda p: init_trainable(plan, p, dtype=master), params), schedule)

    def init_state(frozen, stacks) -> TrainState:
      trainable = init_trainable(plan, plan.experts.join(frozen, stacks), dtype=master)
      return TrainState(jnp.zeros((), jnp.int32), trainable, optimizer.init(trainable), stacks)

    frozen, stacks = plan.experts.split(params)  # the step donates the state and its stacks: params are not used again
    del params
    shardings = step_shardings(config, plan, mesh, jax.eval_shape(init_state, frozen, stacks))
    state = jax.jit(init_state, out_shardings=shardings.state, donate_argnums=(1,))(frozen, stacks)
    row["trainable"] = count_parameters(state.trainable)
    batch = sharding.global_batch(_batch(global_batch, args.seq, config.vocab_size), shardings.batch)
    model = Transformer(config, expert_impl=args.expert_impl, dtype=dtype, remat=args.remat,
                        trained_experts=plan.trained_experts, max_segments=1, mesh=mesh)

    stage = "compile"
    start = time.perf_counter()
    step = make_train_step(model, plan, optimizer, schedule, shardings).lower(state, frozen, batch).compile()
    row["compile_s"] = time.perf_counter() - start
    planned, cost = planned_peak_bytes(step), step.cost_analysis()
    cost = cost[0] if isinstance(cost, list) else cost  # one entry per program in older jax
    if planned is not None:
      row["xla_gib"] = planned / GIB
    if cost and "flops" in cost:
      row["tflop"] = cost["flops"] / 1e12

    stage = "step"
    state, metrics = step(state, frozen, batch)
    row["first_loss"] = float(metrics["loss"])
    _, row["ms"], _ = step_ms(step, (state,), frozen, batch, iters=args.iters)
  except Exception as error:  # an out-of-memory row is a result; anything else is a bug
    if not _is_oom(error):
      raise
    row["status"] = f"out of memory ({stage})"
  row["peak_gib"] = _peak_gib(mesh)
  return row


class Stopped(Exception):
  """SIGTERM (`timeout` around the whole run): the running row is ended and the table printed."""


def _stop(signum, frame):
  raise Stopped


def _child_env(args: argparse.Namespace) -> dict[str, str]:
  env = dict(os.environ)
  env.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.95")  # XLA's default 75% would waste a quarter of the GPU
  if args.tiny:
    env["JAX_PLATFORMS"] = "cpu"
    flags = env.get("XLA_FLAGS", "")
    if "xla_force_host_platform_device_count" not in flags:
      # Single-threaded kernels keep the simulated devices from spinning on a small machine's cores.
      flags += f" --xla_force_host_platform_device_count={TINY_DEVICES} --xla_cpu_multi_thread_eigen=false"
    env["XLA_FLAGS"] = flags.strip()
  return env


def run_row(args: argparse.Namespace, method: str, spec: str) -> dict:
  """`measure` in a child process, so that peak memory is this row's and a crash or an OOM stays in it."""
  options = ["--layers", args.layers, "--batch", args.batch, "--seq", args.seq, "--experts-per-layer",
             args.experts_per_layer, "--iters", args.iters, "--master-dtype", args.master_dtype, "--expert-impl",
             args.expert_impl, "--row", method, spec]
  options += (["--tiny"] if args.tiny else []) + (["--remat"] if args.remat else [])
  command = [sys.executable, os.path.abspath(__file__), *map(str, options)]
  row = {"mesh": spec, "method": method}
  axes = sharding.parse_mesh(spec)
  if -1 not in axes.values():  # known before the row runs, for rows that never report
    row.update(devices=math.prod(axes.values()),
               global_batch=args.batch * math.prod(axes[a] for a in sharding.BATCH_AXES))
  try:
    # stderr passes through: compiler warnings and a failing row's traceback land in the log. On a timeout or
    # a Stopped, subprocess.run kills the child before raising, so no row outlives this process.
    done = subprocess.run(command, stdout=subprocess.PIPE, text=True, env=_child_env(args), timeout=args.row_timeout)
  except subprocess.TimeoutExpired:
    return {**row, "status": f"timed out after {args.row_timeout:g} s"}
  except Stopped:
    return {**row, "status": "stopped (SIGTERM)"}
  found = [line for line in done.stdout.splitlines() if line.startswith(ROW_PREFIX)]
  if done.returncode or not found:
    return {**row, "status": f"failed (exit {done.returncode}; see the log above)"}
  return json.loads(found[-1][len(ROW_PREFIX):])


def _cell(value, fmt: str) -> str:
  return "n/a" if value is None else format(value, fmt)


def _count(n: int | None) -> str:
  if n is None:
    return "n/a"
  if n >= 1e9:
    return f"{n / 1e9:.2f}B"
  return f"{n / 1e6:.1f}M" if n >= 1e6 else f"{n:,}"


def table(args: argparse.Namespace, rows: list[dict]) -> list[str]:
  """The markdown table, scaling taken against the one-device row of each method."""
  single = {r["method"]: r["global_batch"] * args.seq / r["ms"] * 1e3
            for r in rows if r.get("devices") == 1 and "ms" in r}
  lines = ["| mesh | devices | method | layers | global batch×seq | trainable | ms/step | tokens/s | tokens/s/dev | "
           "scaling | peak GiB/dev | XLA GiB/dev | XLA TFLOP/dev | compile s | first loss |",
           "|" + "---|" * 15]
  for r in rows:
    cells = [r["mesh"], str(r.get("devices", "?")), r["method"], str(args.layers)]
    cells.append(f"{r['global_batch']}×{args.seq}" if "global_batch" in r else "?")
    cells.append(_count(r.get("trainable")))
    if "ms" in r:
      tokens = r["global_batch"] * args.seq / r["ms"] * 1e3
      base = single.get(r["method"])
      cells += [f"{r['ms']:.1f}", f"{tokens:,.0f}", f"{tokens / r['devices']:,.0f}",
                f"{tokens / base:.2f}×" if base else "n/a"]
    else:
      cells += [r["status"], "", "", ""]
    cells += [_cell(r.get("peak_gib"), ".4g"), _cell(r.get("xla_gib"), ".4g"), _cell(r.get("tflop"), ".4g"),
              _cell(r.get("compile_s"), ".0f"), _cell(r.get("first_loss"), ".4f")]
    lines.append("| " + " | ".join(cells) + " |")
  return lines


def loss_agreement(rows: list[dict]) -> list[str]:
  """Per global batch with several rows: the spread of their first losses (the same model and data)."""
  groups: dict[int, list[float]] = {}
  for r in rows:
    if "first_loss" in r:
      groups.setdefault(r["global_batch"], []).append(r["first_loss"])
  return [f"first loss at global batch {b}: {len(losses)} rows within {max(losses) - min(losses):.2e}"
          for b, losses in sorted(groups.items()) if len(losses) > 1]


def main() -> None:
  args = parse_args()
  if args.row:
    print(ROW_PREFIX + json.dumps(measure(args, *args.row)), flush=True)
    return
  signal.signal(signal.SIGTERM, _stop)
  rows = []
  for method, spec in [(m, s) for m in args.methods for s in args.meshes]:
    rows.append(run_row(args, method, spec))
    print(f"done: {method} {spec}: {rows[-1]['status']}", file=sys.stderr, flush=True)
    if rows[-1]["status"].startswith("stopped"):
      break
  info = next((r for r in rows if "device_kind" in r), {})
  print(f"{info.get('device_kind', '?')}, jax {info.get('jax', '?')}; "
        f"{'tiny-deepseek' if args.tiny else 'DeepSeek-V2-Lite'} widths, {args.layers} layers, "
        f"{args.batch} × {args.seq} tokens per batch shard, "
        + (f"ESFT {args.experts_per_layer} experts per MoE layer, " if "esft" in args.methods else "")
        + f"{args.master_dtype} master weights and AdamW state, experts {args.expert_impl}"
        + (", layers recomputed in the backward pass" if args.remat else ""))
  print("\n".join(table(args, rows) + loss_agreement(rows)))


if __name__ == "__main__":
  main()
