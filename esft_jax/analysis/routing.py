"""The paper's routing analyses (its Figures 2 and 3) from per-sample gate sums.

One input type serves both sources: per MoE layer and sample, the gate weight each routed expert received,
an array `gate_sums_NxSxE` (N MoE layers, S samples, E routed experts). `read_sample_gate_sums` builds it from
the official scorer's logs (a sample is one log line), `sample_gate_sums` inside a jitted pass over our own
model's routing.

- Concentration (Fig. 2): per layer, an expert's share is its summed gate weight over the layer's total; the
  shares are sorted from high to low, and rank r's value is the mean over layers of the r-th largest share.
- Overlap (Fig. 3): per layer, how many of the top-K experts by summed gate weight of task A's even-numbered
  samples (0, 2, 4, ... counting from 0) are among those of task B's odd-numbered samples; mean over layers.
  On the same task this compares two independent halves of its sample. Ties go to the lower expert id.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Mapping, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from esft_jax.esft.scores import read_routing_logs
from esft_jax.files import atomic_write_text
from esft_jax.model.moe import Routing

FIGURES_JSON = "routing_figures.json"


class SampleGateSums(NamedTuple):
  """Per MoE layer and sample, the summed gate weight of each routed expert, with the routing's K."""
  gate_sums_NxSxE: np.ndarray
  layer_ids: list[int]
  top_k: int


def sample_gate_sums(routing: Sequence[Routing], token_mask_BxL: jax.Array, num_experts: int) -> jax.Array:
  """[N, B, E]: each row's gate weight per expert, summed over its real tokens (jit-friendly).

  `routing` is one `Routing` per MoE layer; `token_mask_BxL` is nonzero on real tokens (segment ids work).
  Rows that only pad a short final batch must be dropped by the caller, or they count as empty samples."""
  mask_BxLx1 = (token_mask_BxL != 0)[..., None].astype(jnp.float32)
  rows_Bx1x1 = jnp.arange(token_mask_BxL.shape[0])[:, None, None]
  per_layer = []
  for r in routing:
    empty_BxE = jnp.zeros((token_mask_BxL.shape[0], num_experts), jnp.float32)
    per_layer.append(empty_BxE.at[rows_Bx1x1, r.expert_ids].add(r.weights.astype(jnp.float32) * mask_BxLx1))
  return jnp.stack(per_layer)


def read_sample_gate_sums(directory: str | Path, top_k: int | None = None,
                          num_experts: int | None = None) -> SampleGateSums:
  """Per-line gate sums of the official scorer's logs in `directory` (and its `rank_*` subfolders, in the order
  `read_routing_logs` reads them). `read_routing_logs` checks every line first and infers K and E."""
  directory = Path(directory)
  totals, layer_ids, top_k = read_routing_logs(directory, top_k, num_experts)
  num_experts = totals.gate_sums.shape[1]
  per_layer = []
  for layer in layer_ids:
    name = f"expert_weights_{layer}.txt"
    files = sorted(directory.glob(name)) + sorted(directory.glob(f"rank_*/{name}"))
    per_layer.append(np.stack([_line_gate_sums_E(line, num_experts) for file in files
                               for line in file.read_text().splitlines()]))
  n_lines = {layer: len(rows) for layer, rows in zip(layer_ids, per_layer)}
  if len(set(n_lines.values())) > 1:
    raise ValueError(f"{directory}: the layers logged different numbers of samples ({n_lines}); the logs are "
                     "truncated or mix runs, so score again into an empty folder")
  gate_sums_NxSxE = np.stack(per_layer)
  if not np.allclose(gate_sums_NxSxE.sum(axis=1), totals.gate_sums, rtol=1e-9, atol=1e-9):
    raise ValueError(f"{directory}: the logs changed while they were read; read them again")
  return SampleGateSums(gate_sums_NxSxE, layer_ids, top_k)


def _line_gate_sums_E(line: str, num_experts: int) -> np.ndarray:
  # The line was checked by read_routing_logs: ids, a tab pair, as many finite weights.
  id_text, weight_text = line.split("\t\t")
  ids = np.array(id_text.split("\t"), np.int64)
  weights = np.array(weight_text.split("\t"), np.float64)
  return np.bincount(ids, weights=weights, minlength=num_experts)


def rank_shares(gate_sums_NxE) -> np.ndarray:
  """[N, E]: per layer, each expert's share of the layer's gate mass, sorted from high to low."""
  gate_sums_NxE = np.asarray(gate_sums_NxE, np.float64)
  if gate_sums_NxE.ndim != 2:
    raise ValueError(f"gate sums must be [layers, experts], got shape {gate_sums_NxE.shape}")
  totals_Nx1 = gate_sums_NxE.sum(axis=1, keepdims=True)
  if np.any(totals_Nx1 <= 0):
    empty = np.flatnonzero(totals_Nx1[:, 0] <= 0).tolist()
    raise ValueError(f"layer rows {empty} have no gate mass; score at least one token")
  return -np.sort(-gate_sums_NxE / totals_Nx1, axis=1)


def concentration(gate_sums_NxE) -> list[float]:
  """For rank r = 1..E, the mean over layers of the r-th largest gate share (sums to 1)."""
  return rank_shares(gate_sums_NxE).mean(axis=0).tolist()


def concentration_spread(gate_sums_NxE) -> list[float]:
  """For rank r = 1..E, the standard deviation over layers of the r-th largest gate share."""
  return rank_shares(gate_sums_NxE).std(axis=0).tolist()


def top_experts(gate_sums_E, k: int) -> np.ndarray:
  """The k experts with the largest gate sums, ties to the lower id."""
  return np.argsort(-np.asarray(gate_sums_E, np.float64), kind="stable")[:k]


def overlap(task_a_NxSxE, task_b_NxSxE, k: int) -> float:
  """Mean over layers of how many top-k experts task A's even-numbered samples share with task B's odd ones."""
  a_NxSxE, b_NxSxE = np.asarray(task_a_NxSxE, np.float64), np.asarray(task_b_NxSxE, np.float64)
  for name, x in (("task A", a_NxSxE), ("task B", b_NxSxE)):
    if x.ndim != 3 or x.shape[1] < 2:
      raise ValueError(f"{name}: per-sample gate sums must be [layers, samples >= 2, experts], got {x.shape}")
  if (a_NxSxE.shape[0], a_NxSxE.shape[2]) != (b_NxSxE.shape[0], b_NxSxE.shape[2]):
    raise ValueError(f"the tasks' routing covers different layers or experts: {a_NxSxE.shape} vs {b_NxSxE.shape}")
  even_NxE, odd_NxE = a_NxSxE[:, 0::2].sum(axis=1), b_NxSxE[:, 1::2].sum(axis=1)
  shared = [len(np.intersect1d(top_experts(even_E, k), top_experts(odd_E, k)))
            for even_E, odd_E in zip(even_NxE, odd_NxE)]
  return float(np.mean(shared))


def routing_figures(per_task: Mapping[str, np.ndarray], top_k: int, out_dir: str | Path | None = None,
                    layer_ids: Sequence[int] | None = None) -> dict:
  """Figures 2 and 3 as data, from {task: gate_sums_NxSxE}; with `out_dir`, also writes routing_figures.json.

  "concentration" and "concentration_spread" are {task: [E values]}, "overlap" is {task A: {task B: value}}
  with A's even samples against B's odd ones."""
  if not per_task:
    raise ValueError("no tasks given; pass at least one task's routing")
  shapes = {task: np.shape(x) for task, x in per_task.items()}
  if len({(s[0], s[-1]) for s in shapes.values()}) > 1:
    raise ValueError(f"the tasks' routing covers different layers or experts ([layers, samples, experts]: "
                     f"{shapes}); score every task with the same model")
  figures = {
      "top_k": top_k,
      "layers": list(layer_ids) if layer_ids is not None else list(range(next(iter(shapes.values()))[0])),
      "samples": {task: int(shape[1]) for task, shape in shapes.items()},
      "concentration": {task: concentration(np.sum(x, axis=1)) for task, x in per_task.items()},
      "concentration_spread": {task: concentration_spread(np.sum(x, axis=1)) for task, x in per_task.items()},
      "overlap": {a: {b: overlap(per_task[a], per_task[b], top_k) for b in per_task} for a in per_task},
  }
  if out_dir is not None:
    Path(out_dir).mkdir(parents=True, exist_ok=True)
    atomic_write_text(Path(out_dir) / FIGURES_JSON, json.dumps(figures, ensure_ascii=False, indent=1))
  return figures


def routing_figures_from_logs(logs: Mapping[str, str | Path], out_dir: str | Path | None = None,
                              top_k: int | None = None, num_experts: int | None = None) -> dict:
  """`routing_figures` from {task: directory of official routing logs}. K is inferred from the logs unless
  given; E defaults to the largest logged id + 1 over all tasks."""
  read = {task: read_sample_gate_sums(directory, top_k, num_experts) for task, directory in logs.items()}
  layer_ids = {task: r.layer_ids for task, r in read.items()}
  top_ks = {task: r.top_k for task, r in read.items()}
  if len({tuple(v) for v in layer_ids.values()}) > 1:
    raise ValueError(f"the tasks' logs cover different MoE layers ({layer_ids}); score every task with one model")
  if len(set(top_ks.values())) > 1:
    raise ValueError(f"the tasks' logs imply different top-k ({top_ks}); pass the model's top-k")
  width = max(r.gate_sums_NxSxE.shape[2] for r in read.values())  # an unused top id leaves a task narrower
  per_task = {task: np.pad(r.gate_sums_NxSxE, ((0, 0), (0, 0), (0, width - r.gate_sums_NxSxE.shape[2])))
              for task, r in read.items()}
  first = next(iter(read.values()))
  return routing_figures(per_task, first.top_k, out_dir, first.layer_ids)
