"""What trains, for every method: the `TrainPlan` and the trainable tree.

The trainer holds two trees (levanter's partition, decided once): the frozen model parameters, and a small
trainable tree that alone gets gradients and optimizer state. For ESFT the trainable tree holds, per MoE
layer, only the trained experts' rows of the stacked `[E, D, F]` tensors; the plan's `TrainedExperts`
(esft_jax/esft/trained_experts.py) slices them out, and writes them back into the stacks inside the jitted step.
So gradients and AdamW state exist only for what is trained, and every frozen parameter stays bit-identical.
Which role a parameter has (routed or shared expert, router bias, non-expert) is read from
esft_jax/param_roles.py.

Paths are '/'-joined Flax paths, e.g. `layers_3/mlp/experts/gate_proj`.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import jax
import jax.numpy as jnp

from esft_jax import lora
from esft_jax.config import ModelConfig
from esft_jax.esft.trained_experts import TrainedExperts
from esft_jax.param_roles import role
from esft_jax.paths import leaves_by_path, set_path

METHODS = ("esft", "fft", "lora")


@dataclasses.dataclass(frozen=True)
class TrainPlan:
  """Which parameters train. Hashable, so jitted steps can close over it."""
  method: str
  experts: TrainedExperts = TrainedExperts()  # ESFT: the routed experts trained, per MoE layer
  shared_experts: bool = False
  non_expert_modules: bool = False
  lora_rank: int = 8
  lora_scale: float = 2.0

  def __post_init__(self):
    if self.method not in METHODS:
      raise ValueError(f"training method {self.method!r} is unknown; use one of {METHODS}")
    if not isinstance(self.experts, TrainedExperts):
      raise TypeError(f"TrainPlan.experts is a TrainedExperts, not {type(self.experts).__name__}")
    if self.method != "esft" and self.experts.layers:
      raise ValueError(f"a {self.method} plan trains whole tensors; trained experts belong to an esft plan")

  @property
  def trained_experts(self) -> TrainedExperts | None:
    """The routed experts whose weight gradients a step uses (`Transformer.trained_experts`): ESFT's; None (all)
    for FFT and LoRA."""
    return self.experts if self.method == "esft" else None

  def trains_whole(self, path: str) -> bool:
    """True where the whole leaf is trainable (FFT, or an ESFT flag covers its role)."""
    kind = role(path).kind
    if kind == "router_bias" or self.method == "lora":
      return False
    if self.method == "fft":
      return True
    return (kind == "shared_experts" and self.shared_experts) or (kind == "non_expert" and self.non_expert_modules)


def plan_from_expert_config(expert_config: Mapping[str, Any]) -> TrainPlan:
  """ESFT's expert-config JSON ({"experts": {layer: ids}, "shared_experts", "non_expert_modules"})."""
  try:
    experts = TrainedExperts.from_mapping(expert_config["experts"])
  except ValueError as e:
    raise ValueError(f"expert config: {e}") from None
  return TrainPlan("esft", experts, bool(expert_config.get("shared_experts", False)),
                   bool(expert_config.get("non_expert_modules", False)))


def init_trainable(plan: TrainPlan, params, rng: jax.Array | None = None, dtype=jnp.float32) -> dict:
  """The trainable tree, as fp32 master copies: whole leaves, ESFT's trained expert rows, or fresh LoRA factors."""
  if plan.method == "lora":
    return lora.init_lora(params, plan.lora_rank, rng if rng is not None else jax.random.key(0), dtype)
  trainable = plan.experts.rows(params, dtype)
  for path, leaf in leaves_by_path(params).items():
    if plan.trains_whole(path):
      set_path(trainable, path, jnp.array(leaf, dtype=dtype, copy=True))  # never alias the frozen tree
  return trainable


def merge_trainable(plan: TrainPlan, params, trainable, rows_already_written: bool = False) -> dict:
  """The full parameter tree the model runs with: frozen parameters with the trainable ones written in.
  `rows_already_written`: the stacks of `params` hold ESFT's trained rows already (`TrainedExperts.write_rows`)
  and are left as they are; the model takes the rows as values of their own (`TrainedExperts.rows_by_layer`)."""
  if plan.method == "lora":
    return lora.apply_lora(params, trainable, plan.lora_scale)
  if rows_already_written:
    merged = jax.tree_util.tree_map(lambda x: x, params)  # new containers; leaves shared, not copied
  else:
    merged = plan.experts.merge(params, trainable)
  frozen = leaves_by_path(params)
  for path, value in leaves_by_path(trainable).items():
    if plan.trains_whole(path):
      set_path(merged, path, value.astype(frozen[path].dtype))
  return merged


def validate_plan(plan: TrainPlan, config: ModelConfig, source: str = "expert config") -> None:
  """ESFT plans must name only MoE layers and existing experts."""
  for layer, ids in plan.experts.layers:
    if layer not in config.moe_layer_ids:
      raise ValueError(f"{source}: layer {layer} is not an MoE layer of this model (MoE layers: "
                       f"{config.moe_layer_ids[0]}..{config.moe_layer_ids[-1]})")
    bad = [e for e in ids if not 0 <= e < config.num_experts]
    if bad:
      raise ValueError(f"{source}: layer {layer} names expert {bad[0]}, but the model has {config.num_experts}")


def count_parameters(tree) -> int:
  return sum(int(leaf.size) for leaf in jax.tree_util.tree_leaves(tree))


def tree_bytes(tree) -> int:
  return sum(int(leaf.size) * leaf.dtype.itemsize for leaf in jax.tree_util.tree_leaves(tree))
