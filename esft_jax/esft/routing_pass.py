"""ESFT's scoring run: a seeded sample of the task's training data, one jitted forward pass per batch, routing
totals accumulated on the device.

Like the official scorer, samples are shuffled with Python's `random` under a seed and taken until the token
budget is reached (the last sample overshoots), and each sample is scored unpacked: batches are padded rows,
and padding is never counted. Row lengths are padded to a few bucket sizes so that the pass compiles a handful
of times, not once per batch.

On a mesh, each batch is split over the batch axes and the totals come out replicated: the partial counts of
every device are summed inside the jitted step. Counts are integers in float32, so they equal one device's
exactly; every process builds the same batches and gets the same totals, and process 0 writes the logs.
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Iterator, Sequence

import chex
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from esft_jax import sharding
from esft_jax.config import ModelConfig
from esft_jax.data.formatting import Example
from esft_jax.esft.scores import RoutingTotals, accumulate, summary_from_totals, write_routing_logs
from esft_jax.generate import bucket
from esft_jax.model.transformer import Transformer
from esft_jax.train.metrics import progress

OFFICIAL_SEED = 5934875


def cut_long_samples(examples: Sequence[Example], max_length: int) -> tuple[list[Example], int]:
  """Every sample cut to its last `max_length` tokens, as `train`'s packing cuts a sample longer than a row,
  and how many were cut. A sample is scored in one row, so an uncut 10 MB line would need an attention matrix
  of its length squared."""
  if max_length < 1:
    raise ValueError(f"--seq-length must be positive, got {max_length}")
  cut = [Example(e.ids_L[-max_length:], e.loss_mask_L[-max_length:], e.source) if len(e) > max_length else e
         for e in examples]
  return cut, sum(len(e) > max_length for e in examples)


def sample_until(examples: Sequence[Example], n_tokens: int, seed: int = OFFICIAL_SEED) -> list[Example]:
  """A seeded shuffle of the examples, taken in order until at least `n_tokens` tokens."""
  if n_tokens <= 0:
    raise ValueError(f"--n-tokens must be positive, got {n_tokens}")
  order = list(range(len(examples)))
  random.Random(seed).shuffle(order)
  chosen, total = [], 0
  for i in order:
    if total >= n_tokens:
      break
    chosen.append(examples[i])
    total += len(examples[i])
  return chosen


def padded_batches(examples: Sequence[Example], batch_size: int
                   ) -> Iterator[tuple[list[Example], np.ndarray, np.ndarray]]:
  """(samples, tokens [B, L], segment ids [B, L]) per batch of `batch_size` unpacked samples: each row one whole
  sample (BOS through EOS), padded (segment id 0) to a bucketed length, so that a pass compiles a handful of
  shapes; a short final batch keeps the batch shape."""
  for start in range(0, len(examples), batch_size):
    chunk = list(examples[start:start + batch_size])
    tokens = np.zeros((batch_size, bucket(max(len(e) for e in chunk))), np.int32)
    segments = np.zeros_like(tokens)
    for i, example in enumerate(chunk):
      tokens[i, :len(example)] = example.ids_L
      segments[i, :len(example)] = 1
    yield chunk, tokens, segments


def make_scoring_step(config: ModelConfig, expert_impl: str = "auto", dtype=jnp.float32, with_routing=False,
                      mesh: Mesh | None = None, max_traces: int | None = None):
  """(params, totals, tokens [B, L], segment ids [B, L]) -> (totals, routing or None), on `mesh` (default:
  one device); totals and routing come back replicated. `max_traces`: fail (`chex.assert_max_traces`) when the
  step is traced more often, as it would be if the totals it returns did not match those it takes; tests set it
  after `chex.clear_trace_counter()`, since the count is kept per definition site, process-wide."""
  mesh = mesh or sharding.single_device_mesh()
  # max_segments=1: each row holds one sample, then padding.
  model = Transformer(config, expert_impl=expert_impl, dtype=dtype, max_segments=1, mesh=mesh)

  def step(params, totals: RoutingTotals, tokens_BxL, segment_ids_BxL):
    chex.assert_rank(tokens_BxL, 2)
    chex.assert_equal_shape([tokens_BxL, segment_ids_BxL])
    with sharding.logical_rules(mesh):
      out = model.apply({"params": params}, tokens_BxL, segment_ids_BxL)
    totals = accumulate(totals, out.routing, segment_ids_BxL)
    routing = [(r.expert_ids, r.weights) for r in out.routing] if with_routing else None
    return totals, routing

  if max_traces is not None:
    step = chex.assert_max_traces(step, n=max_traces)
  rows, whole = sharding.batch_sharding(mesh), sharding.replicated(mesh)
  return jax.jit(step, in_shardings=(sharding.param_shardings(config, mesh), whole, rows, rows),
                 out_shardings=whole, donate_argnums=(1,))


def score_examples(config: ModelConfig, params, examples: Sequence[Example], batch_size: int = 8,
                   expert_impl: str = "auto", dtype=jnp.float32, log_dir: Path | None = None,
                   mesh: Mesh | None = None) -> dict:
  """ESFT's summary.json for these examples; with `log_dir`, also the official routing logs (one line per
  sample), which needs the per-token routing on the host. `batch_size` is the global batch on `mesh`."""
  mesh = mesh or sharding.single_device_mesh()
  sharding.check_batch_size(batch_size, mesh)
  step = make_scoring_step(config, expert_impl, dtype, with_routing=log_dir is not None, mesh=mesh)
  params = sharding.place(params, sharding.param_shardings(config, mesh))
  rows, whole = sharding.batch_sharding(mesh), sharding.replicated(mesh)
  totals = sharding.place(RoutingTotals.zeros(len(config.moe_layer_ids), config.num_experts), whole)
  samples: list[list[tuple[np.ndarray, np.ndarray]]] = []
  bar = progress(total=len(examples), desc="score")
  for chunk, tokens, segments in padded_batches(examples, batch_size):
    totals, routing = step(params, totals, sharding.place(tokens, rows), sharding.place(segments, rows))
    if routing is not None:
      host = jax.device_get(routing)
      for i, example in enumerate(chunk):
        samples.append([(ids[i, :len(example)], weights[i, :len(example)]) for ids, weights in host])
    bar.update(len(chunk))
  bar.close()
  if log_dir is not None and jax.process_index() == 0:
    write_routing_logs(log_dir, list(config.moe_layer_ids), samples)
  return summary_from_totals(jax.device_get(totals), config.num_experts_per_tok, config.moe_layer_ids)
