"""The MoE layer: router (softmax/sigmoid, top-k, group limits, score-correction bias), routed experts,
shared experts, and the load-balancing losses.

The router returns, per token, the K chosen expert ids, the weights that multiply their outputs (the
"gate values" ESFT scores), and the router probabilities over all experts. With `router_group_size` G > 1 each
expert stands for G fine experts (a coarse expert built by grouping them): the router scores the fine experts and
an expert's probability is the mean of its G fine ones.
"""

from __future__ import annotations

from typing import Mapping, NamedTuple

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.sharding import AbstractMesh, Mesh, PartitionSpec

from esft_jax.config import ModelConfig
from esft_jax.model.experts import check_expert_inputs, expert_ffn, rows_already_in
from esft_jax.model.layers import Linear, SwiGLU, logical_param

Dtype = jnp.dtype
EXPERT_STACKS = ("gate_proj", "up_proj", "down_proj")  # one MoE layer's routed experts (`StackedExperts`)


class Routing(NamedTuple):
  """One MoE layer's routing for a [B, L] batch."""
  expert_ids: jax.Array  # [B, L, K] int32
  weights: jax.Array  # [B, L, K] fp32: the factor applied to each chosen expert's output
  probs: jax.Array  # [B, L, E] fp32: softmax (or sigmoid) scores before any bias


def route(logits_TxE: jax.Array, cfg: ModelConfig, correction_bias_E: jax.Array | None = None):
  """Chooses K experts per token. Returns (ids [T, K], weights [T, K], probs [T, E]). With router_group_size
  G, the logits are over the G * E fine experts, expert i's G fine ones consecutive ([T, E * G])."""
  k, n_group = cfg.num_experts_per_tok, cfg.n_group
  probs = jax.nn.sigmoid(logits_TxE) if cfg.scoring_func == "sigmoid" else jax.nn.softmax(logits_TxE, axis=-1)
  if cfg.router_group_size > 1:
    probs = probs.reshape(probs.shape[0], -1, cfg.router_group_size).mean(axis=-1)
  t, e = probs.shape
  if cfg.topk_method == "greedy":
    weights, ids = jax.lax.top_k(probs, k)
  elif cfg.topk_method == "group_limited_greedy":  # DeepSeek-V2: keep the topk_group groups with the best expert
    group_best = probs.reshape(t, n_group, e // n_group).max(axis=-1)
    keep = _top_groups(group_best, cfg.topk_group, e // n_group)
    weights, ids = jax.lax.top_k(jnp.where(keep, probs, 0.0), k)
  elif cfg.topk_method == "noaux_tc":  # DeepSeek-V3: choose on biased scores, weigh with unbiased ones
    choice = probs + (0.0 if correction_bias_E is None else correction_bias_E)
    group_score = jax.lax.top_k(choice.reshape(t, n_group, e // n_group), 2)[0].sum(axis=-1)
    keep = _top_groups(group_score, cfg.topk_group, e // n_group)
    _, ids = jax.lax.top_k(jnp.where(keep, choice, -jnp.inf), k)
    weights = jnp.take_along_axis(probs, ids, axis=-1)
  else:
    raise ValueError(f"topk_method {cfg.topk_method!r} is unknown")
  if cfg.norm_topk_prob:
    weights = weights / (jnp.sum(weights, axis=-1, keepdims=True) + 1e-20)
  return ids.astype(jnp.int32), weights * cfg.routed_scaling_factor, probs


def _top_groups(group_score_TxG: jax.Array, topk_group: int, group_size: int) -> jax.Array:
  _, best = jax.lax.top_k(group_score_TxG, topk_group)
  group_keep = jnp.zeros_like(group_score_TxG, dtype=bool).at[jnp.arange(best.shape[0])[:, None], best].set(True)
  return jnp.repeat(group_keep, group_size, axis=-1)


def sequence_aux_loss(routing: Routing, num_experts: int) -> jax.Array:
  """DeepSeek's sequence-level balance loss, before alpha: mean over sequences of sum_i f_i * P_i with
  f_i = E / (K * L) * #(tokens of the sequence routed to i) and P_i the sequence's mean probability.
  L is the full length, padding included, as in DeepSeek's code."""
  b, length, k = routing.expert_ids.shape
  counts_BxE = jax.vmap(lambda ids: jnp.bincount(ids.reshape(-1), length=num_experts))(routing.expert_ids)
  f = jax.lax.stop_gradient(counts_BxE * num_experts / (k * length))
  return jnp.mean(jnp.sum(f * routing.probs.mean(axis=1), axis=-1))


def batch_aux_loss(routing: Routing, num_experts: int) -> jax.Array:
  """DeepSeek's balance loss without `seq_aux`: the same product over the whole batch, before alpha."""
  ids = routing.expert_ids.reshape(-1)
  f = jax.lax.stop_gradient(jnp.bincount(ids, length=num_experts) / ids.shape[0] * num_experts)
  return jnp.sum(f * routing.probs.reshape(-1, num_experts).mean(axis=0))


def global_balance_loss(routings: list[Routing], num_experts: int, token_mask_BxL: jax.Array) -> jax.Array:
  """Mixtral/OLMoE/Qwen load-balancing loss (Switch style) over all layers and non-padding tokens, before its
  coefficient: E * sum_i (assignments to i / rows) * (mean probability of i)."""
  mask = token_mask_BxL.astype(jnp.float32)
  counts = sum(jnp.zeros(num_experts).at[r.expert_ids].add(mask[..., None]) for r in routings)
  prob_sum = sum(jnp.sum(r.probs * mask[..., None], axis=(0, 1)) for r in routings)
  rows = mask.sum() * len(routings)
  return num_experts * jnp.sum(jax.lax.stop_gradient(counts / rows) * prob_sum / rows)


def _split_axes(mesh: Mesh | AbstractMesh, logical: str) -> tuple[str, ...]:
  """The axes of `mesh`, of more than one device, that the logical rules (`esft_jax.sharding.LOGICAL_RULES`)
  split `logical` over."""
  from esft_jax.sharding import LOGICAL_RULES  # esft_jax.sharding imports the model

  axes = nn.logical_to_mesh_axes((logical,), LOGICAL_RULES)[0]
  if axes is None or mesh.empty:
    return ()
  return tuple(a for a in ((axes,) if isinstance(axes, str) else axes) if mesh.shape[a] > 1)


def routed_experts(x_TxD, ids_TxK, weights_TxK, experts: dict[str, jax.Array], impl: str,
                   trained_experts: tuple[int, ...] | None = None,
                   mesh: Mesh | AbstractMesh | None = None,
                   trained_rows: Mapping[str, jax.Array] | None = None) -> jax.Array:
  """`expert_ffn`, with each device on its own tokens where `mesh` (None: one device; an AbstractMesh compiles
  without the devices) splits the batch under `esft_jax.sharding.LOGICAL_RULES`. XLA's partitioner can split
  neither the dispatch (a sort over every token) nor the Pallas kernels: left to it, every device runs the experts
  on the whole global batch, and data or expert parallelism does not divide the MoE's work.

  The data axes (data, fsdp) move weights: each device gathers the expert weights from their FSDP shards and
  runs them on its own tokens. The expert axis moves tokens instead, as the weights are what is large there
  (64 x 2048 x 1408 x 3 bf16 = 1.1 GB a layer at DeepSeek-V2-Lite widths, against 64 MB for 8 x 2048 tokens):
  each device keeps its E / ep experts, gathers the tokens (and their ids and weights) of its expert group,
  computes only the assignments to its own experts, and `psum_scatter` sums the partial outputs back onto each
  device's own tokens (the rules table splits the batch over the expert axis too). Dropless: the row layout has
  room for every assignment landing on one device. The tensor axis splits the hidden width: each shard computes
  its part and the partial outputs are summed.

  The data axes sum the weight gradients over their devices. With `trained_experts` named, those experts'
  alone are summed: 138 MB a layer for ESFT's 8 experts at DeepSeek-V2-Lite widths, against 1.1 GB for the whole
  stacks (BENCHMARKS.md, sharding).

  `trained_rows` (gate_proj, up_proj, down_proj: the `trained_experts`' rows, [S, D, F] and [S, F, D], which the
  stacks already hold; ESFT's train step writes them in): the gradient reaches these values and not the stacks.
  On a mesh they enter the per-device program as they are, so no stack-sized cotangent is made for them outside
  it. None: the rows are the stacks' own, and the gradient reaches the stacks."""
  check_expert_inputs(x_TxD, ids_TxK, weights_TxK, experts)  # the global shapes, before any split
  if trained_rows is not None:
    _check_trained_rows(trained_rows, trained_experts, experts)
  batch, width, ep = ((), (), ()) if mesh is None else (
      _split_axes(mesh, "batch"), _split_axes(mesh, "mlp"), _split_axes(mesh, "experts"))
  if not batch and not width:
    if trained_rows is not None:  # the rows take their gradient from the stacks' (see rows_already_in)
      ids_S = jnp.asarray(trained_experts, jnp.int32)
      experts = {name: rows_already_in(experts[name], trained_rows[name], ids_S) for name in EXPERT_STACKS}
    return expert_ffn(x_TxD, ids_TxK, weights_TxK, experts, impl, trained_experts)
  tokens = PartitionSpec(batch or None, None)
  gate_up_spec = PartitionSpec(ep or None, None, width or None)  # [E, D, F]: experts over ep, F over tensor
  down_spec = PartitionSpec(ep or None, width or None, None)  # [E, F, D]

  stacks = tuple(experts[name] for name in EXPERT_STACKS)
  if trained_experts is not None and not trained_experts:
    stacks = jax.lax.stop_gradient(stacks)  # no weight gradient is used
  # The trained rows enter the shard_map as values with a gradient of their own, summed over the devices there,
  # the stacks' gradients inside being theirs (see rows_already_in): given apart, or sliced from the stacks where
  # the data axes would otherwise sum the whole stacks' gradients.
  row_values = ()
  if trained_rows is not None:
    row_values = tuple(trained_rows[name] for name in EXPERT_STACKS)
  elif trained_experts and any(axis not in ep for axis in batch):
    row_values = tuple(stack[jnp.asarray(trained_experts, jnp.int32)] for stack in stacks)

  def local(x, ids, weights, gate, up, down, *trained_rows_S):
    first = jax.lax.axis_index(ep) * gate.shape[0] if ep else 0  # this device's first expert (global id)
    if trained_rows_S:  # (ids of the rows local to this device's stack; the others are held elsewhere)
      local_ids_S = jnp.asarray(trained_experts, jnp.int32) - first
      gate, up, down = (rows_already_in(stack, rows_S, local_ids_S)
                        for stack, rows_S in zip((gate, up, down), trained_rows_S))
    if ep:  # the expert group's tokens
      x, ids, weights = (jax.lax.all_gather(a, ep, tiled=True) for a in (x, ids, weights))
    out = expert_ffn(x, ids, weights, {"gate_proj": gate, "up_proj": up, "down_proj": down}, impl,
                     trained_experts, first)
    if ep:
      out = jax.lax.psum_scatter(out, ep, tiled=True)
    return jax.lax.psum(out, width) if width else out

  # check_vma=False: the Pallas kernels' custom VJPs carry no replication types; the input gradients of the
  # gathered expert weights are summed over the devices all the same.
  stack_specs = (gate_up_spec, gate_up_spec, down_spec)
  row_specs = (PartitionSpec(None, None, width or None),) * 2 + (PartitionSpec(None, width or None, None),)
  return jax.shard_map(local, mesh=mesh, in_specs=(tokens,) * 3 + stack_specs + row_specs[:len(row_values)],
                       out_specs=tokens, check_vma=False)(x_TxD, ids_TxK, weights_TxK, *stacks, *row_values)


def _check_trained_rows(trained_rows: Mapping[str, jax.Array], trained_experts: tuple[int, ...] | None,
                        experts: Mapping[str, jax.Array]) -> None:
  """Rows for each stack, one per trained expert, in the stack's shape and dtype: checked before they meet the
  stacks, where a mismatch would fail inside a gather or a shard_map."""
  if not trained_experts:
    raise ValueError(f"trained rows are given, but trained_experts is {trained_experts!r}: name the experts "
                     "whose rows they are")
  if sorted(trained_rows) != sorted(EXPERT_STACKS):
    raise ValueError(f"trained rows name {sorted(trained_rows)}; give one array for each of {list(EXPERT_STACKS)}")
  for name in EXPERT_STACKS:
    stack, rows_S = experts[name], trained_rows[name]
    chex.assert_shape(rows_S, (len(trained_experts), *stack.shape[1:]),
                      custom_message=f"trained rows of {name} for experts {list(trained_experts)}")
    chex.assert_type(rows_S, stack.dtype, custom_message=f"trained rows of {name}, as their stack's dtype")


class StackedExperts(nn.Module):
  """One MoE layer's routed experts as three stacked tensors (the layout ESFT slices trainable experts from)."""
  num_experts: int
  hidden: int
  width: int
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self) -> dict[str, jax.Array]:
    e, d, f = self.num_experts, self.hidden, self.width
    return {
        "gate_proj": logical_param(self, "gate_proj", (e, d, f), ("experts", "embed", "mlp"), self.param_dtype),
        "up_proj": logical_param(self, "up_proj", (e, d, f), ("experts", "embed", "mlp"), self.param_dtype),
        "down_proj": logical_param(self, "down_proj", (e, f, d), ("experts", "mlp", "embed"), self.param_dtype),
    }


class MoEBlock(nn.Module):
  """Routed experts (stacked [E, D, F]) plus shared experts (one fused SwiGLU, optionally sigmoid-gated)."""
  config: ModelConfig
  expert_impl: str = "auto"
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  trained_experts: tuple[int, ...] | None = None  # see `expert_ffn`
  mesh: Mesh | None = None  # see `routed_experts`

  @nn.compact
  def __call__(self, x_BxLxD: jax.Array, trained_rows: Mapping[str, jax.Array] | None = None
               ) -> tuple[jax.Array, Routing]:
    """`trained_rows`: this layer's, see `routed_experts`."""
    cfg = self.config
    b, length, d = x_BxLxD.shape
    e, f = cfg.num_experts, cfg.moe_intermediate_size
    x_TxD = x_BxLxD.reshape(-1, d)
    # The router always runs in fp32 (transformers keeps `gate.weight` in fp32 too).
    router = Linear(e * cfg.router_group_size, ("embed", None), dtype=jnp.float32, param_dtype=jnp.float32,
                    name="gate")
    bias = None
    if cfg.topk_method == "noaux_tc":
      bias = logical_param(self, "e_score_correction_bias", (e,), (None,), jnp.float32, nn.initializers.zeros)
    ids, weights, probs = route(router(x_TxD.astype(jnp.float32)), cfg, bias)

    experts = StackedExperts(e, d, f, self.param_dtype, name="experts")()
    experts = {k: v.astype(self.dtype) for k, v in experts.items()}
    if trained_rows is not None:
      trained_rows = {k: v.astype(self.dtype) for k, v in trained_rows.items()}
    with jax.named_scope("routed_experts"):  # a module of their own in profiles (they are a function here)
      out = routed_experts(x_TxD.astype(self.dtype), ids, weights, experts, self.expert_impl,
                           self.trained_experts, self.mesh, trained_rows)

    if cfg.shared_intermediate_size:  # on [B, L, D]: SwiGLU's activation constraint names batch and length
      shared = SwiGLU(cfg.shared_intermediate_size, self.dtype, self.param_dtype, name="shared_experts")(x_BxLxD)
      if cfg.shared_expert_gate:
        gate = Linear(1, ("embed", None), dtype=self.dtype, param_dtype=self.param_dtype,
                      name="shared_expert_gate")(x_BxLxD)
        shared = jax.nn.sigmoid(gate) * shared
      out = out + shared.reshape(-1, d)
    routing = Routing(ids.reshape(b, length, -1), weights.reshape(b, length, -1), probs.reshape(b, length, e))
    return out.reshape(b, length, d).astype(x_BxLxD.dtype), routing
