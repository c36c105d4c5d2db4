"""Timing shared by the benchmarks (bench_moe.py, bench_train.py, bench_sharded.py)."""

from __future__ import annotations

import statistics
import time

import jax


def waited_and_back_to_back_ms(run, wait, iters: int) -> tuple[float, float]:
  """Times `out = run()` `iters` times, each followed by `wait(out)`, then `iters` times back to back with one
  `wait` after the last. Returns the mean milliseconds of a back-to-back run and the median of a waited-for one.

  Back to back is how the trainer runs steps (it reads metrics every `log_every` steps): the host dispatches a step
  while the one before runs. Waiting for each step adds the host's dispatch of the next (milliseconds for a program
  of hundreds of arrays) to every step."""
  times = []
  for _ in range(iters):
    start = time.perf_counter()
    wait(run())
    times.append(time.perf_counter() - start)
  start = time.perf_counter()
  for _ in range(iters):
    out = run()
  wait(out)
  return (time.perf_counter() - start) / iters * 1e3, statistics.median(times) * 1e3


def step_ms(step, carry: tuple, *inputs, iters: int) -> tuple[tuple, float, float]:
  """`waited_and_back_to_back_ms` of `*carry, metrics = step(*carry, *inputs)` (the carry: what the step donates
  and returns, e.g. the train state), waiting for the loss. Returns the last carry and the two times."""
  inputs = jax.device_put(inputs)  # the trainer's batches are on the device before their step

  def run():
    nonlocal carry
    *carry, metrics = step(*carry, *inputs)
    return metrics["loss"]

  back_to_back, waited = waited_and_back_to_back_ms(run, jax.block_until_ready, iters)
  return tuple(carry), back_to_back, waited


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
