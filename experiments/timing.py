"""Timing shared by the benchmarks (bench_moe.py, bench_train.py, bench_sharded.py)."""

from __future__ import annotations

import statistics
import time

import jax


def step_ms(step, carry: tuple, *inputs, iters: int) -> tuple[tuple, float, float]:
  """Runs `*carry, metrics = step(*carry, *inputs)` (the carry: what the step donates and returns, e.g. the train
  state) `iters` times waiting for each step's loss, then `iters` times back to back, waiting only for the last.
  Returns the last carry, the mean milliseconds of a back-to-back step and the median of a waited-for one.

  Back to back is how the trainer runs (it reads metrics every `log_every` steps): the host dispatches a step
  while the one before runs. Waiting for each step adds the host's dispatch of the next (milliseconds for a
  program of hundreds of arrays) to every step."""
  inputs = jax.device_put(inputs)  # the trainer's batches are on the device before their step
  times = []
  for _ in range(iters):
    start = time.perf_counter()
    *carry, metrics = step(*carry, *inputs)
    jax.block_until_ready(metrics["loss"])
    times.append(time.perf_counter() - start)
  start = time.perf_counter()
  for _ in range(iters):
    *carry, metrics = step(*carry, *inputs)
  jax.block_until_ready(metrics["loss"])
  return tuple(carry), (time.perf_counter() - start) / iters * 1e3, statistics.median(times) * 1e3


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
