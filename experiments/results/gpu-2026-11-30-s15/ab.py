"""Fifteenth session, one-off: the SwiGLU fwd+bwd of the tiled kernels with one operand ring per block for all its
tiles (this code) against a pipeline per tile (tiled.py at da32f64, given as a path), interleaved rounds on one GPU.

    PYTHONPATH=.:experiments python experiments/results/gpu-2026-11-30-s15/ab.py OLD_TILED_PY [--rounds 3]
"""

import argparse
import importlib.util
import sys

import jax
import numpy as np

import bench_moe
from esft_jax.model.kernels import tiled
from timing import waited_and_back_to_back_ms


def load(path: str):
  spec = importlib.util.spec_from_file_location("tiled_per_tile", path)
  module = importlib.util.module_from_spec(spec)
  sys.modules["tiled_per_tile"] = module
  spec.loader.exec_module(module)
  return module


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("old")
  parser.add_argument("--rounds", type=int, default=3)
  parser.add_argument("--iters", type=int, default=20)
  parser.add_argument("--rows", default="16384,32768")
  args = parser.parse_args()
  variants = {"per-tile": load(args.old), "one ring": tiled}
  print(f"# jax {jax.__version__} on {jax.devices()[0].device_kind}")
  print("| rows | routing | variant | ms per round | median ms | TFLOP/s | outputs equal |")
  print("|---|---|---|---|---|---|---|", flush=True)
  for rows in [int(r) for r in args.rows.split(",")]:
    for skewed in (False, True):
      data = bench_moe.make_data(rows, 6, 64, 2048, 1408, skewed, seed=rows + skewed)
      layout = data["layouts"][tiled.ALIGN]
      take = lambda a: jax.numpy.take(a, layout.source_P, axis=0, mode="fill", fill_value=0)
      e = data["experts"]
      fn_args = (take(data["cotangent"]), take(data["x"]), e["gate_proj"], e["up_proj"], e["down_proj"],
                 layout.group_sizes_G)
      steps = {name: jax.jit(bench_moe.with_backward(module.tiled_swiglu, 4)) for name, module in variants.items()}
      outs = {name: jax.block_until_ready(step(*fn_args)) for name, step in steps.items()}
      same = all(bool((a == b).all()) for a, b in zip(*(jax.tree.leaves(o) for o in outs.values())))
      ms = {name: [] for name in steps}
      for _ in range(args.rounds):
        for name, step in steps.items():
          for _ in range(3):
            jax.block_until_ready(step(*fn_args))
          ms[name].append(waited_and_back_to_back_ms(lambda: step(*fn_args), jax.block_until_ready, args.iters)[0])
      for name in steps:
        median = float(np.median(ms[name]))
        rounds = " / ".join(f"{m:.3f}" for m in ms[name])
        print(f"| {data['rows']} | {'skewed' if skewed else 'even'} | {name} | {rounds} | {median:.3f} "
              f"| {18 * data['rows'] * 2048 * 1408 / median / 1e9:.1f} | {same} |", flush=True)


if __name__ == "__main__":
  main()
