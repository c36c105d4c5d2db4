"""Expert granularity for the ablations: coarse experts made from a fine model by grouping (the paper's
appendix B), and base models of equal parameters at other granularities (beyond the paper).

Grouping: the experts that the base routes together on general text form a group; each group becomes one
coarse expert, its members' weights concatenated along the hidden width (a SwiGLU of width G·F computes
exactly the sum of its G members' outputs), gated by the mean of its members' router probabilities
(`ModelConfig.router_group_size`), with top-(k/G) groups per token so that as many fine experts stay active.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from esft_jax import sharding
from esft_jax.config import ModelConfig, config_from_hf
from esft_jax.data.formatting import Example
from esft_jax.demo.pretrain import BaseSpec
from esft_jax.esft.routing_pass import make_scoring_step, padded_batches
from esft_jax.esft.scores import RoutingTotals


def scratch_spec(base: BaseSpec, experts: int, shared_width: int) -> BaseSpec:
  """`base` with its routed parameters (experts × width) and active routed width (top-k × width) split over
  `experts` experts instead, and `shared_width` of shared experts (in units of the new expert width, which
  DeepSeek's config counts them in). Everything else, training included, stays as in `base`."""
  budget, active = base.routed_experts * base.expert_width, base.experts_per_token * base.expert_width
  if experts < 1 or budget % experts or active % (budget // experts):
    raise ValueError(f"experts={experts}: the base's {base.routed_experts} experts of width {base.expert_width}, "
                     f"top-{base.experts_per_token}, do not split evenly into {experts} experts with a whole "
                     "top-k; pick a divisor of the routed width")
  width = budget // experts
  if shared_width < 0 or shared_width % width:
    raise ValueError(f"shared_width={shared_width} is not a multiple of the expert width {width} at {experts} "
                     "experts; DeepSeek's config counts shared experts in expert widths")
  return dataclasses.replace(base, routed_experts=experts, experts_per_token=active // width, expert_width=width,
                             shared_experts=shared_width // width)


def cooccurrence(config: ModelConfig, params, examples: Sequence[Example], batch_size: int = 16,
                 dtype=jnp.float32) -> np.ndarray:
  """[N, E, E] per MoE layer: C[i, j] = tokens whose top-K holds both i and j; padding never counts. The diagonal
  holds each expert's own tokens (it co-occurs with itself), so two experts that are always chosen together get
  the same row, and rows compare by which experts each keeps company with, itself included."""
  # The scoring pass's own step, so the routing is exactly what ESFT scores; its totals are not needed here.
  step = make_scoring_step(config, dtype=dtype, with_routing=True)
  params = sharding.place(params, sharding.param_shardings(config, sharding.single_device_mesh()))
  e = config.num_experts
  totals = RoutingTotals.zeros(len(config.moe_layer_ids), e)
  counts_NxExE = np.zeros((len(config.moe_layer_ids), e, e))
  for _, tokens, segments in padded_batches(examples, batch_size):
    totals, routing = step(params, totals, tokens, segments)
    for layer, (ids_BxLxK, _) in enumerate(jax.device_get(routing)):
      ids_TxK = ids_BxLxK[segments != 0]
      chosen_TxE = np.zeros((len(ids_TxK), e))
      chosen_TxE[np.arange(len(ids_TxK))[:, None], ids_TxK] = 1.0
      counts_NxExE[layer] += chosen_TxE.T @ chosen_TxE
  return counts_NxExE


def cosine_similarity(counts_ExE: np.ndarray) -> np.ndarray:
  """Cosine similarity of the co-occurrence rows; an expert never chosen is similar to nothing (0)."""
  rows = np.asarray(counts_ExE, np.float64)
  unit = rows / np.maximum(np.linalg.norm(rows, axis=1, keepdims=True), 1e-12)
  return unit @ unit.T


MAX_SUBSETS = 5_000_000  # C(E, G) above this takes the exact search more than a few seconds and ~100 MB


def greedy_groups(similarity_ExE: np.ndarray, group_size: int) -> list[tuple[int, ...]]:
  """The paper's greedy grouping, exactly: repeatedly take, among all `group_size`-subsets of the experts not
  yet grouped, the one with the highest mean pairwise similarity (ties: the lexicographically first), until
  every expert is in a group. Every subset's mean is computed once up front and a subset is struck out when one
  of its experts is taken, so the search costs C(E, G) means: 635,376 for 64 experts in fours, 120 pairs for
  16 in twos. Above MAX_SUBSETS subsets it refuses rather than run for minutes. Groups come in the order taken,
  members ascending."""
  similarity_ExE = np.asarray(similarity_ExE, np.float64)
  e = similarity_ExE.shape[0]
  if similarity_ExE.shape != (e, e):
    raise ValueError(f"the similarity matrix must be square [E, E], got shape {similarity_ExE.shape}")
  if group_size < 1 or e % group_size:
    raise ValueError(f"group size {group_size} does not divide the {e} experts; pick a divisor of {e}")
  if group_size == 1:
    return [(i,) for i in range(e)]
  n = math.comb(e, group_size)
  if n > MAX_SUBSETS:
    raise ValueError(f"grouping {e} experts in {group_size}s means {n:,} subsets, above the {MAX_SUBSETS:,} this "
                     "exact search allows; use a smaller group size")
  subsets_SxG = np.fromiter(itertools.chain.from_iterable(itertools.combinations(range(e), group_size)),
                            np.int32, count=n * group_size).reshape(n, group_size)
  pairs = list(itertools.combinations(range(group_size), 2))
  mean_S = sum(similarity_ExE[subsets_SxG[:, a], subsets_SxG[:, b]] for a, b in pairs) / len(pairs)
  free_S = np.ones(n, bool)
  groups = []
  for _ in range(e // group_size):
    best = int(np.argmax(np.where(free_S, mean_S, -np.inf)))
    groups.append(tuple(int(i) for i in subsets_SxG[best]))
    free_S &= ~np.isin(subsets_SxG, subsets_SxG[best]).any(axis=1)
  return groups


def grouped_model(config: ModelConfig, params, hf_config: dict[str, Any], groups: dict[int, list[tuple[int, ...]]],
                  active_experts: int | None = None) -> tuple[ModelConfig, Any, dict[str, Any]]:
  """The coarse model: per MoE layer (`groups[layer]`, every expert in exactly one group of G), coarse expert j
  holds group j's experts concatenated along the hidden width, and the router's columns are reordered so that
  group j's fine experts are columns j*G .. j*G+G-1 (`router_group_size` averages their probabilities).
  `active_experts` (A, default the model's K) fine experts stay active per token: top-(A/G) groups.
  Returns its config, parameters and HF config.json (n_routed_experts E/G, moe_intermediate_size G·F,
  num_experts_per_tok A/G, router_group_size G)."""
  e, f = config.num_experts, config.moe_intermediate_size
  k = active_experts or config.num_experts_per_tok
  sizes = {len(g) for layer_groups in groups.values() for g in layer_groups}
  if len(sizes) != 1:
    raise ValueError(f"every group must have the same size; got sizes {sorted(sizes)}")
  g = sizes.pop()
  if config.router_group_size != 1:
    raise ValueError(f"the model is grouped already (router_group_size={config.router_group_size}); group the "
                     "fine model it came from")
  if not config.model_type.startswith("deepseek"):
    raise ValueError(f"grouping writes DeepSeek configs (n_routed_experts, moe_intermediate_size); model_type "
                     f"{config.model_type!r} is not supported")
  if e % g or k % g:
    raise ValueError(f"group size {g} must divide both n_routed_experts={e} and the {k} active experts per token, "
                     "so that top-(A/G) groups keep as many fine experts active; pick a common divisor")
  if sorted(groups) != list(config.moe_layer_ids):
    raise ValueError(f"groups are given for layers {sorted(groups)}; the model's MoE layers are "
                     f"{list(config.moe_layer_ids)}")
  params = jax.tree_util.tree_map(np.asarray, jax.device_get(params))
  for layer, layer_groups in groups.items():
    order = [i for group in layer_groups for i in group]
    if sorted(order) != list(range(e)):
      raise ValueError(f"layer {layer}: the groups must hold every expert 0..{e - 1} exactly once")
    mlp = params[f"layers_{layer}"]["mlp"]
    mlp["gate"]["kernel"] = mlp["gate"]["kernel"][:, order]
    experts = mlp["experts"]
    for proj in ("gate_proj", "up_proj"):  # [E, D, F] -> [E/G, D, G·F], member m at columns m*F .. m*F+F-1
      d = experts[proj].shape[1]
      experts[proj] = experts[proj][order].reshape(e // g, g, d, f).transpose(0, 2, 1, 3).reshape(e // g, d, g * f)
    experts["down_proj"] = experts["down_proj"][order].reshape(e // g, g * f, -1)
  hf = {**hf_config, "n_routed_experts": e // g, "num_experts_per_tok": k // g, "moe_intermediate_size": g * f,
        "router_group_size": g}
  return config_from_hf(hf, "the grouped config"), params, hf
