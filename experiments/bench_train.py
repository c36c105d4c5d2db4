"""ESFT training-step throughput for each expert path, on a DeepSeek-V2-Lite-shaped model of reduced depth.

    python experiments/bench_train.py --layers 8 --batch 8 --seq 2048 --experts-per-layer 8   # one GPU
    python experiments/bench_train.py --tiny                                                  # CPU, seconds

Prints one table: expert path, ms per step, tokens/s, peak device memory, the loss of the first step (the paths
must agree). The PyTorch reference step is not in this script yet (see BENCHMARKS.md).
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from esft_jax.config import load_config
from esft_jax.esft.trainable import count_parameters, init_trainable, plan_from_expert_config
from esft_jax.model.transformer import Transformer, init_params
from esft_jax.sharding import single_device_mesh
from esft_jax.train.optimizer import make_optimizer
from esft_jax.train.trainer import TrainState, make_train_step, step_shardings


def _peak_bytes() -> int | None:
  stats = jax.devices()[0].memory_stats()
  return stats.get("peak_bytes_in_use") if stats else None


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--layers", type=int, default=8, help="decoder layers (layer 0 dense, the rest MoE)")
  parser.add_argument("--batch", type=int, default=8)
  parser.add_argument("--seq", type=int, default=2048)
  parser.add_argument("--experts-per-layer", type=int, default=8, help="trainable experts per MoE layer")
  parser.add_argument("--iters", type=int, default=5)
  parser.add_argument("--impls", default="grouped,auto")
  parser.add_argument("--tiny", action="store_true", help="the tiny-deepseek preset on CPU, to keep this working")
  args = parser.parse_args()

  config = load_config("tiny-deepseek" if args.tiny else "deepseek-v2-lite")
  if args.tiny:
    args.layers, args.batch, args.seq, args.iters = 3, 2, 64, 2
  config = dataclasses.replace(config, num_layers=args.layers, moe_layers=(False,) + (True,) * (args.layers - 1))
  dtype = jnp.float32 if args.tiny else jnp.bfloat16
  params = init_params(config, jax.random.key(0), param_dtype=dtype)
  plan = plan_from_expert_config({"experts": {str(l): list(range(args.experts_per_layer))
                                              for l in config.moe_layer_ids}})
  tokens = np.random.default_rng(0).integers(3, config.vocab_size, size=(1, args.batch, args.seq + 1))
  batch = {"inputs": tokens[..., :-1].astype(np.int32), "targets": tokens[..., 1:].astype(np.int32),
           "loss_mask": np.ones((1, args.batch, args.seq), np.float32),
           "segment_ids": np.ones((1, args.batch, args.seq), np.int32),
           "positions": np.broadcast_to(np.arange(args.seq, dtype=np.int32), (1, args.batch, args.seq)).copy()}
  mesh = single_device_mesh()
  rows = []
  for impl in args.impls.split(","):
    model = Transformer(config, expert_impl=impl, dtype=dtype)
    trainable = init_trainable(plan, params)
    optimizer = make_optimizer(trainable, lambda step: 1e-5)
    state = TrainState(jnp.zeros((), jnp.int32), trainable, optimizer.init(trainable))
    step = make_train_step(model, plan, optimizer, lambda s: 1e-5, step_shardings(config, plan, mesh, state))
    state, metrics = step(state, params, batch)
    first_loss = float(metrics["loss"])
    times = []
    for _ in range(args.iters):
      start = time.perf_counter()
      state, metrics = step(state, params, batch)
      jax.block_until_ready(metrics["loss"])
      times.append(time.perf_counter() - start)
    ms = statistics.median(times) * 1e3
    peak = _peak_bytes()
    rows.append((impl, ms, args.batch * args.seq / ms * 1e3, "n/a" if peak is None else f"{peak / 2**30:.1f}",
                 first_loss))
  print(f"{jax.devices()[0].device_kind}, jax {jax.__version__}; {args.layers} layers, batch {args.batch} x "
        f"{args.seq}, {args.experts_per_layer} trainable experts per MoE layer "
        f"({count_parameters(init_trainable(plan, params)):,} trainable parameters)")
  print(f"{'experts':<10} {'ms/step':>10} {'tokens/s':>12} {'peak GiB':>9} {'first loss':>11}")
  for impl, ms, tps, peak, loss in rows:
    print(f"{impl:<10} {ms:>10.1f} {tps:>12,.0f} {peak:>9} {loss:>11.4f}")


if __name__ == "__main__":
  main()
