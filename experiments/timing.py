"""Timing shared by the benchmarks (bench_moe.py, bench_train.py, bench_sharded.py)."""

from __future__ import annotations

import statistics
import time

import jax


def median_step_ms(step, carry: tuple, *inputs, iters: int):
  """Runs `*carry, metrics = step(*carry, *inputs)` `iters` times, each until its loss is ready (the carry: what
  the step donates and returns, e.g. the train state). Returns the last carry and the median milliseconds of a
  step."""
  times = []
  for _ in range(iters):
    start = time.perf_counter()
    *carry, metrics = step(*carry, *inputs)
    jax.block_until_ready(metrics["loss"])
    times.append(time.perf_counter() - start)
  return tuple(carry), statistics.median(times) * 1e3


def median_call_ms(fn, *args, iters: int, warmup: int = 1) -> float:
  """The median milliseconds of `fn(*args)` until its outputs are ready, after `warmup` calls (the first
  compiles it)."""
  for _ in range(warmup):
    jax.block_until_ready(fn(*args))
  times = []
  for _ in range(iters):
    start = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - start)
  return statistics.median(times) * 1e3
